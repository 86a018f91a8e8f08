r"""Per-key decay on the fused path (GLA, arXiv 2312.06635): the kernels that the scalar-decay
members do not need. The recurrence, per head, with a log-decay per key ``g_t [K]`` (≤ 0)::

    S_t = diag(e^{g_t}) S_{t−1} + w_t u_tᵀ,      o_t = scale · S_tᵀ q_t

Per chunk n, with G the chunk-relative inclusive cumulative log-decay ``[C, K]`` (row t: the
decay from the chunk's start through token t) and γ = G at the chunk's last token ``[K]``::

    S_{n+1} = diag(e^{γ}) S_n + (W ⊙ e^{γ − G})ᵀ U
    o       = scale · ((Q ⊙ e^{G}) S_n + A U),   A[t, s] = Σ_k q_tk w_sk e^{G_tk − G_sk}  (s ≤ t)

The state pass, the output and the backward's reverse pass, dq/dw inter-chunk parts and du are the
scalar-decay kernels of :mod:`.fused` / :mod:`.fused_bwd` with ``DECAY = 2`` (they read G and
the A below). What is here:

* :func:`_cumsum_kernel`: G, once per call, fp32 ``[B·T, H, K]`` (every kernel then loads the
  rows it needs; a [C, K] cumulative sum cannot be sliced into sub-blocks in registers);
* :func:`_intra_gram_kernel`: A ``[NC, H, C, C]`` fp32, by GLA's secondary chunking: rows in
  sub-blocks of 16; rows in block i meet every earlier column in one tensor-core dot of
  ``Q_i ⊙ e^{G_i − r}`` and ``W ⊙ e^{r − G}`` around the reference ``r = G[16 i − 1]`` (G is
  non-increasing along the chunk, so both exponents are ≤ 0 and neither factor can overflow).
  The block's own (diagonal) columns join the same dot when the block's decay
  ``max_k (G[16 i − 1] − G[16 i + 15])`` is at most :data:`FAST_RANGE` (their factor
  ``e^{r − G_s}`` is then ≤ e^{30}; GLA's log-sigmoid gates divided by 16 reach 30 over 16 tokens
  only with logits averaging below about −30); otherwise they
  are summed exactly, one column at a time, with every exponent masked to ≤ 0. A chunk whose decay
  stays within :data:`CHUNK_RANGE` on either side of its middle row ``r = G[C/2 − 1]``
  (:func:`_chunk_fast`) is instead made whole by :func:`_intra_gram_whole_kernel`, one ``[C, C]``
  dot per 32 keys around r (:func:`_gram_chunk`, shared with :mod:`.perkey_pair`), and the sub-block
  kernel's programs for it only check and leave;
* :func:`_intra_bwd_kernel`: from ``dA = scale · (dO Uᵀ)`` (lower, inclusive; written by the
  dq/dw kernel) the intra-chunk parts of the gradients by the same factoring::

      dq_t += Σ_{s ≤ t} dA[t, s] w_s ⊙ e^{G_t − G_s},   dw_s += Σ_{t ≥ s} dA[t, s] q_t ⊙ e^{G_t − G_s}

  added to the inter-chunk parts (``scale · e^{G} ⊙ dO S_nᵀ`` and ``e^{γ − G} ⊙ U dS_{n+1}ᵀ``, fp32
  from the dq/dw kernel), and the per-key decay term ``λ_{t,k} = q_tk dq_tk − w_tk dw_tk``;
  :func:`_intra_bwd_whole_kernel` does the same for whole chunks (per 32-key slice, around the
  chunk's middle row), the sub-block kernel for the slices it leaves.

The decay gradient is the per-key form of :mod:`.fused_bwd`'s identity: rescaling each key row
by e^{−Λ_{t,k}} removes the decay, so ∂L/∂g_{j,k} = Σ_{t ≥ j} λ_{t,k} within j's sequence,
plus Σ_v (S_final ⊙ dS_final)_{k,v} at its last token: :func:`.decay_grad.decay_gradient_per_key`
(the scalar version's three launches on ``[C, 64]`` tiles).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ints import cdiv, next_pow2
from .tiles import chunk_tokens, floor_log_decay

SUB = 16  # sub-block length of the secondary chunking; tl.dot needs every dim >= 16
#: largest decay across one sub-block, max_k (G[16 i − 1] − G[16 i + 15]), for which its diagonal
#: sub-block is factored like the others (factors up to e^30 ≈ 1e13, far from fp32's e^88)
FAST_RANGE = 30.0
#: largest ``max(−G[C/2 − 1], G[C/2 − 1] − G[last])`` over a chunk's keys for which its Gram(s) and
#: their gradients are factored whole around ``r = G[C/2 − 1]`` (:func:`_chunk_fast`): factors up
#: to e^30, as FAST_RANGE; −1 turns the whole-chunk kernels off (tests)
CHUNK_RANGE = 30.0


def _key_slice(K: int) -> int:
    """Keys per slice of the intra kernels (the forward's dot loop, the backward's programs)."""
    return min(64, max(16, next_pow2(K)))


def whole_keys(K: int) -> int:
    """Keys per slice of the whole-chunk kernels (the Gram's dot loop, the backward's programs):
    32 (sm_90 compile of the intra backward at C = 64: 212 registers, where 64 keys spilled 416 B)."""
    return min(32, _key_slice(K))


@triton.jit
def _cumsum_kernel(g, gc, tok_start, tok_stop, H, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr):
    """gc ``[B·T, H, K]`` fp32 = the inclusive cumulative sum of g ``[B·T, H, K]`` (any float dtype) within
    each chunk (steps floored at ``tiles.LOG_DECAY_FLOOR``), for one chunk × head (program
    ``c·H + h``)."""
    nh = tl.program_id(0)
    _, valid, tok = chunk_tokens(tok_start, tok_stop, nh // H, C)
    offs_k = tl.arange(0, BK)
    off = (tok[:, None] * H + nh % H) * K + offs_k[None, :]
    m = valid[:, None] & (offs_k < K)[None, :]
    x = floor_log_decay(tl.load(g + off, mask=m, other=0.).to(tl.float32))
    tl.store(gc + off, tl.cumsum(x, axis=0), mask=m)


@triton.jit
def _block_rows(x, gc, t0, n_tok, i_b, i_h, H, offs_k, K: tl.constexpr, SUB: tl.constexpr):
    """Rows ``[i_b·SUB, (i_b + 1)·SUB)`` of one chunk (first token ``t0``, ``n_tok`` tokens), keys
    ``offs_k``: ``(X [SUB, BK] fp32, G [SUB, BK], mask [SUB, BK])`` of x and gc (0 outside);
    ``i_b = 0, SUB = C``: the whole chunk."""
    rows = i_b * SUB + tl.arange(0, SUB)
    off = ((t0 + rows)[:, None] * H + i_h) * K + offs_k[None, :]
    m = (rows < n_tok)[:, None] & (offs_k < K)[None, :]
    return tl.load(x + off, mask=m, other=0.).to(tl.float32), tl.load(gc + off, mask=m, other=0.), m


@triton.jit
def _prev_rows(gc, t0, n_tok, i_b, i_h, H, offs_k, K: tl.constexpr, SUB: tl.constexpr):
    """G_prev of rows ``[i_b·SUB, (i_b + 1)·SUB)`` of one chunk ``[SUB, BK]``: G of the row before
    (0 for the chunk's first row and outside the chunk)."""
    rows = i_b * SUB + tl.arange(0, SUB)
    off = ((t0 + rows - 1)[:, None] * H + i_h) * K + offs_k[None, :]
    m = ((rows >= 1) & (rows < n_tok))[:, None] & (offs_k < K)[None, :]
    return tl.load(gc + off, mask=m, other=0.)


@triton.jit
def _rows(x, gc, t0, n_tok, i_b, i_h, H, offs_k, K: tl.constexpr, SUB: tl.constexpr):
    """:func:`_block_rows` without G and the mask (compiled Triton wants every name to
    keep one type, so kernels do not unpack into a throwaway ``_``)."""
    X, G, m = _block_rows(x, gc, t0, n_tok, i_b, i_h, H, offs_k, K, SUB)
    return X


@triton.jit
def _row_at(gc, t0, n_tok, row, i_h, H, offs_k, K: tl.constexpr):
    """G at chunk row ``row`` (keys ``offs_k``), clamped to the chunk's last token (a block with no
    tokens then keeps every exponent ≤ 0); zeros for row −1 (G before the chunk's first token)."""
    row = tl.minimum(row, n_tok - 1)
    # the scalar condition is broadcast first: block & scalar masks break Triton's interpreter
    return tl.load(gc + ((t0 + row) * H + i_h) * K + offs_k, mask=(offs_k < K) & (offs_k * 0 + row >= 0), other=0.)


@triton.jit
def _fast_block(gc, t0, n_tok, i_b, i_h, H, offs_k, K: tl.constexpr, SUB: tl.constexpr,
                FAST_RANGE: tl.constexpr):
    """Whether sub-block i_b's own decay, ``max_k (G[16 i − 1] − G[16 i + 15])``, is at most
    FAST_RANGE: then its diagonal sub-block goes into the same dot as the earlier ones (module
    docstring), the factor ``e^{r − G_s}`` staying ≤ e^{FAST_RANGE}."""
    spread = (_row_at(gc, t0, n_tok, i_b * SUB - 1, i_h, H, offs_k, K)
              - _row_at(gc, t0, n_tok, i_b * SUB + SUB - 1, i_h, H, offs_k, K))
    return tl.max(spread, axis=0) <= FAST_RANGE


@triton.jit
def _chunk_program(tok_start, tok_stop, H):
    """``(nh, i_h, t0, n_tok)`` of a program whose second grid axis is chunk × head."""
    nh = tl.program_id(1).to(tl.int64)
    t0 = tl.load(tok_start + nh // H)
    return nh, nh % H, t0.to(tl.int64), tl.load(tok_stop + nh // H) - t0


@triton.jit
def _chunk_fast(gc, t0, n_tok, i_h, H, offs_k, K: tl.constexpr, C: tl.constexpr, CHUNK_RANGE: tl.constexpr):
    """Whether one chunk's Grams can be factored whole around the reference ``r = G[C/2 − 1]``:
    ``max_k max(−r, r − G[last]) ≤ CHUNK_RANGE``, so that every factor ``e^{G_t − r}``,
    ``e^{G_prev,t − r}``, ``e^{r − G_s}`` is ≤ e^{CHUNK_RANGE} (G is non-increasing from 0)."""
    r = _row_at(gc, t0, n_tok, C // 2 - 1, i_h, H, offs_k, K)
    last = _row_at(gc, t0, n_tok, C - 1, i_h, H, offs_k, K)
    return tl.max(tl.maximum(-r, r - last), axis=0) <= CHUNK_RANGE


@triton.jit
def _chunk_cols(x, gc, t0, n_tok, i_h, H, ks, r, K: tl.constexpr, C: tl.constexpr):
    """``(x ⊙ e^{r − G})ᵀ`` ``[BKS, C]`` fp32 of the whole chunk, loaded transposed by pointer
    arithmetic (never tl.trans), 0 outside."""
    offs_c = tl.arange(0, C)
    off = ((t0 + offs_c)[None, :] * H + i_h) * K + ks[:, None]
    m = (ks < K)[:, None] & (offs_c < n_tok)[None, :]
    e = tl.exp(r[:, None] - tl.load(gc + off, mask=m, other=0.))
    return tl.load(x + off, mask=m, other=0.).to(tl.float32) * e


@triton.jit
def _gram_chunk(row, col, gc, out, t0, n_tok, i_h, H, PREV: tl.constexpr, K: tl.constexpr,
                C: tl.constexpr, BKS: tl.constexpr, PRECISION: tl.constexpr):
    """One Gram of a whole chunk, ``Σ_k row_tk col_sk e^{G(_prev)_tk − G_sk}`` masked (inclusive, strict
    with PREV), ``[C, C]`` stored at out: one ``[C, C]`` dot per BKS keys around the chunk's
    reference ``r = G[C/2 − 1]`` (:func:`_chunk_fast`)."""
    offs_c = tl.arange(0, C)
    acc = tl.zeros([C, C], dtype=tl.float32)
    for kk in range(0, (K + BKS - 1) // BKS):
        ks = kk * BKS + tl.arange(0, BKS)
        r = _row_at(gc, t0, n_tok, C // 2 - 1, i_h, H, ks, K)
        X, G, m = _block_rows(row, gc, t0, n_tok, 0, i_h, H, ks, K, C)
        if PREV:
            G = _prev_rows(gc, t0, n_tok, 0, i_h, H, ks, K, C)
        acc += tl.dot(X * tl.exp(G - r[None, :]), _chunk_cols(col, gc, t0, n_tok, i_h, H, ks, r, K, C),
                      input_precision=PRECISION)
    if PREV:
        keep = offs_c[:, None] > offs_c[None, :]
    else:
        keep = offs_c[:, None] >= offs_c[None, :]
    tl.store(out + offs_c[:, None] * C + offs_c[None, :], tl.where(keep, acc, 0.))


@triton.jit
def _intra_gram_kernel(q, w, gc, amat, tok_start, tok_stop, H, K: tl.constexpr, C: tl.constexpr,
                       BK: tl.constexpr, BKS: tl.constexpr, SUB: tl.constexpr, PRECISION: tl.constexpr,
                       FAST_RANGE: tl.constexpr, CHUNK_RANGE: tl.constexpr):
    """For a chunk that :func:`_chunk_fast` does not allow whole (:func:`_intra_gram_whole_kernel`
    takes the others): rows of sub-block ``i = program_id(0)`` of A for one chunk × head (``program_id(1)``), all C
    columns (zeros above the diagonal), module docstring: one ``[SUB, C]`` dot per BKS keys
    around the reference ``r = G[16 i − 1]`` over the columns before the block, and the block's
    own columns too when :func:`_fast_block`; else the diagonal sub-block exactly, a column at
    a time. Shapes: q, w ``[B·T, H, K]``; gc ``[B·T, H, K]`` fp32; amat ``[NC, H, C, C]`` fp32."""
    nh, i_h, t0, n_tok = _chunk_program(tok_start, tok_stop, H)
    if not _chunk_fast(gc, t0, n_tok, i_h, H, tl.arange(0, BK), K, C, CHUNK_RANGE):
        _intra_gram_block(q, w, gc, amat, nh, i_h, t0, n_tok, tl.program_id(0), K, C, BK, BKS, SUB, PRECISION,
                          FAST_RANGE, H)


@triton.jit
def _intra_gram_whole_kernel(q, w, gc, amat, tok_start, tok_stop, H, K: tl.constexpr, C: tl.constexpr,
                             BK: tl.constexpr, BKS: tl.constexpr, PRECISION: tl.constexpr,
                             CHUNK_RANGE: tl.constexpr):
    """A of one chunk × head (``program_id(1)``) in one piece (:func:`_gram_chunk`, one ``[C, C]``
    dot per BKS keys around the chunk's middle row) if :func:`_chunk_fast` allows, else nothing
    (the chunk is :func:`_intra_gram_kernel`'s)."""
    nh, i_h, t0, n_tok = _chunk_program(tok_start, tok_stop, H)
    if _chunk_fast(gc, t0, n_tok, i_h, H, tl.arange(0, BK), K, C, CHUNK_RANGE):
        _gram_chunk(q, w, gc, amat + nh * C * C, t0, n_tok, i_h, H, False, K, C, BKS, PRECISION)


@triton.jit
def _intra_gram_block(q, w, gc, amat, nh, i_h, t0, n_tok, i_b, K: tl.constexpr, C: tl.constexpr,
                      BK: tl.constexpr, BKS: tl.constexpr, SUB: tl.constexpr, PRECISION: tl.constexpr,
                      FAST_RANGE: tl.constexpr, H):
    """Rows of sub-block i_b of A (:func:`_intra_gram_kernel`)."""
    r = tl.arange(0, SUB)
    rows = i_b * SUB + r
    offs_c = tl.arange(0, C)
    fast = _fast_block(gc, t0, n_tok, i_b, i_h, H, tl.arange(0, BK), K, SUB, FAST_RANGE)
    n_cols = i_b * SUB + SUB * fast.to(tl.int32)          # columns that go through the dot

    acc = tl.zeros([SUB, C], dtype=tl.float32)
    for kk in range(0, (K + BKS - 1) // BKS):
        ks = kk * BKS + tl.arange(0, BKS)
        ref = _row_at(gc, t0, n_tok, i_b * SUB - 1, i_h, H, ks, K)
        Q, G, m = _block_rows(q, gc, t0, n_tok, i_b, i_h, H, ks, K, SUB)
        Q_r = Q * tl.exp(tl.where(m, G - ref[None, :], 0.))                       # exponents <= 0
        # the chunk's w loaded transposed ([BKS, C]) by pointer arithmetic, never tl.trans
        col_off = ((t0 + offs_c)[None, :] * H + i_h) * K + ks[:, None]
        mc = (ks < K)[:, None] & ((offs_c < n_tok) & (offs_c < n_cols))[None, :]
        W_T = tl.load(w + col_off, mask=mc, other=0.).to(tl.float32)
        W_T = W_T * tl.exp(tl.where(mc, ref[:, None] - tl.load(gc + col_off, mask=mc, other=0.), 0.))
        acc += tl.dot(Q_r, W_T, input_precision=PRECISION)
    acc = tl.where(rows[:, None] >= offs_c[None, :], acc, 0.)
    if not fast:
        # a strong decay inside the block: its diagonal sub-block exactly, one column s at a time
        # (masked before exp: above the diagonal the exponent is positive)
        offs_k = tl.arange(0, BK)
        Q, G, m = _block_rows(q, gc, t0, n_tok, i_b, i_h, H, offs_k, K, SUB)
        for s in range(0, SUB):
            col = i_b * SUB + s
            off = ((t0 + col) * H + i_h) * K + offs_k
            ok = (offs_k < K) & (offs_k * 0 + col < n_tok)
            w_s = tl.load(w + off, mask=ok, other=0.).to(tl.float32)
            g_s = tl.load(gc + off, mask=ok, other=0.)
            expo = tl.where(m & (rows >= col)[:, None], G - g_s[None, :], float("-inf"))
            c_s = tl.sum(Q * w_s[None, :] * tl.exp(expo), axis=1)
            acc += tl.where(offs_c[None, :] == col, c_s[:, None], 0.)
    tl.store(amat + nh * C * C + rows[:, None] * C + offs_c[None, :], acc)


@triton.jit
def _intra_bwd_kernel(q, w, gc, dA, dq32, dw32, dq, dw, tok_start, tok_stop, H,
                      K: tl.constexpr, C: tl.constexpr, BKS: tl.constexpr, SPP: tl.constexpr, SUB: tl.constexpr,
                      PRECISION: tl.constexpr, FAST_RANGE: tl.constexpr, CHUNK_RANGE: tl.constexpr):
    """For the (chunk, key slice) pairs :func:`_intra_bwd_whole_kernel` leaves: rows of sub-block
    ``i = program_id(0)``, key slices ``SPP·j … SPP·j + SPP − 1`` of BKS keys (``j = program_id(2)``)
    of one chunk × head (``program_id(1)``): dq, dw (intra parts from dA ``[NC, H, C, C]`` fp32,
    plus the inter parts read from dq32, dw32 ``[B·T, H, K]`` fp32), written to dq, dw in their
    dtype, and the decay term ``q ⊙ dq − w ⊙ dw`` written over dq32 (each program reads and
    writes only its own rows and keys; every product is per key, so the keys split freely).

    dq_t = e^{G_t − r} ⊙ Σ_s dA[t, s] (w_s ⊙ e^{r − G_s}) over s before the block (and in it when
    :func:`_fast_block`), r = G[16 i − 1]; dw_s = e^{ρ − G_s} ⊙ Σ_t dA[t, s] (q_t ⊙ e^{G_t − ρ}) over
    t after the block (and in it when fast), ρ = r when fast, else the block's last row G[16 i + 15];
    a block that is not fast adds its diagonal sub-block exactly, a token at a time."""
    nh, i_h, t0, n_tok = _chunk_program(tok_start, tok_stop, H)
    for u in range(0, SPP):       # key slices SPP·j … SPP·j + SPP − 1 (j = program_id(2))
        offs_k = (tl.program_id(2) * SPP + u) * BKS + tl.arange(0, BKS)
        if not _chunk_fast(gc, t0, n_tok, i_h, H, offs_k, K, C, CHUNK_RANGE):
            _intra_bwd_block(q, w, gc, dA, dq32, dw32, dq, dw, nh, i_h, t0, n_tok, tl.program_id(0), offs_k, H, K,
                             C, SUB, PRECISION, FAST_RANGE)


@triton.jit
def _intra_bwd_whole_kernel(q, w, gc, dA, dq32, dw32, dq, dw, tok_start, tok_stop, H,
                            K: tl.constexpr, C: tl.constexpr, BKS: tl.constexpr, PRECISION: tl.constexpr,
                            CHUNK_RANGE: tl.constexpr):
    """Keys ``[j·BKS, (j + 1)·BKS)`` (``j = program_id(2)``) of one chunk × head (``program_id(1)``)
    whose decay :func:`_chunk_fast` allows, the whole chunk at once around ``r = G[C/2 − 1]``:
    ``dq += e^{G − r} ⊙ dA (W ⊙ e^{r − G})``, ``dw += e^{r − G} ⊙ dAᵀ (Q ⊙ e^{G − r})``; then as
    :func:`_intra_bwd_kernel` (which takes the other slices, with the same BKS)."""
    nh, i_h, t0, n_tok = _chunk_program(tok_start, tok_stop, H)
    offs_k = tl.program_id(2) * BKS + tl.arange(0, BKS)
    if _chunk_fast(gc, t0, n_tok, i_h, H, offs_k, K, C, CHUNK_RANGE):
        offs_c = tl.arange(0, C)
        dA_nh = dA + nh * C * C
        r = _row_at(gc, t0, n_tok, C // 2 - 1, i_h, H, offs_k, K)
        Q, G, m = _block_rows(q, gc, t0, n_tok, 0, i_h, H, offs_k, K, C)
        W = _rows(w, gc, t0, n_tok, 0, i_h, H, offs_k, K, C)
        tile = ((t0 + offs_c)[:, None] * H + i_h) * K + offs_k[None, :]
        e_row = tl.exp(G - r[None, :])
        e_col = tl.exp(r[None, :] - G)
        dQ = tl.load(dq32 + tile, mask=m, other=0.) + e_row * tl.dot(
            tl.load(dA_nh + offs_c[:, None] * C + offs_c[None, :]), W * e_col, input_precision=PRECISION)
        dW = tl.load(dw32 + tile, mask=m, other=0.) + e_col * tl.dot(
            tl.load(dA_nh + offs_c[None, :] * C + offs_c[:, None]), Q * e_row, input_precision=PRECISION)
        tl.store(dq + tile, dQ.to(dq.dtype.element_ty), mask=m)
        tl.store(dw + tile, dW.to(dw.dtype.element_ty), mask=m)
        tl.store(dq32 + tile, Q * dQ - W * dW, mask=m)


@triton.jit
def _intra_bwd_block(q, w, gc, dA, dq32, dw32, dq, dw, nh, i_h, t0, n_tok, i_b, offs_k, H,
                     K: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr, PRECISION: tl.constexpr,
                     FAST_RANGE: tl.constexpr):
    """Rows of sub-block i_b, keys offs_k (:func:`_intra_bwd_kernel`)."""
    r = tl.arange(0, SUB)
    blk = i_b * SUB + r
    offs_c = tl.arange(0, C)
    dA_nh = dA + nh * C * C
    fast = _fast_block(gc, t0, n_tok, i_b, i_h, H, offs_k, K, SUB, FAST_RANGE)
    fast_i = fast.to(tl.int32)
    Q, G, m = _block_rows(q, gc, t0, n_tok, i_b, i_h, H, offs_k, K, SUB)
    W, _, _ = _block_rows(w, gc, t0, n_tok, i_b, i_h, H, offs_k, K, SUB)
    tile = ((t0 + blk)[:, None] * H + i_h) * K + offs_k[None, :]
    dQ = tl.load(dq32 + tile, mask=m, other=0.)
    dW = tl.load(dw32 + tile, mask=m, other=0.)
    Wc, Gc, mc = _block_rows(w, gc, t0, n_tok, 0, i_h, H, offs_k, K, C)      # the whole chunk's rows
    Qc, _, _ = _block_rows(q, gc, t0, n_tok, 0, i_h, H, offs_k, K, C)

    # dq: columns s < 16 i (+ 16 when fast), around r
    ref = _row_at(gc, t0, n_tok, i_b * SUB - 1, i_h, H, offs_k, K)
    ms = mc & (offs_c < i_b * SUB + SUB * fast_i)[:, None]
    W_r = tl.where(ms, Wc * tl.exp(tl.where(ms, ref[None, :] - Gc, 0.)), 0.)
    dA_rows = tl.load(dA_nh + blk[:, None] * C + offs_c[None, :])                   # [SUB, C]
    dQ += tl.dot(dA_rows, W_r, input_precision=PRECISION) * tl.exp(tl.where(m, G - ref[None, :], 0.))
    # dw: rows t >= 16 (i + 1) (16 i when fast), around ρ
    rho = _row_at(gc, t0, n_tok, i_b * SUB + SUB * (1 - fast_i) - 1, i_h, H, offs_k, K)
    mt = mc & (offs_c >= i_b * SUB + SUB * (1 - fast_i))[:, None]
    Q_r = tl.where(mt, Qc * tl.exp(tl.where(mt, Gc - rho[None, :], 0.)), 0.)
    dA_cols = tl.load(dA_nh + offs_c[None, :] * C + blk[:, None])                   # [SUB, C]: dA[t, s]ᵀ
    dW += tl.dot(dA_cols, Q_r, input_precision=PRECISION) * tl.exp(tl.where(m, rho[None, :] - G, 0.))
    if not fast:
        # a strong decay inside the block: its diagonal sub-block exactly, dq one column s at a
        # time, dw one row at a time (masked before exp: the other side's exponent is positive)
        for s in range(0, SUB):
            col = i_b * SUB + s
            ok = (offs_k < K) & (offs_k * 0 + col < n_tok)
            off = ((t0 + col) * H + i_h) * K + offs_k
            w_s = tl.load(w + off, mask=ok, other=0.).to(tl.float32)
            q_s = tl.load(q + off, mask=ok, other=0.).to(tl.float32)
            g_s = tl.load(gc + off, mask=ok, other=0.)
            dA_col = tl.load(dA_nh + blk * C + col)                                   # dA[rows i, s]
            dA_row = tl.load(dA_nh + col * C + blk)                                   # dA[s, cols i]
            lower = m & (blk >= col)[:, None] & ok[None, :]
            upper = m & (blk <= col)[:, None] & ok[None, :]
            dQ += dA_col[:, None] * w_s[None, :] * tl.exp(tl.where(lower, G - g_s[None, :], float("-inf")))
            dW += dA_row[:, None] * q_s[None, :] * tl.exp(tl.where(upper, g_s[None, :] - G, float("-inf")))
    tl.store(dq + tile, dQ.to(dq.dtype.element_ty), mask=m)
    tl.store(dw + tile, dW.to(dw.dtype.element_ty), mask=m)
    tl.store(dq32 + tile, Q * dQ - W * dW, mask=m)


def chunk_cumsum(g: torch.Tensor, tok_start, tok_stop, H: int, K: int, C: int) -> torch.Tensor:
    """G: the chunk-relative inclusive cumulative log-decay of g ``[B·T, H, K]`` (any float dtype;
    read as it is: no fp32 copy of a bf16 g, 6 bytes per element, about 0.05 ms per call at
    (8, 2048, 16, 128) by the H200's copy bandwidth; not timed on its own):
    same shape, fp32."""
    gc = torch.empty(g.shape, device=g.device, dtype=torch.float32)
    NC = tok_start.numel()
    if NC:
        _cumsum_kernel[(NC * H,)](g, gc, tok_start, tok_stop, H, K=K, C=C, BK=max(16, next_pow2(K)),
                                  num_warps=4)
    return gc


def intra_gram(q, w, gc, tok_start, tok_stop, H: int, K: int, C: int, prec: str,
               num_warps: int = 4) -> torch.Tensor:
    """A ``[NC, H, C, C]`` fp32 (module docstring), zeros above the diagonal."""
    NC = tok_start.numel()
    amat = torch.empty(NC, H, C, C, device=q.device, dtype=torch.float32)
    if NC:
        BK = max(16, next_pow2(K))
        args = (q, w, gc, amat, tok_start, tok_stop, H)
        _intra_gram_whole_kernel[(1, NC * H)](*args, K=K, C=C, BK=BK, BKS=whole_keys(K), PRECISION=prec,
                                              CHUNK_RANGE=CHUNK_RANGE, num_warps=num_warps, num_stages=2)
        _intra_gram_kernel[(C // SUB, NC * H)](*args, K=K, C=C, BK=BK, BKS=_key_slice(K), SUB=SUB, PRECISION=prec,
                                               FAST_RANGE=FAST_RANGE, CHUNK_RANGE=CHUNK_RANGE, num_warps=4)
    return amat


def intra_backward(q, w, gc, dA, dq32, dw32, tok_start, tok_stop, H: int, K: int, C: int, prec: str,
                   num_warps: int = 4):
    """``(dq, dw)`` in q's and w's dtype; dq32 then holds the decay terms λ ``[B·T, H, K]`` fp32
    (:func:`_intra_bwd_kernel`)."""
    dq, dw = torch.empty_like(q), torch.empty_like(w)
    NC = tok_start.numel()
    if NC:
        # one key slicing for both kernels (each (chunk, slice) is taken by exactly one of them: the
        # whole-chunk one overwrites dq32 with λ), SPP slices per sub-block program
        BKS = whole_keys(K)
        nks = cdiv(K, BKS)
        args = (q, w, gc, dA, dq32, dw32, dq, dw, tok_start, tok_stop, H)
        _intra_bwd_whole_kernel[(1, NC * H, nks)](*args, K=K, C=C, BKS=BKS, PRECISION=prec, CHUNK_RANGE=CHUNK_RANGE,
                                                  num_warps=num_warps)
        SPP = _key_slice(K) // BKS
        _intra_bwd_kernel[(C // SUB, NC * H, cdiv(nks, SPP))](
            *args, K=K, C=C, BKS=BKS, SPP=SPP, SUB=SUB, PRECISION=prec, FAST_RANGE=FAST_RANGE,
            CHUNK_RANGE=CHUNK_RANGE, num_warps=4)
    return dq, dw
