"""Packed variable-length sequences (``cu_seqlens``) for backends that loop over sequences.

A packed batch is ``B == 1`` with sequences laid end to end along T; ``cu_seqlens``
``[N + 1]`` holds their boundaries (0, T_0, T_0 + T_1, ..., T). Backends without native
varlen support run each sequence on its own and concatenate, which is the definition the
fast kernels are tested against.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


def run_per_sequence(
    fn: Callable,
    per_token: dict,
    cu_seqlens: torch.Tensor,
    initial_state: Optional[torch.Tensor],
    output_final_state: bool,
    **kwargs,
):
    """Run ``fn`` once per packed sequence and stitch the results.

    Args:
        fn: a backend function taking ``**per_token`` (tensors ``[1, T_i, ...]``, ``None`` or
            tuples of such tensors), ``initial_state`` ``[1, H, K, V]`` and ``**kwargs``,
            returning ``(o [1, T_i, H, V], S [1, H, K, V] or None)``.
        per_token: tensors whose dim 1 is time, sliced per sequence.
        cu_seqlens: ``[N + 1]`` integer boundaries.
        initial_state: ``[N, H, K, V]`` or ``None``.
        output_final_state: whether to return the ``[N, H, K, V]`` final states.

    Returns:
        ``(o [1, T, H, V], S [N, H, K, V] or None)``.
    """
    bounds = cu_seqlens.tolist()
    outs, states = [], []
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        piece = {name: _slice(x, lo, hi) for name, x in per_token.items()}
        h0 = None if initial_state is None else initial_state[i : i + 1]
        o, s = fn(**piece, initial_state=h0, output_final_state=output_final_state, **kwargs)
        outs.append(o)
        states.append(s)
    o = torch.cat(outs, dim=1)
    return o, (torch.cat(states, dim=0) if output_final_state else None)


def _slice(x, lo: int, hi: int):
    if x is None:
        return None
    if isinstance(x, (tuple, list)):
        return type(x)(_slice(y, lo, hi) for y in x)
    return x[:, lo:hi]
