"""Summarise run folders written by separate processes (e.g. one sweep per GPU stream)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

from .experiments import _summarise
from .config import TrainConfig


def collect(folder: str) -> List[dict]:
    """Read every ``*/metrics.json`` under ``folder`` and write its summary files and plots.

    Returns:
        the run summaries, sorted by (d_model, objective).
    """
    out = Path(folder)
    runs, curves, base = [], {}, None
    for p in sorted(out.glob("*/metrics.json")):
        data = json.loads(p.read_text())
        s, cfg = data["summary"], TrainConfig.from_dict(data["config"])
        s["backend"] = cfg.backend
        runs.append(s)
        curves[f"{s['objective']} d{s['d_model']}"] = data["rows"]
        base = base or cfg
    runs.sort(key=lambda r: (r["d_model"], r["objective"]))
    if base is not None:
        _summarise(base, out, runs, curves)
    return runs
