r"""Fused forward of the matrix class for the common members: no decay or a scalar decay per
head, and at most one low-rank pair (linear attention, RetNet, Mamba2, DeltaNet, Gated DeltaNet,
Longhorn, gated Longhorn, any rank-1 DPLR with a scalar decay); and a per-key decay with at most
one pair (GLA; RWKV-7 / DPLR, KDA), whose extra kernels are in :mod:`.perkey` and
:mod:`.perkey_pair` (``DECAY = 2`` here).

Same algorithm as :mod:`.chunk` (read its docstring first), rearranged the way fast chunked
linear-attention kernels are (GLA arXiv 2312.06635; the WY/UT form of DeltaNet arXiv 2406.06484
and Gated DeltaNet arXiv 2412.06464): nothing chunk-local is prepared in torch, and the inputs
are read where they lie (token-major ``[B·T, H, D]``, in their own dtype). Per chunk n and head,
with G the chunk-relative cumulative log-decay (a scalar one is computed in every kernel from
``log_decay``, a [C] vector being cheap to re-sum; a per-key one, ``[C, K]``, once per call by
:mod:`.perkey`) and the rank-1 pair (a, b)::

    L = strict(b aᵀ ⊙ e^{G_{t−1} − G_s}),  N = strict(b wᵀ ⊙ e^{G_{t−1} − G_s}),  T = (I − L)⁻¹
    X = T B̂ [C, K],  Y = T N U [C, V]                                 (kernel 1, WY/UT form)
    P = X S_n + Y   (the probes bᵀS_{t−1} of the chunk)
    S_{n+1} = Γ S_n + Âᵀ P + Ŵᵀ U                                      (kernel 2, sequential)
    o = scale · (Q̂ S_n + M_qa P + M_qw U),  M_q· = incl(q ·ᵀ ⊙ e^{G_t − G_s})   (kernel 3)

Kernel 1 (:func:`_wy_fwd_kernel`, one program per chunk × head) forms both Gram matrices with
tensor-core dots, inverts the unit lower-triangular ``I − L`` in registers, blocked by 16 rows
with every step a tensor-core dot (no ``solve_triangular``) and writes X and Y. Kernel 2 (:func:`_state_fwd_kernel`)
walks each sequence's chunks and also stores P, so that kernel 3 (:func:`_output_fwd_kernel`)
computes the intra-chunk output from P and U with the two Grams made in-kernel: no effective
queries and no intra-chunk outputs are ever materialised. Every exponent is ≤ 0 (masked before
``exp``). The chunk-boundary states S_n are the general path's, stored in the inputs' dtype
for bf16/fp16 inputs (:func:`state_dtype`; fp32 otherwise), so either backward can replay them.

Selecting it: ``OLSM_MATRIX_PATH=general`` (environment, read at each call) forces the general
path of :mod:`.chunk` for A/B timing; the default ``auto`` takes this one where it applies.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from olsm.errors import BackendError

from . import perkey, perkey_pair
from .perkey_pair import BA, BW, QA, QW
from ..ints import cdiv, next_pow2, sm_count
from .tiles import (
    chunk_decay, chunk_key_tiles, chunk_tokens, gamma_at, segment_start, store_segment_end, walk_bounds,
    walk_decay, walk_program, walk_tokens,
)

DECAY_NONE, DECAY_SCALAR, DECAY_PER_KEY = 0, 1, 2


@triton.jit
def _strict_ratio(G_prev, G, offs_c):
    """``e^{G_{t−1} − G_s}`` below the diagonal (t > s), 0 on and above it ``[C, C]``; with no
    decay (G = 0) the strict lower mask. Masked before ``exp``: above the diagonal the exponent
    can be large and positive."""
    strict = offs_c[:, None] > offs_c[None, :]
    return tl.exp(tl.where(strict, G_prev[:, None] - G[None, :], float("-inf")))


@triton.jit
def _horner_merge(Tm, L, inner, outer, offs_c, PRECISION: tl.constexpr, N: tl.constexpr):
    """From Tm = (I − L_in)⁻¹, L_in the part of L inside blocks of ``inner`` rows, the inverse over
    blocks of ``outer`` rows: I − L_out = (I − L_in)(I − M) with M = Tm (L_out − L_in), nilpotent
    over the N = outer / inner sub-blocks, so (I − L_out)⁻¹ = (I + M + … + M^{N−1}) Tm (Horner)."""
    between = ((offs_c[:, None] // outer) == (offs_c[None, :] // outer)) & \
        ((offs_c[:, None] // inner) != (offs_c[None, :] // inner))
    M = tl.dot(Tm, tl.where(between, L, 0.), input_precision=PRECISION)
    T_in = Tm
    for _ in range(1, N):
        Tm = T_in + tl.dot(M, Tm, input_precision=PRECISION)
    return Tm


@triton.jit
def _substitute_blocks(L, offs_c, NB: tl.constexpr, PRECISION: tl.constexpr):
    """(I − L_bd)⁻¹ for the NB × NB diagonal blocks L_bd of L, by forward substitution, all blocks
    at once: row i of each block is e_i + L_bd[i, :] T (rows above it are final), i.e. one [C, C]
    dot with the other rows masked out (NB − 1 dots)."""
    L_bd = tl.where((offs_c[:, None] // NB) == (offs_c[None, :] // NB), L, 0.)
    Tm = (offs_c[:, None] == offs_c[None, :]).to(tl.float32)
    for i in range(1, NB):
        Tm = Tm + tl.dot(tl.where((offs_c % NB == i)[:, None], L_bd, 0.), Tm, input_precision=PRECISION)
    return Tm


@triton.jit
def _substitute_blocks_rows(L, C: tl.constexpr, NB: tl.constexpr):
    """The same (I − L_bd)⁻¹ as :func:`_substitute_blocks`, without [C, C] dots: the C / NB diagonal
    blocks are taken out as one [C/NB, NB, NB] tile and row i of every block is formed at once,
    T[i] = e_i + Σ_{s<i} L[i, s] T[s], with two reductions over NB (NB − 1 steps on NB³ C/NB
    elements instead of NB − 1 dots of C³); returned as a block-diagonal [C, C] again."""
    NBLK: tl.constexpr = C // NB
    blk = tl.arange(0, NBLK)
    same = blk[:, None, None, None] == blk[None, None, :, None]                   # [NBLK, 1, NBLK, 1]
    L_bd = tl.sum(tl.where(same, tl.reshape(L, (NBLK, NB, NBLK, NB)), 0.), axis=2)   # [NBLK, NB, NB]
    r = tl.arange(0, NB)
    Tm = tl.zeros((NBLK, NB, NB), dtype=tl.float32) + (r[:, None] == r[None, :]).to(tl.float32)[None, :, :]
    for i in range(1, NB):
        row = r[None, :, None] == i
        l_i = tl.sum(tl.where(row, L_bd, 0.), axis=1)                              # [NBLK, NB]: L[i, :]
        Tm = tl.where(row, Tm + tl.sum(l_i[:, :, None] * Tm, axis=1)[:, None, :], Tm)
    return tl.reshape(tl.where(same, Tm[:, :, None, :], 0.), (C, C))


@triton.jit
def _unit_lower_inverse(L, offs_c, C: tl.constexpr, PRECISION: tl.constexpr, LEVELS: tl.constexpr = 2,
                        ROWS: tl.constexpr = False):
    """T = (I − L)⁻¹ of a strictly lower [C, C] L (C a multiple of 16), every step a [C, C]
    tensor-core dot, blocked like a triangular solve:

    * LEVELS = 2 (``OLSM_MATRIX_INVERSE=levels2``, the default of runs 5–8): 16 × 16 diagonal
      blocks by substitution (15 dots), then 16 → C by :func:`_horner_merge` (1 + C/16 − 1): 19
      serial dots at C = 64;
    * LEVELS = 3 (``levels3``): 4 × 4 blocks by substitution (3), 4 → 16 (1 + 3) and 16 → C
      (1 + C/16 − 1): 11 serial dots at C = 64.

    ROWS (``rows16`` / ``rows4``, the default, for LEVELS 2 / 3): the innermost blocks by row
    substitution on a 3-D tile (:func:`_substitute_blocks_rows`) instead of dots: 4 / 8 serial
    [C, C] dots at C = 64, as FLA inverts its 16 × 16 blocks on small tiles. On the H200 (run 9,
    DeltaNet forward at (8, 2048, 16, 128), bf16) rows4 took 0.795 ms, levels2 0.887, rows16 0.878.

    Stable: every level is an exact block substitution. The plain power series
    (I + L)(I + L²)(I + L⁴)… is exact in theory but its powers grow binomially with correlated
    keys and lost every digit in fp32; row-by-row substitution over all C rows (C − 1 cross-warp
    reductions) cost 1.46 ms per call at (8, 2048, 16, 128) on an H100.
    """
    NB: tl.constexpr = 4 if LEVELS == 3 else 16
    if ROWS:
        Tm = _substitute_blocks_rows(L, C, NB)
    else:
        Tm = _substitute_blocks(L, offs_c, NB, PRECISION)
    if LEVELS == 3:
        Tm = _horner_merge(Tm, L, 4, 16, offs_c, PRECISION, 4)
    if C > 16:
        Tm = _horner_merge(Tm, L, 16, C, offs_c, PRECISION, C // 16)
    return Tm


@triton.jit
def _wy_fwd_kernel(
    w, a, b, u, g, c, states, tok_start, tok_stop, x_wy, y_wy, t_wy, u_scale, kk_coef, kk_out, grams,
    H, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr, PRECISION: tl.constexpr,
    STORE_T: tl.constexpr = False, DELTA: tl.constexpr = False, STORE_NU: tl.constexpr = False,
    LOAD_T: tl.constexpr = False, INV_LEVELS: tl.constexpr = 2, U_SCALE: tl.constexpr = False,
    INV_ROWS: tl.constexpr = False, NORM: tl.constexpr = False, LOWP: tl.constexpr = False,
):
    """X = T B̂ and Y = T N U of one chunk × head (module docstring, kernel 1).

    Shapes: w, a, b ``[B·T, H, K]``; u ``[B·T, H, V]`` (input dtype); g ``[B·T, H]`` fp32;
    tok_start/tok_stop ``[NC]`` int32 (the chunk's tokens); x_wy ``[NC, H, C, K]``,
    y_wy ``[NC, H, C, V]`` in the caller's storage dtype (:func:`state_dtype`: bf16/fp16 for
    half-precision inputs, fp32 otherwise; the kernel casts on store). Rows past the chunk's end
    are written as zeros. With STORE_T
    (the backward) also T itself, t_wy ``[NC, H, C, C]`` fp32.

    DELTA (the delta form of :mod:`.delta`: w = a = b = k are one pointer, c ``[B·T, H]`` fp32):
    L = −diag(c) (K Kᵀ ⊙ R), A = T = (I − L)⁻¹, X = −A diag(c e^{G_{t−1}}) K and Y = A U, so that
    ν = X S_n + Y is the chunk's effective values. With STORE_NU (its backward) the value loop
    writes ν itself into y_wy, from the stored states ``[NC, H, K, V]``, instead of Y; with
    LOAD_T it reads T from t_wy (the forward stored it) instead of inverting I − L again. With
    U_SCALE the written values are u_scale ``[B·T, H]`` fp32 times u (DeltaNet's β v, in-kernel).
    NORM (DELTA, not LOAD_T): c and u_scale are divided by 1 + b_t ‖k_t‖² (b = kk_coef
    ``[B·T, H]`` fp32), the implicit step's normaliser (Longhorn's ε = β / (1 + β kᵀk)), with
    ‖k_t‖² taken from the key rows in registers and written to kk_out ``[B·T, H]`` fp32 for the
    backward.

    DECAY = 2 (a per-key decay with the pair, :mod:`.perkey_pair`): g is the cumulative G
    ``[B·T, H, K]`` fp32, L and N are read from grams ``[NC, H, 4, C, C]`` (decay and strict mask
    included) and B̂ = B ⊙ e^{G_prev} per key.

    LOWP (:func:`wy_dots_lowp`, the default): the X and Y dots take operands in x_wy's dtype (T
    rounded to bf16/fp16, B and U as stored, u_scale folded into T's columns), as FLA's
    ``recompute_w_u``, instead of fp32 copies of B and U written to shared memory for tf32 dots.
    The inverse stays fp32 either way.
    """
    nh = tl.program_id(0).to(tl.int64)
    # rows of b, columns of a and w (transposed by pointer arithmetic, never tl.trans)
    i_h, offs_c, valid, tok, offs_k, mask_k, row_k, mask_row, col_k, mask_col = chunk_key_tiles(
        tok_start, tok_stop, nh, H, K, C, BK, 0)
    G = tl.zeros([C], dtype=tl.float32)
    G_prev = G
    if DECAY == 1:
        g_c, G, _ = chunk_decay(g, tok, valid, i_h, H, offs_c)
        G_prev = G - g_c
    if DELTA:
        c_t = tl.load(c + tok * H + i_h, mask=valid, other=0.)
    t_nh = t_wy + nh * C * C + offs_c[:, None] * C + offs_c[None, :]
    if LOAD_T:
        Tm = tl.load(t_nh)                          # the forward's T (the delta backward)
    else:
        b_rows = tl.load(b + row_k, mask=mask_row, other=0.)
        if NORM:
            kk_t = tl.sum(b_rows.to(tl.float32) * b_rows.to(tl.float32), axis=1)           # ‖k_t‖²
            tl.store(kk_out + tok * H + i_h, kk_t, mask=valid)
            r_t = 1. / (1. + tl.load(kk_coef + tok * H + i_h, mask=valid, other=0.) * kk_t)
            c_t = c_t * r_t
        if DECAY == 2:
            L = tl.load(grams + (nh * 4 + BA) * C * C + offs_c[:, None] * C + offs_c[None, :])
        else:
            a_cols = tl.load(a + col_k, mask=mask_col, other=0.)
            L = tl.dot(b_rows, a_cols, input_precision=PRECISION)                   # [C, C]
            L = L * _strict_ratio(G_prev, G, offs_c)
        if DELTA:
            # a = −c k written as a row scale: the delta rule's ν_t = u_t − c_t k_tᵀ S_{t−1}
            L = L * (-c_t)[:, None]

        Tm = _unit_lower_inverse(L, offs_c, C, PRECISION, INV_LEVELS, INV_ROWS)
        if STORE_T:
            tl.store(t_nh, Tm)
    od = x_wy.dtype.element_ty if LOWP else tl.float32      # the X and Y dots' operands
    # b is read again after the inverse, X is stored, and only then are w's columns read
    # (a second read of b hits L2; keeping [C, K] tiles live through the inverse or next to X
    # spilled registers on sm_90)
    b_rows = tl.load(b + row_k, mask=mask_row, other=0.)
    # X = T B̂ with B̂ = diag(e^{G_{t−1}}) B: the scale goes on T's columns ([C, C], not [C, K])
    if DECAY == 2:
        # per key: B̂ = B ⊙ e^{G_prev}, G_prev the cumulative G of the row before (0 on the first)
        G_prev_k = tl.load(g + row_k - H * K, mask=mask_row & (offs_c >= 1)[:, None], other=0.)
        X = tl.dot(Tm.to(od), (b_rows.to(tl.float32) * tl.exp(G_prev_k)).to(od), input_precision=PRECISION)
    else:
        col_scale = tl.exp(G_prev)
        if DELTA:
            col_scale = -c_t * col_scale
        X = tl.dot((Tm * col_scale[None, :]).to(od), b_rows.to(od), input_precision=PRECISION)
    out_k = nh * C * K + offs_c[:, None] * K + offs_k[None, :]
    tl.store(x_wy + out_k, X.to(x_wy.dtype.element_ty), mask=mask_k[None, :])
    if DELTA:
        TN = Tm                                     # Y = A U: the write shares the probe's key
    elif DECAY == 2:
        TN = tl.dot(Tm, tl.load(grams + (nh * 4 + BW) * C * C + offs_c[:, None] * C + offs_c[None, :]),
                    input_precision=PRECISION)
    else:
        w_cols = tl.load(w + col_k, mask=mask_col, other=0.)
        # the decay ratio is formed again, not kept live through the inverse (registers)
        Nm = tl.dot(b_rows, w_cols, input_precision=PRECISION) * _strict_ratio(G_prev, G, offs_c)
        TN = tl.dot(Tm, Nm, input_precision=PRECISION)
    if U_SCALE:
        s_t = tl.load(u_scale + tok * H + i_h, mask=valid, other=0.)
        if NORM:
            s_t = s_t * r_t
        if LOWP:
            TN = TN * s_t[None, :]          # T N diag(s) U: U stays as stored (no fp32 copy)
    TN_o = TN.to(od)
    for i_v in range(0, (V + BV - 1) // BV):
        offs_v = i_v * BV + tl.arange(0, BV)
        mask_v = offs_v < V
        U = tl.load(u + (tok[:, None] * H + i_h) * V + offs_v[None, :],
                    mask=valid[:, None] & mask_v[None, :], other=0.).to(od)
        if U_SCALE and not LOWP:
            U = U * s_t[:, None]
        Y = tl.dot(TN_o, U, input_precision=PRECISION)
        if STORE_NU:
            # ν as the forward's state pass formed it: X, Y and S_n rounded to the storage dtype
            st = y_wy.dtype.element_ty
            S = tl.load(states + nh * K * V + offs_k[:, None] * V + offs_v[None, :],
                        mask=mask_k[:, None] & mask_v[None, :], other=0.)
            Y = Y.to(st).to(tl.float32) + tl.dot(X.to(st), S.to(st), input_precision=PRECISION)
        tl.store(y_wy + nh * C * V + offs_c[:, None] * V + offs_v[None, :], Y.to(y_wy.dtype.element_ty),
                 mask=mask_v[None, :])


@triton.jit
def _chunk_rows(y, c, c_end, i_h, H, C: tl.constexpr, V: tl.constexpr, offs_v, mask_v):
    """Rows ``[C, BV]`` of chunk ``c`` × head ``i_h`` of a per-chunk tensor y ``[NC, H, C, V]``
    at value columns ``offs_v``; zeros when ``c >= c_end`` (past the walk)."""
    nh = (c * H + i_h).to(tl.int64)
    rows = tl.arange(0, C)
    # the row test rather than `& (c < c_end)`: the interpreter stores a bool tensor & a bool
    # scalar as int32, which tl.load rejects as a mask
    return tl.load(y + nh * C * V + rows[:, None] * V + offs_v[None, :],
                   mask=(rows < tl.where(c < c_end, C, 0))[:, None] & mask_v[None, :], other=0.)


@triton.jit
def _state_fwd_kernel(
    w, a, u, g, x_wy, y_wy, h0, states, probes, final, tok_start, tok_stop, chunk_offsets,
    H, seg_end, seg_g, NSEG,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    DECAY: tl.constexpr, LOWRANK: tl.constexpr, HAS_H0: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, DELTA: tl.constexpr = False,
    LOWP: tl.constexpr = False, SEG_L: tl.constexpr = 0, SEG_START: tl.constexpr = False,
    SEG_W: tl.constexpr = 0, SEG_EXT: tl.constexpr = False, G_CUM: tl.constexpr = False,
):
    """Sequential pass over one sequence × head × block of BV value columns (kernel 2); without a
    low-rank part the grid also splits K into blocks of BK (:func:`sequence_launch`). With DELTA
    (and LOWRANK) P is the delta form's ν and S_{n+1} = γ_n S_n + Ŵᵀ ν (u and a are not read),
    its dots taking operands in the storage dtype; LOWP does the same without a low-rank part.

    Shapes: w, a ``[B·T, H, K]``, u ``[B·T, H, V]`` (input dtype); g ``[B·T, H]`` fp32 (DECAY = 2,
    no low-rank part: the per-key cumulative G ``[B·T, H, K]`` of :mod:`.perkey`);
    x_wy ``[NC, H, C, K]``, y_wy ``[NC, H, C, V]``; writes states ``[NC, H, K, V]`` (S_n, the
    state each chunk starts from), probes ``[NC, H, C, V]`` (P) and final ``[N, H, K, V]``.

    SEG_L > 0 (:mod:`.split`): the grid's first axis is segment × value block and the program
    walks only segment j, chunks ``[j·SEG_L, (j + 1)·SEG_L)`` of its sequence. Without SEG_START
    (split step 1) it walks from a zero state, stores no chunk states or probes, and writes the
    segment's end state to seg_end ``[N·H, NSEG, K, SEG_W]`` fp32 and (first value block) its
    total log-decay to seg_g (``[N·H, NSEG]``, per key ``[N·H, NSEG, K]``). With a low-rank part
    (SEG_EXT, SEG_W = V + K) the columns ``[V, V + K)`` walk the identity with no input, which
    leaves the segment's transition (a product of ``γ I + Âᵀ X`` over its chunks) in seg_end
    beside its end state. With SEG_START (step 3) it starts from the segment's true start state,
    which the join left in seg_end, and stores the chunk states (and probes) as the single walk
    does. No final state either way (the join writes it).
    """
    i_nh, i_h, c_start, c_end, offs_k, mask_k, offs_v, mask_v, mask_kv, kv, kvs, j, lead = walk_program(
        chunk_offsets, H, K, V, BK, BV, SEG_L, SEG_W, SEG_EXT)
    mask_u = offs_v < V                         # the value columns (SEG_EXT walks more: .split)
    store = SEG_L == 0 or SEG_START             # chunk states and probes (not in split step 1)
    # with SEG_L: log-decay from the segment's start (per key: a [BK] vector)
    if DECAY == 2:
        cum = tl.zeros([BK], dtype=tl.float32)
    else:
        cum = tl.zeros([1], dtype=tl.float32)

    # dot operands: fp32 copies, or with DELTA / LOWP as stored (bf16/fp16 tensor-core dots for
    # half-precision inputs, as FLA's state pass; fp32 accumulators and S): half the registers and
    # MMA steps of tf32 on this latency-bound sequential path
    od = states.dtype.element_ty if (DELTA or LOWP) else tl.float32
    S = segment_start(seg_end, i_nh, NSEG, j, kvs, mask_kv, offs_k, offs_v, K, V, BK, BV, SEG_W, SEG_START,
                      SEG_EXT)
    if HAS_H0 and SEG_L == 0:
        S += tl.load(h0 + i_nh.to(tl.int64) * K * V + kv, mask=mask_kv, other=0.)

    t_first, t_end = walk_bounds(tok_start, tok_stop, c_start, c_end)
    if LOWRANK:
        # Y of the walk's first chunk; each step below loads the next chunk's by hand, a whole step
        # ahead: Triton folds `dot + Y` into the dot's accumulator, and its pipeliner prefetches
        # only a dot's A and B operands, so Y was the walk's one synchronous load (sm_90 TTGIR,
        # Triton 3.9), a full memory latency per chunk on the sequential path
        Y = _chunk_rows(y_wy, c_start, c_end, i_h, H, C, V, offs_v, mask_u)
    for c in range(c_start, c_end):
        nh = (c * H + i_h).to(tl.int64)
        if store:
            tl.store(states + nh * K * V + kv, S.to(states.dtype.element_ty), mask=mask_kv)
        offs_c, valid, tok, last = walk_tokens(t_first, t_end, c, c_start, C)
        col_k = (tok[None, :] * H + i_h) * K + offs_k[:, None]
        mask_col = mask_k[:, None] & valid[None, :]
        W_T = tl.load(w + col_k, mask=mask_col, other=0.).to(tl.float32)         # [BK, C]
        if DECAY == 1:
            G, g_total = walk_decay(g, tok, valid, last, i_h, H, offs_c, G_CUM)
            to_end = tl.exp(g_total - G)    # decay from s to the chunk's end, <= 1 up to rounding (cumsum vs sum)
            W_T = W_T * to_end[None, :]
        if DECAY == 2:
            # per key (:mod:`.perkey`): g is the chunk-relative cumulative G [B·T, H, K], γ its last row
            # loaded in the step that uses it (sync loads 1 with a pair): a hand prefetch a chunk
            # ahead (as Y's) was measured slower, DPLR's forward at (1, 32768) 4.89 → 5.16 ms
            gam = gamma_at(g, last, i_h, H, K, offs_k, mask_k)
            to_end_k = tl.exp(gam[:, None] - tl.load(g + col_k, mask=mask_col, other=0.))   # [BK, C]
            W_T = W_T * to_end_k
        if LOWRANK:
            X = tl.load(x_wy + nh * C * K + offs_c[:, None] * K + offs_k[None, :], mask=mask_k[None, :], other=0.)
            P = tl.dot(X.to(od), S.to(od), input_precision=PRECISION) + Y.to(tl.float32)
            Y = _chunk_rows(y_wy, c + 1, c_end, i_h, H, C, V, offs_v, mask_u)
            if store:
                tl.store(probes + nh * C * V + offs_c[:, None] * V + offs_v[None, :],
                         P.to(probes.dtype.element_ty), mask=mask_v[None, :])
        if DELTA:
            S_next = tl.dot(W_T.to(od), P.to(od), input_precision=PRECISION)
        else:
            U = tl.load(u + (tok[:, None] * H + i_h) * V + offs_v[None, :],
                        mask=valid[:, None] & mask_u[None, :], other=0.)                  # [C, BV]
            S_next = tl.dot(W_T.to(od), U.to(od), input_precision=PRECISION)
            if LOWRANK:
                A_T = tl.load(a + col_k, mask=mask_col, other=0.).to(tl.float32)
                if DECAY == 1:
                    A_T = A_T * to_end[None, :]
                elif DECAY == 2:
                    A_T = A_T * to_end_k
                S_next += tl.dot(A_T, P, input_precision=PRECISION)
        if DECAY == 1:
            S_next += tl.exp(g_total) * S
            if SEG_L > 0:
                cum += g_total
        elif DECAY == 2:
            S_next += tl.exp(gam)[:, None] * S
            if SEG_L > 0:
                cum += gam
        else:
            S_next += S
        S = S_next

    if SEG_L > 0:
        if not SEG_START:
            store_segment_end(seg_end, seg_g, i_nh, NSEG, j, S, cum, kvs, mask_kv, lead, offs_k, mask_k, K, SEG_W,
                              0 if SEG_EXT else DECAY)
    else:
        tl.store(final + i_nh.to(tl.int64) * K * V + kv, S, mask=mask_kv)


@triton.jit
def _output_fwd_kernel(
    q, w, a, u, g, states, probes, o, amat, tok_start, tok_stop, scale,
    H, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    DECAY: tl.constexpr, LOWRANK: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, DELTA: tl.constexpr = False,
    LOWP: tl.constexpr = False,
):
    """o = scale · (Q̂ S_n + M_qa P + M_qw U) for one chunk × head × V-block (kernel 3); with
    DELTA (LOWRANK off) o = scale · (Q̂ S_n + M_qw ν), ν read from probes instead of u. LOWP
    (LOWRANK off): the two value dots on storage-dtype operands (:func:`dots_lowp`). DECAY = 2
    (per key; :mod:`.perkey`): g is the cumulative G ``[B·T, H, K]`` fp32 and M_qw is read from
    amat ``[NC, H, C, C]`` fp32 (zeros above the diagonal) instead of formed from q and w; with
    LOWRANK amat is :mod:`.perkey_pair`'s ``[NC, H, 4, C, C]`` and M_qa comes from it too.

    Shapes: q, w, a ``[B·T, H, K]``; u ``[B·T, H, V]``; g ``[B·T, H]`` fp32; states
    ``[NC, H, K, V]``; probes ``[NC, H, C, V]``; o ``[B·T, H, V]`` (written token-major in the
    output dtype; tokens past the chunk's end are not written).
    """
    i_v = tl.program_id(0)
    nh = tl.program_id(1).to(tl.int64)
    i_h = nh % H
    offs_c, valid, tok = chunk_tokens(tok_start, tok_stop, nh // H, C)
    offs_k = tl.arange(0, BK)
    mask_k = offs_k < K
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_v = offs_v < V

    Q = tl.load(q + (tok[:, None] * H + i_h) * K + offs_k[None, :],
                mask=valid[:, None] & mask_k[None, :], other=0.)
    col_k = (tok[None, :] * H + i_h) * K + offs_k[:, None]
    mask_col = mask_k[:, None] & valid[None, :]
    incl = offs_c[:, None] >= offs_c[None, :]
    Q_hat = Q.to(tl.float32)
    if DECAY == 2:
        # per key: Q̂ = Q ⊙ e^{G} from the cumulative G in g, the intra-chunk A made by .perkey
        Q_hat = Q_hat * tl.exp(tl.load(g + (tok[:, None] * H + i_h) * K + offs_k[None, :],
                                       mask=valid[:, None] & mask_k[None, :], other=0.))
        # zeros above the diagonal; with a pair amat holds .perkey_pair's four Grams
        gram = amat + nh * (4 if LOWRANK else 1) * C * C + offs_c[:, None] * C + offs_c[None, :]
        M_qw = tl.load(gram + (QW * C * C if LOWRANK else 0))
    else:
        W_T = tl.load(w + col_k, mask=mask_col, other=0.)
        M_qw = tl.dot(Q, W_T, input_precision=PRECISION)                       # [C, C]
    if DECAY == 1:
        _, G, _ = chunk_decay(g, tok, valid, i_h, H, offs_c)
        ratio = tl.exp(tl.where(incl, G[:, None] - G[None, :], float("-inf")))
        M_qw = M_qw * ratio
        Q_hat = Q_hat * tl.exp(G)[:, None]
    elif DECAY == 0:
        M_qw = tl.where(incl, M_qw, 0.)

    od = states.dtype.element_ty if LOWP else tl.float32       # dot operands (see _state_fwd_kernel)
    S = tl.load(states + nh * K * V + offs_k[:, None] * V + offs_v[None, :],
                mask=mask_k[:, None] & mask_v[None, :], other=0.).to(od)
    acc = tl.dot(Q_hat.to(S.dtype), S, input_precision=PRECISION)
    if DELTA:
        U = tl.load(probes + nh * C * V + offs_c[:, None] * V + offs_v[None, :], mask=mask_v[None, :],
                    other=0.).to(od)
    else:
        U = tl.load(u + (tok[:, None] * H + i_h) * V + offs_v[None, :],
                    mask=valid[:, None] & mask_v[None, :], other=0.).to(od)
    acc += tl.dot(M_qw.to(U.dtype), U, input_precision=PRECISION)
    if LOWRANK:
        if DECAY == 2:
            M_qa = tl.load(gram + QA * C * C)
        else:
            A_T = tl.load(a + col_k, mask=mask_col, other=0.)
            M_qa = tl.dot(Q, A_T, input_precision=PRECISION)
            if DECAY == 1:
                M_qa = M_qa * ratio
            else:
                M_qa = tl.where(incl, M_qa, 0.)
        P = tl.load(probes + nh * C * V + offs_c[:, None] * V + offs_v[None, :], mask=mask_v[None, :],
                    other=0.).to(tl.float32)
        acc += tl.dot(M_qa, P, input_precision=PRECISION)
    tl.store(o + (tok[:, None] * H + i_h) * V + offs_v[None, :], (scale * acc).to(o.dtype.element_ty),
             mask=valid[:, None] & mask_v[None, :])


@dataclass(frozen=True)
class LaunchShape:
    """Block sizes and warps of every fused launch, forward and backward, in one place (so the
    wrappers and ``benchmarks/kernel_resources.py`` cannot drift apart).

    Attributes:
        BK: padded K (a whole key row per tile); BKS: key slice of the dq/dw and rank-1 dk
            kernels; BKS_du: of the du kernel.
        BV: value block of the sequential passes (forward state, reverse dS); BV_dqdw: of the
            dq/dw kernel; BV_out: of the forward output kernel; BV_wide: of the WY kernel and
            the du kernel; BV_rank1: of the rank-1 gradient kernels 2'a/2'b.
        warps_seq, warps_state_lr, warps_out, warps_wy, warps_chunk, warps_rank1: num_warps of
            the sequential passes (the forward one with a low-rank part: warps_state_lr), the
            output kernel, the WY kernel, the rank-0 per-chunk backward kernels and
            the rank-1 ones; warps_pair: the whole-chunk per-key kernels' (:mod:`.perkey` and
            :mod:`.perkey_pair`: Grams, backward), stages_pair: the pair Grams' num_stages (2: half
            the shared memory of 3, sm_90 compile at C = 64); warps_walk_decay: both walks
            without a pair with a scalar decay (:func:`rank0_warps`); warps_delta_decay: the
            delta form's reverse pass with a decay (:func:`.fused_bwd.dstate_warps`; a field
            so that ``tune_fused.py`` can move it; measured on an H200, run 16);
            warps_split_decay: the segment walks of those two walks split along the sequence
            (``OLSM_MATRIX_STATE=split``, :mod:`.split`) at key blocks of at most 64
            (:func:`split_warps`). The split launches about four programs per SM, and at
            warps_walk_decay (8) fewer fit: on the sm_90 compile (Triton 3.6, BK = 32, BV = 64,
            as at (1, 32768, 16, 128)) the forward's segment walks take 76 / 92 registers on 8
            warps, 3 / 2 programs per SM, against 110 / 112 on 4 warps, 4 per SM (the reverse
            ones 2 per SM against 3–4); linear attention's, on 4 warps, fit 8.
            Run 20's profile had Mamba-2's split forward walk at 0.605 ms against linear
            attention's 0.315. Untimed on a GPU at 4 (the split is not the default with a decay).
        BK_seq_min: the narrowest key block :func:`sequence_launch` cuts the walks without a pair
            to at few programs; BK_walk_fwd_min: the same for the forward walk without a pair or a
            decay (linear attention), whose split walk at (1, 32768, 16, 128) took 0.225 ms at 64-key
            blocks against 0.316 at 32 (H200, run 22, ``tune_fused.py``). Its reverse walk lost at 64
            (0.367 → 0.557), and so did Mamba-2's forward walk (0.410 → 0.517; 0.467 on 4 warps).
        BV_seq_min_lr: the narrowest value block the walks with a pair halve to at few programs
            (never under 64 below 128-key rows, :func:`sequence_launch`); a field so that
            ``tune_fused.py`` can time FLA's gated delta h kernel's 64 at (1, 32768), where ours
            walks blocks of 32 (gated DeltaNet's forward walk 1.001 ms against FLA's 0.788, run 22).

    The values are what ``benchmarks/tune_fused.py`` measured fastest on an H100 at
    (8, 2048, 16, 128), bf16, C = 64 (one knob at a time, 2026-11-24): 4 warps beat 8 for every
    per-chunk kernel (output 0.41 → 0.27 ms, WY 0.74 → 0.50, dq/dw 0.59 → 0.45, rank-1 2'a
    3.30 → 2.89 and 2'b 1.63 → 1.14), value blocks of 64 beat 32 in the sequential passes with
    a decay (0.37 → 0.25 ms each; rank-1 reverse pass 2.63 → 1.71), key slices of 32 in du; then,
    with those, 4 warps in the sequential passes (reverse rank-1 pass 1.30 → 1.01 ms, forward
    state pass without low rank 0.24 → 0.19) except the forward one with a low-rank part (0.88
    at 8 warps, 1.14 at 4; before the walks were pipelined; the delta form's own rule since run
    14: :func:`state_warps`).
    """

    BK: int
    BKS: int
    BKS_du: int
    BV: int
    BV_dqdw: int
    BV_out: int
    BV_wide: int
    BV_rank1: int
    warps_seq: int
    warps_state_lr: int
    warps_out: int
    warps_wy: int
    warps_chunk: int
    warps_rank1: int
    warps_pair: int = 4
    stages_pair: int = 2
    warps_walk_decay: int = 8
    warps_delta_decay: int = 4
    warps_split_decay: int = 4
    BK_seq_min: int = 32
    BK_walk_fwd_min: int = 64
    BV_seq_min_lr: int = 32


@functools.lru_cache(maxsize=None)
def launch_shape(K: int, V: int, C: int, fp32: bool = False) -> LaunchShape:
    """The :class:`LaunchShape` for head dims K, V (<= 128) and chunk length C (cached: a pure
    function of its arguments, asked several times per call).

    ``fp32``: float32 inputs (``ieee`` dots, which run on the CUDA cores with twice the register
    tiles). They keep 8 warps in the WY, output and rank-1 kernels and in the sequential passes
    without a low-rank part (``warps_seq``; the forward pass with one, ``warps_state_lr``, depends
    on BK only):
    at 4 warps the reverse rank-1 pass spilled 28 KB per thread (sm_90 compile) and the fp32
    DeltaNet GPU tests did not finish in minutes.
    """
    BK = max(16, next_pow2(K))
    # BV, BV_out and BV_wide are at least 64 wide, even for small V: Triton 3.6's Hopper MMA,
    # given a 16-bit [K, BV] operand with 64- or 32-byte rows (BV = 32 or 16) next to an operand
    # converted in registers, read shared memory past its buffer (compute-sanitizer on an H200:
    # 1024- / 512-byte invalid __shared__ reads in the delta WY kernel's X·S dot at K = 64 and
    # V = 32 / 16 and in the output kernel's storage-dtype M·ν dot; illegal-address faults that
    # depended on the process's history); 128-byte rows ran clean in every case checked.
    # BV_dqdw (32 at BK = 128) and BV_rank1 (16) feed other operands: README §1.3.
    # BV_out: the whole value row for 16-bit inputs, so q and w are read once per chunk (H200, run
    # 15, tune_fused.py, output kernel 64 → 128 at (1, 32768): Mamba-2 0.275 → 0.248 ms, gated
    # DeltaNet 0.278 → 0.237, DeltaNet 0.201 → 0.188, GLA 0.415 → 0.297; linear attention within
    # 2 %); with a pair 64 (:func:`output_block`)
    pv = max(64, next_pow2(V))
    small = C <= 64
    w4 = 8 if fp32 else 4
    return LaunchShape(BK=BK, BKS=min(BK, 64), BKS_du=min(BK, 32), BV=min(64, pv),
                       BV_dqdw=min(64 if BK <= 64 else 32, pv),
                       BV_out=min(32 if BK > 128 else 64 if fp32 else 128, pv), BV_wide=min(64, pv),
                       BV_rank1=16, warps_seq=w4, warps_state_lr=4 if BK <= 64 else 8,
                       warps_out=w4 if BK * C <= 128 * 64 else 8,
                       warps_wy=w4 if C * BK <= 64 * 128 else 8, warps_chunk=4 if small else 8,
                       warps_rank1=w4 if small else 8, warps_pair=4 if small else 8)


def sequence_launch(shape: LaunchShape, N: int, H: int, K: int, V: int, lowrank: bool, device,
                    min_BK: Optional[int] = None):
    """``(grid, BK, BV)`` of the sequential passes (forward state, reverse dS): one program per
    sequence × head × value block × key block, each walking its sequence's chunks in order.

    Without a low-rank part the rows of S are independent, so when there are few sequences ×
    heads (B = 1 at T = 32768: 32 programs on 132 SMs, each walking 512 chunks) K is split too,
    down to blocks of ``BK_seq_min`` (32), until there are about two programs per SM. With one (P = X S reads
    all of S) the key block is all of K and the value block halves instead, down to 32, while
    there are fewer programs than half the SMs (H200, deltanet at (8, 2048, 16, 128): value
    blocks of 32 instead of 64 slowed the forward state pass from 0.24 to 0.36 ms; value blocks of
    32 only with BK >= 128: :func:`launch_shape`). ``min_BK``: the narrowest key block without a
    pair (default ``shape.BK_seq_min``).
    """
    BK, BV = shape.BK, shape.BV
    sms = sm_count(device)
    if not lowrank:
        floor = shape.BK_seq_min if min_BK is None else min_BK
        while BK > floor and N * H * cdiv(V, BV) * cdiv(K, BK) < 2 * sms:
            BK //= 2
    else:
        # 32-wide blocks only with a whole 128-key row (BK = 128: clean under compute-sanitizer;
        # narrower rows at K = 64 were not, see launch_shape)
        while BV > max(shape.BV_seq_min_lr, 32 if BK >= 128 else 64) and 2 * N * H * cdiv(V, BV) < sms:
            BV //= 2
    return (cdiv(V, BV), N * H, cdiv(K, BK)), BK, BV


def wy_constexprs(shape: LaunchShape, K: int, V: int, C: int, decay: int, prec: str, store_t: bool,
                  delta: bool = False, store_nu: bool = False, load_t: bool = False) -> dict:
    """The compile-time arguments of :func:`_wy_fwd_kernel` (also read by ``kernel_resources.py``)."""
    inverse = env_choice("OLSM_MATRIX_INVERSE", ("rows4", "levels2", "levels3", "rows16"))
    levels = 3 if inverse in ("levels3", "rows4") else 2
    # a per-key decay's pair (DECAY = 2) keeps fp32 copies: its B̂ = B ⊙ e^{G_prev} and T spread
    # over the decay's range, and bf16 operands gave DPLR's output a 1.1e-1 relative error at
    # C = 128 on the H200 (run 17, test_fp16_and_chunk_sizes)
    lowp = wy_dots_lowp() and decay != 2
    return dict(K=K, V=V, C=C, BK=shape.BK, BV=shape.BV_wide, DECAY=decay, PRECISION=prec,
                STORE_T=store_t, DELTA=delta, STORE_NU=store_nu, LOAD_T=load_t, INV_LEVELS=levels,
                INV_ROWS=inverse.startswith("rows"), LOWP=lowp,
                num_warps=shape.warps_wy)


def launch_wy(shape: LaunchShape, w, a, b, u, g, tok_start, tok_stop, x_wy, y_wy, t_wy, H, K, V, C, decay, prec,
              c=None, states=None, load_t=False, u_scale=None, kk_coef=None, kk_out=None, grams=None):
    """Kernel 1 (:func:`_wy_fwd_kernel`) over all NC chunks × H heads; with ``t_wy`` it also
    stores T (``load_t``: reads it instead). ``g`` is None without decay. With ``c``
    (``[B·T, H]`` fp32) it runs the delta form (w = a = b), and with ``states`` as well writes ν
    into ``y_wy``; ``u_scale`` (``[B·T, H]`` fp32) scales each token's u; ``kk_coef`` (with
    ``kk_out``, both ``[B·T, H]`` fp32; forward only) divides c and u_scale by 1 + kk_coef ‖k‖².
    ``grams``: a per-key decay's four Grams (:mod:`.perkey_pair`), with ``g`` its cumulative G."""
    NC = tok_start.numel()
    if NC == 0:
        return
    _wy_fwd_kernel[(NC * H,)](
        w, a, b, u, g if g is not None else u, c if c is not None else u, states if states is not None else u,
        tok_start, tok_stop, x_wy, y_wy, t_wy if t_wy is not None else x_wy, u_scale if u_scale is not None else u,
        kk_coef if kk_coef is not None else u, kk_out if kk_out is not None else u,
        grams if grams is not None else u, H, U_SCALE=u_scale is not None, NORM=kk_coef is not None,
        **wy_constexprs(shape, K, V, C, decay, prec, t_wy is not None and not load_t, c is not None,
                        states is not None, load_t))


MAX_FUSED_DIM = 128  # wider heads keep [C, K] tiles of q, w, a, b at once: left to the general path


def env_choice(name: str, choices: tuple) -> str:
    """The code path the environment variable ``name`` selects (read at each call, for A/B
    timing); unset means ``choices[0]``. A value outside ``choices`` is an error, not a silent
    default.

    Raises:
        BackendError: the variable holds something else.
    """
    value = os.environ.get(name, choices[0])
    if value not in choices:
        raise BackendError(f"{name}={value!r} is not one of {', '.join(choices)}; unset it for the default "
                           f"({choices[0]})")
    return value


def dots_lowp() -> bool:
    """``OLSM_MATRIX_DOTS=storage`` (the default; read at each call): the forward state and output
    kernels without a low-rank part, the delta form's output and its per-chunk backward kernels
    take dot operands in the storage dtype (bf16/fp16 tensor-core dots with fp32 accumulators, as
    FLA's kernels) instead of fp32 copies (``fp32``: tf32 dots for half-precision inputs, the
    default up to run 8). On the H200 (run 9, (8, 2048, 16, 128), bf16) DeltaNet's fwd+bwd took
    1.986 ms with storage dots and 2.416 with fp32 copies."""
    return env_choice("OLSM_MATRIX_DOTS", ("storage", "fp32")) == "storage"


def bwd_dots_lowp() -> bool:
    """``OLSM_MATRIX_BWD_DOTS`` (read at each call): ``storage`` (the default) or ``fp32``. Storage:
    the rank-0 backward's per-chunk kernels (linear attention, Mamba-2, GLA) on storage-dtype operands,
    as FLA's ``chunk_bwd_kernel_dqkwg`` and ``chunk_bwd_kernel_dv`` take them: in
    :func:`.fused_bwd._dqdw_bwd_kernel` the value loop's dO, U and the chunk states S_n, dS_{n+1}
    (stored in the inputs' dtype already) and the two dA products (dA rounded once); in
    :func:`.fused_bwd._du_bwd_kernel` W, dS_{n+1} and the intra-chunk matrix (rounded once) with dO.
    Else fp32 copies, which Triton multiplies as tf32 at half the bf16 rate and with twice the
    shared memory (the default up to run 20). On the H200 (run 21, bf16, ``quick_ab.py``) fwd+bwd
    at (1, 32768, 16, 128) went 2.021 -> 1.523 ms (linear attention), 2.474 -> 2.017 (Mamba-2),
    5.402 -> 4.894 (GLA); in CUDA graphs at (8, 2048, 16, 128) linear attention 0.904 -> 0.656 ms,
    against FLA's ``chunk_simple_gla`` at 0.815."""
    return env_choice("OLSM_MATRIX_BWD_DOTS", ("storage", "fp32")) == "storage"


def wy_dots_lowp() -> bool:
    """``OLSM_MATRIX_WY_DOTS`` (read at each call): ``storage`` (the default since run 17), the WY
    kernel's X and Y dots on storage-dtype operands (:func:`_wy_fwd_kernel`'s LOWP; not for a
    per-key decay's pair, see :func:`wy_constexprs`), or ``fp32`` copies of B and U (tf32 dots;
    the default up to run 16). On the H200 (run 17, bf16,
    (1, 32768, 16, 128)) storage dots took DeltaNet's forward from 1.556 to 1.312 ms and its
    fwd+bwd from 3.746 to 3.531; gated DeltaNet's forward 1.874 -> 1.646 ms. ncu (run 16) had found
    the fp32 WY forward at 2 programs per SM with half its shared-memory wavefronts excess, the
    fp32 copies of B and U being the largest tiles it writes to shared memory."""
    return env_choice("OLSM_MATRIX_WY_DOTS", ("storage", "fp32")) == "storage"


WALK_CUMSUM_MAX_BK = 32   # the widest key block whose scalar-decay walks read G by default


def walk_log_decay(g, decay: int, lowrank: bool, BK: int, tok_start, tok_stop, H: int, C: int, made=None):
    """The log-decay a walk (forward state or reverse dS) reads, and its ``G_CUM`` constexpr.

    A walk with a scalar decay and no pair (Mamba-2) can read G, the chunk-relative cumulative
    log-decay made once by :func:`.perkey.chunk_cumsum` (one small launch, ``[B·T, H]`` fp32),
    instead of a ``tl.cumsum`` and a ``tl.sum`` of the chunk's steps in every step of its walk.
    Compiled for sm_90 by Triton 3.6 at the launch of (1, 32768, 16, 128) (BK = 32, 8 warps), the
    forward walk's loop drops from 2512 to 1648 SASS instructions per chunk (its barriers from 9
    to under 4 per warp) and the reverse walk's from 2856 to 2272; at BK = 128 the forward's
    rises (3408 to 3624), and the walks with a pair rise too, so those keep the inline sums.

    ``OLSM_MATRIX_WALK_DECAY`` (read at each call): ``auto`` (the default) reads G at key blocks
    of at most :data:`WALK_CUMSUM_MAX_BK` (32, the few-program launches of long sequences),
    ``cumsum`` at key blocks of at most 64, ``inline`` never; ``cumsum_all`` (opt-in, for A/B
    timing) at every key block, the walks with a pair too (the fused path's and the delta form's).
    H200, bf16, Mamba-2 (run 23, ``quick_ab.py``, cumsum against inline): at (1, 32768, 16, 128)
    (BK = 32) the forward went 0.658 → 0.590 ms and fwd+bwd 2.012 → 1.953; at (8, 2048, 16, 128)
    (BK = 64) the forward went 0.238 → 0.260 and fwd+bwd 0.993 → 1.121, hence the 32 of auto.

    ``made``: G as the forward made it (the backward passes what the forward kept), taken
    instead of a second :func:`.perkey.chunk_cumsum` when G is to be read.

    Returns:
        ``(g_walk, G_CUM)``: G and True, or ``g`` itself and False.
    """
    mode = env_choice("OLSM_MATRIX_WALK_DECAY", ("auto", "inline", "cumsum", "cumsum_all"))
    max_BK = {"auto": WALK_CUMSUM_MAX_BK, "cumsum": 64, "inline": 0, "cumsum_all": BK}[mode]
    if decay == DECAY_SCALAR and (not lowrank or mode == "cumsum_all") and BK <= max_BK:
        return (made if made is not None else perkey.chunk_cumsum(g, tok_start, tok_stop, H, 1, C)), True
    return g, False


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of the chunk-boundary states S_n (and their gradients) for inputs of ``dtype``."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def fused_applies(log_decay, lowrank, K: int = 0, V: int = 0) -> bool:
    """Whether :func:`fused_forward` handles this call: any decay (none, scalar, per key) with at
    most one low-rank pair; K, V <= :data:`MAX_FUSED_DIM`; and the user did not ask for the
    general path with ``OLSM_MATRIX_PATH=general``."""
    if env_choice("OLSM_MATRIX_PATH", ("auto", "general")) == "general":
        return False
    return len(lowrank) <= 1 and max(K, V) <= MAX_FUSED_DIM


# Shared-memory fallback of the sequential passes: loading chunks ahead (num_stages) may not fit
# for wide heads; each OutOfResources drops a configuration one stage, for good.
_STAGES: dict = {}


def launch_staged(kernel, grid, args, stages: int, **kw):
    """Launch ``kernel[grid](*args, **kw)`` at ``stages``, one stage fewer after each
    ``OutOfResources`` (remembered per kernel, input dtype and constexprs; raised at one stage).
    Serves both walks: :func:`_launch_state` and :func:`.fused_bwd.launch_dstate`."""
    key = (id(kernel), str(args[0].dtype)) + tuple(sorted(kw.items()))
    stages = _STAGES.get(key, stages)
    while True:
        try:
            return kernel[grid](*args, num_stages=stages, **kw)
        except triton.runtime.errors.OutOfResources:
            if stages == 1:
                raise
            stages -= 1
            _STAGES[key] = stages


def no_segments(dummy):
    """The segment arguments of :func:`_state_fwd_kernel` when it walks whole sequences."""
    return (dummy, dummy, 1)


def state_stages(decay: int, lowrank: bool, delta: bool = False) -> int:
    """num_stages of :func:`_state_fwd_kernel`: ``OLSM_MATRIX_STATE_STAGES`` if set to 2, 3 or 4;
    ``auto`` (unset): 3 for the delta form and for a decay without a pair, 2 for the rest.

    H200, with the walk's addresses arithmetic (tiles.walk_tokens), forward ms:
    - run 13: DeltaNet at (1, 32768) 1.934 / 1.891 / 2.256 at 2 / 3 / 4 stages, fwd+bwd at (2, 8192)
      1.726 / 1.692 (2 / 3); GLA fwd+bwd at (1, 32768) 5.653 / 5.522 / 5.487.
    - run 14 (``quick_ab.py``, 2 / 3 stages): Mamba-2 (scalar decay, rank 0) 1.338 / 1.256 at
      (1, 32768), 0.405 / 0.390 at (8, 2048); linear attention (no decay: the split pass) 0.533 /
      0.579; the RWKV-7 form (per-key decay, pair; 197 KB of shared memory at 3) 4.981 / 4.987.
    """
    choice = env_choice("OLSM_MATRIX_STATE_STAGES", ("auto", "2", "3", "4"))
    if choice != "auto":
        return int(choice)
    return 3 if delta or (decay != DECAY_NONE and not lowrank) else 2


def output_block(shape: LaunchShape, lowrank: bool) -> int:
    """Value block of :func:`_output_fwd_kernel`: ``BV_out``, at most 64 with a pair (its M_qa·P
    dot on fp32 operands: at 128 the RWKV-7 form's output kernel went 0.727 → 0.861 ms at
    (1, 32768, 16, 128) on the H200, run 15, and the scalar-decay pair spilled 32 B, sm_90 compile;
    ``tune_fused.py`` patches ``BV_out`` only, so it cannot put a pair back at 128)."""
    return min(shape.BV_out, 64) if lowrank else shape.BV_out


def rank0_warps(shape: LaunchShape, decay: int) -> int:
    """num_warps of both walks (forward state, reverse dS) without a low-rank part:
    ``warps_walk_decay`` (8) with a scalar decay, else ``warps_seq``. At 4 warps the scalar
    decay's reverse pass took 255 registers and spilled 72 B per thread (sm_90 compile); H200, run 15, (8, 2048, 16, 128) bf16, Mamba-2, 4 → 8
    warps: reverse pass 0.251 → 0.206 ms, forward 0.115 → 0.105 (within 2 % at (1, 32768)); linear
    attention lost (reverse 0.142 → 0.157)."""
    return shape.warps_walk_decay if decay == DECAY_SCALAR else shape.warps_seq


def split_warps(shape: LaunchShape, decay: int, lowrank: bool, BK: int) -> Optional[int]:
    """num_warps of the segment walks when a walk without a pair is split along the sequence
    (:func:`.split.walk_sequences`) at key blocks ``BK``: ``warps_split_decay`` with a scalar decay
    and key blocks of at most 64 (:func:`sequence_launch` narrows them at few programs, where the
    split pays), where the single walk takes 8 (:func:`rank0_warps`) and fewer of the split's
    programs would fit on an SM; None (the single walk's) otherwise. At whole 128-key rows the
    reverse segment walk takes 255 registers on 4 warps (sm_90, Triton 3.6; 16 B spilled on 3.9)."""
    return shape.warps_split_decay if decay == DECAY_SCALAR and not lowrank and BK <= 64 else None


def state_warps(shape: LaunchShape, decay: int, lowrank: bool, BV: int, delta: bool = False) -> int:
    """num_warps of :func:`_state_fwd_kernel` at value block ``BV``: :func:`rank0_warps` for rank 0,
    ``warps_state_lr`` with a pair, except the delta form, which takes 4 without a decay or at
    64-wide value blocks.

    H200, bf16, K = V = 128, ``benchmarks/tune_fused.py`` (run 14), state pass 8 → 4 warps: the
    delta form without a decay won at every shape (BV = 64 at (8, 2048): 0.220 → 0.190 ms; BV = 32
    at (2, 8192): 0.302 → 0.257, at (1, 32768): 1.010 → 0.819), with a decay at BV = 64 (0.259 →
    0.200) but not at BV = 32 (0.411 → 0.424, 1.621 → 1.660); the general pair (DPLR) lost at every
    shape (0.409 → 0.577 ms at (8, 2048), 2.055 → 2.159 at (1, 32768)).
    """
    if not lowrank:
        return rank0_warps(shape, decay)
    return 4 if delta and (decay == DECAY_NONE or BV >= 64) else shape.warps_state_lr


def _launch_state(grid, args, **kw):
    """:func:`_state_fwd_kernel` at :func:`state_stages` (:func:`launch_staged`)."""
    stages = state_stages(kw["DECAY"], kw["LOWRANK"], kw.get("DELTA", False))
    return launch_staged(_state_fwd_kernel, grid, args, stages, **kw)


def fused_forward(q, w, u, log_decay, lowrank, h0, tok_start, tok_stop, chunk_offsets, C, meta, max_chunks=0):
    """The forward of :func:`.chunk.chunk_matrix` for no / scalar decay and rank <= 1, or a
    per-key decay and rank <= 1.

    Args:
        q, w: ``[B, T, H, K]``; u: ``[B, T, H, V]``; one dtype (contiguous copies are made if
            needed). log_decay: ``None``, ``[B, T, H]`` or ``[B, T, H, K]``.
            lowrank: ``()`` or ``((a, b),)``.
        h0: ``None`` or ``[N, H, K, V]``.
        tok_start, tok_stop: ``[NC]`` int32, the flat token range ``[start, stop)`` of chunk n.
        chunk_offsets: ``[N + 1]`` int32, the chunks of sequence i.
        C: chunk length. meta: ``scale``, ``out_dtype``, ``precision``.
        max_chunks: chunks of the longest sequence (for ``OLSM_MATRIX_STATE=split``, :mod:`.split`;
            0: unknown, the state pass walks whole sequences).

    Returns:
        ``o [B, T, H, V]`` (out_dtype), ``final [N, H, K, V]`` fp32, ``states [NC, H, K, V]``
        (the chunk-boundary states, in :func:`state_dtype` of the inputs) and, with a per-key
        decay, the intra-chunk A ``[NC, H, C, C]`` fp32 (:mod:`.perkey`; None otherwise), which
        the backward reuses: making it again took 0.40 ms of GLA's 3.06 at (8, 2048, 16, 128)
        on an H200, keeping it costs C² fp32 per chunk and head (a quarter of the bf16 states at
        C = 64, K = V = 128); with a pair, its four Grams ``[NC, H, 4, C, C]`` fp32
        (:mod:`.perkey_pair`) in A's place, then T ``[NC, H, C, C]`` fp32, X ``[NC, H, C, K]``
        and P ``[NC, H, C, V]`` (so the backward launches no WY kernel and 2'a reads P).
    """
    B, T, H, K = q.shape
    V = u.shape[-1]
    NC = tok_start.numel()
    N = chunk_offsets.numel() - 1
    dev = q.device
    q, w, u = (t.contiguous() for t in (q, w, u))
    lowrank = [(a.contiguous(), b.contiguous()) for a, b in lowrank]
    # a per-key log-decay is read in its own dtype by .perkey's cumsum (fp32 out), no cast here
    g = None if log_decay is None else log_decay.contiguous() if log_decay.dim() == 4 else log_decay.float().contiguous()
    decay = DECAY_NONE if g is None else DECAY_SCALAR if g.dim() == 3 else DECAY_PER_KEY
    R = len(lowrank)
    prec = meta["precision"]
    shape = launch_shape(K, V, C, fp32=prec == "ieee")
    BK, BV = shape.BK, shape.BV
    dummy = u  # stands in for absent pointers; constexpr flags keep it unread
    a, b = lowrank[0] if R else (dummy, dummy)
    amat = None
    if decay == DECAY_PER_KEY:
        # per key (.perkey): the kernels read the cumulative G and the intra-chunk A, or with a
        # pair its four Grams (.perkey_pair)
        g = perkey.chunk_cumsum(g, tok_start, tok_stop, H, K, C)
        if R:
            amat = perkey_pair.pair_grams(q, w, a, b, g, tok_start, tok_stop, H, K, C, prec, shape.warps_pair,
                                          shape.stages_pair)
        else:
            amat = perkey.intra_gram(q, w, g, tok_start, tok_stop, H, K, C, prec, shape.warps_pair)

    # The chunk-boundary states are stored in the inputs' dtype (bf16/fp16 inputs: half the bytes
    # of the largest tensors the forward writes and the backward reads, as FLA stores its h);
    # the recurrence itself runs in float32 registers and the final state stays float32.
    states = torch.empty(NC, H, K, V, device=dev, dtype=state_dtype(q.dtype))
    final = torch.empty(N, H, K, V, device=dev, dtype=torch.float32)
    o = torch.empty(B, T, H, V, device=dev, dtype=meta["out_dtype"])
    if R:
        # X, Y and the probes P are stored like the states (FLA keeps its w, u, v_new so)
        x_wy = torch.empty(NC, H, C, K, device=dev, dtype=states.dtype)
        y_wy = torch.empty(NC, H, C, V, device=dev, dtype=states.dtype)
        probes = torch.empty(NC, H, C, V, device=dev, dtype=states.dtype)
    else:
        x_wy = y_wy = probes = states
    # a per-key decay with a pair keeps T (fp32), X and P for the backward (:mod:`.perkey_pair`)
    t_wy = torch.empty(NC, H, C, C, device=dev, dtype=torch.float32) if R and decay == DECAY_PER_KEY else None
    if R:
        launch_wy(shape, w, a, b, u, g, tok_start, tok_stop, x_wy, y_wy, t_wy, H, K, V, C, decay, prec, grams=amat)
    h0_ = None if h0 is None else h0.float().contiguous()
    lowp = dots_lowp()
    grid, BK_seq, BV = sequence_launch(shape, N, H, K, V, R > 0, dev,
                                       min_BK=shape.BK_walk_fwd_min if decay == DECAY_NONE else None)
    g_walk, g_cum = walk_log_decay(g, decay, R > 0, BK_seq, tok_start, tok_stop, H, C)
    args = (w, a, u, g_walk if g is not None else dummy, x_wy, y_wy, h0_ if h0_ is not None else dummy,
            states, probes, final, tok_start, tok_stop, chunk_offsets, H) + no_segments(dummy)
    kw = dict(K=K, V=V, C=C, DECAY=decay, LOWRANK=R > 0, HAS_H0=h0 is not None, BK=BK_seq, BV=BV,
              PRECISION=prec, LOWP=lowp and R == 0, G_CUM=g_cum, num_warps=state_warps(shape, decay, R > 0, BV))
    from .split import walk_sequences     # split imports this module

    walk_sequences(lambda grid_, args_, **extra: _launch_state(grid_, args_, **{**kw, **extra}),
                   grid, args, h0_, final, chunk_offsets, H, K, V, BK_seq, BV, decay, max_chunks, dev,
                   lowrank=R > 0, split_warps=split_warps(shape, decay, R > 0, BK_seq))
    if NC > 0:
        BVO = output_block(shape, R > 0)
        _output_fwd_kernel[(cdiv(V, BVO), NC * H)](
            q, w, a, u, g if g is not None else dummy, states, probes, o, amat if amat is not None else dummy,
            tok_start, tok_stop,
            meta["scale"], H, K=K, V=V, C=C, DECAY=decay, LOWRANK=R > 0, BK=BK, BV=BVO,
            PRECISION=prec, LOWP=lowp and R == 0, num_warps=shape.warps_out,
        )
    kept = () if amat is None else (amat,) if t_wy is None else (amat, t_wy, x_wy, probes)
    if g_cum:
        kept = (g_walk,)    # a scalar decay's G, which the backward's walk reads again
    return (o, final, states) + kept
