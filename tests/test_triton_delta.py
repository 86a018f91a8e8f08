"""``olsm.kernels.matrix.chunk_delta`` (the delta form, one effective value per token) against the
float64 reference run with the pair ``(−c k, k)``.

CPU: Triton's interpreter, float32, tolerance 1e-4 (``max|x − y| / max(1, max|y|)``), outputs,
final state and the gradient of every input (q, k, u, c, log_decay, initial_state); odd lengths,
packed sequences with an empty one, two key slices, several WY blocks, strong decays, and the
catalogue's delta members through ``Recurrence`` (backend="triton"). The same checks run in bf16
and fp32 at realistic shapes on a GPU: ``tests/test_triton_matrix_gpu.py``.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported

pytest.importorskip("triton")

from test_triton_matrix import DEVICE, TOL, _import_kernels, rel_err  # noqa: E402

from olsm.backends import reference  # noqa: E402
from olsm.errors import InputError  # noqa: E402

km = _import_kernels()
NAMES = ("q", "k", "u", "c", "log_decay", "h0", "u_scale", "kk_coef")


def delta_inputs(seed, *, B=1, T=37, H=2, K=5, V=7, decay=False, h0=True, N=None, c_max=1.0, strong=False,
                 correlated=False, u_scale=False, kk_coef=False, device="cpu"):
    """float64 ``(q, k, u, c, log_decay, h0)`` (``u_scale``: and a 7th, the per-token scale of u,
    uniform in (0, 1); ``kk_coef``: and an 8th, the normaliser's b, uniform in (0, 2), with keys
    of norms in (0.5, 2) instead of unit ones): unit keys (``correlated``: all near one
    direction), c uniform in (0, c_max), log-decays in (−0.5, 0) (``strong``: (−8, 0))."""
    g = torch.Generator(device=device).manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, device=device, dtype=torch.float64)  # noqa: E731
    q, u = rand(B, T, H, K), rand(B, T, H, V)
    k = rand(B, T, H, K)
    if correlated:
        k = rand(1, 1, H, K) + 0.3 * k
    k = F.normalize(k, dim=-1)
    c = c_max * torch.rand(B, T, H, generator=g, device=device, dtype=torch.float64)
    ld = None
    if decay:
        ld = (-8.0 if strong else -0.5) * torch.rand(B, T, H, generator=g, device=device, dtype=torch.float64)
    s0 = rand(B if N is None else N, H, K, V) if h0 else None
    if kk_coef:
        k = k * (0.5 + 1.5 * torch.rand(B, T, H, 1, generator=g, device=device, dtype=torch.float64))
        b = 2 * torch.rand(B, T, H, generator=g, device=device, dtype=torch.float64)
        return q, k, u, c, ld, s0, torch.rand(B, T, H, generator=g, device=device, dtype=torch.float64), b
    if u_scale:
        return q, k, u, c, ld, s0, torch.rand(B, T, H, generator=g, device=device, dtype=torch.float64)
    return q, k, u, c, ld, s0


def check_delta(inputs, *, chunk_size=16, cu_seqlens=None, scale=0.7, final=True, dtype=torch.float32,
                tol=TOL, err=rel_err, device=DEVICE, tols=None):
    """Run the reference (float64, pair ``(−c k, k)``) and ``chunk_delta`` (``dtype``; c, the
    log-decay and h0 in float32) on the same rounded inputs; compare o, S and every gradient
    (``tols``: per-name tolerances overriding ``tol``). Returns the errors by name."""
    low = [None if t is None else t.to(device, torch.float32 if i >= 3 else dtype).requires_grad_()
           for i, t in enumerate(inputs)]
    hi = [None if t is None else t.detach().double().requires_grad_() for t in low]
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, device=device)
    q, k, u, c, ld, s0, *us = hi
    if len(us) > 1:         # the implicit step's normaliser 1 / (1 + b ‖k‖²) on c and u_scale
        r = 1 / (1 + us[1] * (k * k).sum(-1))
        c, us = c * r, [us[0] * r]
    u_eff = u if not us else us[0][..., None] * u
    o_ref, S_ref = reference.matrix(q, k, u_eff, ld, [(-c[..., None] * k, k)], scale=scale, initial_state=s0,
                                    output_final_state=True, cu_seqlens=cu)
    q, k, u, c, ld, s0, *us = low
    o, S = km.chunk_delta(q, k, u, c, ld, scale=scale, initial_state=s0, output_final_state=final,
                          cu_seqlens=cu, chunk_size=chunk_size, u_scale=us[0] if us else None,
                          kk_coef=us[1] if len(us) > 1 else None)
    assert o.dtype == dtype and o.shape == o_ref.shape
    errs = {"o": err(o, o_ref)}
    gen = torch.Generator(device=device).manual_seed(123)
    d_o = torch.randn(o_ref.shape, generator=gen, device=device, dtype=torch.float64)
    loss_ref, loss = (o_ref * d_o).sum(), (o * d_o.to(dtype)).sum()
    if final:
        assert S.dtype == torch.float32
        errs["S"] = err(S, S_ref)
        d_S = torch.randn(S_ref.shape, generator=gen, device=device, dtype=torch.float64)
        loss_ref, loss = loss_ref + (S_ref * d_S).sum(), loss + (S * d_S.float()).sum()
    else:
        assert S is None
    live = [i for i, t in enumerate(low) if t is not None]
    g_ref = torch.autograd.grad(loss_ref, [hi[i] for i in live])
    g_out = torch.autograd.grad(loss, [low[i] for i in live])
    for i, a, b in zip(live, g_out, g_ref):
        assert a.shape == b.shape and a.dtype == low[i].dtype, NAMES[i]
        errs["d" + NAMES[i]] = err(a, b)
    limit = dict({n: tol for n in errs}, **(tols or {}))
    bad = {n: (e, limit[n]) for n, e in errs.items() if not e < limit[n]}
    assert not bad, f"errors over their tolerance (error, tolerance): {bad}"
    return errs


def pair_decay_error(inputs, *, dtype, err, device, chunk_size=64, scale=0.7):
    """Error of ∂L/∂log_decay through ``chunk_matrix`` with the pair ``(−c k, k)`` (the general
    rank-1 kernels) on the same rounded inputs and loss as :func:`check_delta`: the yardstick for
    the delta path's decay gradient in half precision, a suffix sum of cancelling per-token terms."""
    low = [None if t is None else t.to(device, torch.float32 if i >= 3 else dtype) for i, t in enumerate(inputs)]
    q, k, u, c, ld, s0, *us = low
    if us:
        u = (us[0][..., None] * u.float()).to(dtype)
    a = (-c[..., None] * k.float()).to(dtype)
    leaves = [t.detach().requires_grad_() for t in (q, k, u, a, k)] + [ld.detach().requires_grad_()]
    hi = [t.detach().double().requires_grad_() for t in leaves]
    outs = []
    for (q_, w_, u_, a_, b_, g_), fn, kw in ((hi, reference.matrix, {}), (leaves, km.chunk_matrix,
                                                                        {"chunk_size": chunk_size})):
        o, S = fn(q_, w_, u_, g_, [(a_, b_)], scale=scale, initial_state=s0 if fn is km.chunk_matrix else s0.double(),
                  output_final_state=True, **kw)
        gen = torch.Generator(device=device).manual_seed(123)
        d_o = torch.randn(o.shape, generator=gen, device=device, dtype=torch.float64)
        d_S = torch.randn(S.shape, generator=gen, device=device, dtype=torch.float64)
        loss = (o * d_o.to(o.dtype)).sum() + (S * d_S.to(S.dtype)).sum()
        outs.append(torch.autograd.grad(loss, g_)[0])
    return err(outs[1], outs[0])


CASES = [
    # (decay, chunk, make kwargs, check kwargs)
    (False, 16, {}, {}),                                               # DeltaNet / Longhorn
    (True, 16, {}, {}),                                                # gated DeltaNet
    (True, 32, {"h0": False, "B": 2}, {"final": False}),               # no initial / final state
    (False, 64, {"T": 100, "correlated": True, "H": 1}, {}),           # WY inverse over 4 blocks
    (True, 16, {"K": 80, "V": 24, "H": 1}, {}),                        # two key slices, V not 2^n
    (True, 16, {"strong": True, "c_max": 2.0, "H": 1}, {}),            # strong decays, c up to 2
    (True, 128, {"T": 150, "H": 1, "V": 40}, {}),                      # 8 blocks of 16; V in blocks of 32
    (False, 16, {"T": 1, "B": 2}, {}),                                 # one token
]


@pytest.mark.parametrize("decay,chunk,make,kw", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_matches_reference(decay, chunk, make, kw):
    check_delta(delta_inputs(len(make) + 7 * chunk, decay=decay, **make), chunk_size=chunk, **kw)


@pytest.mark.parametrize("decay", [False, True])
def test_fp32_backward_dots(decay, monkeypatch):
    # OLSM_MATRIX_DOTS=fp32 (the default is storage): the output and per-chunk backward kernels
    # take fp32 copies of their operands (float32 here, so only the code path is checked; bf16
    # numerics: the GPU tests)
    monkeypatch.setenv("OLSM_MATRIX_DOTS", "fp32")
    check_delta(delta_inputs(10, decay=decay, u_scale=True, V=20), chunk_size=16)


WY_STORAGE_CASES = [(False, "keep", False), (True, "keep", False), (True, "recompute", False), (True, "keep", True)]


@pytest.mark.parametrize("wy", ["storage", "fp32"])
@pytest.mark.parametrize("decay,save,kk", WY_STORAGE_CASES, ids=[f"{d}-{s}-{k}" for d, s, k in WY_STORAGE_CASES])
def test_wy_dots(decay, save, kk, wy, monkeypatch):
    # both OLSM_MATRIX_WY_DOTS paths: storage (the default), the WY kernel's X and Y dots on
    # storage-dtype operands with u_scale folded into T's columns, and fp32 copies (the way back);
    # also the backward's relaunch (recompute: STORE_NU) and the implicit step's normaliser
    # (kk_coef: NORM). float32 here, so the folding is what is checked; bf16 numerics:
    # test_chunk_delta_switches on the GPU (the CPU interpreter's bf16 dots are wrong,
    # chunk.interpreter_bf16_dots_ok)
    monkeypatch.setenv("OLSM_MATRIX_WY_DOTS", wy)
    monkeypatch.setenv("OLSM_MATRIX_DELTA_SAVE", save)
    check_delta(delta_inputs(21, T=45, decay=decay, u_scale=True, kk_coef=kk, V=20), chunk_size=16)
    # packed sequences with their own initial states, lengths not multiples of the chunk
    check_delta(delta_inputs(22, T=45, decay=decay, u_scale=True, kk_coef=kk, V=20, N=3), chunk_size=16,
                cu_seqlens=[0, 7, 30, 45])


@pytest.mark.parametrize("decay,kk", [(False, False), (True, True)])
def test_dw_transposed(decay, kk, monkeypatch):
    # OLSM_MATRIX_DQDW=transposed (opt-in for the delta form, whose default forms dA and dAᵀ):
    # dk formed transposed from dA alone, with the delta form's WY terms (E, T, c) and the
    # implicit step's normaliser (KK_GRAD) in that orientation
    monkeypatch.setenv("OLSM_MATRIX_DQDW", "transposed")
    check_delta(delta_inputs(23, T=45, decay=decay, u_scale=True, kk_coef=kk, V=20), chunk_size=16)
    check_delta(delta_inputs(24, T=45, decay=decay, u_scale=True, kk_coef=kk, V=20, N=3), chunk_size=16,
                cu_seqlens=[0, 7, 30, 45])


@pytest.mark.parametrize("inverse", ["rows4", "levels2", "levels3", "rows16"])
@pytest.mark.parametrize("chunk", [64, 128])
def test_wy_inverses(chunk, inverse, monkeypatch):
    # OLSM_MATRIX_INVERSE=rows4 (the default), levels2 (16 → C blocks), levels3 (4 → 16 → C),
    # rows16 (innermost blocks by row substitution) on correlated keys, where an unstable inverse
    # loses every digit
    monkeypatch.setenv("OLSM_MATRIX_INVERSE", inverse)
    check_delta(delta_inputs(chunk, T=150, H=1, decay=True, correlated=True, c_max=1.5), chunk_size=chunk)


@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("save", ["keep", "recompute"])
def test_kept_or_recomputed_x_and_nu(decay, save, monkeypatch):
    # OLSM_MATRIX_DELTA_SAVE=keep (the default): the backward reads the forward's X and ν (one WY
    # launch in all); recompute: it launches the WY kernel again (load_t), Longhorn's normalised
    # coefficients formed in torch for it
    monkeypatch.setenv("OLSM_MATRIX_DELTA_SAVE", save)
    import olsm.kernels.matrix.delta as D
    launches = []
    real = D.launch_wy
    monkeypatch.setattr(D, "launch_wy", lambda *a, **kw: launches.append(kw.get("load_t", False)) or real(*a, **kw))
    check_delta(delta_inputs(11, decay=decay, u_scale=True, T=45), chunk_size=16)
    check_delta(delta_inputs(12, decay=decay, kk_coef=True, T=61, N=4), cu_seqlens=(0, 9, 9, 46, 61))
    assert launches == ([False, False] if save == "keep" else [False, True, False, True])


@pytest.mark.parametrize("decay", [False, True])
def test_packed_sequences_with_an_empty_one(decay):
    cu = (0, 9, 9, 46, 61)
    check_delta(delta_inputs(3, T=61, N=4, decay=decay), cu_seqlens=cu)


@pytest.mark.parametrize("decay", [False, True])
def test_state_passes_split_along_the_sequence(decay, monkeypatch):
    # OLSM_MATRIX_STATE=split: the delta form's forward state pass and reverse pass cut into
    # segments, each also walking its [K, K] transition (kernels/matrix/split.py); packed with an
    # empty sequence, no initial state, strong decays, and the implicit normaliser
    from test_triton_matrix import spy_split

    ran = spy_split(monkeypatch)
    check_delta(delta_inputs(31, T=150, H=2, decay=decay), chunk_size=16)
    check_delta(delta_inputs(32, T=230, N=4, decay=decay, h0=False), cu_seqlens=(0, 20, 20, 211, 230))
    check_delta(delta_inputs(33, T=300, H=1, decay=decay, strong=decay, kk_coef=True, K=16, V=12),
                chunk_size=32, final=False)
    assert ran == [True] * 6, ran


@pytest.mark.parametrize("state", ["walk", "split"])
def test_walks_read_a_precomputed_cumulative_decay(state, monkeypatch):
    # OLSM_MATRIX_WALK_DECAY=cumsum_all (opt-in): the delta form's forward and reverse walks read
    # G made once by perkey.chunk_cumsum (fused.walk_log_decay), whole or in segments; short last
    # chunks, packed sequences with an empty one, strong decays
    from test_triton_matrix import spy_split, spy_walk_decay

    delta = importlib.import_module("olsm.kernels.matrix.delta")
    seen = spy_walk_decay(monkeypatch, delta, delta)
    monkeypatch.setenv("OLSM_MATRIX_WALK_DECAY", "cumsum_all")
    ran = spy_split(monkeypatch) if state == "split" else None
    if ran is None:
        monkeypatch.setenv("OLSM_MATRIX_STATE", "walk")
    check_delta(delta_inputs(41, T=150, H=2, decay=True, strong=True), chunk_size=16)
    check_delta(delta_inputs(42, T=61, N=4, decay=True), cu_seqlens=(0, 9, 9, 46, 61))
    assert seen and all(seen), seen
    assert ran is None or ran[:2] == [True, True], ran     # the 10-chunk sequence splits
    seen.clear()
    check_delta(delta_inputs(43, T=45, decay=False), chunk_size=16)    # no decay: nothing to read
    assert seen and not any(seen), seen


def test_auto_splits_only_the_forward_without_decay_at_few_programs(monkeypatch):
    # OLSM_MATRIX_STATE unset: the delta form's forward state pass is split when it has at most
    # half an SM's worth of programs and no decay; its reverse pass, a decay or more programs walk
    from test_triton_matrix import spy_split

    ran = spy_split(monkeypatch)
    monkeypatch.delenv("OLSM_MATRIX_STATE")
    check_delta(delta_inputs(34, T=150, H=1), chunk_size=16)
    assert ran == [True], ran            # the forward only
    ran.clear()
    check_delta(delta_inputs(35, T=150, H=1, decay=True), chunk_size=16)
    assert ran == [], ran
    split = importlib.import_module("olsm.kernels.matrix.split")
    monkeypatch.setattr(split, "sm_count", lambda device: 1)       # 1 program: more than half of 1 SM
    check_delta(delta_inputs(36, T=150, H=1), chunk_size=16)
    assert ran == [], ran


@pytest.mark.parametrize("decay,chunk", [(False, 16), (True, 32)])
def test_value_scale_in_kernel(decay, chunk):
    # u_scale: the written value s ⊙ u is formed in the kernels (DeltaNet's β v), gradient to s
    check_delta(delta_inputs(4, decay=decay, u_scale=True, V=20), chunk_size=chunk)
    check_delta(delta_inputs(5, T=61, N=4, decay=decay, u_scale=True), cu_seqlens=(0, 9, 9, 46, 61))


@pytest.mark.parametrize("decay,chunk", [(False, 16), (True, 32), (True, 64)])
def test_implicit_normaliser_in_kernel(decay, chunk):
    # kk_coef: c and u_scale divided by 1 + b ‖k‖² inside the kernels (Longhorn's ε), keys of
    # norms 0.5..2 so that ‖k‖² matters; gradients to c, u_scale, b and (through ‖k‖²) to k
    check_delta(delta_inputs(6, decay=decay, kk_coef=True, V=20, K=12), chunk_size=chunk)
    check_delta(delta_inputs(7, T=61, N=4, decay=decay, kk_coef=True), cu_seqlens=(0, 9, 9, 46, 61))


def test_implicit_normaliser_on_the_fallback(monkeypatch):
    # the general-pair fallback forms the same normaliser in torch
    monkeypatch.setenv("OLSM_MATRIX_PATH", "general")
    check_delta(delta_inputs(8, decay=True, kk_coef=True))


def test_backward_out_of_resources_falls_back_to_the_pair(monkeypatch):
    # a GPU whose shared memory is too small for the delta backward's tiles: the gradients come
    # from the general pair instead, still right
    import importlib

    from triton.runtime.errors import OutOfResources

    mod = importlib.import_module("olsm.kernels.matrix.delta")

    def refuse(*a, **kw):
        raise OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(mod, "delta_backward", refuse)
    check_delta(delta_inputs(6, decay=True, u_scale=True))


def test_partial_gradients_and_other_coefficient_dtypes():
    # only some inputs need a gradient; c in bf16 and the log-decay in float64 (used in fp32,
    # gradients returned in their own dtype)
    q, k, u, c, ld, s0 = (t if t is None else t.float() for t in delta_inputs(8, decay=True, T=40))
    c, ld = c.bfloat16(), ld.double()
    ref = [t.detach().clone().requires_grad_(i in (0, 3, 4)) for i, t in enumerate((q, k, u, c, ld))]
    o, _ = km.chunk_delta(*ref, initial_state=s0, chunk_size=16)
    o.square().sum().backward()
    assert ref[1].grad is None and ref[2].grad is None
    assert ref[3].grad.dtype == torch.bfloat16 and ref[4].grad.dtype == torch.float64
    hi = [t.detach().double().requires_grad_(i in (0, 3, 4)) for i, t in enumerate((q, k, u, c, ld))]
    o_ref, _ = reference.matrix(hi[0], hi[1], hi[2], hi[4], [(-hi[3][..., None] * hi[1], hi[1])], scale=1.0,
                                initial_state=s0.double())
    o_ref.square().sum().backward()
    for i in (0, 3, 4):
        assert rel_err(ref[i].grad.float(), hi[i].grad) < (2e-2 if i == 3 else TOL), NAMES[i]


def _count_delta_calls(monkeypatch):
    import importlib

    mod = importlib.import_module("olsm.kernels.matrix.delta")
    calls = []
    for name in ("delta_forward", "delta_backward"):
        real = getattr(mod, name)

        def counted(*a, _real=real, _name=name, **kw):
            calls.append(_name)
            return _real(*a, **kw)

        monkeypatch.setattr(mod, name, counted)
    return calls


def test_general_path_switch_falls_back_to_the_pair(monkeypatch):
    calls = _count_delta_calls(monkeypatch)
    check_delta(delta_inputs(5, decay=True))
    assert calls == ["delta_forward", "delta_backward"]
    calls.clear()
    monkeypatch.setenv("OLSM_MATRIX_PATH", "general")
    check_delta(delta_inputs(5, decay=True))
    assert calls == []


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet", "longhorn", "gated_longhorn"])
def test_catalogue_delta_members_take_chunk_delta(name, monkeypatch):
    import olsm
    import olsm.objectives as objectives

    rec = olsm.derive(getattr(objectives, name))
    assert rec.is_delta_form
    calls = _count_delta_calls(monkeypatch)
    B, T, H, K, V = 1, 21, 2, 4, 6
    gen = torch.Generator().manual_seed(0)
    q, v = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, V, generator=gen)
    # keys of norms 0.5..2: Longhorn's ε = β / (1 + β kᵀk) then depends on them
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    k = k * (0.5 + 1.5 * torch.rand(B, T, H, 1, generator=gen))
    coefs = {s.name: torch.rand(B, T, H, generator=gen) * 0.9 + 0.05 for s in rec.inputs}
    coefs = {n: (-x if n.startswith("log") else x) for n, x in coefs.items()}   # log-decays <= 0
    leaves = dict(q=q, k=k, v=v, **coefs)
    outs = {}
    for backend in ("triton", "reference"):
        ls = {n: t.clone().requires_grad_() for n, t in leaves.items()}
        o, _ = rec(ls["q"], ls["k"], ls["v"], backend=backend, chunk_size=16,
                   **{n: ls[n] for n in coefs})
        o.pow(2).sum().backward()
        outs[backend] = [o.detach()] + [ls[n].grad for n in leaves]
    for a, b in zip(outs["triton"], outs["reference"]):
        assert rel_err(a, b.double()) < TOL
    assert calls == ["delta_forward", "delta_backward"]
    assert not olsm.derive(objectives.kda).is_delta_form and not olsm.derive(objectives.mamba2).is_delta_form


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet", "longhorn", "gated_longhorn"])
def test_delta_path_makes_no_float_copies(name, monkeypatch):
    # the delta path hands k and v to the kernels as given: no float copy of k or v is made (each
    # a [B, T, H, D] pass in the layer's forward and backward), and no kᵀk: Longhorn's
    # ε = β / (1 + β kᵀk) goes to the kernels as c = s = b = β (kk_coef)
    import olsm
    import olsm.materialize as M
    import olsm.objectives as objectives

    rec = olsm.derive(getattr(objectives, name))
    envs = []
    real = M.build_env
    monkeypatch.setattr(M, "build_env", lambda *a: envs.append(real(*a)) or envs[-1])
    k, v = F.normalize(torch.randn(1, 5, 2, 4), dim=-1).bfloat16(), torch.randn(1, 5, 2, 3).bfloat16()
    coefs = {s.name: torch.rand(1, 5, 2) * (-1 if s.name.startswith("log") else 1) for s in rec.inputs}
    t = M.materialize(rec, k, v, coefs, torch.float32, delta=True)
    assert t["w"] is k and t["u"] is v
    assert set(envs[0]) - {s.symbol.name for s in rec.inputs} == set()
    assert ("kk_coef" in t) == ("longhorn" in name)
    # one expression, one tensor: chunk_delta then returns its gradient once (summed in fp32)
    # instead of autograd adding one per place (test_tied_coefficients_get_one_gradient)
    c, s, b = M.delta_coefficients(rec)
    assert (t.get("u_scale") is t["c"]) == (s == c)
    assert (b is not None and t["kk_coef"] is t.get("u_scale")) == (b is not None and b == s)


def test_second_derivative_is_refused():
    q, k, u, c, ld, s0 = (t.float().requires_grad_() for t in delta_inputs(9, T=8, h0=True, decay=True))
    o, _ = km.chunk_delta(q, k, u, c, ld, initial_state=s0)
    (g,) = torch.autograd.grad(o.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|double backward"):
        g.sum().backward()


def test_unknown_switch_value_is_a_clear_error(monkeypatch):
    from olsm.errors import BackendError

    q, k, u, c, ld, s0 = (t.float().requires_grad_() for t in delta_inputs(11, T=8, decay=True))
    monkeypatch.setenv("OLSM_MATRIX_DOTS", "bf16")
    with pytest.raises(BackendError, match="OLSM_MATRIX_DOTS='bf16' is not one of"):
        km.chunk_delta(q, k, u, c, ld, initial_state=s0)


def test_bad_coefficient_is_a_clear_error():
    q, k, u, c, ld, s0 = (t if t is None else t.float() for t in delta_inputs(0, T=8))
    with pytest.raises(InputError, match="c must be"):
        km.chunk_delta(q, k, u, c[..., None], ld)
    with pytest.raises(InputError, match="c must be"):
        km.chunk_delta(q, k, u, 0.5, ld)
    with pytest.raises(InputError, match="floating point"):
        km.chunk_delta(q, k, u, (c > 0.5).int(), ld)
    with pytest.raises(InputError, match="u_scale must be"):
        km.chunk_delta(q, k, u, c, ld, u_scale=c[:, :-1])


# which leaf each of (c, u_scale, kk_coef) is: "x" one tensor passed in several places, "c", "s",
# "b" others
SHARES = {"all": ("x", "x", "x"),                   # Longhorn: c = u_scale = kk_coef = β
          "deltanet": ("x", "x", None),              # DeltaNet: c = u_scale = β
          "u_scale_and_kk_coef": ("c", "x", "x"),
          "c_and_u_scale": ("x", "x", "b"),
          "c_and_kk_coef": ("x", "s", "x"),          # tied positions not next to each other
          "c_and_kk_coef_only": ("x", None, "x")}


@pytest.mark.parametrize("share", list(SHARES))
@pytest.mark.parametrize("decay", [False, True])
def test_one_tensor_as_several_coefficients(decay, share, coef_dtype=torch.float32, T=45, tol=1e-5):
    # Longhorn passes β as c, u_scale and kk_coef: the kernels then read one fp32 copy
    # (delta._operands) and its gradient is the sum of the three (formed once in fp32 by
    # delta_backward, not by autograd); the same as equal copies. Also tensors shared by two of
    # the three, next to each other or not
    km = _import_kernels()
    q, k, u, c, ld, s0, s, b = delta_inputs(21, T=T, decay=decay, kk_coef=True)
    x = (c + s) / 2
    leaves = [t.to(DEVICE, torch.float32) for t in (q, k, u)] + [t.to(DEVICE, coef_dtype) for t in (c, s, b, x)]
    ld = None if ld is None else ld.to(DEVICE, torch.float32)
    roles = SHARES[share]

    def run(copies):
        q_, k_, u_, *coefs = (t.detach().clone().requires_grad_() for t in leaves)
        named = dict(zip("csbx", coefs))
        # as copies, each place of "x" gets its own clone (autograd sums their gradients)
        args = [None if r is None else named[r].clone() if copies and r == "x" else named[r] for r in roles]
        o, S = km.chunk_delta(q_, k_, u_, args[0], ld, u_scale=args[1], kk_coef=args[2], output_final_state=True,
                              chunk_size=16)
        (o.square().sum() + S.sum()).backward()
        used = [t for n, t in zip("csbx", coefs) if n in roles]
        return [o, S, q_.grad, k_.grad, u_.grad] + [t.grad for t in used]

    for i, (a, b) in enumerate(zip(run(False), run(True))):
        assert a.dtype == b.dtype, i
        assert rel_err(a, b.double()) < tol, i


@pytest.mark.parametrize("share", ["all", "deltanet"])
def test_one_half_precision_tensor_as_several_coefficients(share):
    # β in bf16 (q, k, u fp32): one gradient in bf16, summed in fp32 before the rounding (equal
    # copies round each part first, so the two agree to bf16's resolution); B·T·H a multiple of 4
    # here, so the coefficient buffer's rows are not padded
    test_one_tensor_as_several_coefficients(True, share, coef_dtype=torch.bfloat16, T=48, tol=2e-2)


@pytest.mark.parametrize("share", list(SHARES))
def test_tied_coefficients_get_one_gradient(share, monkeypatch):
    # the backward converts no coefficient again (the forward's fp32 copies are kept) and returns
    # a tensor passed as several of c, u_scale, kk_coef one summed gradient, at its first
    # position, None at the others; distinct tensors each get their own
    import importlib

    mod = importlib.import_module("olsm.kernels.matrix.delta")
    flats, outs = [], []
    real_flat, real_bwd = mod._flat_c, mod.delta_backward
    monkeypatch.setattr(mod, "_flat_c", lambda *a: flats.append(1) or real_flat(*a))
    monkeypatch.setattr(mod, "delta_backward", lambda *a, **kw: outs.append(real_bwd(*a, **kw)) or outs[-1])
    q, k, u, c, _, _, s, b = (t if t is None else t.float().requires_grad_()
                              for t in delta_inputs(4, T=20, kk_coef=True, h0=False))
    roles = SHARES[share]
    named = dict(c=c, s=s, b=b, x=(c + s).detach().requires_grad_())
    args = [None if r is None else named[r] for r in roles]
    o, _ = km.chunk_delta(q, k, u, args[0], None, u_scale=args[1], kk_coef=args[2], chunk_size=16)
    n_fwd = len(flats)
    assert n_fwd == len({id(t) for t in args if t is not None})       # one fp32 copy per distinct tensor
    o.square().sum().backward()
    assert len(flats) == n_fwd                                         # none in the backward
    (grads,) = outs
    first = {}
    for pos, t in zip((3, 6, 7), args):
        if t is None:
            assert grads[pos] is None
        elif id(t) in first:
            assert grads[pos] is None, (share, pos)
        else:
            first[id(t)] = pos
            assert grads[pos] is not None and grads[pos].shape == t.shape, (share, pos)
