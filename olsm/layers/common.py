"""Shared by the layers: resolving an objective and the checks every layer does on its input."""
from __future__ import annotations

import torch

from ..derivation import derive
from ..errors import InputError
from ..symbols import k_n


def resolve(objective):
    """``derive`` an Objective, a catalogue name or ``FILE.py:NAME`` (errors are olsm's)."""
    return objective if hasattr(objective, "inputs") and hasattr(objective, "kind") else derive(objective)


def needs_key_norm(rec) -> bool:
    """True for delta/Longhorn-type recurrences, whose transition depends on k.

    Their stability depends on ‖k‖ (DeltaNet's ``I − β k kᵀ`` is a contraction only for
    β‖k‖² ≤ 2), so the layer L2-normalises q and k by default.
    """
    if rec.kind == "matrix":
        return bool(rec.lowrank)
    return rec.gate is not None and k_n in rec.gate.free_symbols


def check_x(x: torch.Tensor, d_model: int, what: str = "x"):
    """``x`` must be ``[B, T, d_model]`` floating point."""
    if not torch.is_tensor(x) or x.dim() != 3 or x.shape[-1] != d_model:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise InputError(f"{what} must be [B, T, d_model={d_model}], got {shape}")


def is_implicit(rec) -> bool:
    """True when the objective's update is implicit (proximal), as Longhorn's is."""
    return getattr(getattr(rec, "objective", None), "update", None) == "implicit"
