r"""A per-key decay with one low-rank pair on the fused path: the RWKV-7 / DPLR form
(arXiv 2503.14456; FLA's ``chunk_dplr_delta_rule``), and a delta rule with per-key gates (KDA).
Per head, with a log-decay per key ``g_t [K]`` (≤ 0) and the pair (a, b)::

    S_t = (diag(e^{g_t}) + a_t b_tᵀ) S_{t−1} + w_t u_tᵀ,      o_t = scale · S_tᵀ q_t

The chunked algebra is :mod:`.fused`'s (its docstring, and README §1) with every decay ratio
taken per key. With G the chunk-relative cumulative log-decay ``[C, K]`` (:mod:`.perkey`) and
G_prev its rows shifted down by one (G before token t; 0 at the chunk's first), the four Grams
of a chunk are::

    M_qa[t, s] = Σ_k q_tk a_sk e^{G_tk − G_sk}   (s ≤ t)      M_qw: the same with w
    L[t, s]    = Σ_k b_tk a_sk e^{G_prev,tk − G_sk}   (s < t)      N: the same with w

:func:`_pair_gram_kernel` makes all four, ``[NC, H, 4, C, C]`` fp32 in the order ``(M_qa, M_qw, L, N)``
(that of kernel 2'a's ``cc``). A chunk whose decay stays within :data:`CHUNK_RANGE` on either side
of its middle row ``r = G[C/2 − 1]`` (every chunk of RWKV-7's gates at C = 64) is factored whole
around r: one ``[C, C]`` dot per 32 keys, ``(X ⊙ e^{G − r}) (Y ⊙ e^{r − G})ᵀ``. The other chunks go
to :func:`_pair_gram_block_kernel`, :mod:`.perkey`'s secondary chunking: 16-row blocks, one
tensor-core dot per 64 keys around the reference row ``r = G[16 i − 1]`` (both G_t and G_prev,t of
block i's rows are ≤ r, so neither factor overflows), the diagonal sub-block in the dot when
:func:`.perkey._fast_block`, else exactly, a column at a time. The forward's WY kernel then reads
L and N, the output kernel M_qa and M_qw, and ``ChunkMatrixFunction`` keeps them for the backward
(its reverse-pass and 2'a kernels read them again).

The backward's kernel 2'a stores ``cc``, the gradients of the four decayed Grams (masked:
inclusive for M_qa, M_qw, strict for L, N), and kernel 2'b with ``DECAY = 2`` the inter-chunk
parts of dq, da, dw, db in fp32. :func:`_pair_bwd_kernel` (whole chunks, per 32-key slice) and
:func:`_pair_bwd_block_kernel` (the other slices, 16-row blocks) add the intra-chunk parts by the
same factorings, each Gram's gradient reaching its row operand and its column operand::

    dq_t += Σ_s (cc_qa[t, s] a_s + cc_qw[t, s] w_s) ⊙ e^{G_t − G_s}
    db_t += Σ_s (cc_L[t, s] a_s + cc_N[t, s] w_s) ⊙ e^{G_prev,t − G_s}
    da_s += Σ_t cc_qa[t, s] q_t ⊙ e^{G_t − G_s} + cc_L[t, s] b_t ⊙ e^{G_prev,t − G_s}   (dw: cc_qw, cc_N)

and writes the per-key decay terms of :mod:`.fused_bwd`'s identity, ``λ_t = q ⊙ dq − w ⊙ dw −
a ⊙ da + b ⊙ db`` and ``bb_t = b ⊙ db`` (b's term belongs to the token before), for
:func:`.decay_grad.decay_gradient_per_key`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ints import cdiv, next_pow2

from .perkey import (CHUNK_RANGE, FAST_RANGE, SUB, _block_rows, _chunk_fast, _chunk_program, _fast_block,
                     _gram_chunk, _key_slice, _prev_rows, _row_at, _rows, whole_keys)

#: index of each Gram in the ``[NC, H, 4, C, C]`` tensor (and of its gradient in kernel 2'a's cc)
QA, QW, BA, BW = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)


def pair_keys(K: int, C: int) -> int:
    """Keys per slice of the whole-chunk pair kernels (the Grams' dot loop, the backward's
    programs): :func:`.perkey.whole_keys`, and 16 at C = 128, so that a chunk's ``[C, BKS]`` fp32
    operands stay in registers next to the ``[C, C]`` accumulator or cc tile."""
    return whole_keys(K) if C <= 64 else min(16, whole_keys(K))


@triton.jit
def _token(x, t0, n_tok, col, i_h, H, offs_k, K: tl.constexpr, PREV: tl.constexpr = False):
    """Row ``col`` of one chunk (first token t0, n_tok tokens) of x ``[B·T, H, K]`` as fp32, keys
    ``offs_k``, 0 outside the chunk; with PREV the row before (0 for the chunk's first row): the
    operands of one column of a diagonal sub-block summed exactly."""
    ok = (offs_k < K) & (offs_k * 0 + col < n_tok)
    off = ((t0 + col) * H + i_h) * K + offs_k
    if PREV:
        return tl.load(x + off - H * K, mask=ok & (offs_k * 0 + col >= 1), other=0.).to(tl.float32)
    return tl.load(x + off, mask=ok, other=0.).to(tl.float32)


@triton.jit
def _pair_gram_kernel(q, w, a, b, gc, grams, tok_start, tok_stop, H, K: tl.constexpr, C: tl.constexpr,
                      BK: tl.constexpr, BKS: tl.constexpr, PRECISION: tl.constexpr, CHUNK_RANGE: tl.constexpr):
    """Gram ``j = program_id(0)`` (order QA, QW, BA, BW) of one chunk × head (``program_id(1)``) in one
    piece (:func:`_gram_chunk`) if :func:`_chunk_fast` allows; else nothing (the chunk is
    :func:`_pair_gram_block_kernel`'s). Shapes: q, w, a, b ``[B·T, H, K]``; gc ``[B·T, H, K]`` fp32;
    grams ``[NC, H, 4, C, C]`` fp32."""
    j = tl.program_id(0)
    nh, i_h, t0, n_tok = _chunk_program(tok_start, tok_stop, H)
    if _chunk_fast(gc, t0, n_tok, i_h, H, tl.arange(0, BK), K, C, CHUNK_RANGE):
        out = grams + nh * 4 * C * C + j * C * C
        if j == QA:
            _gram_chunk(q, a, gc, out, t0, n_tok, i_h, H, False, K, C, BKS, PRECISION)
        elif j == QW:
            _gram_chunk(q, w, gc, out, t0, n_tok, i_h, H, False, K, C, BKS, PRECISION)
        elif j == BA:
            _gram_chunk(b, a, gc, out, t0, n_tok, i_h, H, True, K, C, BKS, PRECISION)
        else:
            _gram_chunk(b, w, gc, out, t0, n_tok, i_h, H, True, K, C, BKS, PRECISION)


@triton.jit
def _pair_gram_block_kernel(q, w, a, b, gc, grams, tok_start, tok_stop, H, K: tl.constexpr, C: tl.constexpr,
                            BK: tl.constexpr, BKS: tl.constexpr, SUB: tl.constexpr, PRECISION: tl.constexpr,
                            FAST_RANGE: tl.constexpr, CHUNK_RANGE: tl.constexpr):
    """Rows of sub-block ``i = program_id(0)`` of the four Grams of one chunk × head
    (``program_id(1)``) that :func:`_chunk_fast` does not allow whole (:func:`_gram_block`); a
    kernel of its own, so that its registers and shared memory do not limit the other's occupancy."""
    nh, i_h, t0, n_tok = _chunk_program(tok_start, tok_stop, H)
    if not _chunk_fast(gc, t0, n_tok, i_h, H, tl.arange(0, BK), K, C, CHUNK_RANGE):
        _gram_block(q, w, a, b, gc, grams, nh, i_h, t0, n_tok, tl.program_id(0), H, K, C, BK, BKS, SUB,
                    PRECISION, FAST_RANGE)


@triton.jit
def _gram_block(q, w, a, b, gc, grams, nh, i_h, t0, n_tok, i_b, H, K: tl.constexpr, C: tl.constexpr,
                BK: tl.constexpr, BKS: tl.constexpr, SUB: tl.constexpr, PRECISION: tl.constexpr,
                FAST_RANGE: tl.constexpr):
    """Rows of sub-block ``i_b`` of the four Grams of one chunk × head, all C columns (zeros above
    the diagonal, and on it for L and N): module docstring; as :func:`.perkey._intra_gram_kernel`
    with two row operands (q with G, b with G_prev) and two column operands (a, w)."""
    rows = i_b * SUB + tl.arange(0, SUB)
    offs_c = tl.arange(0, C)
    fast = _fast_block(gc, t0, n_tok, i_b, i_h, H, tl.arange(0, BK), K, SUB, FAST_RANGE)
    n_cols = i_b * SUB + SUB * fast.to(tl.int32)          # columns that go through the dots

    m_qa = tl.zeros([SUB, C], dtype=tl.float32)
    m_qw = tl.zeros([SUB, C], dtype=tl.float32)
    m_ba = tl.zeros([SUB, C], dtype=tl.float32)
    m_bw = tl.zeros([SUB, C], dtype=tl.float32)
    for kk in range(0, (K + BKS - 1) // BKS):
        ks = kk * BKS + tl.arange(0, BKS)
        ref = _row_at(gc, t0, n_tok, i_b * SUB - 1, i_h, H, ks, K)
        Q, G, m = _block_rows(q, gc, t0, n_tok, i_b, i_h, H, ks, K, SUB)
        Bm = _rows(b, gc, t0, n_tok, i_b, i_h, H, ks, K, SUB)
        G_prev = _prev_rows(gc, t0, n_tok, i_b, i_h, H, ks, K, SUB)
        Q_r = Q * tl.exp(tl.where(m, G - ref[None, :], 0.))                        # exponents <= 0
        B_r = Bm * tl.exp(tl.where(m, G_prev - ref[None, :], 0.))
        # the chunk's a and w loaded transposed ([BKS, C]) by pointer arithmetic, never tl.trans
        col_off = ((t0 + offs_c)[None, :] * H + i_h) * K + ks[:, None]
        mc = (ks < K)[:, None] & ((offs_c < n_tok) & (offs_c < n_cols))[None, :]
        e_col = tl.exp(tl.where(mc, ref[:, None] - tl.load(gc + col_off, mask=mc, other=0.), 0.))
        A_T = tl.load(a + col_off, mask=mc, other=0.).to(tl.float32) * e_col
        W_T = tl.load(w + col_off, mask=mc, other=0.).to(tl.float32) * e_col
        m_qa += tl.dot(Q_r, A_T, input_precision=PRECISION)
        m_qw += tl.dot(Q_r, W_T, input_precision=PRECISION)
        m_ba += tl.dot(B_r, A_T, input_precision=PRECISION)
        m_bw += tl.dot(B_r, W_T, input_precision=PRECISION)
    incl = rows[:, None] >= offs_c[None, :]
    strict = rows[:, None] > offs_c[None, :]
    m_qa = tl.where(incl, m_qa, 0.)
    m_qw = tl.where(incl, m_qw, 0.)
    m_ba = tl.where(strict, m_ba, 0.)
    m_bw = tl.where(strict, m_bw, 0.)
    if not fast:
        # a strong decay inside the block: its diagonal sub-block exactly, one column s at a time
        # (masked before exp: above the diagonal the exponents are positive)
        offs_k = tl.arange(0, BK)
        Q, G, m = _block_rows(q, gc, t0, n_tok, i_b, i_h, H, offs_k, K, SUB)
        Bm = _rows(b, gc, t0, n_tok, i_b, i_h, H, offs_k, K, SUB)
        G_prev = _prev_rows(gc, t0, n_tok, i_b, i_h, H, offs_k, K, SUB)
        for s in range(0, SUB):
            col = i_b * SUB + s
            a_s = _token(a, t0, n_tok, col, i_h, H, offs_k, K)
            w_s = _token(w, t0, n_tok, col, i_h, H, offs_k, K)
            g_s = _token(gc, t0, n_tok, col, i_h, H, offs_k, K)
            e_q = Q * tl.exp(tl.where(m & (rows >= col)[:, None], G - g_s[None, :], float("-inf")))
            e_b = Bm * tl.exp(tl.where(m & (rows > col)[:, None], G_prev - g_s[None, :], float("-inf")))
            here = offs_c[None, :] == col
            m_qa += tl.where(here, tl.sum(e_q * a_s[None, :], axis=1)[:, None], 0.)
            m_qw += tl.where(here, tl.sum(e_q * w_s[None, :], axis=1)[:, None], 0.)
            m_ba += tl.where(here, tl.sum(e_b * a_s[None, :], axis=1)[:, None], 0.)
            m_bw += tl.where(here, tl.sum(e_b * w_s[None, :], axis=1)[:, None], 0.)
    out = grams + nh * 4 * C * C + rows[:, None] * C + offs_c[None, :]
    tl.store(out + QA * C * C, m_qa)
    tl.store(out + QW * C * C, m_qw)
    tl.store(out + BA * C * C, m_ba)
    tl.store(out + BW * C * C, m_bw)


@triton.jit
def _pair_bwd_kernel(q, w, a, b, gc, cc, dq32, dw32, da32, db32, dq, dw, da, db, tok_start, tok_stop, H,
                     K: tl.constexpr, C: tl.constexpr, BKS: tl.constexpr, PRECISION: tl.constexpr,
                     CHUNK_RANGE: tl.constexpr):
    """Keys ``[j·BKS, (j + 1)·BKS)`` (``j = program_id(2)``) of one chunk × head (``program_id(1)``):
    dq, dw, da, db (module docstring: the intra parts from cc ``[NC, H, 4, C, C]`` fp32, plus the
    inter parts read from dq32, dw32, da32, db32 ``[B·T, H, K]`` fp32) written in their dtype;
    then λ over dq32 and bb = b ⊙ db over db32: the whole chunk at once (:func:`_bwd_chunk`) if
    :func:`_chunk_fast` allows for these keys, else nothing (:func:`_pair_bwd_block_kernel`'s)."""
    nh, i_h, t0, n_tok = _chunk_program(tok_start, tok_stop, H)
    offs_k = tl.program_id(2) * BKS + tl.arange(0, BKS)
    if _chunk_fast(gc, t0, n_tok, i_h, H, offs_k, K, C, CHUNK_RANGE):
        _bwd_chunk(q, w, a, b, gc, cc, dq32, dw32, da32, db32, dq, dw, da, db, nh, i_h, t0, n_tok, offs_k, H,
                   K, C, PRECISION)


@triton.jit
def _pair_bwd_block_kernel(q, w, a, b, gc, cc, dq32, dw32, da32, db32, dq, dw, da, db, tok_start, tok_stop, H,
                           K: tl.constexpr, C: tl.constexpr, BKS: tl.constexpr, SPP: tl.constexpr,
                           SUB: tl.constexpr, PRECISION: tl.constexpr, FAST_RANGE: tl.constexpr,
                           CHUNK_RANGE: tl.constexpr):
    """As :func:`_pair_bwd_kernel` for the (chunk, key slice) pairs it leaves: rows of sub-block
    ``i = program_id(0)`` (:func:`_bwd_block`), key slices ``SPP·j … SPP·j + SPP − 1``
    (``j = program_id(2)``; several per program, because a program that finds nothing to do still
    holds this kernel's registers while it looks)."""
    nh, i_h, t0, n_tok = _chunk_program(tok_start, tok_stop, H)
    for u in range(0, SPP):
        offs_k = (tl.program_id(2) * SPP + u) * BKS + tl.arange(0, BKS)
        if not _chunk_fast(gc, t0, n_tok, i_h, H, offs_k, K, C, CHUNK_RANGE):
            _bwd_block(q, w, a, b, gc, cc, dq32, dw32, da32, db32, dq, dw, da, db, nh, i_h, t0, n_tok,
                       tl.program_id(0), offs_k, H, K, C, SUB, PRECISION, FAST_RANGE)


@triton.jit
def _store_grads(q, w, a, b, dq32, db32, dq, dw, da, db, tile, m, dQ, dW, dA, dB):
    """dq, dw, da, db of one tile in their dtypes; λ = q ⊙ dq − w ⊙ dw − a ⊙ da + b ⊙ db over dq32 and
    bb = b ⊙ db over db32 (fp32)."""
    tl.store(dq + tile, dQ.to(dq.dtype.element_ty), mask=m)
    tl.store(dw + tile, dW.to(dw.dtype.element_ty), mask=m)
    tl.store(da + tile, dA.to(da.dtype.element_ty), mask=m)
    tl.store(db + tile, dB.to(db.dtype.element_ty), mask=m)
    bb = tl.load(b + tile, mask=m, other=0.).to(tl.float32) * dB
    lam = (tl.load(q + tile, mask=m, other=0.).to(tl.float32) * dQ
           - tl.load(w + tile, mask=m, other=0.).to(tl.float32) * dW
           - tl.load(a + tile, mask=m, other=0.).to(tl.float32) * dA)
    tl.store(dq32 + tile, lam + bb, mask=m)
    tl.store(db32 + tile, bb, mask=m)


@triton.jit
def _two_grams(cc_nh, i, j, cc_offs, X, Y, d32, tile, m, e, C: tl.constexpr, PRECISION: tl.constexpr):
    """``d32[tile] + e ⊙ (cc_i X + cc_j Y)`` ``[C, BKS]`` fp32, cc_i read at cc_offs (rows, or the
    transpose); one accumulator through the two dots, one after the other (fewer operand buffers in
    shared memory at once)."""
    acc = tl.dot(tl.load(cc_nh + i * C * C + cc_offs), X, input_precision=PRECISION)
    acc = tl.dot(tl.load(cc_nh + j * C * C + cc_offs), Y, acc, input_precision=PRECISION)
    return tl.load(d32 + tile, mask=m, other=0.) + e * acc


@triton.jit
def _bwd_chunk(q, w, a, b, gc, cc, dq32, dw32, da32, db32, dq, dw, da, db, nh, i_h, t0, n_tok, offs_k, H,
               K: tl.constexpr, C: tl.constexpr, PRECISION: tl.constexpr):
    """The whole chunk's rows, keys offs_k, around ``r = G[C/2 − 1]`` (:func:`_chunk_fast`): with
    ``Ǎ = A ⊙ e^{r − G}`` (W̌ the same) and ``Q̌ = Q ⊙ e^{G − r}``, ``B̌ = B ⊙ e^{G_prev − r}``,
    ``dQ += (cc_qa Ǎ + cc_qw W̌) ⊙ e^{G − r}``, ``dB += (cc_L Ǎ + cc_N W̌) ⊙ e^{G_prev − r}``,
    ``dA += (cc_qaᵀ Q̌ + cc_Lᵀ B̌) ⊙ e^{r − G}``, dW the same with cc_qw, cc_N."""
    offs_c = tl.arange(0, C)
    cc_nh = cc + nh * 4 * C * C
    cc_rows = offs_c[:, None] * C + offs_c[None, :]
    cc_cols = offs_c[None, :] * C + offs_c[:, None]            # the transpose, by pointer arithmetic
    r = _row_at(gc, t0, n_tok, C // 2 - 1, i_h, H, offs_k, K)
    tile = ((t0 + offs_c)[:, None] * H + i_h) * K + offs_k[None, :]
    A, G, m = _block_rows(a, gc, t0, n_tok, 0, i_h, H, offs_k, K, C)       # the whole chunk's rows
    e_col = tl.exp(r[None, :] - G)
    A_r = A * e_col
    W_r = _rows(w, gc, t0, n_tok, 0, i_h, H, offs_k, K, C) * e_col
    e_row = tl.exp(G - r[None, :])
    e_prev = tl.exp(_prev_rows(gc, t0, n_tok, 0, i_h, H, offs_k, K, C) - r[None, :])
    dQ = _two_grams(cc_nh, QA, QW, cc_rows, A_r, W_r, dq32, tile, m, e_row, C, PRECISION)
    dB = _two_grams(cc_nh, BA, BW, cc_rows, A_r, W_r, db32, tile, m, e_prev, C, PRECISION)
    Q_r = _rows(q, gc, t0, n_tok, 0, i_h, H, offs_k, K, C) * e_row
    B_r = _rows(b, gc, t0, n_tok, 0, i_h, H, offs_k, K, C) * e_prev
    dA = _two_grams(cc_nh, QA, BA, cc_cols, Q_r, B_r, da32, tile, m, e_col, C, PRECISION)
    dW = _two_grams(cc_nh, QW, BW, cc_cols, Q_r, B_r, dw32, tile, m, e_col, C, PRECISION)
    _store_grads(q, w, a, b, dq32, db32, dq, dw, da, db, tile, m, dQ, dW, dA, dB)


@triton.jit
def _bwd_block(q, w, a, b, gc, cc, dq32, dw32, da32, db32, dq, dw, da, db, nh, i_h, t0, n_tok, i_b, offs_k, H,
               K: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr, PRECISION: tl.constexpr,
               FAST_RANGE: tl.constexpr):
    """Rows of sub-block ``i_b``, keys offs_k, of one chunk × head.

    Row side (dq, db of the block's rows): columns s before the block (and in it when
    :func:`.perkey._fast_block`) around r = G[16 i − 1]. Column side (da, dw of the block's rows
    as columns): rows t after the block (and in it when fast) around ρ = r when fast, else the
    block's last row G[16 i + 15]; G_t and G_prev,t of those rows are ≤ ρ. A block that is not
    fast adds its diagonal sub-block exactly, a token at a time (as :func:`.perkey._intra_bwd_kernel`).
    """
    blk = i_b * SUB + tl.arange(0, SUB)
    offs_c = tl.arange(0, C)
    cc_nh = cc + nh * 4 * C * C
    fast = _fast_block(gc, t0, n_tok, i_b, i_h, H, offs_k, K, SUB, FAST_RANGE)
    fast_i = fast.to(tl.int32)
    tile = ((t0 + blk)[:, None] * H + i_h) * K + offs_k[None, :]
    Q, G, m = _block_rows(q, gc, t0, n_tok, i_b, i_h, H, offs_k, K, SUB)
    G_prev = _prev_rows(gc, t0, n_tok, i_b, i_h, H, offs_k, K, SUB)
    dQ = tl.load(dq32 + tile, mask=m, other=0.)
    dB = tl.load(db32 + tile, mask=m, other=0.)
    dA = tl.load(da32 + tile, mask=m, other=0.)
    dW = tl.load(dw32 + tile, mask=m, other=0.)
    rows_cc = blk[:, None] * C + offs_c[None, :]          # cc[rows of the block, every column]
    cols_cc = offs_c[None, :] * C + blk[:, None]          # cc[every row, columns of the block]ᵀ

    # row side: columns s < 16 i (+ 16 when fast), around r
    ref = _row_at(gc, t0, n_tok, i_b * SUB - 1, i_h, H, offs_k, K)
    Ac, Gc, mc = _block_rows(a, gc, t0, n_tok, 0, i_h, H, offs_k, K, C)      # the whole chunk's rows
    Wc = _rows(w, gc, t0, n_tok, 0, i_h, H, offs_k, K, C)
    ms = mc & (offs_c < i_b * SUB + SUB * fast_i)[:, None]
    e_col = tl.where(ms, tl.exp(tl.where(ms, ref[None, :] - Gc, 0.)), 0.)
    A_r = Ac * e_col
    W_r = Wc * e_col
    dQ += (tl.dot(tl.load(cc_nh + QA * C * C + rows_cc), A_r, input_precision=PRECISION)
           + tl.dot(tl.load(cc_nh + QW * C * C + rows_cc), W_r, input_precision=PRECISION)) \
        * tl.exp(tl.where(m, G - ref[None, :], 0.))
    dB += (tl.dot(tl.load(cc_nh + BA * C * C + rows_cc), A_r, input_precision=PRECISION)
           + tl.dot(tl.load(cc_nh + BW * C * C + rows_cc), W_r, input_precision=PRECISION)) \
        * tl.exp(tl.where(m, G_prev - ref[None, :], 0.))
    # column side: rows t >= 16 (i + 1) (16 i when fast), around ρ
    rho = _row_at(gc, t0, n_tok, i_b * SUB + SUB * (1 - fast_i) - 1, i_h, H, offs_k, K)
    Qc = _rows(q, gc, t0, n_tok, 0, i_h, H, offs_k, K, C)
    Bc = _rows(b, gc, t0, n_tok, 0, i_h, H, offs_k, K, C)
    Gpc = _prev_rows(gc, t0, n_tok, 0, i_h, H, offs_k, K, C)
    mt = mc & (offs_c >= i_b * SUB + SUB * (1 - fast_i))[:, None]
    Q_r = tl.where(mt, Qc * tl.exp(tl.where(mt, Gc - rho[None, :], 0.)), 0.)
    B_r = tl.where(mt, Bc * tl.exp(tl.where(mt, Gpc - rho[None, :], 0.)), 0.)
    e_row = tl.exp(tl.where(m, rho[None, :] - G, 0.))
    dA += (tl.dot(tl.load(cc_nh + QA * C * C + cols_cc), Q_r, input_precision=PRECISION)
           + tl.dot(tl.load(cc_nh + BA * C * C + cols_cc), B_r, input_precision=PRECISION)) * e_row
    dW += (tl.dot(tl.load(cc_nh + QW * C * C + cols_cc), Q_r, input_precision=PRECISION)
           + tl.dot(tl.load(cc_nh + BW * C * C + cols_cc), B_r, input_precision=PRECISION)) * e_row
    if not fast:
        # a strong decay inside the block: its diagonal sub-block exactly, the row side one column
        # s at a time, the column side one row at a time (masked before exp)
        for s in range(0, SUB):
            col = i_b * SUB + s
            q_s = _token(q, t0, n_tok, col, i_h, H, offs_k, K)
            a_s = _token(a, t0, n_tok, col, i_h, H, offs_k, K)
            w_s = _token(w, t0, n_tok, col, i_h, H, offs_k, K)
            b_s = _token(b, t0, n_tok, col, i_h, H, offs_k, K)
            g_s = _token(gc, t0, n_tok, col, i_h, H, offs_k, K)
            gp_s = _token(gc, t0, n_tok, col, i_h, H, offs_k, K, PREV=True)
            ok2 = m & ((offs_k < K) & (offs_k * 0 + col < n_tok))[None, :]
            # row side: cc[block rows, s]
            incl = tl.exp(tl.where(ok2 & (blk >= col)[:, None], G - g_s[None, :], float("-inf")))
            strict = tl.exp(tl.where(ok2 & (blk > col)[:, None], G_prev - g_s[None, :], float("-inf")))
            dQ += (tl.load(cc_nh + QA * C * C + blk * C + col)[:, None] * a_s[None, :]
                   + tl.load(cc_nh + QW * C * C + blk * C + col)[:, None] * w_s[None, :]) * incl
            dB += (tl.load(cc_nh + BA * C * C + blk * C + col)[:, None] * a_s[None, :]
                   + tl.load(cc_nh + BW * C * C + blk * C + col)[:, None] * w_s[None, :]) * strict
            # column side: cc[s, block columns], token s as the row
            incl = tl.exp(tl.where(ok2 & (blk <= col)[:, None], g_s[None, :] - G, float("-inf")))
            strict = tl.exp(tl.where(ok2 & (blk < col)[:, None], gp_s[None, :] - G, float("-inf")))
            c_qa = tl.load(cc_nh + QA * C * C + col * C + blk)[:, None]
            c_ba = tl.load(cc_nh + BA * C * C + col * C + blk)[:, None]
            c_qw = tl.load(cc_nh + QW * C * C + col * C + blk)[:, None]
            c_bw = tl.load(cc_nh + BW * C * C + col * C + blk)[:, None]
            dA += c_qa * q_s[None, :] * incl + c_ba * b_s[None, :] * strict
            dW += c_qw * q_s[None, :] * incl + c_bw * b_s[None, :] * strict
    _store_grads(q, w, a, b, dq32, db32, dq, dw, da, db, tile, m, dQ, dW, dA, dB)


def pair_grams(q, w, a, b, gc, tok_start, tok_stop, H: int, K: int, C: int, prec: str,
               num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """The four Grams ``[NC, H, 4, C, C]`` fp32, order :data:`QA`, :data:`QW`, :data:`BA`,
    :data:`BW` (module docstring). q, w, a, b ``[B·T, H, K]``; gc the cumulative G ``[B·T, H, K]``
    fp32 (:func:`.perkey.chunk_cumsum`)."""
    NC = tok_start.numel()
    grams = torch.empty(NC, H, 4, C, C, device=q.device, dtype=torch.float32)
    if NC:
        BK = max(16, next_pow2(K))
        args = (q, w, a, b, gc, grams, tok_start, tok_stop, H)
        _pair_gram_kernel[(4, NC * H)](*args, K=K, C=C, BK=BK, BKS=pair_keys(K, C), PRECISION=prec,
                                       CHUNK_RANGE=CHUNK_RANGE, num_warps=num_warps, num_stages=num_stages)
        _pair_gram_block_kernel[(C // SUB, NC * H)](*args, K=K, C=C, BK=BK, BKS=_key_slice(K), SUB=SUB,
                                                    PRECISION=prec, FAST_RANGE=FAST_RANGE,
                                                    CHUNK_RANGE=CHUNK_RANGE, num_warps=4)
    return grams


def pair_backward(q, w, a, b, gc, cc, d32, tok_start, tok_stop, H: int, K: int, C: int, prec: str,
                  num_warps: int = 4):
    """``(dq, dw, da, db)`` in the inputs' dtypes from kernel 2'a's cc ``[NC, H, 4, C, C]`` and the
    inter-chunk parts d32 = ``(dq32, dw32, da32, db32)`` ``[B·T, H, K]`` fp32 of kernel 2'b;
    afterwards dq32 holds λ and db32 holds bb (:func:`_pair_bwd_kernel`)."""
    grads = tuple(torch.empty_like(t) for t in (q, w, a, b))
    NC = tok_start.numel()
    if NC:
        args = (q, w, a, b, gc, cc, *d32, *grads, tok_start, tok_stop, H)
        # one key slicing for both kernels: each (chunk, slice) is taken by exactly one of them (the
        # whole-chunk kernel overwrites dq32 with λ, which the other would read as dq's inter part)
        BKS = pair_keys(K, C)
        _pair_bwd_kernel[(1, NC * H, cdiv(K, BKS))](*args, K=K, C=C, BKS=BKS, PRECISION=prec,
                                                           CHUNK_RANGE=CHUNK_RANGE, num_warps=num_warps)
        SPP = _key_slice(K) // BKS       # key slices of 64 per program, as the Grams' sub-blocks
        _pair_bwd_block_kernel[(C // SUB, NC * H, cdiv(cdiv(K, BKS), SPP))](
            *args, K=K, C=C, BKS=BKS, SPP=SPP, SUB=SUB, PRECISION=prec, FAST_RANGE=FAST_RANGE,
            CHUNK_RANGE=CHUNK_RANGE, num_warps=4)
    return grads
