"""The generated elementwise-gate Triton scan against the materialised-G torch reference.

On a machine without CUDA the kernels run in Triton's interpreter (float32 only: bfloat16 is
broken there), so shapes stay tiny and the grid small (the interpreter costs ~10 ms per
token per program). Every case checks the outputs, the final state and the gradients with
respect to q, k, v, every coefficient input, the initial state and the D skip, against a
float64 evaluation of the same IR by :func:`elementwise_scan_torch`, by
``‖x − ref‖ / ‖ref‖``. float32 lands near 1e-7; an off-by-one token or a wrong partial
derivative lands above 1e-2.

The ``gpu`` tests run the compiled kernels at the Longhorn paper's shapes in float32 and
bfloat16.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # before any kernel is decorated: generated kernels are imported lazily, and Triton reads
    # this variable when @triton.jit runs
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import sympy as sp

import olsm
from olsm.errors import BackendError, InputError
from olsm.ir import RecurrenceIR
from olsm.kernels.elementwise import (
    Plan,
    cache_dir,
    compile_recurrence,
    elementwise_scan,
    elementwise_scan_torch,
    elementwise_step,
    generate_source,
    triton_code,
)
from olsm.kernels.elementwise.scan import lean_template
from olsm.objectives import longhorn_diag, mamba1
from olsm.spec import InputSpec
from olsm.symbols import k_n, kk, v_j

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TOL32 = 1e-4


#: the cases the classic template (``OLSM_ELEMENTWISE_LEAN=0``, the way back) also runs on the
#: CPU (on a GPU it runs every case): its structures (masked blocks, h0, D, value tiles, varlen
#: with an empty sequence, the register slab's segments, the sequence split, deep prefetch,
#: decode), a subset to keep CI's time
CLASSIC_ON_CPU = {"test_longhorn_diag_odd_T_initial_state_D", "test_mamba1_param_A_and_value_tiles",
                  "test_user_objective_every_input_kind", "test_register_slab_varlen",
                  "test_register_slab_segments_varlen_user_objective", "test_sequence_split_varlen_user_objective",
                  "test_backward_split_varlen_mamba1_value_tiles",
                  "test_deep_prefetch_short_chunks_and_sequences", "test_decode_step_equals_full_forward",
                  "test_forward_only_no_checkpoints_and_no_final_state", "test_lean_template_is_the_one_compiled",
                  "test_few_programs_block_only_on_the_lean_template"}


@pytest.fixture(autouse=True)
def library_defaults(monkeypatch):
    """The library's own defaults, whatever the shell running the tests has set."""
    for name in ("OLSM_ELEMENTWISE_SLAB", "OLSM_ELEMENTWISE_SLAB_SEGMENTS", "OLSM_ELEMENTWISE_BWD_SPLIT",
                 "OLSM_ELEMENTWISE_CARRY_BT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True, params=["lean", "classic"])
def template(request, monkeypatch):
    """Every test on both kernel templates: the lean default (folded masks, the walks' whole
    blocks without token masks, ex2.approx.ftz on a GPU) and the classic one
    (``OLSM_ELEMENTWISE_LEAN=0``), read when each call compiles its kernels."""
    if request.param == "classic" and not CUDA and request.function.__name__ not in CLASSIC_ON_CPU:
        pytest.skip("on the CPU the classic template runs the CLASSIC_ON_CPU cases")
    monkeypatch.setenv("OLSM_ELEMENTWISE_LEAN", "1" if request.param == "lean" else "0")
    return request.param


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖x − ref‖ / ‖ref‖`` in float64 (NaN never passes)."""
    x, ref = x.double(), ref.double()
    err = ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    return err if err == err else float("inf")


# ---------------------------------------------------------------------------------------
# recurrences: two from the catalogue (via olsm.derive) and one written by hand
# ---------------------------------------------------------------------------------------


def user_objective() -> RecurrenceIR:
    """A NEW elementwise recurrence, never seen by the kernel code: every kind of input.

    gate  G[n, j] = exp(-softplus(a_n + c_n) · w_j²) / (1 + β k_n²)
    k̃[n]         = k_n / (1 + β kᵀk)
    ṽ[j]         = sqrt(β) · exp(s) · v_j

    with a per-token per-key ``a``, a per-token per-head ``β``, and per-head parameters
    ``c [H, K]``, ``w [H, V]``, ``s [H]``.
    """
    inputs = (
        InputSpec("a", ("K",), True, None, "per-key decay logit"),
        InputSpec("beta", (), True, "positive", "per-head step size"),
        InputSpec("c", ("K",), False, None, "per-key decay bias"),
        InputSpec("w", ("V",), False, None, "per-value decay scale"),
        InputSpec("s", (), False, None, "log output gain"),
    )
    a, beta, c, w, s = (spec.symbol for spec in inputs)
    soft = sp.Symbol("soft_n", real=True)
    return RecurrenceIR(
        name="user_softplus_gate",
        kind="elementwise",
        inputs=inputs,
        aux=((soft, sp.log(1 + sp.exp(a + c))),),
        write_key=k_n / (1 + beta * kk),
        write_value=sp.sqrt(beta) * sp.exp(s) * v_j,
        gate=sp.exp(-soft * w**2) / (1 + beta * k_n**2),
    )


_RECS = {}


def get_rec(name: str):
    if name not in _RECS:
        _RECS[name] = {
            "longhorn_diag": lambda: olsm.derive(longhorn_diag),
            "mamba1": lambda: olsm.derive(mamba1),
            "user": user_objective,
        }[name]()
    return _RECS[name]


def make_inputs(name, B, T, H, K, V, *, seed=0, dtype=torch.float32, device=DEV):
    """Well-conditioned random inputs like the real layers produce."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, k, v = rn(B, T, H, K), rn(B, T, H, K) / K**0.5, rn(B, T, H, V)
    if name == "longhorn_diag":
        coefs = {"beta": torch.sigmoid(rn(B, T, H, V))}
    elif name == "mamba1":
        dt = torch.nn.functional.softplus(rn(B, T, H, V) - 2.0)
        A = -torch.arange(1, K + 1, dtype=torch.float32).repeat(H, V, 1) * (0.5 + torch.rand(H, V, K, generator=g))
        coefs = {"dt": dt, "A": A}
    else:
        coefs = {
            "a": rn(B, T, H, K), "beta": torch.sigmoid(rn(B, T, H)) + 0.1,
            "c": rn(H, K), "w": rn(H, V), "s": 0.3 * rn(H),
        }
    cast = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), {n: cast(c) for n, c in coefs.items()}


def run_both(name, B, T, H, K, V, *, h0=False, D=False, cu_seqlens=None, chunk_size=8,
             block_v=None, dtype=torch.float32, seed=0, scale=None, prefetch=None, block_t=None,
             slab=None, slab_slots=None, slab_segments=None, seq_split=None):
    """Kernel (in ``dtype``) and float64 reference on the same inputs: outputs and grads."""
    rec = get_rec(name)
    q, k, v, coefs = make_inputs(name, B, T, H, K, V, seed=seed, dtype=dtype)
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    g = torch.Generator().manual_seed(seed + 1)
    S0 = torch.randn(N, H, K, V, generator=g).to(DEV) if h0 else None
    Dp = torch.randn(H, V, generator=g).to(DEV) if D else None
    cu = torch.tensor(cu_seqlens, dtype=torch.int32, device=DEV) if cu_seqlens is not None else None
    scale = K**-0.5 if scale is None else scale
    leaves = {"q": q, "k": k, "v": v, **{f"coef:{n}": c for n, c in coefs.items()}}
    if S0 is not None:
        leaves["initial_state"] = S0
    if Dp is not None:
        leaves["D"] = Dp
    do = torch.randn(B, T, H, V, generator=g).to(DEV)
    dS = torch.randn(N, H, K, V, generator=g).to(DEV)

    def go(fn, cast):
        # the kernel gets the leaves as they are (q, k, v, coefficients in ``dtype``; state
        # and D in float32), the reference the very same values in float64
        x = {n: (t.detach().to(cast) if cast else t.detach().clone()).requires_grad_(True)
             for n, t in leaves.items()}
        c = {n[5:]: t for n, t in x.items() if n.startswith("coef:")}
        kw = dict(scale=scale, initial_state=x.get("initial_state"), output_final_state=True,
                  cu_seqlens=cu, chunk_size=chunk_size, D=x.get("D"))
        if fn is elementwise_scan:
            kw["block_v"] = block_v
            kw["block_t"] = block_t
            kw["prefetch"] = prefetch
            kw["slab"] = slab
            kw["slab_slots"] = slab_slots
            kw["slab_segments"] = slab_segments
            kw["seq_split"] = seq_split
        o, S = fn(rec, x["q"], x["k"], x["v"], c, **kw)
        loss = (o.double() * do.double()).sum() + (S.double() * dS.double()).sum()
        grads = torch.autograd.grad(loss, list(x.values()))
        return o, S, dict(zip(x, grads))

    got = go(elementwise_scan, None)
    ref = go(elementwise_scan_torch, torch.float64)
    return got, ref


def check(got, ref, tol=TOL32, gtol=None):
    gtol = tol if gtol is None else gtol
    (o, S, g), (o_r, S_r, g_r) = got, ref
    errs = {"o": rel(o, o_r), "S": rel(S, S_r)}
    errs.update({f"d{n}": rel(g[n], g_r[n]) for n in g_r})
    bad = {n: e for n, e in errs.items() if e > (tol if n in ("o", "S") else gtol)}
    assert not bad, f"errors over tolerance: {bad} (all: {errs})"
    return errs


# ---------------------------------------------------------------------------------------
# correctness in the interpreter (CPU) or on the GPU (float32)
# ---------------------------------------------------------------------------------------


def test_longhorn_diag_odd_T_initial_state_D():
    """longhorn_diag from derive(): T not a multiple of the chunk, K != V, h0 and D-skip."""
    check(*run_both("longhorn_diag", 2, 19, 1, 8, 6, h0=True, D=True, chunk_size=8))


def test_mamba1_param_A_and_value_tiles():
    """mamba1 (A [H, V, K] parameter) with two V-tiles: the per-tile partial sums of dq, dk."""
    check(*run_both("mamba1", 1, 13, 2, 4, 8, chunk_size=5, block_v=4))


def test_user_objective_every_input_kind():
    """A hand-written objective: per-token scalar/per-key inputs, [H], [H, K], [H, V] params,
    an aux definition, kᵀk, a sqrt and a softplus: all printed, all differentiated by sympy."""
    check(*run_both("user", 1, 11, 2, 5, 3, h0=True, D=True, chunk_size=4))


def test_varlen_three_sequences():
    """cu_seqlens with three packed sequences of odd lengths, per-sequence initial/final states."""
    got, ref = run_both("longhorn_diag", 1, 16, 1, 4, 4, h0=True, cu_seqlens=[0, 3, 10, 16], chunk_size=4)
    check(got, ref)


def test_checkpoint_every_block_no_slab():
    """Checkpoint interval equal to the backward's block (C = BT = 4): the backward takes each
    block's entering state straight from the checkpoint, the branch without the scratch slab."""
    got, ref = run_both("mamba1", 2, 13, 1, 4, 5, h0=True, D=True, chunk_size=4, block_t=(4, 4))
    check(got, ref)
    got, ref = run_both("longhorn_diag", 1, 11, 1, 4, 4, cu_seqlens=[0, 5, 11], chunk_size=4, block_t=4)
    check(got, ref)


def test_deep_prefetch_short_chunks_and_sequences():
    """Loads 3 tokens ahead (forward) / 2 (backward) with sequences and chunks shorter than
    that: the ring of prefetched slots must never use a token of another sequence."""
    got, ref = run_both("user", 1, 12, 1, 4, 3, h0=True, cu_seqlens=[0, 2, 9, 12],
                        chunk_size=4, prefetch=(3, 2))
    check(got, ref)


# the register slab (slab="registers"): the backward keeps a chunk's block-entering states in
# a [slots, BK, BV] register tensor instead of a global scratch slab. In the interpreter the
# backward's block is 4 tokens, so slab_slots = s checkpoints every 4 s tokens.


@pytest.mark.parametrize("slots", [2, 4])
def test_register_slab_longhorn_diag_odd_T_initial_state_D(slots):
    """Several chunks, the last one partial (T = 19 is no multiple of C = 8 or 16), h0, D."""
    check(*run_both("longhorn_diag", 2, 19, 1, 8, 6, h0=True, D=True, slab="registers", slab_slots=slots))


def test_register_slab_mamba1_value_tiles():
    """mamba1's [H, V, K] parameter and two value slices (atomics into dq, dk)."""
    check(*run_both("mamba1", 1, 21, 2, 4, 8, block_v=4, seed=2, slab="registers", slab_slots=2))


def test_register_slab_user_objective():
    """The hand-written objective (every input kind), h0 and D, 4 slots: C = 16 < T = 23."""
    check(*run_both("user", 1, 23, 2, 5, 3, h0=True, D=True, seed=4, slab="registers", slab_slots=4))


def test_register_slab_varlen():
    """Packed sequences shorter and longer than the chunk (C = 8): per-sequence checkpoint
    offsets, initial and final states."""
    check(*run_both("longhorn_diag", 1, 29, 1, 4, 4, h0=True, cu_seqlens=[0, 3, 20, 20, 29],
                    slab="registers", slab_slots=2, seed=6))


def test_register_slab_default_slots_long_sequence():
    """The default slot count (REG_SLOTS) with chunk_size asking for more: C = 64 < T = 150,
    so the slab is filled and read back across several chunks; odd T, h0, D."""
    check(*run_both("mamba1", 1, 150, 1, 4, 4, h0=True, D=True, chunk_size=40, seed=8, slab="registers"))


def test_register_slab_gives_the_global_slab_results():
    """At one checkpoint interval both slabs hold the same states: identical gradients."""
    common = dict(h0=True, D=True, chunk_size=16, seed=9)
    g_reg, _ = run_both("user", 1, 37, 1, 4, 3, slab="registers", slab_slots=4, **common)
    g_glb, _ = run_both("user", 1, 37, 1, 4, 3, slab="global", **common)
    (o1, S1, d1), (o2, S2, d2) = g_reg, g_glb
    assert torch.equal(o1, o2) and torch.equal(S1, S2)
    for n in d1:
        assert rel(d1[n], d2[n]) < 1e-6, n


# register slab with segments: a checkpoint every BT · slots · segments tokens; the backward
# replays a chunk to keep each segment's entering state in registers, then does the segments
# last to first as chunks of their own


def test_register_slab_segments_odd_T():
    """C = 4 · 2 · 4 = 32 < T = 45: a full chunk of four segments, then a partial chunk of a
    full and a partial segment; h0, D, two sequences."""
    check(*run_both("longhorn_diag", 2, 45, 1, 8, 6, h0=True, D=True, seed=12,
                    slab="registers", slab_slots=2, slab_segments=4))


def spy_configs(monkeypatch) -> list:
    """Every launch shape the scan's launcher makes from now on (``choose_config``'s results)."""
    import olsm.kernels.elementwise.scan as scan_mod

    seen = []
    real = scan_mod.choose_config

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(scan_mod, "choose_config", spy)
    return seen


def test_register_slab_segments_from_the_environment(monkeypatch):
    """``$OLSM_ELEMENTWISE_SLAB_SEGMENTS`` reaches calls that name no segments (the layers' way
    to the checkpoint-lean backward) and its gradients match the reference; mamba1, h0, D."""
    seen = spy_configs(monkeypatch)
    monkeypatch.setenv("OLSM_ELEMENTWISE_SLAB_SEGMENTS", "4")
    check(*run_both("mamba1", 2, 45, 1, 8, 6, h0=True, D=True, seed=15, slab="registers", slab_slots=2))
    assert seen and {cfg.segments for cfg in seen} == {4}


def test_register_slab_segments_of_one_block():
    """Segments of a single block (slots = 1, so no block slab), mamba1 with two value slices."""
    check(*run_both("mamba1", 1, 27, 2, 4, 8, block_v=4, block_t=4, seed=13,
                    slab="registers", slab_slots=1, slab_segments=4))


def test_register_slab_segments_varlen_user_objective():
    """Packed sequences (one empty) with segments: C = 16, h0 and D, every input kind."""
    check(*run_both("user", 1, 41, 1, 4, 3, h0=True, D=True, cu_seqlens=[0, 5, 5, 30, 41], seed=14,
                    slab="registers", slab_slots=2, slab_segments=2))


# the gradient-buffer slab (slab="grads"): the backward keeps a segment's block-entering states
# in the cells of dv (and of a per-value coefficient's gradient) that it has not written yet, row
# k of a state in token k of its block, so the block is at least K tokens: one replay of a long
# checkpoint interval at no memory. At K = 4 the interpreter's 4-token blocks stay.


@pytest.mark.parametrize("slots", [2, None])
def test_grads_slab_longhorn_diag_odd_T_initial_state_D(slots):
    """float32 (a state in dv's cells whole): C = 8 < T = 19 with a partial last chunk, or the
    default interval, one chunk of five blocks; h0, D, two sequences."""
    check(*run_both("longhorn_diag", 2, 19, 1, 4, 6, h0=True, D=True, slab="grads", slab_slots=slots))


def test_grads_slab_varlen_value_tiles_and_backward_split():
    """Packed sequences (one empty) over two value slices, and a backward split in two; mamba1."""
    check(*run_both("mamba1", 1, 29, 1, 4, 8, block_v=4, h0=True, cu_seqlens=[0, 3, 20, 20, 29], seed=6,
                    slab="grads", slab_slots=2))
    check(*run_both("mamba1", 2, 37, 1, 4, 8, block_v=4, D=True, seed=7, slab="grads", slab_slots=2,
                    seq_split=(None, 2)))


@pytest.mark.parametrize("name", ["longhorn_diag", "mamba1"])
def test_grads_slab_halves_equal_register_slab_float16(name):
    """2-byte inputs: a state's high 16 bits in dv, its low 16 bits in dβ / dΔ. At the same
    block and interval the register slab holds the same states, so every output is bitwise
    equal (dropping the low halves moves the gradients by ~2e-3)."""
    common = dict(h0=True, D=True, dtype=torch.float16, seed=8, slab_slots=2, block_t=(None, 4))
    (o1, S1, d1), ref = run_both(name, 1, 23, 1, 4, 4, slab="grads", **common)
    (o2, S2, d2), _ = run_both(name, 1, 23, 1, 4, 4, slab="registers", **common)
    assert torch.equal(o1, o2) and torch.equal(S1, S2)
    for n in d1:
        assert torch.equal(d1[n], d2[n]), n
    check((o1, S1, d1), ref, tol=2e-3, gtol=5e-3)


def test_grads_slab_needs_room_for_a_float32_state():
    """2-byte v and no per-value coefficient (the user objective): a clear error; float32 runs."""
    with pytest.raises(InputError, match="slab='grads'.*slab='registers'"):
        run_both("user", 1, 9, 1, 4, 3, dtype=torch.float16, slab="grads")
    check(*run_both("user", 1, 23, 2, 5, 3, h0=True, D=True, seed=4, slab="grads", slab_slots=2))


# the forward split along the sequence (seq_split): every segment but the last walked from zero
# for its gate product and end state, then every segment from its true start; the backward
# restarts from the checkpoints the second walk stored


def test_sequence_split_longhorn_diag_odd_T_initial_state_D():
    """Three segments of 16 tokens (C = 8) over T = 45, the last one partial; h0, D."""
    check(*run_both("longhorn_diag", 2, 45, 1, 8, 6, h0=True, D=True, seed=21, slab="registers", slab_slots=2,
                    seq_split=3))


def test_sequence_split_mamba1_value_tiles_more_segments_than_chunks():
    """mamba1 with two value slices (the segment pairs are per slice); 4 segments asked of a
    sequence of 2 chunks gives 2."""
    check(*run_both("mamba1", 1, 13, 2, 4, 8, block_v=4, chunk_size=8, seed=22, seq_split=4))
    check(*run_both("mamba1", 1, 40, 2, 4, 8, block_v=4, seed=23, slab="registers", slab_slots=2, seq_split=4))


def test_sequence_split_varlen_user_objective():
    """Packed sequences (one empty, one shorter than a segment) split: segments past a
    sequence's end do nothing, each sequence's last segment writes its final state."""
    check(*run_both("user", 1, 41, 1, 4, 3, h0=True, D=True, cu_seqlens=[0, 5, 5, 30, 41], seed=24,
                    slab="registers", slab_slots=2, seq_split=3))


def test_sequence_split_is_refused_below_one():
    rec = get_rec("longhorn_diag")
    q, k, v, coefs = make_inputs("longhorn_diag", 1, 8, 1, 4, 4)
    with pytest.raises(InputError, match="seq_split"):
        elementwise_scan(rec, q, k, v, coefs, seq_split=0)
    with pytest.raises(InputError, match="seq_split"):
        elementwise_scan(rec, q, k, v, coefs, seq_split=(None, 0))
    with pytest.raises(InputError, match="pair"):
        elementwise_scan(rec, q, k, v, coefs, seq_split=(1, 2, 3))


# the backward split along the sequence (seq_split=(forward, backward)): every segment but the
# first walked for its (gate product, gradient from zero) pair, then every segment's backward
# from the gradient reaching its end, carried through the later segments' pairs


class _GridLog:
    """Stands in for a kernel: records the grids it is launched on and each launch's token
    block ``BT``, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.grids, self.blocks = kernel, [], []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.blocks.append(kwargs.get("BT"))
            return launch(*args, **kwargs)
        return run


def test_backward_split_global_slab_user_objective(monkeypatch):
    """Three backward segments of 16 tokens over T = 45 (the last partial), the forward whole:
    the global slab (its scratch per segment: C = 8 over blocks of 4), h0, dht, D and every
    parameter kind (atomic sums from every segment); the carry pass runs on segments 1 and 2,
    in the backward's blocks of 4 tokens (config.carry_block), then in 16-token ones asked for
    and capped at 8 (the largest power of two dividing C), then in 2-token ones."""
    rec = get_rec("user")
    _, mod = compile_recurrence(rec)
    log = _GridLog(mod.bwd_carry_kernel)
    monkeypatch.setattr(mod, "bwd_carry_kernel", log)
    check(*run_both("user", 2, 45, 1, 4, 3, h0=True, D=True, seed=31, chunk_size=8, block_t=(4, 4),
                    slab="global", seq_split=(None, 3)))
    assert log.grids == [(2, 1, 2)]  # (sequences · heads, value slices, segments 1..2)
    assert log.blocks == [4]
    for bt in ("16", "2"):   # longer than C (capped), shorter than the backward's block
        monkeypatch.setenv("OLSM_ELEMENTWISE_CARRY_BT", bt)
        check(*run_both("user", 2, 45, 1, 4, 3, h0=True, D=True, seed=31, chunk_size=8, block_t=(4, 4),
                        slab="global", seq_split=(None, 3)))
    assert log.blocks == [4, 8, 2]


def test_backward_split_by_default_setting(monkeypatch):
    """A call that names no split takes ``OLSM_ELEMENTWISE_BWD_SPLIT`` (the automatic rule is
    pinned in test_elementwise_config.py); a call without gradients runs no carry pass."""
    rec = get_rec("mamba1")
    _, mod = compile_recurrence(rec)
    log = _GridLog(mod.bwd_carry_kernel)
    monkeypatch.setattr(mod, "bwd_carry_kernel", log)
    monkeypatch.setenv("OLSM_ELEMENTWISE_BWD_SPLIT", "2")
    check(*run_both("mamba1", 1, 20, 1, 4, 4, h0=True, D=True, seed=34, slab="registers", slab_slots=2))
    assert log.grids == [(1, 1, 1)]
    q, k, v, coefs = make_inputs("mamba1", 1, 20, 1, 4, 4)
    with torch.no_grad():
        elementwise_scan(rec, q, k, v, coefs, slab="registers", slab_slots=2)
    assert len(log.grids) == 1


def test_backward_split_folds_carries_without_final_state(monkeypatch):
    """No final state asked for (no dht): the fold starts from zero. The backward kernel gets
    one folded [BK, BV] tile per segment but the last (fold.py), not the carry pass's pairs."""
    rec = get_rec("mamba1")
    _, mod = compile_recurrence(rec)
    seen = []
    kernel = mod.bwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                seen.append((grid, kwargs["carry"].numel(), kwargs["NSPLIT"]))
                return kernel[grid](*args, **kwargs)
            return run
    monkeypatch.setattr(mod, "bwd_kernel", Spy())
    B, T, H, K, V = 2, 37, 1, 4, 8
    q, k, v, coefs = make_inputs("mamba1", B, T, H, K, V, seed=35)
    do = torch.randn(B, T, H, V, generator=torch.Generator().manual_seed(36)).to(DEV)
    grads = []
    for fn, cast in ((elementwise_scan, None), (elementwise_scan_torch, torch.float64)):
        x = [t.detach().to(cast) if cast else t.detach().clone() for t in (q, k, v, *coefs.values())]
        for t in x:
            t.requires_grad_(True)
        kw = dict(block_v=4, block_t=(4, 4), slab="registers", slab_slots=2, seq_split=(None, 3)) if cast is None else {}
        o, S = fn(rec, x[0], x[1], x[2], dict(zip(coefs, x[3:])), scale=K**-0.5, chunk_size=8, **kw)
        assert S is None
        grads.append(torch.autograd.grad((o.double() * do.double()).sum(), x))
    for name, g, g_r in zip(["q", "k", "v", *coefs], *grads):
        assert rel(g, g_r) < TOL32, name
    (grid, numel, nsplit), = seen
    assert grid == (B * H, 2, 3) and nsplit == 3
    assert numel == B * H * 2 * (nsplit - 1) * 4 * 4  # (sequences · heads, slices, segments 0..1, BK, BV)


def test_backward_split_varlen_mamba1_value_tiles():
    """Packed sequences (one empty, one shorter than a segment) and two value slices, split in
    the backward only and in both kernels differently: segments past a sequence's end carry
    nothing and sum nothing."""
    cu = [0, 5, 5, 30, 41]
    check(*run_both("mamba1", 1, 41, 1, 4, 8, h0=True, D=True, cu_seqlens=cu, block_v=4, seed=32,
                    slab="registers", slab_slots=2, seq_split=(None, 4)))
    check(*run_both("longhorn_diag", 1, 41, 1, 4, 4, h0=True, cu_seqlens=cu, seed=33,
                    slab="registers", slab_slots=2, seq_split=(2, 3)))


def test_varlen_user_objective_matches_separate_calls():
    """Packed sequences give exactly what separate calls give (no state leaks across)."""
    rec = get_rec("user")
    q, k, v, coefs = make_inputs("user", 1, 12, 1, 4, 4, seed=3)
    cu = torch.tensor([0, 5, 7, 12], dtype=torch.int32, device=DEV)
    o, S = elementwise_scan(rec, q, k, v, coefs, output_final_state=True, cu_seqlens=cu, chunk_size=4)
    for i, (lo, hi) in enumerate([(0, 5), (5, 7), (7, 12)]):
        per = {n: (c[:, lo:hi] if c.dim() >= 3 and c.shape[1] == 12 else c) for n, c in coefs.items()}
        o_i, S_i = elementwise_scan(rec, q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], per,
                                    output_final_state=True, chunk_size=4)
        assert rel(o[:, lo:hi], o_i) < 1e-6 and rel(S[i : i + 1], S_i) < 1e-6


def test_decode_step_equals_full_forward():
    """Feeding tokens one at a time through elementwise_step reproduces the scan."""
    rec = get_rec("mamba1")
    B, T, H, K, V = 1, 5, 1, 4, 4
    q, k, v, coefs = make_inputs("mamba1", B, T, H, K, V, seed=5)
    D = torch.randn(H, V, device=DEV)
    o, S = elementwise_scan(rec, q, k, v, coefs, scale=0.5, output_final_state=True, D=D)
    state = None
    for t in range(T):
        step = {"dt": coefs["dt"][:, t], "A": coefs["A"]}
        o_t, state = elementwise_step(rec, q[:, t], k[:, t], v[:, t], step, state, scale=0.5, D=D)
        assert rel(o_t, o[:, t]) < 1e-6
    assert rel(state, S) < 1e-6


def test_forward_only_no_checkpoints_and_no_final_state():
    rec = get_rec("longhorn_diag")
    q, k, v, coefs = make_inputs("longhorn_diag", 1, 6, 1, 4, 4, seed=7)
    o, S = elementwise_scan(rec, q, k, v, coefs)
    o_r, _ = elementwise_scan_torch(rec, q.double(), k.double(), v.double(), {n: c.double() for n, c in coefs.items()})
    assert S is None and o.dtype == q.dtype and rel(o, o_r) < TOL32


# ---------------------------------------------------------------------------------------
# code generation and the printer
# ---------------------------------------------------------------------------------------


def test_printer_powers_rationals_functions():
    x, y = sp.symbols("x y", real=True)
    assert triton_code(x**2) == "((x)*(x))"
    assert triton_code(x**-2) == "(1.0/((x)*(x)))"
    assert triton_code(sp.Rational(1, 4) * x) in ("0.25*x", "(0.25)*x", "x/4.0")
    assert triton_code(sp.sqrt(x)) == "tl.sqrt(x)"
    assert triton_code(1 / sp.sqrt(x)) == "tl.math.rsqrt(x)"
    assert triton_code(1 / (1 + sp.exp(-x))) == "tl.sigmoid(x)"
    assert triton_code(sp.exp(x * y)) == "tl.exp(x*y)"
    assert triton_code(sp.log(x)) == "tl.log(x)"
    assert triton_code(sp.Abs(x)) == "tl.abs(x)"
    assert "tl.maximum" in triton_code(sp.Max(x, 0))
    assert triton_code(x, {"x": "s_x"}) == "s_x"
    # the printed text is valid Python with tl in scope
    assert "1.0" in triton_code(1 + x)


@pytest.mark.parametrize("expr, culprit", [
    (sp.gamma(sp.Symbol("x")), "gamma"),
    (sp.Function("f")(sp.Symbol("x")), "f(x)"),
    (sp.besselj(0, sp.Symbol("x")), "besselj"),
])
def test_printer_refuses_with_the_subexpression(expr, culprit):
    with pytest.raises(BackendError, match=culprit.replace("(", r"\(").replace(")", r"\)")):
        triton_code(expr)


def test_unprintable_gate_is_a_clear_backend_error():
    beta = InputSpec("beta", ("V",), True, "positive")
    rec = RecurrenceIR(name="bad", kind="elementwise", inputs=(beta,), aux=(),
                       write_key=k_n, write_value=v_j,
                       gate=sp.gamma(1 + beta.symbol * k_n**2))
    with pytest.raises(BackendError, match="gamma"):
        compile_recurrence(rec)


def test_unknown_symbol_and_wrong_class_are_backend_errors():
    rec = RecurrenceIR(name="bad", kind="elementwise", inputs=(), aux=(),
                       write_key=k_n, write_value=v_j, gate=sp.exp(-sp.Symbol("mystery_j")))
    with pytest.raises(BackendError, match="mystery_j"):
        Plan(rec)
    wrong_axis = RecurrenceIR(name="bad2", kind="elementwise", inputs=(), aux=(),
                              write_key=k_n * v_j, write_value=v_j, gate=sp.S.One)
    with pytest.raises(BackendError, match="write_key"):
        Plan(wrong_axis)
    with pytest.raises(BackendError, match="elementwise"):
        Plan(RecurrenceIR(name="m", kind="matrix", inputs=(), aux=(), write_key=k_n, write_value=v_j))


def test_key_dimension_limit_and_input_checks():
    rec = get_rec("longhorn_diag")
    q, k, v, coefs = make_inputs("longhorn_diag", 1, 2, 1, 257, 2)
    with pytest.raises(BackendError, match="K <= 256"):
        elementwise_scan(rec, q, k, v, coefs)
    q, k, v, coefs = make_inputs("longhorn_diag", 1, 2, 1, 4, 2)
    with pytest.raises(InputError, match="beta"):
        elementwise_scan(rec, q, k, v, {})
    with pytest.raises(InputError, match="beta"):
        elementwise_scan(rec, q, k, v, {"beta": coefs["beta"][..., :1]})


def test_lean_template_is_the_one_compiled(template):
    # the switch reaches the generator: whole-block loops (n_full, n_part) only in the lean
    # source, and the two templates live in different files
    plan, mod = compile_recurrence(get_rec("mamba1"))
    text = open(mod.__file__).read()
    assert ("n_full" in text and "n_part" in text) == (template == "lean")
    _, other = compile_recurrence(get_rec("mamba1"), lean=template != "lean")
    assert other.__file__ != mod.__file__
    assert generate_source(plan, lean=template == "lean") == text


def test_lean_template_is_the_default(monkeypatch):
    monkeypatch.delenv("OLSM_ELEMENTWISE_LEAN", raising=False)
    assert lean_template()
    monkeypatch.setenv("OLSM_ELEMENTWISE_LEAN", "0")
    assert not lean_template()


def test_few_programs_block_only_on_the_lean_template(template, monkeypatch):
    # choose_config hears the call's sequences × heads only for the template its rule was
    # measured on (the classic one spilled with the doubled forward block)
    from olsm.kernels.elementwise import scan as scan_mod

    seen = []
    real = scan_mod.choose_config

    def spy(*args, **kwargs):
        seen.append(kwargs.get("sequences_heads"))
        return real(*args, **kwargs)
    monkeypatch.setattr(scan_mod, "choose_config", spy)
    q, k, v, coefs = make_inputs("longhorn_diag", 3, 5, 2, 4, 2)
    elementwise_scan(get_rec("longhorn_diag"), q, k, v, coefs)
    assert seen == [6 if template == "lean" else None]


def test_lean_switch_refuses_other_values(monkeypatch):
    monkeypatch.setenv("OLSM_ELEMENTWISE_LEAN", "yes")
    with pytest.raises(BackendError, match="OLSM_ELEMENTWISE_LEAN"):
        compile_recurrence(get_rec("mamba1"))


def test_generated_source_is_printed_from_the_ir_and_cached_on_disk():
    rec = get_rec("mamba1")
    plan, mod = compile_recurrence(rec, lean=True)
    text = generate_source(plan)
    assert "_exp(s_A_jn*s_dt_j)" in text  # the gate, printed from sympy (_exp: ex2.approx.ftz on a GPU)
    assert mod.__file__.startswith(str(cache_dir()))
    with open(mod.__file__) as f:
        assert f.read() == text
    # derivatives came from sympy: d exp(A dt)/dA = dt exp(A dt) appears in the backward
    assert any(p.factor == "A_jn" and p.of == "G" for p in plan.partials)
    # a different objective gets a different file
    _, mod2 = compile_recurrence(get_rec("longhorn_diag"))
    assert mod2.__file__ != mod.__file__


# ---------------------------------------------------------------------------------------
# GPU: compiled kernels at the Longhorn paper's shapes (E = 2·768, N = 16, one head)
# ---------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["longhorn_diag", "mamba1", "user"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_paper_shapes(name, dtype):
    B, T, H, K, V = 2, 2048, 1, 16, 1536
    if name == "user":
        H, V = 4, 128
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    got, ref = run_both(name, B, T, H, K, V, h0=True, D=True, chunk_size=64, dtype=dtype, seed=11)
    check(got, ref, tol=tol, gtol=tol if dtype == torch.float32 else 5e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("seq_split", [None, 4])
def test_gpu_varlen_bf16(seq_split):
    # None: packed sequences are not split by default; 4: segments of 256 tokens
    got, ref = run_both("longhorn_diag", 1, 1000, 1, 16, 256, h0=True, D=True,
                        cu_seqlens=[0, 100, 611, 1000], chunk_size=64, dtype=torch.bfloat16, seed=4,
                        seq_split=seq_split)
    check(got, ref, tol=2e-2, gtol=5e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["longhorn_diag", "mamba1"])
@pytest.mark.parametrize("seq_split", [None, 3, 8, (None, 4)])
def test_gpu_sequence_split_paper_shape(name, seq_split):
    """B = 2, T = 4000 at E = 1536 (384 forward programs), whole or split along the sequence
    (both kernels, or the backward only)."""
    got, ref = run_both(name, 2, 4000, 1, 16, 1536, h0=True, D=True, chunk_size=64, dtype=torch.bfloat16,
                        seed=13, seq_split=seq_split)
    check(got, ref, tol=2e-2, gtol=5e-2)


def check_paper_shape(name, T, dtype, **kw):
    """B = 2, one head, K = 16, E = 1536, h0 and D, against the float64 reference (fp32 to 1e-4;
    bf16 to 2e-2 for o and S, 5e-2 for the gradients)."""
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    got, ref = run_both(name, 2, T, 1, 16, 1536, h0=True, D=True, chunk_size=64, dtype=dtype, **kw)
    check(got, ref, tol=tol, gtol=tol if dtype == torch.float32 else 5e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["longhorn_diag", "mamba1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("segments", [None, 8])
def test_gpu_register_slab_paper_shapes(name, dtype, segments):
    """The register slab compiled: checkpoints every 128 tokens, or every 1024 (8 segments),
    T = 2000 not a multiple of either."""
    check_paper_shape(name, 2000, dtype, seed=12, slab="registers", slab_segments=segments)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["longhorn_diag", "mamba1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq_split", [None, (None, 4)])
def test_gpu_grads_slab_paper_shapes(name, dtype, seq_split):
    """The gradient-buffer slab compiled (16-token blocks, a checkpoint every 2048 tokens; in
    bf16 the states' halves in dv and dβ / dΔ), T = 5000 not a multiple of either, whole or
    with the backward split in four."""
    check_paper_shape(name, 5000, dtype, seed=14, slab="grads", seq_split=seq_split)


@pytest.mark.gpu
@gpu
def test_gpu_auto_slab_choice(monkeypatch):
    """The default slab ("auto") on the GPU: mamba1's gradient-slab backward compiles lean, so it
    takes that slab (a checkpoint every 2048 tokens); longhorn_diag's spills, so it keeps the
    register slab. Gradients match the reference."""
    seen = spy_configs(monkeypatch)
    for name, slab in (("mamba1", "grads"), ("longhorn_diag", "registers")):
        seen.clear()
        got, ref = run_both(name, 2, 3000, 1, 16, 1536, h0=True, D=True, chunk_size=64, dtype=torch.bfloat16,
                            seed=15)
        check(got, ref, tol=2e-2, gtol=5e-2)
        assert seen[-1].slab == slab, (name, [cfg.slab for cfg in seen])
