r"""Inverse of a batch of unit lower-triangular matrices ``I − L`` (L strictly lower), the T
of the WY/UT representation (DeltaNet arXiv 2406.06484), as a differentiable op.

It replaces ``torch.linalg.solve_triangular`` on ``[C·R, C·R]`` systems with K + V right-hand
sides in the general path of :mod:`.chunk`: one Triton program per matrix forms T by forward
substitution in registers (T[i] = e_i + Σ_{s<i} L[i, s] T[s], rows of L read from memory), and
the solution is then a plain batched product ``T @ rhs``. Backward (T = (I − L)⁻¹ gives
dT = T dL T): ``∂ℓ/∂L = strict_lower(Tᵀ (∂ℓ/∂T) Tᵀ)``, two batched products.

Matrices larger than :data:`MAX_N` (wide ranks at long chunks) fall back to the torch solve.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ints import next_pow2

MAX_N = 128  # [n, n] fp32 tile in registers; larger spills badly


@triton.jit
def _unit_lower_inverse_kernel(l, t, n: tl.constexpr, BN: tl.constexpr):
    """T = (I − L)⁻¹ for one matrix: l, t ``[M, n, n]`` fp32 (only L's strict lower part is read)."""
    base = tl.program_id(0).to(tl.int64) * n * n
    offs = tl.arange(0, BN)
    Tm = (offs[:, None] == offs[None, :]).to(tl.float32)
    for i in range(1, n):
        l_i = tl.load(l + base + i * n + offs, mask=offs < i, other=0.)           # L[i, s < i]
        r_i = tl.sum(l_i[:, None] * Tm, axis=0)                                   # (L T)[i, :]
        Tm = tl.where(offs[:, None] == i, Tm + r_i[None, :], Tm)
    mask = (offs[:, None] < n) & (offs[None, :] < n)
    tl.store(t + base + offs[:, None] * n + offs[None, :], Tm, mask=mask)


class _UnitLowerInverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, L):
        *lead, n, _ = L.shape
        flat = L.reshape(-1, n, n).contiguous().float()
        T = torch.empty_like(flat)
        if flat.shape[0] > 0:
            BN = max(16, next_pow2(n))
            _unit_lower_inverse_kernel[(flat.shape[0],)](flat, T, n=n, BN=BN, num_warps=4 if BN <= 64 else 8)
        T = T.view(*lead, n, n)
        ctx.save_for_backward(T)
        return T

    @staticmethod
    def backward(ctx, dT):
        (T,) = ctx.saved_tensors
        Tt = T.transpose(-1, -2)
        return torch.tril(Tt @ dT @ Tt, diagonal=-1)


def unit_lower_inverse(L: torch.Tensor) -> torch.Tensor:
    """``(I − L)⁻¹`` for strictly lower-triangular L, batched, differentiable.

    Args:
        L: ``[..., n, n]`` fp32; entries on and above the diagonal are ignored (taken as 0).

    Returns:
        T ``[..., n, n]`` fp32, unit lower-triangular, with ``(I − L) T = I``.
    """
    n = L.shape[-1]
    if n > MAX_N:
        eye = torch.eye(n, device=L.device, dtype=L.dtype)
        return torch.linalg.solve_triangular(eye - torch.tril(L, -1), eye.expand_as(L),
                                             upper=False, unitriangular=True)
    return _UnitLowerInverse.apply(L)
