r"""The scalar log-decay's gradient from the per-token terms the backward kernels write
(:mod:`.fused_bwd` module docstring, decay gradient):

    ∂L/∂g_t = Σ_{t' ≥ t in t's sequence} λ_t'  −  bb_t

with λ summed over the key slices (``dlam [NK, B·T, H]``), ⟨dS_final, S_final⟩ belonging to each
sequence's last token, and bb (``dbb``) the low-rank b terms, which start one token later.

A suffix sum along each sequence. Walking each sequence × head's chunks in one program (the
first version) is latency-bound where there are few of them: at B = 1, T = 32768, H = 16, 16
programs walk 512 chunks each. Here it is three launches, the two large ones parallel over
chunks × heads:

1. :func:`_chunk_total_kernel`: each chunk's Σ λ;
2. :func:`_carry_kernel`: per sequence × head, the sum over the chunks after each chunk (plus
   the final-state term), a block of chunk totals at a time;
3. :func:`_decay_grad_kernel`: within each chunk the suffix sum of λ, plus the chunk's carry,
   minus bb.

Every sum stays within its sequence (no whole-batch suffix sum minus the part past a
sequence's end, which would cancel). A per-key decay (:mod:`.perkey`) has a λ per token and key;
:func:`decay_gradient_per_key` runs the same three steps on ``[C, K]`` tiles (reversed
cumulative sums along the tokens and along the chunks).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ints import cdiv, next_pow2
from .tiles import chunk_tokens

CARRY_BLOCK = 64    # chunk totals per step of the carry scan


@triton.jit
def _chunk_lam(dlam, tok, valid, i_h, BT, H, NK: tl.constexpr, C: tl.constexpr):
    """λ of one chunk's tokens ``[C]``, summed over the NK key slices."""
    lam = tl.zeros([C], dtype=tl.float32)
    for k in range(0, NK):
        lam += tl.load(dlam + k * BT * H + tok * H + i_h, mask=valid, other=0.)
    return lam


@triton.jit
def _chunk_total_kernel(dlam, tot, tok_start, tok_stop, BT, H, NK: tl.constexpr, C: tl.constexpr):
    """Step 1 for one chunk × head (program ``c·H + h``): tot ``[NC·H]`` fp32 gets Σ λ."""
    nh = tl.program_id(0)
    offs_c, valid, tok = chunk_tokens(tok_start, tok_stop, nh // H, C)
    tl.store(tot + nh, tl.sum(_chunk_lam(dlam, tok, valid, nh % H, BT, H, NK, C), axis=0))


@triton.jit
def _carry_kernel(tot, last, carry, chunk_offsets, H, HAS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """Step 2 for one sequence × head: carry ``[NC·H]`` fp32 of chunk c gets the sequence's
    final-state term (``last [N·H]``) plus Σ tot over the sequence's chunks after c; blocks of
    BLOCK chunk totals from the sequence's end, each block's exclusive suffix sums by a masked
    [BLOCK, BLOCK] reduction."""
    i_nh = tl.program_id(0)
    i_h = i_nh % H
    c_start = tl.load(chunk_offsets + i_nh // H)
    c_end = tl.load(chunk_offsets + i_nh // H + 1)
    acc = tl.zeros([1], dtype=tl.float32)
    if HAS_LAST:
        acc += tl.load(last + i_nh + tl.arange(0, 1))
    offs = tl.arange(0, BLOCK)
    after = offs[None, :] > offs[:, None]          # [i, j]: chunk j of the block comes after chunk i
    for b in range(0, (c_end - c_start + BLOCK - 1) // BLOCK):
        c = c_end - (b + 1) * BLOCK + offs
        mask = c >= c_start
        vals = tl.load(tot + c * H + i_h, mask=mask, other=0.)
        tl.store(carry + c * H + i_h, acc + tl.sum(tl.where(after, vals[None, :], 0.), axis=1), mask=mask)
        acc += tl.sum(vals, axis=0)


@triton.jit
def _decay_grad_kernel(dlam, dbb, carry, dg, tok_start, tok_stop, BT, H,
                       NK: tl.constexpr, C: tl.constexpr, HAS_BB: tl.constexpr):
    """Step 3 for one chunk × head: dg ``[B·T, H]`` fp32 = suffix sum of λ within the chunk +
    the chunk's carry − bb."""
    nh = tl.program_id(0)
    i_h = nh % H
    offs_c, valid, tok = chunk_tokens(tok_start, tok_stop, nh // H, C)
    lam = _chunk_lam(dlam, tok, valid, i_h, BT, H, NK, C)
    suffix = tl.sum(tl.where(offs_c[None, :] >= offs_c[:, None], lam[None, :], 0.), axis=1) + tl.load(carry + nh)
    if HAS_BB:
        for k in range(0, NK):
            # b_t is scaled by e^{Λ_{t−1}}: its term starts one token later
            suffix -= tl.load(dbb + k * BT * H + tok * H + i_h, mask=valid, other=0.)
    tl.store(dg + tok * H + i_h, suffix, mask=valid)


def decay_gradient(dlam: torch.Tensor, dbb, d_final, final, tok_start, tok_stop, chunk_offsets,
                   C: int) -> torch.Tensor:
    """∂L/∂g (module docstring).

    Args:
        dlam: ``[NK, B·T, H]`` fp32, the per-token λ of each key slice.
        dbb: ``None`` or ``[NK, B·T, H]`` fp32, the low-rank b terms.
        d_final, final: ``None`` or ``[N, H, K, V]`` fp32 (the final state and its gradient):
            the final state carries e^{Λ_end}, so ⟨dS_final, S_final⟩ belongs to each sequence's
            last token.
        tok_start, tok_stop: ``[NC]`` int32, each chunk's tokens; chunk_offsets ``[N + 1]`` int32.
        C: the chunk size.

    Returns:
        dg ``[B·T, H]`` fp32.
    """
    NK, BT, H = dlam.shape
    NC, N = tok_start.numel(), chunk_offsets.numel() - 1
    dg = torch.empty(BT, H, device=dlam.device, dtype=torch.float32)
    if NC == 0:
        return dg
    last = None if d_final is None else (d_final * final).sum((-2, -1)).contiguous()     # [N, H]
    tot = torch.empty(NC * H, device=dlam.device, dtype=torch.float32)
    carry = torch.empty_like(tot)
    _chunk_total_kernel[(NC * H,)](dlam, tot, tok_start, tok_stop, BT, H, NK=NK, C=C)
    _carry_kernel[(N * H,)](tot, last if last is not None else tot, carry, chunk_offsets, H,
                            HAS_LAST=last is not None, BLOCK=CARRY_BLOCK)
    _decay_grad_kernel[(NC * H,)](dlam, dbb if dbb is not None else dlam, carry, dg, tok_start, tok_stop, BT, H,
                                  NK=NK, C=C, HAS_BB=dbb is not None)
    return dg


@triton.jit
def _key_total_kernel(lam, tot, tok_start, tok_stop, H, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr):
    """Per-key step 1 for one chunk × head × key block: tot ``[NC·H, K]`` fp32 gets Σ λ."""
    nh = tl.program_id(0)
    offs_c, valid, tok = chunk_tokens(tok_start, tok_stop, nh // H, C)
    offs_k = tl.program_id(1) * BK + tl.arange(0, BK)
    mask_k = offs_k < K
    x = tl.load(lam + (tok[:, None] * H + nh % H) * K + offs_k[None, :], mask=valid[:, None] & mask_k[None, :],
                other=0.)
    tl.store(tot + nh.to(tl.int64) * K + offs_k, tl.sum(x, axis=0), mask=mask_k)


@triton.jit
def _key_carry_kernel(tot, last, carry, chunk_offsets, H, K: tl.constexpr, HAS_LAST: tl.constexpr,
                      BLOCK: tl.constexpr, BK: tl.constexpr):
    """Per-key step 2 for one sequence × head × key block: carry ``[NC·H, K]`` of chunk c gets the
    final-state term (``last [N·H, K]``) plus Σ tot over the sequence's chunks after c, a
    ``[BLOCK, BK]`` tile of chunk totals at a time (a reversed cumulative sum along the chunks)."""
    i_nh = tl.program_id(0)
    i_h = i_nh % H
    offs_k = tl.program_id(1) * BK + tl.arange(0, BK)
    mask_k = offs_k < K
    c_start = tl.load(chunk_offsets + i_nh // H)
    c_end = tl.load(chunk_offsets + i_nh // H + 1)
    acc = tl.zeros([BK], dtype=tl.float32)
    if HAS_LAST:
        acc += tl.load(last + i_nh.to(tl.int64) * K + offs_k, mask=mask_k, other=0.)
    offs = tl.arange(0, BLOCK)
    for b in range(0, (c_end - c_start + BLOCK - 1) // BLOCK):
        c = c_end - (b + 1) * BLOCK + offs
        m = (c >= c_start)[:, None] & mask_k[None, :]
        at = (c.to(tl.int64) * H + i_h)[:, None] * K + offs_k[None, :]
        vals = tl.load(tot + at, mask=m, other=0.)
        tl.store(carry + at, acc[None, :] + tl.cumsum(vals, axis=0, reverse=True) - vals, mask=m)
        acc += tl.sum(vals, axis=0)


@triton.jit
def _key_grad_kernel(lam, bb, carry, dg, tok_start, tok_stop, H, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                     HAS_BB: tl.constexpr = False):
    """Per-key step 3 for one chunk × head × key block: dg ``[B·T, H, K]`` fp32 = the suffix sum of
    λ within the chunk + the chunk's carry (− bb ``[B·T, H, K]`` with HAS_BB: b's term starts one
    token later)."""
    nh = tl.program_id(0)
    offs_c, valid, tok = chunk_tokens(tok_start, tok_stop, nh // H, C)
    offs_k = tl.program_id(1) * BK + tl.arange(0, BK)
    mask_k = offs_k < K
    m = valid[:, None] & mask_k[None, :]
    at = (tok[:, None] * H + nh % H) * K + offs_k[None, :]
    x = tl.load(lam + at, mask=m, other=0.)
    suffix = tl.cumsum(x, axis=0, reverse=True) + tl.load(carry + nh.to(tl.int64) * K + offs_k, mask=mask_k,
                                                          other=0.)[None, :]
    if HAS_BB:
        suffix -= tl.load(bb + at, mask=m, other=0.)
    tl.store(dg + at, suffix, mask=m)


def decay_gradient_per_key(lam: torch.Tensor, d_final, final, tok_start, tok_stop, chunk_offsets,
                           C: int, bb=None) -> torch.Tensor:
    """∂L/∂g for a per-key log-decay (:mod:`.perkey`): the same suffix sums per key.

    Args:
        lam: ``[B·T, H, K]`` fp32, the per-token, per-key λ = q ⊙ dq − w ⊙ dw (with a pair
            − a ⊙ da + b ⊙ db, :mod:`.perkey_pair`).
        d_final, final: ``None`` or ``[N, H, K, V]`` fp32: Σ_v dS_final ⊙ S_final belongs to each
            sequence's last token.
        tok_start, tok_stop, chunk_offsets, C: as :func:`decay_gradient`.
        bb: ``None`` or ``[B·T, H, K]`` fp32, b ⊙ db, subtracted at its own token (b_t's decay
            factor is the one up to token t − 1).

    Returns:
        dg ``[B·T, H, K]`` fp32.
    """
    BT, H, K = lam.shape
    NC, N = tok_start.numel(), chunk_offsets.numel() - 1
    dg = torch.empty_like(lam)
    if NC == 0:
        return dg
    last = None if d_final is None else (d_final * final).sum(-1).contiguous()            # [N, H, K]
    tot = torch.empty(NC * H, K, device=lam.device, dtype=torch.float32)
    carry = torch.empty_like(tot)
    BK = min(64, max(16, next_pow2(K)))
    NK = cdiv(K, BK)
    _key_total_kernel[(NC * H, NK)](lam, tot, tok_start, tok_stop, H, K=K, C=C, BK=BK)
    _key_carry_kernel[(N * H, NK)](tot, last if last is not None else tot, carry, chunk_offsets, H, K=K,
                                   HAS_LAST=last is not None, BLOCK=CARRY_BLOCK, BK=BK)
    _key_grad_kernel[(NC * H, NK)](lam, bb if bb is not None else lam, carry, dg, tok_start, tok_stop, H, K=K, C=C,
                                   BK=BK, HAS_BB=bb is not None)
    return dg


def decay_gradient_reference(dlam, dbb, d_final, final, tok_start, tok_stop, chunk_offsets, C: int):
    """:func:`decay_gradient` as a plain loop over each sequence's tokens, last to first, in
    float64 (same arguments; returns ``[B·T, H]`` fp32): the reference its tests compare with."""
    lam = dlam.double().sum(0)
    dg = torch.zeros_like(lam)
    offsets = chunk_offsets.tolist()
    for i, (c0, c1) in enumerate(zip(offsets[:-1], offsets[1:])):
        carry = torch.zeros_like(lam[0])
        if d_final is not None:
            carry = carry + (d_final[i].double() * final[i].double()).sum((-2, -1))
        if c1 > c0:
            for t in range(int(tok_stop[c1 - 1]) - 1, int(tok_start[c0]) - 1, -1):
                carry = carry + lam[t]
                dg[t] = carry
    if dbb is not None:
        dg = dg - dbb.double().sum(0)
    return dg.float()


def decay_gradient_per_key_reference(lam, d_final, final, tok_start, tok_stop, chunk_offsets, C: int, bb=None):
    """:func:`decay_gradient_per_key` by :func:`decay_gradient_reference` with the keys folded into
    the heads (same arguments; returns ``[B·T, H, K]`` fp32): the reference its tests compare with."""
    BT, H, K = lam.shape
    fold = lambda t: None if t is None else t.reshape(t.shape[0], H * K, 1, t.shape[-1])  # noqa: E731
    return decay_gradient_reference(lam.reshape(1, BT, H * K), None if bb is None else bb.reshape(1, BT, H * K),
                                    fold(d_final), fold(final), tok_start, tok_stop, chunk_offsets, C).reshape(BT, H, K)
