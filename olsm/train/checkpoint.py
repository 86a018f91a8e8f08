"""Checkpoints that resume a run with nothing lost: model, optimiser, schedule, step, RNG, data, metrics.

Batches are a pure function of ``(seed, step)`` (see :mod:`.loop`), so the step is the data
position; the RNG states are saved anyway for anything else that draws random numbers.
Files are written to a temporary name and renamed, so an interrupted save never leaves a
half-written checkpoint behind.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from ..errors import InputError

FORMAT = 1


class CheckpointError(InputError):
    """A checkpoint is unreadable, not olsm's, or belongs to a different run."""


def rng_state() -> dict:
    """Every RNG a run may draw from."""
    s = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(path: Path, *, model, optimizer, scheduler, step: int, config, metrics: list):
    """Atomically write a checkpoint at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "kind": "olsm-train", "step": step, "data_position": step,
             "config": config.identity(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "rng": rng_state(), "metrics": metrics}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, config, *, model, optimizer, scheduler) -> dict:
    """Restore a run from ``path`` into ``model``/``optimizer``/``scheduler`` and the RNGs.

    Returns:
        the checkpoint dict (``step``, ``metrics``...).

    Raises:
        CheckpointError: unreadable file, foreign format, other run's config or model shapes.
    """
    path = Path(path)
    hint = f"delete {path} (or the run folder) or pass --no-resume to start over"
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, garbage, wrong pickle: all mean the same to the user
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e}); {hint}") from None
    if not isinstance(state, dict) or state.get("kind") != "olsm-train":
        raise CheckpointError(f"{path} is not an olsm training checkpoint; {hint}")
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {state.get('format')}, this olsm writes {FORMAT}; {hint}")
    want, have = config.identity(), state["config"]
    diff = {k: (have.get(k), want[k]) for k in want if have.get(k) != want[k]}
    if diff:
        words = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"{path} belongs to a different run ({words}); {hint}")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} does not fit this model ({e}); {hint}") from None
    set_rng_state(state["rng"])
    return state
