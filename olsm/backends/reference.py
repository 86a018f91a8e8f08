"""The reference backend: the recurrence one token at a time, exactly as written.

This file defines truth. Every other backend (chunked torch, Triton) is tested against it,
so it is written for reading, not speed: a Python loop over t, float32 accumulation at least
(float64 stays float64), no tricks.

Matrix class (DESIGN §3, class 1), per head::

    S_t = (diag(exp(log_decay_t)) + Σ_r a_{t,r} b_{t,r}ᵀ) S_{t-1} + w_t u_tᵀ
    o_t = scale · S_tᵀ q_t

Elementwise class (class 2)::

    S_t = G_t ⊙ S_{t-1} + w_t u_tᵀ
    o_t = scale · S_tᵀ q_t

Shapes: q, w, a_r, b_r ``[B, T, H, K]``; u ``[B, T, H, V]``; log_decay ``[B, T, H]`` or
``[B, T, H, K]``; G ``[B, T, H, K, V]``; states ``[B, H, K, V]``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .varlen import run_per_sequence


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _initial(initial_state, B, H, K, V, dtype, device):
    if initial_state is None:
        return torch.zeros(B, H, K, V, dtype=dtype, device=device)
    return initial_state.to(dtype)


def matrix(
    q: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    log_decay: Optional[torch.Tensor] = None,
    lowrank: Sequence[Tuple[torch.Tensor, torch.Tensor]] = (),
    *,
    scale: float = 1.0,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
):
    """Matrix-transition recurrence, step by step.

    Args:
        q: queries ``[B, T, H, K]``.
        w: written keys k̃ ``[B, T, H, K]``.
        u: written values ṽ ``[B, T, H, V]``.
        log_decay: ``None``, ``[B, T, H]`` (scalar per head) or ``[B, T, H, K]`` (per key).
        lowrank: pairs ``(a, b)``, each ``[B, T, H, K]``; the transition gains ``a bᵀ``.
        scale: readout scale.
        initial_state: ``[B, H, K, V]`` (``[N, H, K, V]`` with ``cu_seqlens``) or ``None``.
        output_final_state: return the last state.
        cu_seqlens: ``[N + 1]`` boundaries of packed sequences (then ``B == 1``).
        chunk_size: ignored (accepted so every backend shares one signature).

    Returns:
        ``o [B, T, H, V]`` in q's dtype and the final state ``[B, H, K, V]`` (float32 or
        float64) or ``None``.
    """
    if cu_seqlens is not None:
        return run_per_sequence(
            matrix, dict(q=q, w=w, u=u, log_decay=log_decay, lowrank=tuple(lowrank)),
            cu_seqlens, initial_state, output_final_state, scale=scale,
        )
    B, T, H, K = q.shape
    V = u.shape[-1]
    acc = accumulation_dtype(q.dtype)
    S = _initial(initial_state, B, H, K, V, acc, q.device)
    outs = []
    for t in range(T):
        S_prev = S
        S = S_prev
        if log_decay is not None:
            d = log_decay[:, t].to(acc).exp()
            S = S * (d[..., None, None] if d.dim() == 2 else d[..., :, None])
        for a, b in lowrank:
            # a_t (b_tᵀ S_{t-1}): a rank-one correction computed from the *old* state
            bS = torch.einsum("bhk,bhkv->bhv", b[:, t].to(acc), S_prev)
            S = S + a[:, t].to(acc)[..., :, None] * bS[..., None, :]
        S = S + w[:, t].to(acc)[..., :, None] * u[:, t].to(acc)[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t].to(acc), S) * scale)
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, V, dtype=acc)
    return o.to(q.dtype), (S if output_final_state else None)


def elementwise(
    q: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    gate: torch.Tensor,
    *,
    scale: float = 1.0,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
):
    """Elementwise-gate recurrence, step by step.

    Args:
        q: queries ``[B, T, H, K]``.
        w: written keys ``[B, T, H, K]``.
        u: written values ``[B, T, H, V]``.
        gate: G ``[B, T, H, K, V]``.
        scale, initial_state, output_final_state, cu_seqlens, chunk_size: as in :func:`matrix`.

    Returns:
        ``(o [B, T, H, V], S [B, H, K, V] or None)``.
    """
    if cu_seqlens is not None:
        return run_per_sequence(
            elementwise, dict(q=q, w=w, u=u, gate=gate),
            cu_seqlens, initial_state, output_final_state, scale=scale,
        )
    B, T, H, K = q.shape
    V = u.shape[-1]
    acc = accumulation_dtype(q.dtype)
    S = _initial(initial_state, B, H, K, V, acc, q.device)
    outs = []
    for t in range(T):
        S = gate[:, t].to(acc) * S + w[:, t].to(acc)[..., :, None] * u[:, t].to(acc)[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t].to(acc), S) * scale)
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, V, dtype=acc)
    return o.to(q.dtype), (S if output_final_state else None)
