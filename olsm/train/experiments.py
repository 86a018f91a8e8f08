"""The two experiments: MQAR (Zoology) and byte-level language modelling, and sweeps over them.

Each run lives in its own folder: ``checkpoint.pt``, ``metrics.csv``, ``metrics.json``
(config, rows, summary) and ``loss.png``. A sweep adds ``summary.csv``/``summary.json`` and a
plot across runs (MQAR accuracy vs d_model; LM validation curves).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ..errors import InputError
from ..layers import MixerLM
from .config import TrainConfig
from .corpus import byte_batch, eval_windows, load_corpus, split_corpus
from .distributed import is_main
from .loop import batch_generator, lm_loss, resolve_device, train_loop
from .metrics import plot_accuracy_vs_dmodel, plot_curves, write_csv, write_json
from .mqar import IGNORE, mqar_batch, parse_mqar_configs


def build_model(cfg: TrainConfig, vocab_size: int) -> MixerLM:
    """The model a config describes, initialised from ``cfg.seed``.

    Raises:
        ObjectiveError: unknown objective; InputError: d_model not divisible by num_heads...
    """
    torch.manual_seed(cfg.seed)
    kwargs = {"backend": cfg.backend}
    return MixerLM(cfg.objective, vocab_size, cfg.d_model, cfg.n_layers, cfg.num_heads, block=cfg.block,
                   mlp_ratio=cfg.mlp_ratio, **kwargs)


def _check(cfg: TrainConfig):
    for name in ("steps", "batch_size", "d_model", "n_layers", "eval_every", "checkpoint_every", "log_every"):
        if getattr(cfg, name) <= 0:
            raise InputError(f"{name} must be positive, got {getattr(cfg, name)}")


def run_mqar(cfg: TrainConfig, *, resume: bool = True, stop_at: Optional[int] = None) -> dict:
    """Train on MQAR and evaluate recall accuracy per setting.

    Returns:
        summary: ``objective, d_model, params, accuracy`` (mean over eval settings),
        ``accuracy@SEQ:PAIRS`` for each, final ``train_loss``, ``seconds``.
    """
    cfg = dataclasses.replace(cfg, task="mqar")
    _check(cfg)
    train_cfgs, eval_cfgs = parse_mqar_configs(cfg.train_configs), parse_mqar_configs(cfg.eval_configs)
    model = build_model(cfg, cfg.vocab_size)
    device = resolve_device(cfg.device)
    # a fixed evaluation set, drawn once from its own seeds
    eval_sets = []
    for i, c in enumerate(eval_cfgs):
        g = torch.Generator().manual_seed(10_000_019 + 7919 * cfg.seed + i)
        eval_sets.append((c, mqar_batch(cfg.eval_examples, c.seq_len, c.num_kv_pairs, cfg.vocab_size, generator=g)))

    def batch(step):
        c = train_cfgs[step % len(train_cfgs)]  # cycle the settings, one per batch (no padding)
        return mqar_batch(cfg.batch_size, c.seq_len, c.num_kv_pairs, cfg.vocab_size,
                          generator=batch_generator(cfg.seed, step))

    def evaluate(m):
        res, accs = {}, []
        for c, (x, y) in eval_sets:
            correct = total = 0
            for i in range(0, x.shape[0], cfg.batch_size):
                xb, yb = x[i:i + cfg.batch_size].to(device), y[i:i + cfg.batch_size].to(device)
                pred = m(xb).argmax(-1)
                keep = yb != IGNORE
                correct += (pred[keep] == yb[keep]).sum().item()
                total += keep.sum().item()
            res[f"accuracy@{c}"] = correct / total
            accs.append(correct / total)
        res["accuracy"] = sum(accs) / len(accs)
        return res

    rows = train_loop(model, cfg, batch, evaluate, resume=resume, stop_at=stop_at)
    return _finish(cfg, model, rows, "eval_accuracy")


def run_lm(cfg: TrainConfig, *, resume: bool = True, stop_at: Optional[int] = None) -> dict:
    """Train a byte-level LM on ``cfg.corpus`` (default: the stdlib's sources).

    Returns:
        summary: ``objective, d_model, params, val_loss, val_bpb`` (bits per byte), ``train_loss``, ``seconds``.
    """
    cfg = dataclasses.replace(cfg, task="lm")
    _check(cfg)
    train, val = split_corpus(load_corpus(cfg.corpus, cfg.max_bytes), cfg.seq_len)
    windows = eval_windows(val, cfg.seq_len, cfg.eval_windows)
    model = build_model(cfg, 256)
    device = resolve_device(cfg.device)

    def batch(step):
        return byte_batch(train, cfg.batch_size, cfg.seq_len, batch_generator(cfg.seed, step))

    def evaluate(m):
        total, n = 0.0, 0
        for i in range(0, windows.shape[0], cfg.batch_size):
            w = windows[i:i + cfg.batch_size].to(device)
            total += lm_loss(m(w[:, :-1]), w[:, 1:]).item() * w.shape[0]
            n += w.shape[0]
        return {"loss": total / n, "bpb": total / n / math.log(2)}

    rows = train_loop(model, cfg, batch, evaluate, resume=resume, stop_at=stop_at)
    return _finish(cfg, model, rows, "eval_bpb")


def _finish(cfg, model, rows, key) -> dict:
    out = Path(cfg.out)
    summary = {"objective": cfg.objective, "block": cfg.block, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
               "params": model.num_parameters(), "steps_done": rows[-1]["step"] if rows else 0,
               "tokens": rows[-1]["tokens"] if rows else 0, "seconds": rows[-1]["seconds"] if rows else 0.0}
    evals = [r for r in rows if key in r]
    if evals:
        summary["train_loss"] = rows[-1]["loss"]
        prefix = "val_" if cfg.task == "lm" else ""
        summary.update({prefix + k[len("eval_"):]: v for k, v in evals[-1].items() if k.startswith("eval_")})
    if not is_main():  # under torchrun rank 0 writes the run's files (the others hold the same rows)
        return summary
    if rows:
        write_csv(out / "metrics.csv", rows)
        plot_curves(out / "loss.png", {cfg.objective: rows}, "loss", title=f"{cfg.task}: {cfg.objective}, "
                    f"d_model {cfg.d_model}", ylabel="training loss")
    write_json(out / "metrics.json", {"config": dataclasses.asdict(cfg), "summary": summary, "rows": rows})
    return summary


def sweep(base: TrainConfig, objectives: Sequence[str], d_models: Sequence[int], *, resume: bool = True,
          stop_at: Optional[int] = None) -> List[dict]:
    """Run every (objective, d_model) in ``base.out/<objective>-d<d_model>`` and summarise.

    Returns:
        one summary per run (see :func:`run_mqar` / :func:`run_lm`); also written to
        ``summary.csv``/``summary.json`` with a plot (``accuracy_vs_dmodel.png`` or ``val_curves.png``).
    """
    out = Path(base.out)
    runs, curves = [], {}
    fn = run_mqar if base.task == "mqar" else run_lm
    for d in d_models:
        for obj in objectives:
            cfg = dataclasses.replace(base, objective=obj, d_model=d, out=str(out / f"{obj}-d{d}"))
            runs.append(fn(cfg, resume=resume, stop_at=stop_at))
            curves[f"{obj} d{d}"] = _rows(Path(cfg.out)) if is_main() else []  # rank 0 may be writing it
            if len(objectives) * len(d_models) > 1 or base.task == "mqar":
                _summarise(base, out, runs, curves)  # after every run: a killed sweep keeps what it did
    return runs


def _summarise(base, out: Path, runs, curves):
    if not is_main():  # rank 0 writes (torchrun)
        return
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "summary.csv", runs)
    write_json(out / "summary.json", runs)
    if base.task == "mqar" and all("accuracy" in r for r in runs):
        plot_accuracy_vs_dmodel(out / "accuracy_vs_dmodel.png", runs,
                                title=f"MQAR ({base.steps} steps, eval {base.eval_configs})")
    plot_curves(out / "loss_curves.png", curves, "loss", title=f"{base.task}: training loss", ylabel="training loss")
    if base.task == "lm":
        plot_curves(out / "val_curves.png", curves, "eval_bpb", title="byte LM: validation bits per byte",
                    ylabel="bits per byte")


def _rows(run: Path) -> List[dict]:
    import json

    p = run / "metrics.json"
    return json.loads(p.read_text())["rows"] if p.exists() else []
