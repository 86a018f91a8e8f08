r"""Decayed Gram matrices inside a chunk: the intra-chunk pairwise terms of the chunked form.

Every intra-chunk interaction of the matrix class is one pattern: a row vector x_t (a query,
or a low-rank ``b``) meets a column vector y_s (a written key ``w`` or a low-rank ``a``) through
the diagonal decay accumulated between them::

    M[t, s] = Σ_k x[t, k] · y[s, k] · exp(e[t, k] − f[s, k])      for s < t (strict) or s ≤ t

with ``f`` the chunk-relative cumulative log-decay at s and ``e`` the one at t (or at t − 1 for
the "probe" rows of the low-rank part). For every valid pair e[t] ≤ f[s] (log-decays are ≤ 0),
so the exact formula only ever takes exp of non-positive numbers.

* no decay or a scalar decay per head: ``exp(e − f)`` is a [C, C] matrix, so M is a masked
  matrix product; plain torch is as fast as anything here (:func:`decayed_gram` does it).
* per-key decay (GLA, arXiv 2312.06635 §4): the ratio depends on k, so M is no longer one
  product. Following the paper's secondary chunking, the chunk is cut into sub-blocks of 16.
  An off-diagonal sub-block (rows in block i, columns in block j < i) is factored around the
  reference r = f[i·16 − 1], the last position before block i:
  ``x_t e^{e_t − r}`` and ``y_s e^{r − f_s}`` both have non-positive exponents, so the product
  is a tensor-core ``tl.dot`` that can neither overflow nor lose more than the true product.
  Diagonal sub-blocks are computed exactly, one column at a time.

The Triton kernels here handle the per-key case, forward and backward; the autograd Function
:class:`_PerKeyGram` turns them into an op that torch differentiates through.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ints import next_pow2

SUB = 16  # sub-block length of the secondary chunking; tl.dot needs every dim >= 16


@triton.jit
def _gram_fwd_kernel(
    x, y, e, f, m,                      # x, y, e, f: [N, C, K] fp32; m: [N, C, C] fp32
    C: tl.constexpr, K: tl.constexpr,
    BK: tl.constexpr, SUB: tl.constexpr, STRICT: tl.constexpr,
):
    """One program = one chunk (of one head) × one row sub-block i."""
    i_b = tl.program_id(0)
    i_n = tl.program_id(1).to(tl.int64)
    NB: tl.constexpr = C // SUB

    rows = i_b * SUB + tl.arange(0, SUB)
    offs_k = tl.arange(0, BK)
    mask_k = offs_k < K
    base = i_n * C * K
    x_i = tl.load(x + base + rows[:, None] * K + offs_k[None, :], mask=mask_k[None, :], other=0.)
    e_i = tl.load(e + base + rows[:, None] * K + offs_k[None, :], mask=mask_k[None, :], other=0.)
    m_base = m + i_n * C * C + rows[:, None] * C

    # Off-diagonal sub-blocks j < i, through the reference point r = f[i·SUB − 1].
    if i_b > 0:
        r = tl.load(f + base + (i_b * SUB - 1) * K + offs_k, mask=mask_k, other=0.)
        x_r = x_i * tl.exp(e_i - r[None, :])                        # exponent <= 0
        for j in range(0, i_b):
            cols = j * SUB + tl.arange(0, SUB)
            # y and f are loaded transposed ([K, SUB]) by pointer arithmetic, never tl.trans
            yT = tl.load(y + base + cols[None, :] * K + offs_k[:, None], mask=mask_k[:, None], other=0.)
            fT = tl.load(f + base + cols[None, :] * K + offs_k[:, None], mask=mask_k[:, None], other=0.)
            y_r = yT * tl.exp(r[:, None] - fT)                       # exponent <= 0
            blk = tl.dot(x_r, y_r, input_precision="ieee")
            tl.store(m_base + cols[None, :], blk)

    # Diagonal sub-block: exact, one column s at a time.
    cols = i_b * SUB + tl.arange(0, SUB)
    diag = tl.zeros([SUB, SUB], dtype=tl.float32)
    for s in range(0, SUB):
        col = i_b * SUB + s
        y_s = tl.load(y + base + col * K + offs_k, mask=mask_k, other=0.)
        f_s = tl.load(f + base + col * K + offs_k, mask=mask_k, other=0.)
        if STRICT:
            valid = rows > col
        else:
            valid = rows >= col
        # Mask before exp: an invalid pair may have a large positive exponent.
        expo = tl.where(valid[:, None], e_i - f_s[None, :], float("-inf"))
        c_s = tl.sum(x_i * y_s[None, :] * tl.exp(expo), axis=1)
        diag += tl.where(tl.arange(0, SUB)[None, :] == s, c_s[:, None], 0.)
    tl.store(m_base + cols[None, :], diag)

    # Sub-blocks above the diagonal are zero.
    for j in range(i_b + 1, NB):
        cols = j * SUB + tl.arange(0, SUB)
        tl.store(m_base + cols[None, :], tl.zeros([SUB, SUB], dtype=tl.float32))


@triton.jit
def _gram_bwd_kernel(
    x, y, e, f, dm,                     # as in the forward; dm: [N, C, C]
    dx, dy,                             # [N, C, K]
    C: tl.constexpr, K: tl.constexpr,
    BK: tl.constexpr, SUB: tl.constexpr, STRICT: tl.constexpr,
):
    """One program = one chunk × sub-block i, which it owns as a row block (dx) and a column
    block (dy)::

        dx[t] = Σ_s dm[t, s] y[s] e^{e_t − f_s},    dy[s] = Σ_t dm[t, s] x[t] e^{e_t − f_s}
    """
    i_b = tl.program_id(0)
    i_n = tl.program_id(1).to(tl.int64)
    NB: tl.constexpr = C // SUB

    blk = i_b * SUB + tl.arange(0, SUB)
    offs_k = tl.arange(0, BK)
    mask_k = offs_k < K
    base = i_n * C * K
    dm_base = dm + i_n * C * C
    tile = blk[:, None] * K + offs_k[None, :]
    x_i = tl.load(x + base + tile, mask=mask_k[None, :], other=0.)
    y_i = tl.load(y + base + tile, mask=mask_k[None, :], other=0.)
    e_i = tl.load(e + base + tile, mask=mask_k[None, :], other=0.)
    f_i = tl.load(f + base + tile, mask=mask_k[None, :], other=0.)

    # dx, rows in block i: earlier column blocks through the reference r_i = f[i·SUB − 1].
    dx_i = tl.zeros([SUB, BK], dtype=tl.float32)
    if i_b > 0:
        r = tl.load(f + base + (i_b * SUB - 1) * K + offs_k, mask=mask_k, other=0.)
        for j in range(0, i_b):
            cols = j * SUB + tl.arange(0, SUB)
            y_j = tl.load(y + base + cols[:, None] * K + offs_k[None, :], mask=mask_k[None, :], other=0.)
            f_j = tl.load(f + base + cols[:, None] * K + offs_k[None, :], mask=mask_k[None, :], other=0.)
            dm_ij = tl.load(dm_base + blk[:, None] * C + cols[None, :])
            dx_i += tl.dot(dm_ij, y_j * tl.exp(r[None, :] - f_j), input_precision="ieee")
        dx_i = dx_i * tl.exp(e_i - r[None, :])

    # dy, columns in block i: later row blocks m > i, each through its own reference r_m.
    dy_i = tl.zeros([SUB, BK], dtype=tl.float32)
    for mb in range(i_b + 1, NB):
        rows = mb * SUB + tl.arange(0, SUB)
        r_m = tl.load(f + base + (mb * SUB - 1) * K + offs_k, mask=mask_k, other=0.)
        x_m = tl.load(x + base + rows[:, None] * K + offs_k[None, :], mask=mask_k[None, :], other=0.)
        e_m = tl.load(e + base + rows[:, None] * K + offs_k[None, :], mask=mask_k[None, :], other=0.)
        # dm block (rows m, cols i) loaded transposed: [cols i, rows m]
        dmT = tl.load(dm_base + rows[None, :] * C + blk[:, None])
        part = tl.dot(dmT, x_m * tl.exp(e_m - r_m[None, :]), input_precision="ieee")
        dy_i += part * tl.exp(r_m[None, :] - f_i)

    # Diagonal sub-block, exact. dx: one column s at a time; dy: one row t at a time.
    for s in range(0, SUB):
        col = i_b * SUB + s
        if STRICT:
            valid = blk > col
        else:
            valid = blk >= col
        y_s = tl.load(y + base + col * K + offs_k, mask=mask_k, other=0.)
        f_s = tl.load(f + base + col * K + offs_k, mask=mask_k, other=0.)
        dm_s = tl.load(dm_base + blk * C + col)                     # dm[block rows, s]
        expo = tl.where(valid[:, None], e_i - f_s[None, :], float("-inf"))
        dx_i += dm_s[:, None] * y_s[None, :] * tl.exp(expo)
    for t in range(0, SUB):
        row = i_b * SUB + t
        if STRICT:
            valid = blk < row
        else:
            valid = blk <= row
        x_t = tl.load(x + base + row * K + offs_k, mask=mask_k, other=0.)
        e_t = tl.load(e + base + row * K + offs_k, mask=mask_k, other=0.)
        dm_t = tl.load(dm_base + row * C + blk)                      # dm[t, block cols]
        expo = tl.where(valid[:, None], e_t[None, :] - f_i, float("-inf"))
        dy_i += dm_t[:, None] * x_t[None, :] * tl.exp(expo)

    tl.store(dx + base + tile, dx_i, mask=mask_k[None, :])
    tl.store(dy + base + tile, dy_i, mask=mask_k[None, :])


def _block_k(K: int) -> int:
    return max(16, next_pow2(K))


class _PerKeyGram(torch.autograd.Function):
    """M = decayed Gram of x, y with per-key exponents e (rows) and f (columns)."""

    @staticmethod
    def forward(ctx, x, y, e, f, strict: bool):
        *lead, C, K = x.shape
        x, y, e, f = (t.reshape(-1, C, K).contiguous() for t in (x, y, e, f))
        N = x.shape[0]
        m = torch.empty(N, C, C, device=x.device, dtype=torch.float32)
        if N > 0:
            _gram_fwd_kernel[(C // SUB, N)](
                x, y, e, f, m, C=C, K=K, BK=_block_k(K), SUB=SUB, STRICT=strict, num_warps=4,
            )
        ctx.save_for_backward(x, y, e, f)
        ctx.strict, ctx.lead = strict, lead
        return m.view(*lead, C, C)

    @staticmethod
    def backward(ctx, dm):
        x, y, e, f = ctx.saved_tensors
        N, C, K = x.shape
        dm = dm.reshape(N, C, C).contiguous().float()
        dx, dy = torch.empty_like(x), torch.empty_like(y)
        if N > 0:
            _gram_bwd_kernel[(C // SUB, N)](
                x, y, e, f, dm, dx, dy, C=C, K=K, BK=_block_k(K), SUB=SUB, STRICT=ctx.strict,
                num_warps=4,
            )
        # ∂M/∂e[t,k] = x[t,k]·(dx contribution), ∂M/∂f[s,k] = −y[s,k]·(dy contribution)
        de, df = x * dx, -(y * dy)
        shape = (*ctx.lead, C, K)
        return dx.view(shape), dy.view(shape), de.view(shape), df.view(shape), None


def decayed_gram(x, y, e, f, strict: bool):
    """The decayed Gram matrix of one chunk, batched over leading dims.

    Args:
        x: row vectors ``[..., C, K]`` fp32.
        y: column vectors ``[..., C, K]`` fp32.
        e: row exponents: ``None`` (no decay), ``[..., C]`` (scalar decay) or ``[..., C, K]``.
        f: column exponents, same kind as ``e``; ``e[t] <= f[s]`` for every valid pair.
        strict: keep s < t only (else s <= t).

    Returns:
        ``M [..., C, C]`` fp32 with ``M[t, s] = Σ_k x[t,k] y[s,k] exp(e[t,k] − f[s,k])`` on the
        valid pairs and 0 elsewhere.
    """
    C = x.shape[-2]
    mask = torch.ones(C, C, dtype=torch.bool, device=x.device).tril(-1 if strict else 0)
    if e is None:
        return (x @ y.transpose(-1, -2)) * mask
    if e.dim() == x.dim() - 1:
        # scalar decay: the ratio is a [C, C] matrix; mask before exp (invalid pairs can be large)
        diff = e[..., :, None] - f[..., None, :]
        ratio = torch.exp(diff.masked_fill(~mask, float("-inf")))
        return (x @ y.transpose(-1, -2)) * ratio
    return _PerKeyGram.apply(x, y, e, f, strict)
