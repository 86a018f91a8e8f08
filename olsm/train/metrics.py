"""Write metric rows to CSV and JSON, and plot them (matplotlib, Agg backend)."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, List, Sequence


def write_csv(path: Path, rows: Sequence[dict]):
    """Rows (dicts, possibly with different keys) to one CSV with the union of columns."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def write_json(path: Path, obj):
    Path(path).write_text(json.dumps(obj, indent=1, default=str))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(path: Path, curves: Dict[str, List[dict]], key: str = "loss", title: str = "",
                ylabel: str = None, x: str = "step"):
    """One line per run: ``curves[label] = rows``; rows without ``key`` are skipped."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rows in curves.items():
        pts = [(r[x], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), label=label, marker="o" if len(pts) < 12 else None, ms=3)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel or key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_vs_dmodel(path: Path, summary: Sequence[dict], key: str = "accuracy", title: str = "MQAR"):
    """Zoology-style plot: accuracy against model width, one line per objective."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for obj in dict.fromkeys(r["objective"] for r in summary):
        pts = sorted((r["d_model"], r[key]) for r in summary if r["objective"] == obj and key in r)
        ax.plot(*zip(*pts), marker="o", label=obj)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["d_model"] for r in summary}), [str(d) for d in sorted({r["d_model"] for r in summary})])
    ax.set_xlabel("d_model")
    ax.set_ylabel(key)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
