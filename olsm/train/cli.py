"""``olsm train``: MQAR and byte-level LM runs (and sweeps) from the command line.

    olsm train mqar --objective longhorn --objective mamba2 --d-model 64 --d-model 128 --steps 2000
    olsm train lm --objective longhorn_diag --block longhorn --corpus my.txt --steps 5000

Interrupted runs resume from their last checkpoint when run again with the same options.
"""
from __future__ import annotations

from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..errors import OlsmError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train olsm layers: multi-query associative recall (Zoology) and byte-level LM.")
console = Console()

# options both commands share: one definition each, so help and defaults cannot drift apart
# (typer still needs every parameter named in each command's signature)
_OBJ = typer.Option(["longhorn"], "--objective", "-o", help="catalogue name or FILE.py:NAME; repeat for a sweep")
_OUT = typer.Option(None, "--out", help="run folder (a sweep writes one sub-folder per run)")
_PAR = typer.Option("auto", help="under torchrun: ddp or fsdp (FSDP2); auto = ddp when WORLD_SIZE > 1, else none. "
                    "--batch-size is the global batch")
_MLP = typer.Option(4.0, help="SwiGLU ratio (0: no MLP)")
_WD = typer.Option(0.1, help="AdamW weight decay")
_WARMUP = typer.Option(50, help="warmup steps")
_EVAL_EVERY = typer.Option(100, help="evaluate every N steps")
_CKPT_EVERY = typer.Option(100, help="checkpoint every N steps")
_SEED = typer.Option(0, help="seed of init and data")
_DEVICE = typer.Option("auto", help="auto, cpu, cuda")
_COMPILE = typer.Option(False, help="torch.compile the model")
_RESUME = typer.Option(True, help="continue from a checkpoint in --out if there is one")
_PROGRESS = typer.Option(True, help="progress bars")
_STOP_AT = typer.Option(None, hidden=True, help="stop before this step (tests)")
_BACKEND = typer.Option("auto", help="recurrence backend: auto, torch, triton, reference")
_PRECISION = typer.Option("fp32", help="fp32 or bf16 (autocast on CUDA)")


def _run(base, objectives: List[str], d_models: List[int], resume: bool, stop_at: Optional[int]):
    from .experiments import sweep

    try:
        runs = sweep(base, objectives, d_models, resume=resume, stop_at=stop_at)
    except OlsmError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; the last checkpoint is saved: run the same command to resume[/yellow]")
        raise typer.Exit(130)
    from .distributed import is_main

    if not is_main():  # under torchrun rank 0 prints the table
        return
    cols = ["objective", "d_model", "params", "steps_done", "seconds", "train_loss"]
    cols += ["accuracy"] if base.task == "mqar" else ["val_loss", "val_bpb"]
    table = Table(title=f"olsm train {base.task} -> {base.out}")
    for c in cols:
        table.add_column(c)
    for r in runs:
        table.add_row(*[f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c, "—")) for c in cols])
    console.print(table)
    for r in runs:  # global tokens (all ranks) over rank 0's wall time, evaluation included
        if r.get("seconds"):
            console.print(f"{r['objective']} d{r['d_model']}: {r['tokens'] / r['seconds']:,.0f} tokens/s")


@app.command()
def mqar(objective: List[str] = _OBJ,
         d_model: List[int] = typer.Option([64], "--d-model", help="model width; repeat for a sweep"),
         n_layers: int = typer.Option(2, help="blocks"),
         num_heads: int = typer.Option(1, help="heads per mixer"),
         block: str = typer.Option("mixer", help="mixer (multi-head olsm.Mixer) or longhorn (the paper's block)"),
         mlp_ratio: float = _MLP,
         steps: int = typer.Option(1000, help="optimiser steps"),
         batch_size: int = typer.Option(64, help="sequences per step"),
         lr: float = typer.Option(1e-3, help="peak learning rate"),
         weight_decay: float = _WD,
         warmup: int = _WARMUP,
         vocab_size: int = typer.Option(8192, help="vocabulary (keys: first half, values: second half)"),
         train_configs: str = typer.Option("64:4,128:8,256:16,256:32,256:64", help="SEQ_LEN:PAIRS,... trained on"),
         eval_configs: str = typer.Option("64:4,128:8,256:16,256:32,256:64,512:64", help="SEQ_LEN:PAIRS,... scored"),
         eval_examples: int = typer.Option(256, help="examples per eval setting"),
         eval_every: int = _EVAL_EVERY,
         checkpoint_every: int = _CKPT_EVERY,
         seed: int = _SEED,
         device: str = _DEVICE,
         parallel: str = _PAR,
         backend: str = _BACKEND,
         precision: str = _PRECISION,
         compile: bool = _COMPILE,
         out: Optional[str] = _OUT,
         resume: bool = _RESUME,
         progress: bool = _PROGRESS,
         stop_at: Optional[int] = _STOP_AT):
    """Multi-query associative recall (Zoology, arXiv 2312.04927): accuracy vs d_model per objective."""
    from .config import TrainConfig

    base = TrainConfig(task="mqar", n_layers=n_layers, num_heads=num_heads, block=block, mlp_ratio=mlp_ratio,
                       steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup=warmup,
                       vocab_size=vocab_size, train_configs=train_configs, eval_configs=eval_configs,
                       eval_examples=eval_examples, eval_every=eval_every, checkpoint_every=checkpoint_every,
                       seed=seed, device=device, parallel=parallel, backend=backend, precision=precision,
                       compile=compile,
                       out=out or "runs/mqar", progress=progress)
    _run(base, objective, d_model, resume, stop_at)


@app.command()
def lm(objective: List[str] = _OBJ,
       d_model: List[int] = typer.Option([128], "--d-model", help="model width; repeat for a sweep"),
       n_layers: int = typer.Option(4, help="blocks"),
       num_heads: int = typer.Option(2, help="heads per mixer"),
       block: str = typer.Option("mixer", help="mixer or longhorn"),
       mlp_ratio: float = _MLP,
       corpus: Optional[str] = typer.Option(None, help="text file or folder (default: the stdlib's .py sources)"),
       max_bytes: Optional[int] = typer.Option(None, help="read at most this many bytes of the corpus"),
       seq_len: int = typer.Option(256, help="bytes per training sequence"),
       steps: int = typer.Option(1000, help="optimiser steps"),
       batch_size: int = typer.Option(32, help="sequences per step"),
       lr: float = typer.Option(2e-3, help="peak learning rate"),
       weight_decay: float = _WD,
       warmup: int = _WARMUP,
       eval_windows: int = typer.Option(64, help="validation windows"),
       eval_every: int = _EVAL_EVERY,
       checkpoint_every: int = _CKPT_EVERY,
       seed: int = _SEED,
       device: str = _DEVICE,
       parallel: str = _PAR,
       backend: str = _BACKEND,
       precision: str = _PRECISION,
       compile: bool = _COMPILE,
       out: Optional[str] = _OUT,
       resume: bool = _RESUME,
       progress: bool = _PROGRESS,
       stop_at: Optional[int] = _STOP_AT):
    """Byte-level language modelling; validation bits per byte per objective."""
    from .config import TrainConfig

    base = TrainConfig(task="lm", n_layers=n_layers, num_heads=num_heads, block=block, mlp_ratio=mlp_ratio,
                       corpus=corpus, max_bytes=max_bytes, seq_len=seq_len, steps=steps, batch_size=batch_size,
                       lr=lr, weight_decay=weight_decay, warmup=warmup, eval_windows=eval_windows,
                       eval_every=eval_every, checkpoint_every=checkpoint_every, seed=seed, device=device,
                       parallel=parallel,
                       backend=backend, precision=precision, compile=compile, out=out or "runs/lm",
                       progress=progress)
    _run(base, objective, d_model, resume, stop_at)


@app.command()
def summarize(folder: str = typer.Argument(..., help="a sweep folder holding one sub-folder per run")):
    """Rebuild summary.csv/json and the plots of a sweep folder from its runs' metrics.json."""
    from .collect import collect

    runs = collect(folder)
    if not runs:
        console.print(f"[red]error:[/red] no runs (*/metrics.json) under {folder}")
        raise typer.Exit(1)
    table = Table(title=f"runs in {folder}")
    cols = [c for c in ("objective", "block", "d_model", "params", "steps_done", "seconds", "backend", "train_loss",
                        "accuracy", "val_bpb") if any(c in r for r in runs)]
    for c in cols:
        table.add_column(c)
    for r in runs:
        table.add_row(*[f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c, "—")) for c in cols])
    console.print(table)
