"""Call a recurrence from a layer: backend fallback, and a boundary ``torch.compile`` respects.

The recurrence dispatches on Python values (backend name, IR class) and, on GPU, launches
Triton kernels of its own, so :func:`torch.compile` should not trace into it: the call is
wrapped in :func:`torch.compiler.disable` (one graph break per layer; the projections, convs
and norms around it still compile).
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional

import torch

from ..errors import BackendError

_WARNED = set()


@torch.compiler.disable
def run_recurrence(rec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, coefs: Dict[str, torch.Tensor], *,
                   backend: str = "auto", scale: Optional[float] = None, initial_state=None,
                   output_final_state: bool = False, cu_seqlens=None, chunk_size: int = 64,
                   check_inputs: bool = False):
    """Run ``rec`` over a sequence; with ``backend="auto"`` on CUDA fall back to torch if Triton cannot run.

    Args:
        rec: a :class:`olsm.Recurrence`.
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; coefs: ``{name: tensor}``.
        backend, scale, initial_state, output_final_state, cu_seqlens, chunk_size, check_inputs:
            as for :meth:`olsm.Recurrence.__call__`.

    Returns:
        ``(o [B, T, H, V], S [B or N, H, K, V] or None)``.
    """
    opts = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens, chunk_size=chunk_size, check_inputs=check_inputs)
    if backend == "auto" and q.is_cuda:
        try:
            return rec(q, k, v, backend="triton", **opts, **coefs)
        except BackendError as e:
            if (rec.name, rec.kind) not in _WARNED:
                _WARNED.add((rec.name, rec.kind))
                warnings.warn(f"olsm: {rec.name}: Triton backend unavailable ({e}); using backend='torch'")
            backend = "torch"
    return rec(q, k, v, backend=backend, **opts, **coefs)


@torch.compiler.disable
def step_recurrence(rec, q, k, v, state, coefs, scale=None):
    """One token: ``rec.step`` (see :meth:`olsm.Recurrence.step`). Returns ``(o [B, H, V], S)``."""
    return rec.step(q, k, v, state, scale=scale, **coefs)
