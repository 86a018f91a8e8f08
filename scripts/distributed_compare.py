"""Compare ``olsm train`` runs of one config on 1 and N GPUs: loss curves and tokens/s scaling.

    python scripts/distributed_compare.py 1gpu:1:runs/gpu1 ddp:2:runs/ddp fsdp:2:runs/fsdp --out results/dist

Each run is ``LABEL:GPUS:FOLDER`` where FOLDER holds the run's ``metrics.json`` (an ``olsm train``
run folder, or a sweep folder with exactly one run inside). The first run is the reference.
Writes to ``--out``: ``loss_curves.csv`` (one loss column per run), ``loss_curves.png``, ``loss_gap.png``,
``scaling.csv`` and ``scaling.md`` (steady-state global tokens/s, speed-up and efficiency
against the reference, largest relative loss difference from it), and copies of each
``metrics.json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path
from typing import List

from olsm.train.metrics import plot_curves, write_csv


def find_metrics(folder: Path) -> Path:
    """``folder/metrics.json``, or the single ``*/metrics.json`` of a sweep folder.

    Raises:
        SystemExit: none or several found (says which folder).
    """
    if (folder / "metrics.json").exists():
        return folder / "metrics.json"
    found = sorted(folder.glob("*/metrics.json"))
    if len(found) != 1:
        raise SystemExit(f"{folder}: expected one metrics.json (or one run folder holding it), found {len(found)}")
    return found[0]


def steady_tokens_per_s(rows: List[dict], skip: int) -> float:
    """Median global tokens/s over logged intervals after step ``skip`` that hold no evaluation.

    Args:
        rows: metric rows (``step``, ``tokens``, ``seconds``, maybe ``eval_*``).
        skip: leave out intervals ending at or before this step (kernel compilation, warmup).

    Returns:
        tokens/s; for short runs with no such interval, the whole run's tokens over its seconds.
    """
    rates = []
    for a, b in zip(rows, rows[1:]):
        evaluated = any(k.startswith("eval_") for k in b)
        if b["step"] > skip and not evaluated and b["seconds"] > a["seconds"] and b["tokens"] > a["tokens"]:
            rates.append((b["tokens"] - a["tokens"]) / (b["seconds"] - a["seconds"]))
    if rates:
        return statistics.median(rates)
    return rows[-1]["tokens"] / rows[-1]["seconds"] if rows and rows[-1]["seconds"] else 0.0


def max_rel_diff(rows: List[dict], ref: List[dict], key: str = "loss") -> float:
    """Largest ``|x - x_ref| / |x_ref|`` of ``key`` over the steps both runs logged."""
    r = {x["step"]: x[key] for x in ref if key in x}
    diffs = [abs(x[key] - r[x["step"]]) / abs(r[x["step"]]) for x in rows if key in x and x["step"] in r]
    return max(diffs) if diffs else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="LABEL:GPUS:FOLDER, reference first")
    ap.add_argument("--out", required=True, help="folder for the CSV, PNG and Markdown files")
    ap.add_argument("--skip", type=int, default=20, help="steps left out of the tokens/s estimate")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for spec in args.runs:
        label, gpus, folder = spec.split(":", 2)
        path = find_metrics(Path(folder))
        shutil.copy(path, out / f"metrics_{label}.json")
        runs.append((label, int(gpus), json.loads(path.read_text())["rows"]))
    ref_label, ref_gpus, ref = runs[0]
    ref_tps = steady_tokens_per_s(ref, args.skip)
    steps = sorted({r["step"] for _, _, rows in runs for r in rows})
    table = []
    for s in steps:
        row = {"step": s}
        for label, _, rows in runs:
            for r in rows:
                if r["step"] == s:
                    row[f"loss_{label}"] = r["loss"]
                    if "eval_loss" in r:
                        row[f"eval_loss_{label}"] = r["eval_loss"]
        table.append(row)
    write_csv(out / "loss_curves.csv", table)
    plot_curves(out / "loss_curves.png", {f"{label} ({g} GPU)": rows for label, g, rows in runs}, "loss",
                title="training loss, same global batch", ylabel="training loss")
    # the curves overlap when all is well: plot the gap to the reference as well
    ref_loss = {r["step"]: r["loss"] for r in ref}
    gaps = {label: [{"step": r["step"], "gap": (r["loss"] - ref_loss[r["step"]]) / abs(ref_loss[r["step"]])}
                    for r in rows if r["step"] in ref_loss] for label, _, rows in runs[1:]}
    if gaps:
        plot_curves(out / "loss_gap.png", gaps, "gap", title=f"training loss relative to {ref_label}",
                    ylabel="(loss - reference) / reference")
    scaling = []
    for label, gpus, rows in runs:
        tps = steady_tokens_per_s(rows, args.skip)
        speedup = tps / ref_tps if ref_tps else float("nan")
        scaling.append({"run": label, "gpus": gpus, "tokens_per_s": round(tps), "speedup": round(speedup, 3),
                        "efficiency": round(speedup * ref_gpus / gpus, 3), "final_loss": rows[-1]["loss"],
                        "max_rel_loss_diff": max_rel_diff(rows, ref), "steps": rows[-1]["step"]})
    write_csv(out / "scaling.csv", scaling)
    cols = list(scaling[0])
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |"
           for r in scaling]
    (out / "scaling.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
