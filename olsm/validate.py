"""Check what a user passes to a recurrence; every failure says what to do."""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .errors import InputError

_CONSTRAINT = {
    "positive": (lambda x: x > 0, "> 0"),
    "nonnegative": (lambda x: x >= 0, ">= 0"),
    "nonpositive": (lambda x: x <= 0, "<= 0"),
    "negative": (lambda x: x < 0, "< 0"),
}


def _tensor(name, x):
    if not torch.is_tensor(x):
        raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise InputError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_qkv(q, k, v):
    """q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, one device, one dtype.

    Returns:
        ``(B, T, H, K, V)``.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _tensor(name, x)
        if x.dim() != 4:
            raise InputError(f"{name} must be [B, T, H, {'V' if name == 'v' else 'K'}] (4-D), got shape "
                             f"{tuple(x.shape)}; olsm uses one layout, [B, T, H, D] (no head-first)")
    if q.shape != k.shape:
        raise InputError(f"q and k must have the same shape [B, T, H, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise InputError(f"v must be [B, T, H, V] with q's B, T, H = {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    if len({q.device, k.device, v.device}) != 1:
        raise InputError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        raise InputError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them first")
    B, T, H, K = q.shape
    return B, T, H, K, v.shape[-1]


def check_coefficients(rec, coefs: Dict[str, torch.Tensor], dims, device, check_values=True):
    """Every declared coefficient present, with its shape, on the device, finite, in range."""
    names = [s.name for s in rec.inputs]
    missing = [n for n in names if n not in coefs]
    extra = [n for n in coefs if n not in names]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra}")
        sig = ", ".join(f"{s.name}={s.shape}" for s in rec.inputs) or "no coefficients"
        raise InputError(f"{rec.name}: {'; '.join(parts)}. It takes {sig}.")
    B, T, H, K, V = dims
    for spec in rec.inputs:
        x = coefs[spec.name]
        _tensor(spec.name, x)
        want = spec.expected_shape(B, T, H, K, V)
        if tuple(x.shape) != want:
            raise InputError(f"{rec.name}: {spec.name} must be {spec.shape} = {want}, got {tuple(x.shape)}")
        if x.device != device:
            raise InputError(f"{rec.name}: {spec.name} is on {x.device} but q is on {device}")
        if not check_values:
            continue
        if not torch.isfinite(x).all():
            raise InputError(f"{rec.name}: {spec.name} contains NaN or inf")
        if spec.constraint:
            ok, words = _CONSTRAINT[spec.constraint]
            if not ok(x).all():
                raise InputError(f"{rec.name}: {spec.name} must be {words} ({spec.constraint}); "
                                 f"got min {x.min().item():.4g}, max {x.max().item():.4g}. "
                                 f"{_hint(spec.name, spec.constraint)}")


def _hint(name, constraint):
    if constraint == "positive":
        return "Parameterise it e.g. with softplus or sigmoid."
    if constraint in ("nonpositive", "negative"):
        return "Parameterise it e.g. as -softplus(x) or logsigmoid(x)."
    return ""


def check_state(initial_state: Optional[torch.Tensor], n: int, dims, device, what="B"):
    """``initial_state`` must be ``[n, H, K, V]``."""
    if initial_state is None:
        return
    _tensor("initial_state", initial_state)
    B, T, H, K, V = dims
    if tuple(initial_state.shape) != (n, H, K, V):
        raise InputError(f"initial_state must be [{what}, H, K, V] = {(n, H, K, V)}, got "
                         f"{tuple(initial_state.shape)}")
    if initial_state.device != device:
        raise InputError(f"initial_state is on {initial_state.device} but q is on {device}")


def check_cu_seqlens(cu_seqlens, dims, device) -> int:
    """Validate packed-sequence boundaries; return the number of sequences N."""
    B, T = dims[:2]
    if not torch.is_tensor(cu_seqlens) or cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point:
        raise InputError("cu_seqlens must be a 1-D integer tensor [N + 1] of sequence boundaries")
    if B != 1:
        raise InputError(f"with cu_seqlens the batch must be packed into B == 1, got B = {B}")
    if cu_seqlens.numel() < 2:
        raise InputError("cu_seqlens needs at least two entries (0 and T)")
    if cu_seqlens.device != device:
        raise InputError(f"cu_seqlens is on {cu_seqlens.device} but q is on {device}")
    c = cu_seqlens.tolist()
    if c[0] != 0 or c[-1] != T:
        raise InputError(f"cu_seqlens must start at 0 and end at T = {T}, got {c[0]} ... {c[-1]}")
    if any(b <= a for a, b in zip(c[:-1], c[1:])):
        raise InputError(f"cu_seqlens must be strictly increasing (no empty sequences), got {c}")
    return len(c) - 1
