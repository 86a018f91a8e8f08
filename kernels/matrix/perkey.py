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
* :func:`_intra_gram_kernel`: A ``[NC, H, C, C]`` fp32, by GLA's secondary chunking: rows and
  columns in sub-blocks of 16; an off-diagonal sub-block (rows in block i, columns in block
  j < i) is one tensor-core dot of ``Q_i ⊙ e^{G_i − r}`` and ``W_j ⊙ e^{r − G_j}`` around the
  reference ``r = G[16 i − 1]`` (G is non-increasing along the chunk, so both exponents are
  ≤ 0 and neither factor can overflow); a diagonal sub-block exactly, as ``[16, 16, 32]`` tiles
  of e^{G_t − G_s} over 32 keys at a time.
  Entries above the diagonal are not written (readers mask them);
* :func:`_intra_bwd_kernel`: from ``dA = scale · (dO Uᵀ)`` (lower, inclusive; written by the
  dq/dw kernel) the intra-chunk parts of the gradients by the same sub-block factoring::

      dq_t += Σ_{s ≤ t} dA[t, s] w_s ⊙ e^{G_t − G_s},   dw_s += Σ_{t ≥ s} dA[t, s] q_t ⊙ e^{G_t − G_s}

  added to the inter-chunk parts (``scale · e^{G} ⊙ dO S_nᵀ`` and ``e^{γ − G} ⊙ U dS_{n+1}ᵀ``, fp32
  from the dq/dw kernel), and the per-key decay term ``λ_{t,k} = q_tk dq_tk − w_tk dw_tk``.

The decay gradient is the per-key form of :mod:`.fused_bwd`'s identity: rescaling each key row
by e^{−Λ_{t,k}} removes the decay, so ∂L/∂g_{j,k} = Σ_{t ≥ j} λ_{t,k} within j's sequence,
plus Σ_v (S_final ⊙ dS_final)_{k,v} at its last token: :func:`.decay_grad.decay_gradient` with
the key axis folded into the heads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

SUB = 16  # sub-block length of the secondary chunking; tl.dot needs every dim >= 16
BKD = 32  # keys per [SUB, SUB, BKD] tile of the diagonal sub-blocks (and per intra-backward program)


@triton.jit
def _cumsum_kernel(g, gc, tok_start, tok_stop, H, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr):
    """gc ``[B·T, H, K]`` fp32 = the inclusive cumulative sum of g ``[B·T, H, K]`` fp32 within
    each chunk, for one chunk × head (program ``c·H + h``)."""
    nh = tl.program_id(0)
    i_h = nh % H
    t0 = tl.load(tok_start + nh // H).to(tl.int64)
    n_tok = tl.load(tok_stop + nh // H) - tl.load(tok_start + nh // H)
    offs_c = tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    off = ((t0 + offs_c)[:, None] * H + i_h) * K + offs_k[None, :]
    m = (offs_c < n_tok)[:, None] & (offs_k < K)[None, :]
    x = tl.load(g + off, mask=m, other=0.)
    tl.store(gc + off, tl.cumsum(x, axis=0), mask=m)


@triton.jit
def _block_rows(x, gc, t0, n_tok, i_b, i_h, H, offs_k, K: tl.constexpr, SUB: tl.constexpr):
    """Rows ``[i_b·SUB, (i_b + 1)·SUB)`` of one chunk (first token ``t0``, ``n_tok`` tokens), keys
    ``offs_k``: ``(X [SUB, BK] fp32, G [SUB, BK], mask [SUB, BK])`` of x and gc (0 outside)."""
    rows = i_b * SUB + tl.arange(0, SUB)
    off = ((t0 + rows)[:, None] * H + i_h) * K + offs_k[None, :]
    m = (rows < n_tok)[:, None] & (offs_k < K)[None, :]
    return tl.load(x + off, mask=m, other=0.).to(tl.float32), tl.load(gc + off, mask=m, other=0.), m


@triton.jit
def _reference_row(gc, t0, n_tok, i_b, i_h, H, offs_k, K: tl.constexpr, SUB: tl.constexpr):
    """G at the chunk's row ``i_b·SUB − 1`` (keys ``offs_k``), the reference of row block i_b;
    past the chunk's end (the block has no tokens) its last row, so that ``r − G_s`` stays ≤ 0
    for every token s before the block: a zero there made e^{−G_s} overflow, times a zero."""
    row = tl.minimum(i_b * SUB - 1, n_tok - 1)
    return tl.load(gc + ((t0 + row) * H + i_h) * K + offs_k, mask=offs_k < K, other=0.)


@triton.jit
def _diag_decay(G, m, SUB: tl.constexpr):
    """``E[t, s, k] = e^{G_tk − G_sk}`` for t ≥ s within one sub-block, 0 elsewhere
    ``[SUB, SUB, BK]`` (masked before exp: above the diagonal the exponent is positive)."""
    r = tl.arange(0, SUB)
    keep = (r[:, None] >= r[None, :])[:, :, None] & m[:, None, :] & m[None, :, :]
    return tl.exp(tl.where(keep, G[:, None, :] - G[None, :, :], float("-inf")))


@triton.jit
def _chunk_program(tok_start, tok_stop, H):
    """``(nh, i_h, t0, n_tok)`` of a program whose second grid axis is chunk × head."""
    nh = tl.program_id(1).to(tl.int64)
    t0 = tl.load(tok_start + nh // H)
    return nh, nh % H, t0.to(tl.int64), tl.load(tok_stop + nh // H) - t0


@triton.jit
def _intra_gram_kernel(q, w, gc, amat, tok_start, tok_stop, H, K: tl.constexpr, C: tl.constexpr,
                       BK: tl.constexpr, BKD: tl.constexpr, SUB: tl.constexpr, PRECISION: tl.constexpr):
    """Rows of sub-block ``i = program_id(0)`` of A for one chunk × head (``program_id(1)``)
    (module docstring): the off-diagonal sub-blocks as dots over all of K, the diagonal one as
    ``[SUB, SUB, BKD]`` tiles, BKD keys at a time. Shapes: q, w ``[B·T, H, K]``; gc
    ``[B·T, H, K]`` fp32; amat ``[NC, H, C, C]`` fp32 (written on and below the diagonal)."""
    i_b = tl.program_id(0)
    nh, i_h, t0, n_tok = _chunk_program(tok_start, tok_stop, H)
    r = tl.arange(0, SUB)
    rows = i_b * SUB + r
    offs_k = tl.arange(0, BK)
    mask_k = offs_k < K
    a_rows = amat + nh * C * C + rows[:, None] * C

    if i_b > 0:
        Q, G, m = _block_rows(q, gc, t0, n_tok, i_b, i_h, H, offs_k, K, SUB)
        ref = _reference_row(gc, t0, n_tok, i_b, i_h, H, offs_k, K, SUB)
        Q_r = Q * tl.exp(tl.where(m, G - ref[None, :], 0.))                      # exponents <= 0
        for j in range(0, i_b):
            cols = j * SUB + r
            # columns loaded transposed ([BK, SUB]) by pointer arithmetic, never tl.trans
            col_off = ((t0 + cols)[None, :] * H + i_h) * K + offs_k[:, None]
            mc = mask_k[:, None] & (cols < n_tok)[None, :]
            W_T = tl.load(w + col_off, mask=mc, other=0.).to(tl.float32)
            W_T = W_T * tl.exp(tl.where(mc, ref[:, None] - tl.load(gc + col_off, mask=mc, other=0.), 0.))
            tl.store(a_rows + cols[None, :], tl.dot(Q_r, W_T, input_precision=PRECISION))

    # the diagonal sub-block exactly: A[t, s] = Σ_k q_tk w_sk E[t, s, k]
    diag = tl.zeros([SUB, SUB], dtype=tl.float32)
    for kk in range(0, (K + BKD - 1) // BKD):
        ks = kk * BKD + tl.arange(0, BKD)
        Q, G, m = _block_rows(q, gc, t0, n_tok, i_b, i_h, H, ks, K, SUB)
        W, _, _ = _block_rows(w, gc, t0, n_tok, i_b, i_h, H, ks, K, SUB)
        diag += tl.sum(Q[:, None, :] * W[None, :, :] * _diag_decay(G, m, SUB), axis=2)
    tl.store(a_rows + rows[None, :], diag)


@triton.jit
def _intra_bwd_kernel(q, w, gc, dA, dq32, dw32, dq, dw, tok_start, tok_stop, H,
                      K: tl.constexpr, C: tl.constexpr, BKS: tl.constexpr, SUB: tl.constexpr,
                      PRECISION: tl.constexpr):
    """Rows of sub-block ``i = program_id(0)``, keys ``[j·BKS, (j + 1)·BKS)`` (``j = program_id(2)``)
    of one chunk × head (``program_id(1)``): dq, dw (intra parts from dA ``[NC, H, C, C]`` fp32,
    plus the inter parts read from dq32, dw32 ``[B·T, H, K]`` fp32), written to dq, dw in their
    dtype, and the decay term ``q ⊙ dq − w ⊙ dw`` written over dq32 (each program reads and
    writes only its own rows and keys). Every product is per key, so the keys split freely."""
    i_b = tl.program_id(0)
    nh, i_h, t0, n_tok = _chunk_program(tok_start, tok_stop, H)
    NB: tl.constexpr = C // SUB
    r = tl.arange(0, SUB)
    blk = i_b * SUB + r
    offs_k = tl.program_id(2) * BKS + tl.arange(0, BKS)
    dA_nh = dA + nh * C * C
    Q, G, m = _block_rows(q, gc, t0, n_tok, i_b, i_h, H, offs_k, K, SUB)
    W, _, _ = _block_rows(w, gc, t0, n_tok, i_b, i_h, H, offs_k, K, SUB)
    tile = ((t0 + blk)[:, None] * H + i_h) * K + offs_k[None, :]
    dQ = tl.load(dq32 + tile, mask=m, other=0.)
    dW = tl.load(dw32 + tile, mask=m, other=0.)

    # dq of these rows from earlier column blocks j < i, through the reference r_i
    if i_b > 0:
        ref = _reference_row(gc, t0, n_tok, i_b, i_h, H, offs_k, K, SUB)
        acc = tl.zeros([SUB, BKS], dtype=tl.float32)
        for j in range(0, i_b):
            W_j, G_j, m_j = _block_rows(w, gc, t0, n_tok, j, i_h, H, offs_k, K, SUB)
            dA_ij = tl.load(dA_nh + blk[:, None] * C + (j * SUB + r)[None, :])
            acc += tl.dot(dA_ij, W_j * tl.exp(tl.where(m_j, ref[None, :] - G_j, 0.)), input_precision=PRECISION)
        dQ += acc * tl.exp(tl.where(m, G - ref[None, :], 0.))
    # dw of these columns from later row blocks mb > i, each through its own reference r_mb
    for mb in range(i_b + 1, NB):
        ref_m = _reference_row(gc, t0, n_tok, mb, i_h, H, offs_k, K, SUB)
        Q_m, G_m, m_m = _block_rows(q, gc, t0, n_tok, mb, i_h, H, offs_k, K, SUB)
        dA_T = tl.load(dA_nh + (mb * SUB + r)[None, :] * C + blk[:, None])           # [cols i, rows mb]
        part = tl.dot(dA_T, Q_m * tl.exp(tl.where(m_m, G_m - ref_m[None, :], 0.)), input_precision=PRECISION)
        dW += part * tl.exp(tl.where(m, ref_m[None, :] - G, 0.))
    # the diagonal sub-block exactly, with E[t, s, k] = e^{G_tk − G_sk} (t ≥ s):
    # dq_t += Σ_s dA[t, s] w_s E[t, s],  dw_s += Σ_t dA[t, s] q_t E[t, s]
    dA_ii = tl.load(dA_nh + blk[:, None] * C + blk[None, :])[:, :, None]
    E = _diag_decay(G, m, SUB)
    dQ += tl.sum(dA_ii * W[None, :, :] * E, axis=1)
    dW += tl.sum(dA_ii * Q[:, None, :] * E, axis=0)
    tl.store(dq + tile, dQ.to(dq.dtype.element_ty), mask=m)
    tl.store(dw + tile, dW.to(dw.dtype.element_ty), mask=m)
    tl.store(dq32 + tile, Q * dQ - W * dW, mask=m)


def chunk_cumsum(g: torch.Tensor, tok_start, tok_stop, H: int, K: int, C: int) -> torch.Tensor:
    """G: the chunk-relative inclusive cumulative log-decay of g ``[B·T, H, K]`` fp32 (same
    shape, fp32)."""
    gc = torch.empty_like(g)
    NC = tok_start.numel()
    if NC:
        _cumsum_kernel[(NC * H,)](g, gc, tok_start, tok_stop, H, K=K, C=C, BK=max(16, triton.next_power_of_2(K)),
                                  num_warps=4)
    return gc


def intra_gram(q, w, gc, tok_start, tok_stop, H: int, K: int, C: int, prec: str) -> torch.Tensor:
    """A ``[NC, H, C, C]`` fp32 (module docstring; above the diagonal unwritten)."""
    NC = tok_start.numel()
    amat = torch.empty(NC, H, C, C, device=q.device, dtype=torch.float32)
    if NC:
        _intra_gram_kernel[(C // SUB, NC * H)](q, w, gc, amat, tok_start, tok_stop, H, K=K, C=C,
                                               BK=max(16, triton.next_power_of_2(K)), BKD=BKD, SUB=SUB,
                                               PRECISION=prec, num_warps=4)
    return amat


def intra_backward(q, w, gc, dA, dq32, dw32, tok_start, tok_stop, H: int, K: int, C: int, prec: str):
    """``(dq, dw)`` in q's and w's dtype; dq32 then holds the decay terms λ ``[B·T, H, K]`` fp32
    (:func:`_intra_bwd_kernel`)."""
    dq, dw = torch.empty_like(q), torch.empty_like(w)
    NC = tok_start.numel()
    if NC:
        _intra_bwd_kernel[(C // SUB, NC * H, triton.cdiv(K, BKD))](
            q, w, gc, dA, dq32, dw32, dq, dw, tok_start, tok_stop, H, K=K, C=C, BKS=BKD, SUB=SUB, PRECISION=prec,
            num_warps=4)
    return dq, dw
