"""The ``olsm`` command line: list, derive and verify objectives (and train layers).

    olsm list
    olsm derive longhorn            # or FILE.py:OBJ
    olsm verify all                 # property checks, table of pass/fail and max error
    olsm train ...                  # see ``olsm train --help``
"""
from __future__ import annotations

import importlib
import time
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .testing.checks import ALL_CHECKS, CHECKS

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="olsm: declare an online-learning objective, get a proven recurrence and a layer.")
console = Console()


@app.command("list")
def list_cmd():
    """List the catalogue: name, IR class, update, inputs."""
    from .derivation import derive
    from .load import catalogue

    table = Table(title="olsm catalogue")
    for col in ("name", "class", "update", "inputs"):
        table.add_column(col)
    for name, obj in catalogue().items():
        rec = derive(obj)
        ins = ", ".join(f"{s.name} {s.shape}" for s in rec.inputs) or "—"
        table.add_row(name, rec.kind, str(rec).split("\n")[0], ins)
    console.print(table)


@app.command()
def derive(objective: str = typer.Argument(..., help="catalogue name or FILE.py:OBJ"),
           latex: bool = typer.Option(False, help="also print the LaTeX form")):
    """Derive an objective: print objective, recurrence, IR class and proof status."""
    from .derivation import derive as _derive
    from .errors import OlsmError

    try:
        rec = _derive(objective)
    except OlsmError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1)
    console.print(f"[bold]{rec.name}[/bold]")
    console.print(rec.describe(), highlight=False)
    if latex:
        console.print(rec.latex(), highlight=False)


@app.command()
def verify(objectives: List[str] = typer.Argument(..., help="names, FILE.py:OBJ, or 'all'"),
           examples: int = typer.Option(20, help="random problems per property"),
           seed: int = typer.Option(0, help="random seed"),
           plot: Optional[str] = typer.Option(None, help="save a bar plot of max errors to this PNG"),
           checks: str = typer.Option(",".join(CHECKS),
                                      help="comma-separated subset of " + ", ".join(ALL_CHECKS)
                                      + " (kernel: the Triton backend against the reference; on a CPU "
                                      "set TRITON_INTERPRET=1)")):
    """Run the property checks of olsm.testing and print a pass/fail table."""
    from rich.progress import track

    from .load import catalogue
    from .testing import run_check

    chosen = [c.strip() for c in checks.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in ALL_CHECKS]
    if unknown or not chosen:
        console.print(f"[red]unknown check(s) {unknown or checks!r}[/red]; choose from {', '.join(ALL_CHECKS)}")
        raise typer.Exit(2)
    names = list(catalogue()) if objectives == ["all"] else objectives
    rows = []
    jobs = [(n, c) for n in names for c in chosen]
    start = time.perf_counter()
    for name, check in track(jobs, description="verifying", console=console, transient=True):
        rows.append(run_check(name, check, examples=examples, seed=seed))
    table = Table(title=f"olsm verify ({examples} examples each, {time.perf_counter() - start:.1f} s)")
    for col in ("objective", "check", "result", "max rel. error", "tolerance"):
        table.add_column(col)
    for r in rows:
        mark = "[green]pass[/green]" if r.passed else f"[red]FAIL[/red] {r.message}"
        table.add_row(r.objective, r.check, mark, f"{r.max_error:.2e}", f"{r.tolerance:.0e}")
    console.print(table)
    if plot:
        _plot(rows, plot)
        console.print(f"plot saved to {plot}")
    if not all(r.passed for r in rows):
        raise typer.Exit(1)


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    checks = sorted({r.check for r in rows})
    names = list(dict.fromkeys(r.objective for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.9), 4))
    width = 0.8 / len(checks)
    for i, c in enumerate(checks):
        vals = [next((max(r.max_error, 1e-18) for r in rows if r.objective == n and r.check == c), 1e-18)
                for n in names]
        ax.bar([x + i * width for x in range(len(names))], vals, width, label=c)
    ax.set_yscale("log")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names, rotation=30, ha="right")
    ax.set_ylabel("max relative error")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _add_optional(module: str, name: str):
    """Sub-commands living in other packages (e.g. ``olsm train``) register if present."""
    try:
        sub = importlib.import_module(module)
    except ImportError as e:
        if e.name and e.name.startswith(module):
            return
        raise
    app.add_typer(sub.app, name=name)


_add_optional("olsm.train.cli", "train")


def main():  # console-script entry point
    app()


if __name__ == "__main__":
    main()
