"""Print the Triton source of one elementwise-gate recurrence: a block-parallel scan.

A recurrence of the elementwise class (DESIGN §3, class 2) is

    S_t = G_t ⊙ S_{t-1} + k̃_t ṽ_tᵀ,      o_t = scale · S_tᵀ q_t  (+ D ⊙ v_t)

Rather than one generic kernel that interprets G, k̃, ṽ at run time, we print them (and
their partial derivatives, :class:`~.plan.Plan`) into kernels specialised to the recurrence.

**Algorithm.** One program owns one (sequence, head, BV-wide slice of the value axis) and the
whole key axis, so its state is a ``[BK, BV]`` tile. It walks the sequence in blocks of
``BT`` tokens. Per block it loads the tokens' factors as ``[BT, ...]`` tiles, evaluates the
gate and the write for all of them at once as 3-D tiles ``[BT, BK, BV]``, and solves the
recurrence inside the block with one ``tl.associative_scan`` along the token axis, whose
elements are the affine maps ``x ↦ a x + b`` of each step, composed by

    (a1, b1) then (a2, b2)  =  (a1 a2, a2 b1 + b2).

The state entering the block is folded into the first token's ``b``; the last row of the
scan is the state handed to the next block. The output of all BT tokens is then one
reduction over the key axis. The chain of dependent steps a program runs is thus T/BT
block steps, each a scan, instead of T token steps each waiting on its own loads and
reductions; the loads of a block are issued together (and a block ahead, see
:class:`~.emit.BlockLoads`).

**Backward.** Every ``C`` tokens (a multiple of the block) the forward stores the state
entering the chunk (but not chunk 0's: the initial state, or zeros). The backward walks the
chunks last to first. For a chunk it replays the forward from the checkpoint to get the
state entering each of its ``NB_C`` blocks (``C / BT``; see segments below), then walks the
blocks last to first.
Those block-entering states are kept either in a per-program scratch slab in global memory
(``SLAB_IN_REGS = 0``: a store per block, a barrier, a load back; every program's slab at
once costs ``C / BT`` states per (sequence, head)) or in a register tensor ``slab [NB_C, BK,
BV]`` (``SLAB_IN_REGS = 1``, NB_C a power of two): the replay writes slot i with
``tl.where(slot == i, S, slab)`` and the reverse walk reads it back with a select and a sum
over the slot axis (on sm_90 no shared memory beyond the global-slab kernel's, and at 16
slots no spills at the default backward tile). With the slab in registers C no longer costs
memory, so checkpoints can be rarer; ``NSEG > 1`` goes further: a chunk
(``C = NSEG · NB_C · BT``) is ``NSEG`` segments of ``NB_C`` blocks, a first replay
keeps the state entering each segment in a second register tensor ``[NSEG, BK, BV]``, and the
segments are then done last to first, each as a chunk above (a second replay of the chunk
for ``NSEG`` times fewer checkpoints). For a block it needs S_t
(for dq), S_{t-1} (for dG) and dS_t. One forward scan whose elements carry a second,
*exclusive* affine pair,

    (a1, b1, e1, f1) then (a2, b2, e2, f2) = (a1 a2, a2 b1 + b2, a1 e2, e2 b1 + f2),

with (e, f) = (1, -0) for every token, gives both S_t (inclusive) and S_{t-1} (exclusive) at
row t. One reverse scan of the maps ``P ↦ G_t ⊙ (X_t + P)`` (written as a forward scan between
two ``tl.flip`` of the token axis: Triton 3.6 lowers ``reverse=True`` with many warp shuffles,
640 ``shfl.sync`` on that line of the sm_90 backward at ``[8, 16, 4]`` against 3.9's 128;
flipping an in-thread axis costs none) with
``X_t = scale · q_t do_tᵀ`` gives P_{t-1} = G_t ⊙ dS_t (inclusive, the carry to the previous
block at row 0) and P_t (exclusive), so ``dS_t = X_t + P_t``. Then, for all BT tokens at once,

    dq_t = scale · S_t do_t      dG_t = dS_t ⊙ S_{t-1}
    dk̃_t = dS_t ṽ_t              dṽ_t = dS_tᵀ k̃_t

pushed through the printed partial derivatives to every factor. Gradients that sum over the
value axis (dq, dk, per-key and per-head coefficients) receive one contribution per value
slice: with several slices they are added with float32 atomics into one ``[B, T, H, ...]``
buffer (no per-slice partial copies); parameters and D are summed over a program's tokens in
registers and then added atomically into one float32 tensor of their own shape.

**The gradient-buffer slab** (``SLAB_IN_REGS = 2``, ``slab="grads"``). The cells of dv — and,
for 2-byte inputs, of one per-token, per-value coefficient's gradient (dΔ, dβ) — that belong to a
block are this program's alone and are written only when its reverse walk reaches that block.
With blocks of at least K tokens they hold the block's entering state until then: row k of the
float32 state in token k (whole in a 4-byte dv; as its high 16 bits in dv and low 16 bits in the
coefficient's gradient, bit for bit, for 2-byte ones). The replay stores every block's state but
the segment's last (which may be partial and stays in registers), and the reverse walk loads
each block's state one block ahead, a barrier ending every block so a load is done before that
block's gradients overwrite it. One replay of a checkpoint interval of any length, no slab
memory and no slab registers; the price is the longer block.

**Split along the sequence (opt-in, ``seq_split``).** With ``SEG_T > 0`` the forward runs
twice over segments of SEG_T tokens (a multiple of C), the grid's third axis the segment:
``PHASE = 1`` walks every segment but the last from zero and keeps only the product of its gates
and its end state; ``PHASE = 2`` starts each segment from h0 carried through the earlier
segments' pairs (``S ← A_i ⊙ S + E_i``, in the program) and stores outputs and checkpoints at
their global positions, so the backward does not know. (On the H200 it did not speed up the
forward at the paper's shapes: ``benchmarks/README.md``, runs 13 and 19.)

**The backward split along the sequence** (automatic at few programs, :func:`~.scan.default_backward_split`).
With ``SPLIT_T > 0`` the backward's grid gets a third axis, segments of SPLIT_T tokens (whole
checkpoint intervals), each walked by its own program from the gradient reaching its end. The
reverse scan's recurrence ``P_{t-1} = G_t ⊙ (X_t + P_t)`` is affine in P, so over a segment it is
``P_out = A ⊙ P_in + L`` with A the product of the segment's gates and L what its own tokens send
back from P_in = 0. ``bwd_carry_kernel`` walks every segment but the first forward in time for
that pair (per block, one product scan of G: ``L += A ⊙ Σ_r cp_r ⊙ X_r``, ``A ⊙= cp_last``) into
two buffers; ``fold.fold_carries_kernel`` folds dht through them, last segment first, writing
the gradient reaching the end of segment s − 1 over L_s (slot s − 1), so the A buffer is freed
before the backward runs; ``bwd_kernel`` then starts segment i from slot i (the last segment from
dht).
Each segment restarts from the forward's checkpoints, so nothing else changes (the parameters'
and D's sums are atomic adds already).

The key axis is never split across programs: K (d_state) is small in the models this class
serves (16 in Mamba-1 and Longhorn), kᵀk needs the whole key, and a split would turn dv and
every per-value gradient — ``[B, T, H, V]``, the large ones — into atomic sums.
"""
from __future__ import annotations

from typing import Tuple

from .emit import (
    BlockLoads,
    Coefficients,
    Src,
    emit_block_masks,
    emit_factors,
    emit_params,
    grad_expr,
    tile_addr,
)
from .plan import Factor, Plan

#: bump whenever the generated source changes for the same expressions
GENERATOR_VERSION = "elementwise-14-gradient-slab-cells"

#: default of the backward's ``SLAB_IN_REGS`` constexpr (the launcher always passes it and
#: ``HAS_H0``; the defaults serve compiles that name only the older constexprs, e.g.
#: benchmarks/kernel_resources.py)
DEFAULT_SLAB_IN_REGS = 0

_HELPERS = '''\
# Local helpers instead of tl.sum / tl.cdiv / tl.sigmoid: those are @jit functions of
# triton.language, built for the compiler or the interpreter once, when triton.language
# is first imported. These are built when this module is, so the kernels run under
# TRITON_INTERPRET=1 whatever imported triton first.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _add)


@triton.jit
def _cdiv(a, b: tl.constexpr):
    return (a + b - 1) // b


# exp: tl.exp, or (the lean template on a GPU) ex2.approx.ftz: tl.exp lowers to ex2.approx
# without .ftz, which ptxas expands with a range test and two rescaling multiplies for
# subnormal results (five instructions an element instead of two); results under 2^-126 flush
# to zero. The CPU interpreter runs no inline PTX.
_FAST_EXP = tl.constexpr(@LEAN@ and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))


@triton.jit
def _exp(x):
    if _FAST_EXP:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x * 1.4426950408889634],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.exp(x)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + _exp(-x))


@triton.jit
def _mul(a, b):
    return a * b


@triton.jit
def _affine(a1, b1, a2, b2):
    # the step x -> a1 x + b1, then x -> a2 x + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _affine_excl(a1, b1, e1, f1, a2, b2, e2, f2):
    # (a, b): every step so far; (e, f): all of them but the last. A single step's (e, f)
    # is the identity (1, -0); constant there, it folds away in a thread's own registers
    # (x * 1 and x + -0 are exact), so the exclusive result costs little beyond the scan.
    return a1 * a2, a2 * b1 + b2, a1 * e2, e2 * b1 + f2


@triton.jit
def _accumulate(ptr, val, mask, ATOMIC: tl.constexpr):
    # several value slices add into one buffer; a lone slice just writes
    if ATOMIC:
        tl.atomic_add(ptr, val, mask=mask, sem="relaxed")
    else:
        tl.store(ptr, val, mask=mask)


@triton.jit
def _grads_slab_at(t_blk, i_h, o_gs, m, i, n, H: tl.constexpr, V: tl.constexpr):
    # cells (offsets, mask) of slot i, the state entering the block at token t_blk: row k in token
    # t_blk + k (o_gs); only slots 0 <= i < n are kept. (The slot test is broadcast through the
    # offsets: the interpreter refuses a scalar-and-block mask.)
    off = (t_blk * H + i_h).to(tl.int64) * V + o_gs
    slot = off * 0 + i
    return off, m & (slot >= 0) & (slot < n)


@triton.jit
def _grads_slab_store(dv, lo, off, mask, S, HALVES: tl.constexpr):
    # a block-entering state kept in gradient cells this program writes later: float32 whole in a
    # 4-byte dv, or bit for bit as its high 16 bits in dv and its low 16 bits in lo
    if HALVES == 1:
        tl.store(dv + off, S, mask=mask)
    else:
        bits = S.to(tl.int32, bitcast=True)
        tl.store(dv.to(tl.pointer_type(tl.int16)) + off, (bits >> 16).to(tl.int16), mask=mask)
        tl.store(lo.to(tl.pointer_type(tl.int16)) + off, bits.to(tl.int16), mask=mask)


@triton.jit
def _grads_slab_load(dv, lo, off, mask, HALVES: tl.constexpr):
    if HALVES == 1:
        S = tl.load(dv + off, mask=mask, other=0.0)
    else:
        hi = tl.load(dv.to(tl.pointer_type(tl.int16)) + off, mask=mask, other=0).to(tl.int32)
        low = tl.load(lo.to(tl.pointer_type(tl.int16)) + off, mask=mask, other=0).to(tl.int32)
        S = ((hi << 16) | (low & 0xFFFF)).to(tl.float32, bitcast=True)
    return S


'''

_HEAD = """\
i_bh = tl.program_id(0)
i_v = tl.program_id(1)
i_b = i_bh // H
i_h = i_bh % H
if IS_VARLEN:
    bos = tl.load(cu_seqlens + i_b).to(tl.int64)
    eos = tl.load(cu_seqlens + i_b + 1).to(tl.int64)
    ck0 = tl.load(chunk_offsets + i_b).to(tl.int64)
else:
    bos = i_b.to(tl.int64) * T
    eos = bos + T
    ck0 = i_b.to(tl.int64) * (_cdiv(T, C) - 1)  # chunk 0's entering state is not stored
n_tok = (eos - bos).to(tl.int32)
rows = tl.arange(0, BT)
r3 = rows[:, None, None]
n_k = tl.arange(0, BK)
j_v = i_v * BV + tl.arange(0, BV)
m_k = n_k < K
m_v = j_v < V
m_kv = m_k[:, None] & m_v[None, :]
# offsets of this program's [K, BV] slice inside a [.., H, K, V] state
o_state = n_k[:, None] * V + j_v[None, :]"""

_SIZES = (
    "    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,\n"
    "    BT: tl.constexpr, C: tl.constexpr,"
)


def _head(lean: bool) -> str:
    """The kernels' common head; ``lean``: key and value masks that the compiler folds to true
    when the blocks tile K and V exactly (``K == BK``, ``V % BV == 0``: their selects drop out)."""
    if not lean:
        return _HEAD
    masks = "m_k = n_k < K\nm_v = j_v < V\n"
    assert masks in _HEAD, "the head's mask lines changed: update _head"
    return _HEAD.replace(masks, "m_k = (n_k < K) | (K == BK)  # all true when the blocks tile K and V\n"
                                "m_v = (j_v < V) | (V % BV == 0)\n")


def _fold_entering(S: str, lean: bool) -> str:
    """``b``: the block's writes with the entering state ``S`` folded into row 0 (``lean``: by a
    select, so rows past 0 do not multiply G by zero, which IEEE keeps as instructions)."""
    if lean:
        return f"b = tl.where(r3 == 0, wk * wv + G * {S}[None, :, :], wk * wv)  # entering state at row 0"
    return f"b = wk * wv + G * tl.where(r3 == 0, {S}[None, :, :], 0.0)  # entering state folded in"


def _emit_loops(src: Src, loops, block) -> None:
    """Each ``(loop head, full)`` of ``loops`` with ``block(full)`` as its body: one masked loop,
    or (lean) a loop of whole blocks and one of the partial block."""
    for head, full in loops:
        src(head)
        src.indent()
        block(full)
        src.dedent()


def _walk_forward(src: Src, loads, lean: bool, block) -> None:
    """The blocks from token ``t0`` to ``eos`` in time order, ``block(full)`` the body of each;
    ``n_blk`` is their count (lean: the whole blocks first, with token masks the compiler knows
    are true, so their selects and compares drop out, then the partial last block if any)."""
    src("n_blk = _cdiv(tl.maximum(eos - t0, 0).to(tl.int32), BT)")
    loads.prologue(src, "t0", "BT", "n_blk")
    if lean:
        src("n_full = (tl.maximum(eos - t0, 0) // BT).to(tl.int32)")
        loops = (("for i_blk in range(0, n_full):", True), ("for i_blk in range(n_full, n_blk):", False))
    else:
        loops = (("for i_blk in range(0, n_blk):", False),)
    _emit_loops(src, loops, block)


def _block_values(src: Src, plan: Plan, loads, count: str, full: bool) -> None:
    """The block at ``t_blk`` (block ``i_blk`` of ``count``) walked forward in time: its loads,
    token masks (none when ``full``), factors and the values of G, k̃, ṽ (no partials)."""
    loads.take(src, "t_blk", "BT", "i_blk", count)
    emit_block_masks(src, "t_blk", full=full)
    emit_factors(src, plan)
    Coefficients(plan, with_partials=False).emit_values(src)


def _scan_block_end(src: Src, lean: bool):
    """S <- the state after the block (G, wk, wv of the block in scope)."""
    src(
        _fold_entering("S", lean),
        "_, S3 = tl.associative_scan((G, b), 0, _affine)",
        "# the last row (rows past the end carried the last token's state); the -0.0 filler",
        "# keeps the sum exact and lets the compiler drop the additions",
        "S = _sum(tl.where(r3 == BT - 1, S3, -0.0), 0)",
    )


def _forward_block(src: Src, plan: Plan, loads, full: bool, lean: bool):
    """One forward block at ``t_blk``: checkpoint, loads, scan, outputs, the state after it.
    ``full``: every token of the block lies in the sequence (no token masks)."""
    src(
        "t_blk = t0 + i_blk * BT",
        "if STORE_CKPT and PHASE != 1:",
        "    # the state entering chunk c > 0 (chunk 0 starts from h0 or zeros: not stored)",
        "    g_blk = blk0 + i_blk",
        "    if (g_blk % (C // BT) == 0) & (g_blk > 0):",
        "        tl.store(ckpt + ((ck0 + g_blk // (C // BT) - 1) * H + i_h) * K * V + o_state, S, mask=m_kv)",
    )
    _block_values(src, plan, loads, "n_blk", full)
    src(
        _fold_entering("S", lean),
        "A3, S3 = tl.associative_scan((G, b), 0, _affine)  # S3[r] = state after token r",
        "if PHASE == 1:",
        "    A = A * _sum(tl.where(r3 == BT - 1, A3, -0.0), 0)",
        "else:",
        "    o_b = _sum(S3 * q_c[:, :, None], 1) * scale",
        "    if HAS_D:",
        "        o_b += d_j[None, :] * v_c",
    )
    addr, mask = tile_addr("o", "V", "tok", "m_t")
    src(f"    tl.store({addr}, o_b.to(o.dtype.element_ty), mask={mask})")
    src(
        "# the last row (rows past the end carried the last token's state); the -0.0 filler",
        "# keeps the sum exact and lets the compiler drop the additions",
        "S = _sum(tl.where(r3 == BT - 1, S3, -0.0), 0)",
    )


def _forward(src: Src, plan: Plan, depth: int, coef_args: str, lean: bool):
    loads = BlockLoads(plan, with_q=True, with_do=False, depth=depth)
    src("@triton.jit")
    src(
        "def fwd_kernel(\n"
        f"    q, k, v, o, {coef_args}d_skip, h0, ht, ckpt, cu_seqlens, chunk_offsets,\n"
        "    scale, T,\n"
        f"{_SIZES}\n"
        "    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, STORE_CKPT: tl.constexpr,\n"
        "    HAS_D: tl.constexpr, IS_VARLEN: tl.constexpr,\n"
        "    seg=None, NSEG=1, SEG_T: tl.constexpr = 0, PHASE: tl.constexpr = 0,\n"
        "):"
    )
    src.indent()
    src(
        '"""One program: one (sequence, head, BV-slice of V), all tokens in blocks of BT, each',
        "block one scan over its tokens. Every C tokens the state entering the chunk goes to",
        "``ckpt`` for the backward.",
        "",
        "SEG_T > 0 (a multiple of C): the sequence split into segments of SEG_T tokens, the grid's",
        "third axis the segment j. PHASE 1 walks segment j from zero and writes its gate product",
        "and end state to seg ``[N·H, NV, NSEG, 2, BK, BV]`` fp32 (no outputs); PHASE 2 starts",
        "segment j from its true state, h0 (or zeros) carried through the earlier segments'",
        "(product, end state) pairs, and writes its outputs and checkpoints as the single walk",
        '(the last segment the final state)."""',
        _head(lean),
    )
    emit_params(src, plan)
    src(
        "S = tl.full([BK, BV], 0.0, dtype=tl.float32)",
        "if HAS_H0 and PHASE != 1:",
        "    S = tl.load(h0 + i_bh.to(tl.int64) * K * V + o_state, mask=m_kv, other=0.0).to(tl.float32)",
        "if HAS_D:",
        "    d_j = tl.load(d_skip + i_h * V + j_v, mask=m_v, other=0.0).to(tl.float32)",
        "t0 = bos",
        "blk0 = 0  # blocks before this program's first, in its sequence (checkpoint numbering)",
        "if SEG_T > 0:",
        "    i_s = tl.program_id(2)",
        "    t0 = bos + i_s * SEG_T",
        "    blk0 = i_s * (SEG_T // BT)",
        "    last = i_s == tl.maximum(_cdiv(n_tok, SEG_T), 1) - 1  # holds the final state",
        "    eos = tl.minimum(eos, t0 + SEG_T)  # the block masks stop at the segment's end",
        "    # the pairs of segment i: seg[(i_bh, i_v), i, 0] = gate product, [.., 1] = end state",
        "    o_seg = seg + (i_bh * tl.num_programs(1) + i_v).to(tl.int64) * NSEG * 2 * BK * BV",
        "    o_tile = n_k[:, None] * BV + tl.arange(0, BV)[None, :]",
        "    if PHASE == 1:",
        "        A = tl.full([BK, BV], 1.0, dtype=tl.float32)  # product of the gates so far",
        "    else:",
        "        for i in range(0, i_s):",
        "            A_i = tl.load(o_seg + (2 * i) * BK * BV + o_tile)",
        "            S = A_i * S + tl.load(o_seg + (2 * i + 1) * BK * BV + o_tile)",
    )
    _walk_forward(src, loads, lean, lambda full: _forward_block(src, plan, loads, full, lean))
    src(
        "if PHASE == 1:",
        "    tl.store(o_seg + (2 * i_s) * BK * BV + o_tile, A)",
        "    tl.store(o_seg + (2 * i_s + 1) * BK * BV + o_tile, S)",
        "elif STORE_HT:",
        "    if SEG_T > 0:",
        "        if last:",
        "            tl.store(ht + i_bh.to(tl.int64) * K * V + o_state, S, mask=m_kv)",
        "    else:",
        "        tl.store(ht + i_bh.to(tl.int64) * K * V + o_state, S, mask=m_kv)",
    )
    src.dedent()
    src("", "")


def _store_token_grad(src: Src, ptr: str, axes: str, val: str, cast: bool):
    """Write a per-token gradient tile: per-value ones are this program's alone, the rest
    are summed over the value slices."""
    addr, mask = tile_addr(ptr, axes, "tok", "m_t")
    if axes == "V":
        val = f"({val}).to({ptr}.dtype.element_ty)" if cast else val
        src(f"tl.store({addr}, {val}, mask={mask})")
    else:
        src(f"_accumulate({addr}, {val}, {mask}, SPLIT_V)")


def _replay_loop(src, plan: Plan, rec_loads, t0: str, count: str, lean: bool) -> None:
    """Emit the head of a forward replay in the backward: ``for i_blk in range(0, count)`` over
    blocks from token ``t0``, each block's values and scan (no partials), the body left open
    (indented) for the caller to keep the state it needs."""
    rec_loads.prologue(src, t0, "BT", count)
    src(f"for i_blk in range(0, {count}):")
    src.indent()
    src(f"t_blk = {t0} + i_blk * BT")
    # a replay never reaches a segment's last block, the only one that can be partial (lean:
    # no token masks)
    _block_values(src, plan, rec_loads, count, lean)
    _scan_block_end(src, lean)


def _reverse_block(src: Src, plan: Plan, rev_loads, full: bool, lean: bool):
    """One block of the backward's reverse walk at ``i_rb``: its entering state, the forward
    and reverse scans, every gradient. ``full``: every token of the block lies in the sequence."""
    src("i_blk = nb - 1 - i_rb", "t_blk = t_seg + i_blk * BT")
    rev_loads.take(src, "t_blk", "-BT", "i_rb", "nb")
    src(
        "if NB_C > 1:",
        "    if SLAB_IN_REGS == 1:",
        "        # slot i_blk: a select over the slots, in each thread's own registers",
        "        S0 = _sum(tl.where(slot == i_blk, slab, -0.0), 0)",
        "    elif SLAB_IN_REGS == 2:",
        "        # loaded one block ahead (the last block's, which may be partial, is S itself); the",
        "        # barrier that ends the block orders the load before the previous block's stores",
        "        S0 = S_next",
        "        o_nx, m_nx = _grads_slab_at(t_blk - BT, i_h, o_gs, m_kv, i_blk - 1, nb - 1, H, V)",
        "        S_next = _grads_slab_load(dv, scratch, o_nx, m_nx, SLAB_HALVES)",
        "    else:",
        "        S0 = tl.load(scr + i_blk * BK * BV + o_slab)",
        "else:",
        "    S0 = S",
    )
    emit_block_masks(src, "t_blk", full=full)
    emit_factors(src, plan)
    coefs = Coefficients(plan, with_partials=True)
    coefs.emit_values(src)
    parts = coefs.parts
    # the order below keeps few [BT, BK, BV] tiles alive at once: each is consumed as soon as
    # the next step allows
    src(
        "# forward states: S3[r] = S after token r (inclusive), Sx3[r] = S before it (exclusive)",
        _fold_entering("S0", lean),
        "_, S3, _, Sx3 = tl.associative_scan((G, b, one3, nz3), 0, _affine_excl)",
        "dq_b = _sum(S3 * do_c[:, None, :], 2) * scale",
    )
    _store_token_grad(src, "dq", "K", "dq_b", cast=False)
    src(
        "Sx3 = tl.where(r3 == 0, S0[None, :, :], Sx3)",
        "# reverse: the maps P -> G_t ⊙ (X_t + P), the later gradient P folded into the last row;",
        "# inclusive Pi3[r] = G_r ⊙ dS_r, exclusive Px3[r] = what reaches S_r from later tokens",
        "XP = (q_c * scale)[:, :, None] * do_c[:, None, :] + tl.where(r3 == BT - 1, P[None, :, :], 0.0)",
        "_, Pi3, _, Px3 = tl.associative_scan((tl.flip(G, 0), tl.flip(G * XP, 0), one3, nz3), 0, _affine_excl)",
        "Pi3 = tl.flip(Pi3, 0)",
        "Px3 = tl.flip(Px3, 0)",
        "P = _sum(tl.where(r3 == 0, Pi3, -0.0), 0)  # to the previous block: G_t0 ⊙ dS_t0",
        "dS = XP + Px3",
        "dG = dS * Sx3",
    )
    coefs.emit_partials(src)
    dk_terms = []
    if "k_n" in plan.symbols:
        g = grad_expr(parts, Factor("k_n", None, "K", True))
        if g:
            dk_terms.append(g)
    if "kk" in plan.symbols:
        g = grad_expr(parts, Factor("kk", None, "", True))
        if g:
            src(f"dkk = {g}")
            dk_terms.append("2.0 * dkk[:, None] * k_c")
    src(f"dk_b = {' + '.join(dk_terms) if dk_terms else 'tl.full([BT, BK], 0.0, dtype=tl.float32)'}")
    g = grad_expr(parts, Factor("v_j", None, "V", True)) if "v_j" in plan.symbols else None
    src(f"dv_b = {g or 'tl.full([BT, BV], 0.0, dtype=tl.float32)'}")
    src(
        "if HAS_D:",
        "    dv_b += d_j[None, :] * do_c",
        "    acc_d += _sum(do_c * v_c, 0)",
    )
    _store_token_grad(src, "dk", "K", "dk_b", cast=False)
    _store_token_grad(src, "dv", "V", "dv_b", cast=True)
    for fac in plan.factors:
        if fac.input is None:
            continue
        g = grad_expr(parts, fac) or "0.0"
        if fac.per_token:
            _store_token_grad(src, "g_" + fac.input, fac.axes, g, cast=True)
        else:
            src(f"acc_{fac.input} += {g}")
    src(
        "if NB_C > 1:",
        "    if SLAB_IN_REGS == 2:",
        "        tl.debug_barrier()  # the next block's state is read before that block's gradients overwrite it",
    )


def _carry_block(src: Src, plan: Plan, loads, full: bool):
    """One block of the backward's carry walk: the block's gate prefix products fold its
    tokens' ``X_t = scale · q_t do_tᵀ`` into L, and its gate product into A."""
    src("t_blk = t0 + i_blk * BT")
    _block_values(src, plan, loads, "n_blk", full)
    src(
        "cp = tl.associative_scan(G, 0, _mul)  # cp[r] = G_0 ⊙ .. ⊙ G_r (rows past the end: G = 1)",
        "L += A * _sum(cp * ((q_c * scale)[:, :, None] * do_c[:, None, :]), 0)",
        "A = A * _sum(tl.where(r3 == BT - 1, cp, -0.0), 0)",
    )


def _backward_carry(src: Src, plan: Plan, depth: int, coef_args: str, lean: bool):
    loads = BlockLoads(plan, with_q=True, with_do=True, depth=depth)
    src("@triton.jit")
    src(
        "def bwd_carry_kernel(\n"
        f"    q, k, v, do, {coef_args}carry_a, carry_l, cu_seqlens, chunk_offsets,\n"
        "    scale, T, NSPLIT,\n"
        f"{_SIZES}\n"
        "    IS_VARLEN: tl.constexpr, SPLIT_T: tl.constexpr,\n"
        "):"
    )
    src.indent()
    src(
        '"""The backward split along the sequence, first pass: one program per (sequence, head,',
        "BV-slice, segment s >= 1) walks segment s forward and writes slot s - 1 of ``carry_a``",
        "and ``carry_l`` ([N·H, NV, NSPLIT - 1, BK, BV] each) the pair (A, L): A = ⊙_t G_t over the segment and",
        "L = Σ_t (G_{t0} ⊙ .. ⊙ G_t) ⊙ X_t, the gradient its tokens' outputs send to the state",
        "before it. The gradient leaving the segment is then A ⊙ P + L for P the one reaching its",
        "end (the reverse scan's recurrence P_{t-1} = G_t ⊙ (X_t + P_t), unrolled). Segment 0's",
        'pair would reach no one."""',
        _head(lean),
    )
    emit_params(src, plan)
    src(
        "i_s = tl.program_id(2) + 1",
        "t0 = bos + i_s * SPLIT_T",
        "eos = tl.minimum(eos, t0 + SPLIT_T)  # the block masks stop at the segment's end",
        "A = tl.full([BK, BV], 1.0, dtype=tl.float32)",
        "L = tl.full([BK, BV], 0.0, dtype=tl.float32)",
    )
    _walk_forward(src, loads, lean, lambda full: _carry_block(src, plan, loads, full))
    src(
        "o_car = ((i_bh * tl.num_programs(1) + i_v).to(tl.int64) * (NSPLIT - 1) + i_s - 1) * BK * BV",
        "o_car += n_k[:, None] * BV + tl.arange(0, BV)[None, :]",
        "tl.store(carry_a + o_car, A)",
        "tl.store(carry_l + o_car, L)",
    )
    src.dedent()
    src("", "")


def _backward(src: Src, plan: Plan, depth: int, coef_args: str, grad_args: str, lean: bool):
    rec_loads = BlockLoads(plan, with_q=False, with_do=False, depth=depth)
    rev_loads = BlockLoads(plan, with_q=True, with_do=True, depth=depth)
    src("@triton.jit")
    src(
        "def bwd_kernel(\n"
        f"    q, k, v, do, {coef_args}d_skip, h0, dht, dh0, ckpt, scratch,\n"
        f"    dq, dk, dv, dd_skip, {grad_args}cu_seqlens, chunk_offsets,\n"
        "    scale, T, NV,\n"
        f"{_SIZES}\n"
        "    NB_C: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,\n"
        "    HAS_D: tl.constexpr, IS_VARLEN: tl.constexpr, SPLIT_V: tl.constexpr,\n"
        f"    HAS_H0: tl.constexpr = False, SLAB_IN_REGS: tl.constexpr = {DEFAULT_SLAB_IN_REGS},\n"
        "    NSEG: tl.constexpr = 1, carry=None, NSPLIT=1, SPLIT_T: tl.constexpr = 0,\n"
        "    SLAB_HALVES: tl.constexpr = 1,\n"
        "):"
    )
    src.indent()
    src(
        '"""Reverse pass of one (sequence, head, BV-slice): chunks last to first, and inside a',
        "chunk its NB_C = C / BT blocks last to first, each replayed from the block's entering",
        "state and differentiated with one forward and one reverse scan. The chunk's NB_C",
        "block-entering states live in registers ([NB_C, BK, BV], SLAB_IN_REGS = 1; NB_C a power of",
        "two), in a per-program global scratch slab (0), or (2) in this program's own cells of the",
        "gradient buffers it has not written yet (dv, and ``scratch``: a per-value coefficient's",
        "gradient buffer when SLAB_HALVES = 2). With NSEG > 1 (register slab only) a",
        "checkpoint covers NSEG segments of NB_C blocks: a first replay keeps the state entering",
        "each segment in registers ([NSEG, BK, BV]), and each segment is then done as a chunk.",
        "",
        "SPLIT_T > 0 (a multiple of C): the sequence split into NSPLIT segments of SPLIT_T tokens,",
        "the grid's third axis the segment i_p; its walk starts from the gradient reaching its end:",
        "dht for the last segment, slot i_p of ``carry`` [N·H, NV, NSPLIT - 1, BK, BV] for the",
        "others (dht folded through the later segments' pairs: ``bwd_carry_kernel``, then",
        "``fold.fold_carries_kernel``).",
        "",
        "Outputs that sum over the value axis (dq, dk, per-key/per-head coefficients) are",
        "accumulated over the value slices (atomics when SPLIT_V); per-value ones are written;",
        "parameters and the D gradient are summed over this program's tokens, then added",
        'atomically across sequences, segments and slices."""',
        _head(lean),
        "i_p = 0  # segment of the sequence split",
        "i_prog = i_bh * NV + i_v  # this program's global-slab scratch",
        "if SPLIT_T > 0:",
        "    i_p = tl.program_id(2)",
        "    i_prog = i_prog * NSPLIT + i_p",
    )
    emit_params(src, plan)
    acc_shape = {"": "[1]", "K": "[BK]", "V": "[BV]", "VK": "[BK, BV]"}
    for fac in plan.factors:
        if not fac.per_token:
            src(f"acc_{fac.input} = tl.full({acc_shape[fac.axes]}, 0.0, dtype=tl.float32)")
    src(
        "if HAS_D:",
        "    d_j = tl.load(d_skip + i_h * V + j_v, mask=m_v, other=0.0).to(tl.float32)",
        "acc_d = tl.full([BV], 0.0, dtype=tl.float32)",
        "# the exclusive half of the scan elements: the identity step",
        "one3 = tl.full([BT, BK, BV], 1.0, dtype=tl.float32)",
        "nz3 = tl.full([BT, BK, BV], -0.0, dtype=tl.float32)",
        "# P: gradient reaching the state after the current block from everything later",
        "P = tl.full([BK, BV], 0.0, dtype=tl.float32)",
        "if HAS_DHT:",
        "    P = tl.load(dht + i_bh.to(tl.int64) * K * V + o_state, mask=m_kv, other=0.0).to(tl.float32)",
        "c_lo = 0  # this program's chunks: [c_lo, c_hi)",
        "c_hi = _cdiv(n_tok, C)",
        "if SPLIT_T > 0:",
        "    c_lo = i_p * (SPLIT_T // C)",
        "    c_hi = tl.minimum(c_hi, c_lo + SPLIT_T // C)",
        "    if i_p < NSPLIT - 1:",
        "        # the gradient reaching this segment's end, dht folded through the later segments",
        "        # (fold.fold_carries_kernel); the last segment's is dht itself",
        "        o_car = ((i_bh * NV + i_v).to(tl.int64) * (NSPLIT - 1) + i_p) * BK * BV",
        "        P = tl.load(carry + o_car + n_k[:, None] * BV + tl.arange(0, BV)[None, :])",
        "if NB_C > 1:",
        "    if SLAB_IN_REGS == 1:",
        "        slot = tl.arange(0, NB_C)[:, None, None]  # slab slot of each block of a chunk",
        "    elif SLAB_IN_REGS == 0:",
        "        o_slab = n_k[:, None] * BV + tl.arange(0, BV)[None, :]",
        "        scr = scratch + i_prog.to(tl.int64) * NB_C * BK * BV",
        "    else:",
        "        # slot i of a segment: row k of the state in token k of block i (BT >= BK), value j",
        "        o_gs = n_k[:, None].to(tl.int64) * (H * V) + j_v[None, :]",
        "if NSEG > 1:",
        "    sslot = tl.arange(0, NSEG)[:, None, None]  # segment-slab slot of each segment",
        "for i_r in range(0, c_hi - c_lo):",
    )
    src.indent()
    src(
        "i_c = c_hi - 1 - i_r",
        "t_chunk = bos + i_c * C",
        "n_seg = _cdiv(tl.minimum(C, n_tok - i_c * C), NB_C * BT)  # segments in this chunk",
        "if i_c > 0:",
        "    S = tl.load(ckpt + ((ck0 + i_c - 1) * H + i_h) * K * V + o_state, mask=m_kv, other=0.0)",
        "elif HAS_H0:",
        "    S = tl.load(h0 + i_bh.to(tl.int64) * K * V + o_state, mask=m_kv, other=0.0).to(tl.float32)",
        "else:",
        "    S = tl.full([BK, BV], 0.0, dtype=tl.float32)",
        "if NSEG > 1:",
    )
    src.indent()
    src(
        "# 0) replay the chunk's segments but the last; slot s holds the state entering segment s",
        "segs = tl.where(sslot == 0, S[None, :, :], 0.0)",
    )
    _replay_loop(src, plan, rec_loads, "t_chunk", "(n_seg - 1) * NB_C", lean)
    src(
        "seg_to = tl.where((i_blk + 1) % NB_C == 0, (i_blk + 1) // NB_C, -1)  # -1: no slot",
        "segs = tl.where(sslot == seg_to, S[None, :, :], segs)",
    )
    src.dedent()
    src.dedent()
    src("for i_rs in range(0, n_seg):")
    src.indent()
    src(
        "i_s = n_seg - 1 - i_rs",
        "t_seg = t_chunk + i_s * (NB_C * BT)",
        "nb = _cdiv(tl.minimum(NB_C * BT, n_tok - i_c * C - i_s * (NB_C * BT)), BT)  # blocks in this segment",
        "if NSEG > 1:",
        "    S = _sum(tl.where(sslot == i_s, segs, -0.0), 0)",
        "if NB_C > 1:",
    )
    src.indent()
    src(
        "# 1) replay the segment forward; slot i of the slab holds the state entering block i",
        "# (the gradient-buffer slab stores none for the last block, which keeps its state in S)",
        "if SLAB_IN_REGS == 1:",
        "    slab = tl.where(slot == 0, S[None, :, :], 0.0)",
        "elif SLAB_IN_REGS == 2:",
        "    o_sl, m_sl = _grads_slab_at(t_seg, i_h, o_gs, m_kv, 0, nb - 1, H, V)",
        "    _grads_slab_store(dv, scratch, o_sl, m_sl, S, SLAB_HALVES)",
        "else:",
        "    tl.store(scr + o_slab, S)",
    )
    _replay_loop(src, plan, rec_loads, "t_seg", "nb - 1", lean)
    src(
        "if SLAB_IN_REGS == 1:",
        "    slab = tl.where(slot == i_blk + 1, S[None, :, :], slab)",
        "elif SLAB_IN_REGS == 2:",
        "    o_sl, m_sl = _grads_slab_at(t_blk + BT, i_h, o_gs, m_kv, i_blk + 1, nb - 1, H, V)",
        "    _grads_slab_store(dv, scratch, o_sl, m_sl, S, SLAB_HALVES)",
        "else:",
        "    tl.store(scr + (i_blk + 1) * BK * BV + o_slab, S)",
    )
    src.dedent()
    src(
        "if SLAB_IN_REGS != 1:",
        "    tl.debug_barrier()  # the slab is read back by other threads",
    )
    src.dedent()
    src("# 2) the segment's blocks, last to first")
    src(
        "if NB_C > 1:",
        "    if SLAB_IN_REGS == 2:",
        "        S_next = S  # the state entering the segment's last block",
    )
    rev_loads.prologue(src, "t_seg + (nb - 1) * BT", "-BT", "nb")
    if lean:
        # the segment's last block first, with token masks if it is the sequence's partial last
        # block; the rest with masks the compiler knows are true
        src("n_part = (t_seg + nb * BT > eos).to(tl.int32)")
        loops = (("for i_rb in range(0, n_part):", False), ("for i_rb in range(n_part, nb):", True))
    else:
        loops = (("for i_rb in range(0, nb):", False),)
    _emit_loops(src, loops, lambda full: _reverse_block(src, plan, rev_loads, full, lean))
    src(
        "if NB_C > 1:",
        "    if SLAB_IN_REGS == 0:",
        "        tl.debug_barrier()  # the next chunk overwrites the slab",
    )
    src.dedent()
    src.dedent()
    src(
        "if STORE_DH0:",
        "    if i_p == 0:  # the first segment's walk ends at h0",
        "        tl.store(dh0 + i_bh.to(tl.int64) * K * V + o_state, P, mask=m_kv)",
        "if HAS_D:",
        "    tl.atomic_add(dd_skip + i_h * V + j_v, acc_d, mask=m_v, sem='relaxed')",
    )
    # parameters (shaped as the input, [H, ...], float32, zeroed by the caller): each program's
    # sum over its tokens added atomically, as dq and dk across value slices, instead of one
    # row per (sequence, segment[, value slice]) that the caller sums: those rows took
    # N · NSPLIT times the parameter's size (0.75 MiB for mamba1's A at E = 1536, B = 8)
    for fac in plan.factors:
        if fac.per_token:
            continue
        gp, acc = "g_" + fac.input, "acc_" + fac.input
        if fac.axes == "":
            src(f"tl.atomic_add({gp} + i_h + tl.arange(0, 1), {acc}, sem='relaxed')")
        elif fac.axes == "K":
            src(f"tl.atomic_add({gp} + i_h * K + n_k, {acc}, mask=m_k, sem='relaxed')")
        elif fac.axes == "V":
            src(f"tl.atomic_add({gp} + i_h * V + j_v, {acc}, mask=m_v, sem='relaxed')")
        else:
            src(f"tl.atomic_add({gp} + (i_h * V + j_v[None, :]) * K + n_k[:, None], {acc}, mask=m_kv, sem='relaxed')")
    src.dedent()


def generate_source(plan: Plan, prefetch: Tuple[int, int] = (1, 1), lean: bool = True) -> str:
    """The Python module text holding ``fwd_kernel`` and ``bwd_kernel`` for ``plan``.

    Args:
        plan: what to compute.
        prefetch: how many blocks ahead the forward and the backward loops load (0: none).
        lean: the template with fewer instructions per block (the default; False, or
            ``OLSM_ELEMENTWISE_LEAN=0``, gives the classic one): key/value masks folded when the blocks tile K and V,
            the entering state selected into row 0, ``exp`` as ``ex2.approx.ftz`` on a GPU, and
            the walks' whole blocks without token masks (the partial last block apart).

    Returns:
        Source text of a module importing only ``os``, ``triton`` and ``triton.language``.
    """
    src = Src()
    src(
        f'"""Generated by olsm.kernels.elementwise ({GENERATOR_VERSION}) for {plan.name!r}. Do not edit.',
        "",
        f"gate        G[n, j] = {plan.gate}",
        f"write key   k̃[n]    = {plan.wk}",
        f"write value ṽ[j]    = {plan.wv}",
        "",
        "Block-parallel scan; the algorithm is described in olsm/kernels/elementwise/codegen.py.",
        '"""',
        "import os",
        "",
        "import triton",
        "import triton.language as tl",
        "",
        "",
    )
    src.lines.extend(_HELPERS.replace("@LEAN@", str(bool(lean))).rstrip("\n").split("\n") + ["", ""])
    coef_args = "".join(f"x_{s.name}, " for s in plan.inputs)
    grad_args = "".join(f"g_{s.name}, " for s in plan.inputs)
    _forward(src, plan, prefetch[0], coef_args, lean)
    _backward(src, plan, prefetch[1], coef_args, grad_args, lean)
    src("", "")
    _backward_carry(src, plan, prefetch[1], coef_args, lean)
    return src.text()
