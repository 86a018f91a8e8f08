"""Padding masks to packed sequences and back.

A mixer runs padded batches exactly by packing the real tokens of each row into one sequence
(``cu_seqlens``), so padding never enters a convolution window or the memory, wherever it is
(left, right, or holes).
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..errors import InputError


def check_mask(attention_mask: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """Validate ``attention_mask [B, T]`` (1 / True = real token); return it as bool."""
    if not torch.is_tensor(attention_mask) or tuple(attention_mask.shape) != (B, T):
        shape = tuple(attention_mask.shape) if torch.is_tensor(attention_mask) else type(attention_mask).__name__
        raise InputError(f"attention_mask must be a [B, T] = {(B, T)} tensor of 0/1, got {shape}")
    mask = attention_mask.bool()
    if not mask.any(1).all():
        raise InputError("every row of attention_mask needs at least one real token (1); "
                         f"rows {torch.nonzero(~mask.any(1)).flatten().tolist()} are all padding")
    return mask


def unpad(x: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack the real tokens of each row, in order.

    Args:
        x: ``[B, T, ...]``; mask: bool ``[B, T]``.

    Returns:
        ``(packed [1, total, ...], cu_seqlens [B + 1] int32, flat indices [total])``.
    """
    B, T = mask.shape
    idx = torch.nonzero(mask.reshape(-1), as_tuple=False).flatten()
    lens = mask.sum(1, dtype=torch.int32)
    cu = torch.zeros(B + 1, dtype=torch.int32, device=x.device)
    cu[1:] = torch.cumsum(lens, 0)
    return x.reshape(B * T, *x.shape[2:])[idx][None], cu, idx


def repad(y: torch.Tensor, idx: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """Inverse of :func:`unpad`: ``[1, total, ...]`` -> ``[B, T, ...]`` with zeros at padding."""
    out = y.new_zeros(B * T, *y.shape[2:])
    out = out.index_copy(0, idx, y[0])
    return out.reshape(B, T, *y.shape[2:])


def run_masked(sequence, x: torch.Tensor, cache, cu_seqlens, attention_mask, want_state: bool):
    """Run a layer's ``sequence(x, cache, cu_seqlens, want_state)`` on packed or padded input.

    An ``attention_mask`` ``[B, T]`` is turned into packing (the real tokens laid end to end
    with ``cu_seqlens``), so padding never reaches a convolution window or the memory; the
    output is scattered back to ``[B, T, D]`` with zeros at padding.

    Returns:
        ``(y, state)`` as ``sequence`` returns them.
    """
    if attention_mask is None:
        return sequence(x, cache, cu_seqlens, want_state)
    if cu_seqlens is not None:
        raise InputError("pass either attention_mask or cu_seqlens, not both")
    B, T = x.shape[:2]
    xp, cu, idx = unpad(x, check_mask(attention_mask, B, T))
    y, state = sequence(xp, cache, cu, want_state)
    return repad(y, idx, B, T), state
