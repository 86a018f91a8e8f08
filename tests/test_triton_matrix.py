"""The Triton matrix-class kernel (``olsm.kernels.matrix.chunk_matrix``) against the reference.

On a machine without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``,
set below before any kernel module is imported; Triton picks the interpreter when a kernel is
decorated). The interpreter is slow and only float32 works there, so shapes are tiny (B, H of
1-2, T = 37 with chunks of 16 or 32) and the cases cover every specialisation once:
decay none / scalar / per-key x low rank none / delta form / general, plus Longhorn, packed
sequences, initial states, odd lengths, K != V (non-powers of two) and the error paths.

Each case compares, against the float64 reference, the outputs, the final state and the
gradient of every input (q, w, u, log_decay, each a and b, initial_state) with
``max|x - y| / max(1, max|y|) < 1e-4``.

bf16/fp16/fp32 at realistic shapes on the GPU: ``tests/test_triton_matrix_gpu.py``.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import pathlib
import sys
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    # must precede the import of any kernel module (the decorator picks the interpreter)
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from olsm.backends import reference  # noqa: E402
from olsm.errors import BackendError, InputError  # noqa: E402


def _import_kernels():
    """``olsm.kernels.matrix``; from the source tree when olsm is not pip-installed (the
    package-dir mapping kernels/ -> olsm.kernels exists only in an installed olsm)."""
    try:
        return importlib.import_module("olsm.kernels.matrix")
    except ModuleNotFoundError:
        root = pathlib.Path(__file__).resolve().parents[1] / "kernels"
        spec = importlib.util.spec_from_file_location(
            "olsm.kernels", root / "__init__.py", submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["olsm.kernels"] = module
        spec.loader.exec_module(module)
        return importlib.import_module("olsm.kernels.matrix")


km = _import_kernels()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4
CU_SEQLENS = (0, 9, 46, 61)  # three packed sequences of odd lengths 9, 37, 15


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    """``max|x - y| / max(1, max|y|)``; ``y`` is the reference."""
    return ((x.double() - y.double()).abs().max() / y.abs().max().clamp_min(1.0)).item()


def make_inputs(seed, *, B=1, T=37, H=2, K=5, V=7, decay="none", lowrank="none", h0=True,
                N=None, strong=False):
    """float64 inputs of one catalogue member.

    decay: none | scalar | key. lowrank: none | delta (Gated DeltaNet form: a = -α β k, b = k,
    w = k, u = β v) | longhorn (a = -ε k, b = k, u = ε v, ε = β / (1 + β kᵀk)) | general
    (rank 1) | general2 (rank 2). Returns (q, w, u, log_decay, lowrank pairs, initial_state).
    """
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, w, u = rand(B, T, H, K), rand(B, T, H, K) / K ** 0.5, rand(B, T, H, V)
    log_decay = None
    lo = -8.0 if strong else -0.5
    if decay == "scalar":
        log_decay = lo * torch.rand(B, T, H, generator=g, dtype=torch.float64)
    elif decay == "key":
        log_decay = lo * torch.rand(B, T, H, K, generator=g, dtype=torch.float64)
    pairs = []
    if lowrank in ("delta", "longhorn"):
        k = torch.nn.functional.normalize(rand(B, T, H, K), dim=-1)
        beta = torch.rand(B, T, H, 1, generator=g, dtype=torch.float64)
        if lowrank == "longhorn":
            beta = beta / (1 + beta * (k * k).sum(-1, keepdim=True))
        alpha = 1.0 if decay != "scalar" else log_decay.exp()[..., None]
        pairs = [(-alpha * beta * k, k)]
        w, u = k, beta * u   # scalar decay: α(I − βkkᵀ)S + βkvᵀ = αS − αβ k (kᵀS) + βkvᵀ
    elif lowrank.startswith("general"):
        pairs = [(0.4 * rand(B, T, H, K), 0.4 * rand(B, T, H, K))
                 for _ in range(2 if lowrank == "general2" else 1)]
    n = B if N is None else N
    s0 = rand(n, H, K, V) if h0 else None
    return q, w, u, log_decay, pairs, s0


def check(inputs, *, chunk_size=16, cu_seqlens=None, scale=0.7, final=True, dtype=torch.float32):
    """Run reference (float64) and kernel (``dtype``) on ``inputs``; compare o, S and grads."""
    q, w, u, g, pairs, s0 = inputs
    leaves64 = [q, w, u, g, *[t for p in pairs for t in p], s0]
    leaves64 = [None if t is None else t.detach().clone().requires_grad_() for t in leaves64]
    leaves = [None if t is None else t.detach().to(DEVICE, dtype).requires_grad_() for t in leaves64]

    def call(fn, ls, **kw):
        q_, w_, u_, g_, *rest = ls
        lr, h0 = rest[:-1], rest[-1]
        pairs_ = [(lr[2 * i], lr[2 * i + 1]) for i in range(len(lr) // 2)]
        cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, device=q_.device)
        return fn(q_, w_, u_, g_, pairs_, scale=scale, initial_state=h0, output_final_state=final,
                  cu_seqlens=cu, **kw)

    o_ref, S_ref = call(reference.matrix, leaves64)
    o, S = call(km.chunk_matrix, leaves, chunk_size=chunk_size)
    assert o.dtype == dtype and o.shape == o_ref.shape
    assert rel_err(o.cpu(), o_ref) < TOL, "outputs"
    gen = torch.Generator().manual_seed(123)
    d_o = torch.randn(o_ref.shape, generator=gen, dtype=torch.float64)
    loss_ref = (o_ref * d_o).sum()
    loss = (o * d_o.to(DEVICE, dtype)).sum()
    if final:
        assert S.dtype == torch.float32 and S.shape == S_ref.shape
        assert rel_err(S.cpu(), S_ref) < TOL, "final state"
        d_S = torch.randn(S_ref.shape, generator=gen, dtype=torch.float64)
        loss_ref = loss_ref + (S_ref * d_S).sum()
        loss = loss + (S * d_S.to(DEVICE)).sum()
    else:
        assert S is None
    live = [i for i, t in enumerate(leaves64) if t is not None]
    grads_ref = torch.autograd.grad(loss_ref, [leaves64[i] for i in live])
    grads = torch.autograd.grad(loss, [leaves[i] for i in live])
    names = ["q", "w", "u", "log_decay"] + [f"lowrank{i}" for i in range(len(leaves) - 5)] + ["h0"]
    for i, a, b in zip(live, grads, grads_ref):
        assert a.shape == b.shape
        assert rel_err(a.cpu(), b) < TOL, f"gradient of {names[i]}: {rel_err(a.cpu(), b):.2e}"


CASES = [
    # (decay, lowrank, chunk_size, extra make_inputs kwargs): the catalogue, one case each
    ("none", "none", 16, {}),                       # linear attention
    ("scalar", "none", 16, {}),                     # RetNet / Mamba2
    ("key", "none", 32, {}),                        # GLA, two sub-blocks: off-diagonal path
    ("none", "delta", 16, {}),                      # DeltaNet
    ("scalar", "delta", 16, {}),                    # Gated DeltaNet
    ("key", "delta", 16, {"H": 1}),                 # gated delta with per-key decay (KDA-like)
    ("none", "longhorn", 16, {"B": 2, "H": 1}),     # Longhorn
    ("none", "general2", 16, {"H": 1}),             # DeltaProduct-like rank 2
    ("scalar", "general", 32, {"H": 1, "K": 16, "V": 16}),
    ("key", "general", 32, {"H": 1, "K": 9, "V": 20}),   # RWKV-7-like DPLR
]


@pytest.mark.parametrize("decay,lowrank,chunk,kw", CASES, ids=[f"{c[0]}-{c[1]}-C{c[2]}" for c in CASES])
def test_matches_reference(decay, lowrank, chunk, kw):
    check(make_inputs(zlib.crc32(f"{decay}{lowrank}".encode()), decay=decay, lowrank=lowrank, **kw), chunk_size=chunk)


@pytest.mark.parametrize("decay,lowrank", [("none", "none"), ("scalar", "none"), ("scalar", "delta"), ("key", "general")])
def test_packed_sequences(decay, lowrank):
    T = CU_SEQLENS[-1]
    check(make_inputs(7, T=T, H=1, decay=decay, lowrank=lowrank, N=len(CU_SEQLENS) - 1),
          cu_seqlens=CU_SEQLENS)


def test_no_initial_state_no_final_state_short_sequence():
    # T < chunk and T = 1, without initial state and without the final state's gradient
    check(make_inputs(3, T=5, decay="scalar", lowrank="delta", h0=False), final=False)
    check(make_inputs(4, T=1, decay="key", lowrank="none", h0=False, H=1), final=True)


@pytest.mark.parametrize("decay", ["none", "scalar"])
def test_fp32_dots_without_a_pair(decay, monkeypatch):
    # OLSM_MATRIX_DOTS=fp32 (the default is storage): the rank-0 forward state and output kernels
    # take fp32 copies of their operands (float32 here: the code path only; bf16 numerics in the
    # GPU tests)
    monkeypatch.setenv("OLSM_MATRIX_DOTS", "fp32")
    check(make_inputs(31, decay=decay), chunk_size=16)


@pytest.mark.parametrize("decay", ["none", "scalar", "key"])
def test_storage_dots_in_the_rank0_backward(decay, monkeypatch):
    # OLSM_MATRIX_BWD_DOTS: storage (the default) gives the rank-0 dq/dw kernel's dA products and
    # the du kernel storage-dtype operands, fp32 their fp32 copies (float32 here: the code paths
    # and the switch's wiring; bf16 numerics in the GPU tests)
    fb = importlib.import_module("olsm.kernels.matrix.fused_bwd")
    seen = {}
    for name in ("_dqdw_bwd_kernel", "_du_bwd_kernel"):
        real = getattr(fb, name)

        class Spy:   # records the LOWP each launch is given
            def __getitem__(self, grid, _real=real, _name=name):
                def run(*a, **kw):
                    seen.setdefault(_name, []).append(kw.get("LOWP", False))
                    return _real[grid](*a, **kw)
                return run

        monkeypatch.setattr(fb, name, Spy())
    monkeypatch.delenv("OLSM_MATRIX_BWD_DOTS", raising=False)
    check(make_inputs(32, decay=decay), chunk_size=16)
    assert seen == {"_dqdw_bwd_kernel": [True], "_du_bwd_kernel": [True]}   # the default: storage
    monkeypatch.setenv("OLSM_MATRIX_BWD_DOTS", "fp32")
    seen.clear()
    check(make_inputs(33, decay=decay), chunk_size=16)
    assert seen == {"_dqdw_bwd_kernel": [False], "_du_bwd_kernel": [False]}


def spy_walk_decay(monkeypatch, fwd_module, bwd_module) -> list:
    """Record the ``G_CUM`` of every forward-state (``fwd_module._launch_state``) and reverse
    (``bwd_module.launch_dstate``) walk launch; returns the list they append to."""
    seen = []
    for mod, name in ((fwd_module, "_launch_state"), (bwd_module, "launch_dstate")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda grid, args, _real=real, **kw: seen.append(kw["G_CUM"]) or _real(grid, args, **kw))
    return seen


@pytest.mark.parametrize("split", [False, True])
def test_walks_read_a_precomputed_cumulative_decay(split, monkeypatch):
    # OLSM_MATRIX_WALK_DECAY=cumsum: the rank-0 walks with a scalar decay (forward state, reverse
    # dS; whole or in segments) read G made once by perkey.chunk_cumsum instead of summing each
    # chunk's steps inline, on a short last chunk (T = 45 at C = 16) and packed sequences (the
    # chunks' totals at their last tokens). A pair keeps the inline sums (fused.walk_log_decay).
    seen = spy_walk_decay(monkeypatch, importlib.import_module("olsm.kernels.matrix.fused"),
                          importlib.import_module("olsm.kernels.matrix.fused_bwd"))
    monkeypatch.setenv("OLSM_MATRIX_WALK_DECAY", "cumsum")
    # G is made once per forward and kept for the backward's walk (fused_backward's kept)
    perkey = importlib.import_module("olsm.kernels.matrix.perkey")
    made, real_cumsum = [], perkey.chunk_cumsum
    monkeypatch.setattr(perkey, "chunk_cumsum", lambda *a: made.append(a[4]) or real_cumsum(*a))
    ran = spy_split(monkeypatch) if split else None     # 10 chunks of 16: two segments
    check(make_inputs(34, T=157 if split else 45, decay="scalar"), chunk_size=16)
    if not split:
        check(make_inputs(35, T=CU_SEQLENS[-1], H=1, decay="scalar", N=len(CU_SEQLENS) - 1), chunk_size=16,
              cu_seqlens=CU_SEQLENS)
    # two checks × (forward, reverse) walked whole, or one check × two segment launches each
    assert seen == [True] * 4, seen
    assert made == [1] * (1 if split else 2), made
    assert ran is None or ran == [True, True], ran
    seen.clear()
    check(make_inputs(36, T=45, decay="scalar", lowrank="delta"), chunk_size=16)
    assert len(seen) >= 2 and not any(seen), seen
    # cumsum_all (opt-in): the fused path's walks with a pair read G as well
    monkeypatch.setenv("OLSM_MATRIX_WALK_DECAY", "cumsum_all")
    seen.clear()
    check(make_inputs(38, T=45, decay="scalar", lowrank="general"), chunk_size=16)
    assert len(seen) >= 2 and all(seen), seen
    monkeypatch.setenv("OLSM_MATRIX_WALK_DECAY", "cumsums")
    with pytest.raises(BackendError, match="OLSM_MATRIX_WALK_DECAY='cumsums'"):
        check(make_inputs(37, decay="scalar"), chunk_size=16)


def test_walk_decay_default_reads_cumulative_decay_at_narrow_key_blocks(monkeypatch):
    # OLSM_MATRIX_WALK_DECAY=auto (the default) reads G at key blocks of at most 32 (the
    # few-program launches, where it was faster on the H200) and sums inline above; cumsum up to
    # 64; inline never; a pair or no scalar decay always sums inline (fused.walk_log_decay)
    fused = importlib.import_module("olsm.kernels.matrix.fused")
    g = torch.zeros(8, 2)
    monkeypatch.setattr(fused.perkey, "chunk_cumsum", lambda *a: "G")
    cases = {("auto", 32): True, ("auto", 64): False, ("cumsum", 64): True, ("cumsum", 128): False,
             ("inline", 32): False}
    for (mode, BK), want in cases.items():
        monkeypatch.setenv("OLSM_MATRIX_WALK_DECAY", mode)
        got = fused.walk_log_decay(g, fused.DECAY_SCALAR, False, BK, None, None, 2, 16)
        assert got == (("G", True) if want else (g, False)), (mode, BK, got)
        assert fused.walk_log_decay(g, fused.DECAY_SCALAR, True, BK, None, None, 2, 16)[1] is False
        assert fused.walk_log_decay(g, fused.DECAY_PER_KEY, False, BK, None, None, 2, 16)[1] is False
    monkeypatch.delenv("OLSM_MATRIX_WALK_DECAY")
    assert fused.walk_log_decay(g, fused.DECAY_SCALAR, False, 32, None, None, 2, 16)[1] is True


@pytest.mark.parametrize("levels", ["levels2", "levels3", "rows16", "rows4"])
@pytest.mark.parametrize("chunk", [16, 64, 128])
def test_fused_wy_inverse_over_several_blocks(chunk, levels, monkeypatch):
    # the fused WY kernel inverts I − L in blocks (kernels/matrix/fused.py, _unit_lower_inverse:
    # 16-row blocks, or 4 → 16 → C with OLSM_MATRIX_INVERSE=levels3; rows16 / rows4 (the
    # default): the innermost blocks by row substitution on a 3-D tile instead of dots): C = 64 and 128 take 4 and 8
    # blocks of 16; K = 5 unit keys over 150 tokens are often nearly parallel, the case where an
    # unstable inverse (e.g. the power series of L) loses every digit
    monkeypatch.setenv("OLSM_MATRIX_INVERSE", levels)
    check(make_inputs(12, T=150, H=1, decay="scalar", lowrank="delta"), chunk_size=chunk)
    check(make_inputs(13, T=150, H=1, decay="none", lowrank="longhorn"), chunk_size=chunk)


def test_strong_per_key_decay_stays_finite():
    # per-step log-decays down to -8: exponents of the factored form would overflow float32 if
    # taken from the chunk start; the sub-block reference points keep them <= 0
    check(make_inputs(5, H=1, decay="key", lowrank="general", strong=True), chunk_size=64)


@pytest.mark.parametrize("bwd", ["auto", "autograd"])
def test_second_derivative_is_refused(bwd, monkeypatch):
    # neither the Triton backward nor the autograd one behind it is differentiable again: asking
    # for a second derivative must raise, not return zeros
    monkeypatch.setenv("OLSM_MATRIX_BWD", bwd)
    q, w, u, g, pairs, s0 = make_inputs(41, T=20, decay="scalar", lowrank="delta")
    q = q.float().requires_grad_()
    o, _ = km.chunk_matrix(q, w.float(), u.float(), g.float(), [(a.float(), b.float()) for a, b in pairs])
    (dq,) = torch.autograd.grad(o.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):
        dq.sum().backward()


def test_non_contiguous_inputs():
    q, w, u, g, pairs, s0 = make_inputs(6, decay="scalar")
    q = q.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    u = u.transpose(2, 3).contiguous().transpose(2, 3)
    assert not u.is_contiguous()
    check((q, w, u, g, pairs, s0))


def _small(dtype=torch.float32, K=4, V=4):
    return (torch.randn(1, 3, 1, K, dtype=dtype), torch.randn(1, 3, 1, K, dtype=dtype),
            torch.randn(1, 3, 1, V, dtype=dtype))


def test_errors(monkeypatch):
    q, w, u = _small()
    with pytest.raises(InputError, match="dtype"):
        km.chunk_matrix(q, w.double(), u)
    with pytest.raises(InputError, match="dtype"):
        km.chunk_matrix(q, w.half(), u)
    with pytest.raises(InputError, match="chunk_size"):
        km.chunk_matrix(q, w, u, chunk_size=24)
    with pytest.raises(InputError, match="shape"):
        km.chunk_matrix(q, w[:, :2], u)
    with pytest.raises(InputError, match="B == 1"):
        km.chunk_matrix(*(torch.cat([t, t]) for t in (q, w, u)), cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(BackendError, match="256"):
        km.chunk_matrix(*_small(K=4, V=300))
    if DEVICE == "cpu":
        # bfloat16 in an interpreter whose bf16 dots are wrong (Triton 3.9: values of order 1e10)
        # is refused; the probe is a real dot, so an interpreter that gets them right is let through.
        # This interpreter, for real: refused, or (a fixed Triton) right to bf16 accuracy
        from olsm.kernels.matrix.chunk import interpreter_bf16_dots_ok

        low = [t.bfloat16() for t in (q, w, u)]
        if interpreter_bf16_dots_ok():
            o_ref = km.chunk_matrix(*(t.float() for t in low))[0]
            assert rel_err(km.chunk_matrix(*low)[0].float(), o_ref) < 2e-2
        else:
            with pytest.raises(BackendError, match="bfloat16 operands wrongly; pass float32"):
                km.chunk_matrix(*low)
        for ok in (False, True):
            monkeypatch.setattr("olsm.kernels.matrix.chunk.interpreter_bf16_dots_ok", lambda ok=ok: ok)
            if ok:
                assert km.chunk_matrix(*(t.bfloat16() for t in (q, w, u)))[0].dtype == torch.bfloat16
            else:
                for call in (lambda: km.chunk_matrix(*(t.bfloat16() for t in (q, w, u))),
                             lambda: km.chunk_delta(*(t.bfloat16() for t in (q, w, u)), torch.rand(q.shape[:3]))):
                    with pytest.raises(BackendError, match="bfloat16 operands wrongly; pass float32"):
                        call()
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(BackendError, match="CUDA"):
            km.chunk_matrix(q, w, u)
    monkeypatch.setattr(triton, "__version__", "2.1.0")
    with pytest.raises(BackendError, match="too old"):
        km.chunk_matrix(q, w, u)


def test_code_path_switches_refuse_unknown_values(monkeypatch):
    # OLSM_MATRIX_PATH / _SOLVE / _BWD / _INVERSE select code paths for A/B timing; a typo must not
    # silently time the default path
    q, w, u = (t.to(DEVICE).requires_grad_() for t in _small())
    for name in ("OLSM_MATRIX_PATH", "OLSM_MATRIX_BWD"):      # read in the forward / the backward
        monkeypatch.setenv(name, "tritn")
        with pytest.raises(BackendError, match=f"{name}='tritn' is not one of"):
            o, _ = km.chunk_matrix(q, w, u)
            o.sum().backward()
        monkeypatch.delenv(name)
    monkeypatch.setenv("OLSM_MATRIX_PATH", "general")
    monkeypatch.setenv("OLSM_MATRIX_SOLVE", "cublas")
    with pytest.raises(BackendError, match="OLSM_MATRIX_SOLVE='cublas'"):
        km.chunk_matrix(q, w, u, None, [(w, q)])
    monkeypatch.delenv("OLSM_MATRIX_PATH")
    monkeypatch.setenv("OLSM_MATRIX_INVERSE", "level3")                     # read by the WY launch
    with pytest.raises(BackendError, match="OLSM_MATRIX_INVERSE='level3'"):
        km.chunk_matrix(q, w, u, None, [(w, q)])


FUSED_CASES = [("none", "none"), ("scalar", "none"), ("key", "none"), ("none", "delta"), ("scalar", "delta"),
               ("none", "longhorn"), ("scalar", "general")]


@pytest.mark.parametrize("decay,lowrank", FUSED_CASES, ids=[f"{d}-{r}" for d, r in FUSED_CASES])
def test_fused_path_is_taken_and_general_path_still_matches(decay, lowrank, monkeypatch):
    # any decay with rank <= 1 runs the fused forward (kernels/matrix/fused.py, perkey.py,
    # perkey_pair.py), rank 2 the general path, which stays selectable with
    # OLSM_MATRIX_PATH=general (A/B timing on the GPU)
    fused = importlib.import_module("olsm.kernels.matrix.fused")
    log_decay = {"none": None, "scalar": torch.zeros(1, 1, 1), "key": torch.zeros(1, 1, 1, 1)}[decay]
    assert fused.fused_applies(log_decay, [] if lowrank == "none" else [(None, None)])
    assert fused.fused_applies(torch.zeros(1, 1, 1, 1), [(None, None)])          # per key with a pair (DPLR)
    assert not fused.fused_applies(torch.zeros(1, 1, 1, 1), [(None, None)] * 2)  # rank 2: general
    inputs = make_inputs(11, T=37, H=1, K=6, V=5, decay=decay, lowrank=lowrank)
    check(inputs, chunk_size=32)
    monkeypatch.setenv("OLSM_MATRIX_PATH", "general")
    assert not fused.fused_applies(None, [])
    check(inputs, chunk_size=16)


@pytest.mark.parametrize("n", [16, 24])
def test_unit_lower_inverse_and_its_gradient(n):
    # the T = (I − L)⁻¹ of the general path's WY/UT form, against torch's inverse (float64)
    trinv = importlib.import_module("olsm.kernels.matrix.trinv")
    gen = torch.Generator().manual_seed(n)
    L64 = (0.3 * torch.randn(3, n, n, generator=gen, dtype=torch.float64)).requires_grad_()
    dT = torch.randn(3, n, n, generator=gen, dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64)
    T_ref = torch.linalg.inv(eye - torch.tril(L64, -1))
    (g_ref,) = torch.autograd.grad((T_ref * dT).sum(), L64)
    L = L64.detach().float().to(DEVICE).requires_grad_()
    T = trinv.unit_lower_inverse(L)
    (g,) = torch.autograd.grad((T * dT.float().to(DEVICE)).sum(), L)
    assert rel_err(T.cpu(), T_ref) < TOL and rel_err(g.cpu(), g_ref) < TOL


def test_fused_path_falls_back_when_out_of_resources(monkeypatch):
    # a GPU whose shared memory cannot hold the fused tiles runs the general path instead
    chunk = importlib.import_module("olsm.kernels.matrix.chunk")

    def refuse(*args, **kwargs):
        raise chunk.OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(chunk, "fused_forward", refuse)
    check(make_inputs(9, T=5, H=1, decay="scalar", lowrank="delta"))


def test_walks_drop_stages_on_out_of_resources(monkeypatch):
    # both walks launch through fused.launch_staged (forward at state_stages, reverse at
    # dstate_stages); a GPU without the shared memory for that many stages gets one stage fewer
    # per OutOfResources (remembered), never the general path or the autograd fallback (run 13:
    # DPLR's reverse pass at 3 stages needed 312 KB and fell back, 4x slower)
    chunk = importlib.import_module("olsm.kernels.matrix.chunk")
    fused_mod = importlib.import_module("olsm.kernels.matrix.fused")
    fb = importlib.import_module("olsm.kernels.matrix.fused_bwd")

    class Tight:
        """a walk kernel on a GPU where only one stage fits"""

        def __init__(self, real):
            self.real, self.tried = real, []

        def __getitem__(self, grid):
            def run(*args, num_stages, **kw):
                self.tried.append(num_stages)
                if num_stages > 1:
                    raise chunk.OutOfResources(300000, 232448, "shared memory")
                return self.real[grid](*args, num_stages=num_stages, **kw)
            return run

    fwd, rev = Tight(fused_mod._state_fwd_kernel), Tight(fb._dstate_bwd_kernel)
    monkeypatch.setattr(fused_mod, "_state_fwd_kernel", fwd)
    monkeypatch.setattr(fb, "_dstate_bwd_kernel", rev)
    monkeypatch.setattr(fused_mod, "_STAGES", {})
    taken = []
    monkeypatch.setattr(chunk, "fused_forward", lambda *a, **k: taken.append("fwd") or fused_mod.fused_forward(*a, **k))
    monkeypatch.setattr(chunk, "fused_backward", lambda *a, **k: taken.append("bwd") or fb.fused_backward(*a, **k))
    check(make_inputs(51, T=40, H=1, decay="key", lowrank="general"))
    # per key with a pair: both walks at 2 stages, then 1
    assert taken == ["fwd", "bwd"] and fwd.tried == [2, 1] and rev.tried == [2, 1], (taken, fwd.tried, rev.tried)
    fwd.tried.clear(), rev.tried.clear()
    check(make_inputs(52, T=40, H=1, decay="key", lowrank="general"))
    assert fwd.tried == [1] and rev.tried == [1], (fwd.tried, rev.tried)    # remembered per configuration
    fwd.tried.clear(), rev.tried.clear()
    check(make_inputs(53, T=40, H=1, decay="key"))                  # GLA: both walks start at 3 stages
    assert fwd.tried == [3, 2, 1] and rev.tried == [3, 2, 1], (fwd.tried, rev.tried)


@pytest.mark.parametrize("decay", ["none", "scalar", "key"])
def test_fused_backward_is_taken_and_autograd_backward_still_matches(decay, monkeypatch):
    # without a low-rank part the backward is kernels/matrix/fused_bwd.py (three Triton kernels, a
    # fourth for the decay gradient's per-sequence sum);
    # OLSM_MATRIX_BWD=autograd keeps the general path's autograd backward for A/B timing
    chunk = importlib.import_module("olsm.kernels.matrix.chunk")
    calls = []
    real = chunk.fused_backward
    monkeypatch.setattr(chunk, "fused_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    # odd length, K and V not powers of two, a chunk size that leaves a short last chunk
    inputs = make_inputs(13, B=2, T=45, H=2, K=24, V=40, decay=decay)
    check(inputs, chunk_size=32)
    assert calls, "fused backward not used"
    check(inputs, chunk_size=16, final=False)     # no final-state gradient term
    calls.clear()
    monkeypatch.setenv("OLSM_MATRIX_BWD", "autograd")
    check(inputs, chunk_size=32)
    assert not calls


def _spy_sequence_launch(monkeypatch):
    """The (grid, BK, BV) of every sequential-pass launch (fused.sequence_launch), forward and backward."""
    fused = importlib.import_module("olsm.kernels.matrix.fused")
    launches = []
    real = fused.sequence_launch

    def spy(*args, **kw):
        launches.append(real(*args, **kw))
        return launches[-1]
    monkeypatch.setattr(fused, "sequence_launch", spy)
    monkeypatch.setattr(importlib.import_module("olsm.kernels.matrix.fused_bwd"), "sequence_launch", spy)
    return launches


@pytest.mark.parametrize("decay", ["none", "scalar"])
def test_sequential_passes_split_along_keys(decay, monkeypatch):
    # without a low-rank part, few sequences × heads split the sequential passes along K
    # (fused.sequence_launch): K = 80 in blocks of 32 is three key blocks, the last one masked;
    # without a decay the forward walk stops at blocks of 64 (BK_walk_fwd_min): two blocks
    grids = _spy_sequence_launch(monkeypatch)
    check(make_inputs(21, B=2, T=75, H=1, K=80, V=20, decay=decay), chunk_size=32)
    fwd_blocks = (2, 64) if decay == "none" else (3, 32)
    assert [(grid[2], bk) for grid, bk, _ in grids] == [fwd_blocks, (3, 32)], grids


def test_sequential_passes_with_a_pair_split_along_values(monkeypatch):
    # with a low-rank pair the key block is all of K; few sequences × heads shrink the value
    # block instead: V = 80 with one head is three blocks of 32 (the last one masked) when the
    # key row is 128 wide, and two of 64 below that (32-wide blocks next to 64-key rows made
    # invalid shared-memory reads on an H200: fused.launch_shape)
    grids = _spy_sequence_launch(monkeypatch)
    check(make_inputs(22, B=1, T=45, H=1, K=100, V=80, decay="scalar", lowrank="delta"), chunk_size=16)
    assert len(grids) == 2 and all(grid == (3, 1, 1) and bv == 32 for grid, _, bv in grids), grids
    grids.clear()
    check(make_inputs(22, B=1, T=45, H=1, K=12, V=80, decay="scalar", lowrank="delta"), chunk_size=16)
    assert len(grids) == 2 and all(grid == (2, 1, 1) and bv == 64 for grid, _, bv in grids), grids


def spy_split(monkeypatch):
    """Switch on ``OLSM_MATRIX_STATE=split``; returns the list of what each ``split_state_pass``
    call returned (True: it split; False: one segment covered every sequence)."""
    monkeypatch.setenv("OLSM_MATRIX_STATE", "split")
    split = importlib.import_module("olsm.kernels.matrix.split")
    ran = []
    real = split.split_state_pass
    monkeypatch.setattr(split, "split_state_pass", lambda *a, **kw: ran.append(real(*a, **kw)) or ran[-1])
    return ran


SPLIT_CASES = [("none", "none"), ("scalar", "none"), ("key", "none"), ("none", "general"), ("scalar", "delta"),
               ("key", "general")]


@pytest.mark.parametrize("decay,lowrank", SPLIT_CASES, ids=[f"{d}-{r}" for d, r in SPLIT_CASES])
def test_state_pass_split_along_the_sequence(decay, lowrank, monkeypatch):
    # OLSM_MATRIX_STATE=split (kernels/matrix/split.py): segments walked in parallel from zero,
    # joined sequentially, walked again from their true starts, in the forward state pass and the backward's
    # reverse pass; with and without an initial state, packed sequences of different lengths (an
    # empty one), a strong decay, and no final state (no d_final). With a pair (fused path) the
    # segments also walk their [K, K] transitions (SEG_EXT), the join multiplies by them; a per-key
    # decay joins with a per-key total. K = 5 and V = 7 leave the transition's columns straddling
    # a value block.
    ran = spy_split(monkeypatch)
    check(make_inputs(41, B=2, T=150, H=2, decay=decay, lowrank=lowrank), chunk_size=16)
    check(make_inputs(42, B=1, T=150, H=2, decay=decay, lowrank=lowrank, h0=False), chunk_size=16, final=False)
    check(make_inputs(43, T=230, H=2, decay=decay, lowrank=lowrank, N=4), cu_seqlens=(0, 20, 20, 211, 230),
          chunk_size=16)
    strong = decay != "none"
    if strong:
        check(make_inputs(44, B=1, T=150, H=1, decay=decay, lowrank=lowrank, strong=True), chunk_size=16)
    assert ran and all(ran) and len(ran) == 2 * (3 + strong), ran    # forward and reverse pass


def test_split_walks_with_a_scalar_decay_take_their_own_warps(monkeypatch):
    # the split's segment walks (steps 1 and 3, both directions) launch on fused.split_warps:
    # warps_split_decay with a scalar decay, no pair and key blocks of at most 64 (the single walk
    # takes warps_walk_decay, and fewer of the split's programs would fit on an SM), else the
    # single walk's
    F = importlib.import_module("olsm.kernels.matrix.fused")
    FB = importlib.import_module("olsm.kernels.matrix.fused_bwd")
    sh = F.launch_shape(128, 128, 64)
    assert F.split_warps(sh, 1, False, 32) == sh.warps_split_decay == 4 != sh.warps_walk_decay
    assert F.split_warps(sh, 1, False, 64) == 4 and F.split_warps(sh, 1, False, 128) is None
    assert F.split_warps(sh, 0, False, 32) is None and F.split_warps(sh, 1, True, 32) is None
    assert F.split_warps(sh, 2, False, 32) is None
    spy_split(monkeypatch)
    seen = []
    for mod in (F, FB):
        real = mod.launch_staged

        def spy(kernel, grid, args, stages, _real=real, **kw):
            seen.append((kernel.fn.__name__, kw.get("SEG_L", 0) > 0, kw["num_warps"]))
            return _real(kernel, grid, args, stages, **kw)
        monkeypatch.setattr(mod, "launch_staged", spy)
        monkeypatch.setattr(mod, "split_warps", lambda shape, decay, lowrank, BK: 2 if decay == 1 and not lowrank else None)
    check(make_inputs(48, B=1, T=150, H=1, decay="scalar"), chunk_size=16)
    assert sorted(set(seen)) == [("_dstate_bwd_kernel", True, 2), ("_state_fwd_kernel", True, 2)], seen
    seen.clear()
    check(make_inputs(48, B=1, T=150, H=1, decay="none"), chunk_size=16)
    # no decay: the single walk's warps (the override above answers None)
    assert len(seen) == 4 and all(seg and w != 2 for _, seg, w in seen), seen


def test_state_pass_auto_splits_only_few_programs_of_rank_0_without_decay(monkeypatch):
    # OLSM_MATRIX_STATE unset (auto): one head's long sequence (a few programs for 132 SMs) is
    # split, with or without packing; with a decay (scalar or per key), a pair, or many programs,
    # it is walked whole (the split was slower or no faster there on an H200, run 13)
    ran = spy_split(monkeypatch)
    monkeypatch.delenv("OLSM_MATRIX_STATE")
    check(make_inputs(45, B=1, T=150, H=1, decay="none"), chunk_size=16)
    assert ran == [True, True], ran
    ran.clear()
    check(make_inputs(46, B=1, T=150, H=1, decay="scalar"), chunk_size=16)
    check(make_inputs(49, B=1, T=150, H=1, decay="key"), chunk_size=16)
    check(make_inputs(50, B=1, T=150, H=1, decay="none", lowrank="delta"), chunk_size=16)
    assert ran == [], ran
    split = importlib.import_module("olsm.kernels.matrix.split")
    monkeypatch.setattr(split, "sm_count", lambda device: 3)      # 2 sequences x 2 heads: 4 programs
    check(make_inputs(47, B=2, T=150, H=2, decay="none"), chunk_size=16)
    assert ran == [], ran


@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")   # the interpreter, on the fake call
def test_cached_layout_survives_inference_mode_and_fake_tensors():
    # the equal-length chunk layout is cached per (B, T, C, device) (chunk._layout): a first call
    # under inference_mode must not leave inference tensors that the general path's backward
    # then saves for autograd (rank-2 pairs take that path), and a call under a fake-tensor mode
    # must not leave fakes for the next real call
    from torch._subclasses.fake_tensor import FakeTensorMode

    chunk = importlib.import_module("olsm.kernels.matrix.chunk")
    q, w, u, g, pairs, _ = make_inputs(48, T=40, H=1, K=4, V=4, lowrank="general2")
    chunk._dense_layout.cache_clear()
    with torch.inference_mode():
        km.chunk_matrix(q.float(), w.float(), u.float(), g, [(a.float(), b.float()) for a, b in pairs], chunk_size=16)
    leaves = [t.float().requires_grad_() for t in (q, w, u)]
    o, _ = km.chunk_matrix(*leaves, g, [(a.float(), b.float()) for a, b in pairs], chunk_size=16)
    o.sum().backward()
    assert all(t.grad is not None for t in leaves)
    chunk._dense_layout.cache_clear()
    with pytest.raises(Exception), FakeTensorMode(allow_non_fake_inputs=True):
        km.chunk_matrix(q.float(), w.float(), u.float(), chunk_size=16)
    assert chunk._dense_layout.cache_info().currsize == 0
    o, _ = km.chunk_matrix(q.float(), w.float(), u.float(), chunk_size=16)
    assert torch.isfinite(o).all()


def test_value_blocks_never_narrower_than_64_below_128_keys():
    # Triton 3.6 on Hopper read shared memory out of bounds for 16-bit [K, 32] / [K, 16] dot
    # operands at K = 64 (compute-sanitizer, benchmarks/sanitize_kernels.py): every value block
    # of the fused kernels is >= 64 wide whatever V, and 32 only in the sequential passes with
    # a 128-key row
    fused = importlib.import_module("olsm.kernels.matrix.fused")
    for K in (1, 16, 33, 64, 100, 128):
        for V in (1, 16, 17, 32, 64, 100, 128):
            shape = fused.launch_shape(K, V, 64)
            assert min(shape.BV, shape.BV_out, shape.BV_wide) >= 64, (K, V, shape)
            assert shape.BV_dqdw >= (64 if shape.BK <= 64 else 32), (K, V, shape)
            for N, H in ((1, 1), (8, 16)):
                _, BK, BV = fused.sequence_launch(shape, N, H, K, V, True, torch.device("cpu"))
                assert BV >= (32 if BK >= 128 else 64), (K, V, N, H, BK, BV)
    # BV_seq_min_lr (a tuning field) stops the halving earlier: one head of 128 keys keeps 64
    wide = dataclasses.replace(fused.launch_shape(128, 128, 64), BV_seq_min_lr=64)
    assert fused.sequence_launch(wide, 1, 1, 128, 128, True, torch.device("cpu"))[2] == 64
    assert fused.sequence_launch(fused.launch_shape(128, 128, 64), 1, 1, 128, 128, True, torch.device("cpu"))[2] == 32


@pytest.mark.parametrize("decay", ["none", "scalar"])
def test_dq_dw_both_products(decay, monkeypatch):
    # OLSM_MATRIX_DQDW=both (the way back; the default forms dw transposed from dA alone without
    # a low-rank part, which every other test here runs): dA and dAᵀ by two products; odd
    # lengths, key and value dims that are not powers of two, packed sequences with an empty one
    monkeypatch.setenv("OLSM_MATRIX_DQDW", "both")
    check(make_inputs(31, T=75, H=2, K=20, V=12, decay=decay), chunk_size=32)
    cu = (0, 12, 12, 50)
    check(make_inputs(32, T=cu[-1], H=1, decay=decay, N=len(cu) - 1), cu_seqlens=cu, chunk_size=16)


def test_dq_dw_switch(monkeypatch):
    # auto: transposed without a low-rank part, both in the delta form; a per-key decay always both
    import olsm.kernels.matrix.fused_bwd as FB

    monkeypatch.delenv("OLSM_MATRIX_DQDW", raising=False)
    assert FB.dw_transposed(0) and FB.dw_transposed(1) and not FB.dw_transposed(2)
    assert not FB.dw_transposed(0, delta=True) and not FB.dw_transposed(1, delta=True)
    monkeypatch.setenv("OLSM_MATRIX_DQDW", "transposed")
    assert FB.dw_transposed(1, delta=True) and not FB.dw_transposed(2)
    monkeypatch.setenv("OLSM_MATRIX_DQDW", "both")
    assert not FB.dw_transposed(0) and not FB.dw_transposed(1, delta=True)
    monkeypatch.setenv("OLSM_MATRIX_DQDW", "transpose")
    with pytest.raises(BackendError, match="OLSM_MATRIX_DQDW='transpose'"):
        FB.dw_transposed(0)


def test_fused_backward_packed_with_an_empty_sequence():
    # an empty sequence has no chunks: its d_final flows straight to its dh0, and the decay
    # gradient's per-sequence suffix sums must not leak across the packed boundaries
    for cu in ((0, 12, 12, 50), (0, 0, 20, 33, 33)):      # empty in the middle; first and last
        check(make_inputs(17, T=cu[-1], H=2, decay="scalar", N=len(cu) - 1), cu_seqlens=cu)
        check(make_inputs(18, T=cu[-1], H=1, K=6, decay="key", N=len(cu) - 1), cu_seqlens=cu)


@pytest.mark.parametrize("chunk,whole", [(32, True), (64, True), (32, False)])
def test_per_key_decay_fused_sub_blocks(chunk, whole, monkeypatch):
    # GLA on the fused path (kernels/matrix/perkey.py): the intra-chunk A and its gradient whole
    # around each chunk's middle row where its decay allows, else by sub-blocks of 16 around
    # reference rows. Per-step log-decays down to -8 (a factoring from the chunk's start would
    # overflow float32), mild ones, several chunks with a short last one, packed sequences whose
    # chunks end inside a sub-block, the value axis in two blocks, strong decays on some keys only
    # (key slices split between the two backward kernels); whole=False: sub-blocks everywhere
    chunk_mod = importlib.import_module("olsm.kernels.matrix.chunk")
    if not whole:
        monkeypatch.setattr(importlib.import_module("olsm.kernels.matrix.perkey"), "CHUNK_RANGE", -1.0)
    calls = []
    real = chunk_mod.fused_backward
    monkeypatch.setattr(chunk_mod, "fused_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    check(make_inputs(61, B=2, T=150, H=1, K=20, V=70, decay="key", strong=True), chunk_size=chunk)
    check(make_inputs(62, T=140, H=2, K=9, V=5, decay="key", N=3), cu_seqlens=(0, 37, 38, 140), chunk_size=chunk)
    # mild decays with a step of -40 and one of -100 (e^100 overflows float32): in one chunk, sub-blocks whose diagonal
    # goes into the dot (decay across the block <= perkey.FAST_RANGE) next to ones summed exactly
    q, w, u, g, pairs, s0 = make_inputs(63, B=1, T=100, H=1, K=6, V=5, decay="key")
    g[0, 20, 0, 1], g[0, 70, 0, 4] = -40.0, -100.0
    check((q, w, u, g, pairs, s0), chunk_size=chunk)
    q, w, u, g, pairs, s0 = make_inputs(65, B=1, T=70, H=1, K=80, V=8, decay="key")
    g[..., :64] *= 16
    check((q, w, u, g, pairs, s0), chunk_size=chunk)
    assert len(calls) == 4


# whole chunks at the shortest and longest chunk, sub-blocks between (a fourth case, whole chunks
# at C = 32, took 36 s of CI's interpreter time for the same code specialised to one more C)
@pytest.mark.parametrize("chunk,whole", [(16, True), (64, True), (32, False)])
def test_per_key_decay_with_a_pair_fused(chunk, whole, monkeypatch):
    # the RWKV-7 / DPLR form (per-key decay, a and b unrelated) and a delta rule with per-key gates
    # on the fused path (kernels/matrix/perkey_pair.py): its four Grams made once per forward and
    # kept, the Triton backward taken. Per-step log-decays down to -8 (chunks past CHUNK_RANGE: 16-row
    # sub-blocks), mild ones (whole chunks), a -40 and a -100 step (fast and exact diagonal
    # sub-blocks in one chunk), packed sequences with an empty one, K > 32 (several key slices of
    # the pair kernels); whole=False: the sub-block path everywhere
    chunk_mod = importlib.import_module("olsm.kernels.matrix.chunk")
    pair = importlib.import_module("olsm.kernels.matrix.perkey_pair")
    if not whole:
        monkeypatch.setattr(pair, "CHUNK_RANGE", -1.0)
    calls, made = [], []
    real, real_grams = chunk_mod.fused_backward, pair.pair_grams
    monkeypatch.setattr(chunk_mod, "fused_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(pair, "pair_grams", lambda *a, **k: made.append(1) or real_grams(*a, **k))
    check(make_inputs(71, B=2, T=150, H=1, K=20, V=70, decay="key", lowrank="general", strong=True), chunk_size=chunk)
    q, w, u, g, pairs, s0 = make_inputs(72, B=1, T=100, H=2, K=6, V=5, decay="key", lowrank="general")
    g[0, 20, 0, 1], g[0, 70, 1, 4] = -40.0, -100.0
    check((q, w, u, g, pairs, s0), chunk_size=chunk)
    cu = (0, 37, 37, 38, 140)
    check(make_inputs(73, T=140, H=1, K=9, V=5, decay="key", lowrank="general", N=4), cu_seqlens=cu, chunk_size=chunk)
    check(make_inputs(74, B=1, T=70, H=1, K=80, V=20, decay="key", lowrank="delta"), chunk_size=chunk, final=False)
    # strong decays on the first 32 keys only: the backward's key slices split between its two kernels
    q, w, u, g, pairs, s0 = make_inputs(75, B=1, T=70, H=1, K=80, V=8, decay="key", lowrank="general")
    g[..., :32] *= 16
    check((q, w, u, g, pairs, s0), chunk_size=chunk)
    assert len(calls) == 5 and len(made) == 5, (calls, made)


@pytest.mark.parametrize("wy", ["storage", "fp32"])
def test_wy_dots_on_the_pair_paths(wy, monkeypatch):
    # OLSM_MATRIX_WY_DOTS (storage, the default, and fp32) reaches the WY launches of the general
    # pair too, not only the delta form's: no, a scalar and a per-key decay (float32: the code
    # path; bf16: GPU; the per-key decay keeps fp32 copies either way, next test)
    monkeypatch.setenv("OLSM_MATRIX_WY_DOTS", wy)
    for i, decay in enumerate(("none", "scalar", "key")):
        check(make_inputs(90 + i, T=45, K=24, V=20, decay=decay, lowrank="general"), chunk_size=16)


def test_wy_storage_dots_not_with_a_per_key_decay(monkeypatch):
    # storage-dtype WY dots are the default without a decay and with a scalar one, never with a
    # per-key decay's pair (DECAY = 2): bf16 operands gave DPLR's output a 1.1e-1 relative error
    # at C = 128 on the H200 (run 17); OLSM_MATRIX_WY_DOTS=fp32 turns them off everywhere
    fused = importlib.import_module("olsm.kernels.matrix.fused")
    shape = fused.launch_shape(128, 128, 64)
    lowp = lambda decay: fused.wy_constexprs(shape, 128, 128, 64, decay, "tf32", False)["LOWP"]  # noqa: E731
    monkeypatch.delenv("OLSM_MATRIX_WY_DOTS", raising=False)
    assert [lowp(d) for d in (0, 1, 2)] == [True, True, False]
    monkeypatch.setenv("OLSM_MATRIX_WY_DOTS", "fp32")
    assert [lowp(d) for d in (0, 1, 2)] == [False, False, False]


RANK1_CASES = [("none", "delta"), ("scalar", "delta"), ("none", "longhorn"), ("scalar", "general")]


@pytest.mark.parametrize("decay,lowrank", RANK1_CASES, ids=[f"{d}-{r}" for d, r in RANK1_CASES])
def test_triton_backward_with_one_lowrank_pair(decay, lowrank, monkeypatch):
    # the rank-1 members (DeltaNet, gated DeltaNet, Longhorn, rank-1 DPLR with a scalar decay)
    # take the Triton backward by default; OLSM_MATRIX_BWD=autograd still reaches the old one
    chunk = importlib.import_module("olsm.kernels.matrix.chunk")
    calls = []
    real = chunk.fused_backward
    monkeypatch.setattr(chunk, "fused_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    inputs = make_inputs(zlib.crc32(f"rank1{decay}{lowrank}".encode()), B=2, T=45, H=2, K=24, V=40,
                         decay=decay, lowrank=lowrank)
    check(inputs, chunk_size=32)
    check(inputs, chunk_size=16, final=False)
    assert len(calls) == 2, "the rank-1 Triton backward was not used"
    monkeypatch.setenv("OLSM_MATRIX_BWD", "autograd")
    check(inputs, chunk_size=32)
    assert len(calls) == 2
    monkeypatch.delenv("OLSM_MATRIX_BWD")
    cu = (0, 12, 12, 50)    # packed, with an empty sequence
    check(make_inputs(5, T=cu[-1], H=1, K=6, V=5, decay=decay, lowrank=lowrank, N=len(cu) - 1, h0=False),
          cu_seqlens=cu)
    # K > 64: two K-slices in kernel 2'b, whose decay terms are summed afterwards
    check(make_inputs(8, T=70, H=1, K=80, V=20, decay=decay, lowrank=lowrank), chunk_size=32)


def test_per_key_backward_reuses_the_forward_intra_matrix(monkeypatch):
    # the fused per-key forward keeps its intra-chunk A for the backward (fused_forward returns it,
    # ChunkMatrixFunction saves it): A is made once per forward+backward, not again in the backward
    perkey = importlib.import_module("olsm.kernels.matrix.perkey")
    made = []
    real = perkey.intra_gram
    monkeypatch.setattr(perkey, "intra_gram", lambda *a, **k: made.append(1) or real(*a, **k))
    check(make_inputs(64, B=1, T=40, H=1, K=6, V=5, decay="key"), chunk_size=16)
    assert len(made) == 1, made


@pytest.mark.parametrize("decay,lowrank,chunk", [("key", "none", 16), ("scalar", "none", 32), ("key", "general", 16),
                                                 ("scalar", "delta", 16)])
def test_minus_infinite_log_decay_is_a_reset_not_nan(decay, lowrank, chunk):
    # a log-decay of −inf (forget everything) is ≤ 0 and allowed: every path floors each step at
    # tiles.LOG_DECAY_FLOOR before the chunk's cumulative sum (−inf − (−inf) gave NaN outputs)
    q, w, u, g, pairs, s0 = make_inputs(8, B=1, T=40, H=1, K=8, V=4, decay=decay, lowrank=lowrank)
    g = g.clone()
    g[0, 20, 0] = -float("inf")            # every key of token 20, or its scalar
    check((q, w, u, g, pairs, s0), chunk_size=chunk)
