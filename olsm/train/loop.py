"""The training loop shared by MQAR and the byte LM: AdamW, warmup + cosine, checkpoints, metrics.

Resumption is exact: the batch of step ``s`` is drawn from a generator seeded by
``(seed, s)``, evaluation draws nothing, and the checkpoint holds model, optimiser, schedule,
step, RNG states and the metrics so far. A run interrupted (Ctrl-C, ``stop_at``) saves a
checkpoint and a later call with the same config continues where it stopped.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import TrainConfig
from .distributed import setup as setup_parallel
from .mqar import IGNORE

CHECKPOINT = "checkpoint.pt"


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def batch_generator(seed: int, step: int) -> torch.Generator:
    """The generator of step ``step``'s batch: the data position is the step."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def lr_lambda(cfg: TrainConfig):
    """Linear warmup over ``cfg.warmup`` steps, then cosine decay to 10 % at ``cfg.steps``."""
    def f(step):
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose target is not ``IGNORE``."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def autocast(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def train_loop(model, cfg: TrainConfig, batch_fn: Callable[[int], Tuple[torch.Tensor, torch.Tensor]],
               eval_fn: Callable[[object], Dict[str, float]], *, resume: bool = True,
               stop_at: Optional[int] = None) -> List[dict]:
    """Train ``model`` for ``cfg.steps`` steps, resuming from ``cfg.out/checkpoint.pt`` if present.

    Args:
        model: a :class:`olsm.layers.MixerLM` (on CPU; moved to ``cfg.device`` here).
        cfg: the run.
        batch_fn: ``step -> (inputs [B, T], targets [B, T])`` on CPU, a function of the step only.
        eval_fn: ``model -> {name: value}`` (run under ``no_grad``).
        resume: continue from an existing checkpoint (False: start over, overwriting it).
        stop_at: stop (with a checkpoint) before this step, as an interruption would.

    Returns:
        metric rows: ``{"step", "loss", "lr", "tokens", "seconds", "eval_*"...}``.
    """
    par = setup_parallel(cfg, resolve_device(cfg.device))  # torchrun: DDP/FSDP2 (see .distributed)
    device = par.device
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(device)
    wrapped = par.wrap(model)  # before the optimiser: FSDP2 replaces the parameters
    opt = torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    rows: List[dict] = []
    step, tokens, seconds = 0, 0, 0.0
    path = out / CHECKPOINT
    if resume and path.exists():
        state = par.load(path, cfg, model=model, optimizer=opt, scheduler=sched)
        step, rows = state["step"], state["metrics"]
        tokens = rows[-1]["tokens"] if rows else 0
        seconds = rows[-1]["seconds"] if rows else 0.0
    fwd = torch.compile(wrapped) if cfg.compile else wrapped

    def checkpoint(at):
        par.save(path, model=model, optimizer=opt, scheduler=sched, step=at, config=cfg, metrics=rows)

    applying = False
    bar = tqdm(total=cfg.steps, initial=step, disable=not (cfg.progress and par.is_main),
               desc=f"{cfg.task} {cfg.objective}", dynamic_ncols=True)
    model.train()
    try:
        while step < cfg.steps:
            if stop_at is not None and step >= stop_at:
                checkpoint(step)
                break
            t0 = time.perf_counter()
            inputs, targets = par.shard(*batch_fn(step))  # this rank's rows of the global batch
            inputs, targets = inputs.to(device), targets.to(device)
            with autocast(cfg, device):
                logits = fwd(inputs)
            loss = par.loss(lm_loss, logits, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            applying = True  # from here until step += 1 the model is ahead of the counters
            opt.step()
            sched.step()
            step += 1
            applying = False
            tokens += inputs.numel() * par.world  # global: every rank holds an equal shard
            last = step == cfg.steps
            if step % cfg.log_every == 0 or last or step == 1 or step % cfg.eval_every == 0:
                row = {"step": step, "loss": par.mean(loss), "lr": sched.get_last_lr()[0], "tokens": tokens}
                if step % cfg.eval_every == 0 or last:
                    model.eval()
                    with torch.no_grad(), autocast(cfg, device):
                        row.update({f"eval_{k}": v for k, v in eval_fn(model).items()})
                    model.train()
                seconds += time.perf_counter() - t0
                row["seconds"] = round(seconds, 3)
                rows.append(row)
                bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in ("loss",) or k.startswith("eval_")
                                 and isinstance(v, float)}, refresh=False)
            else:
                seconds += time.perf_counter() - t0
            bar.update(1)
            if step % cfg.checkpoint_every == 0 or last:
                checkpoint(step)
    except KeyboardInterrupt:
        # else keep the last periodic checkpoint: it is consistent (and under torchrun the ranks
        # stop at different points, so a save that needs all of them could hang)
        if not applying and not par.distributed:
            checkpoint(step)
        bar.close()
        raise
    bar.close()
    return rows
