"""Data-parallel training under ``torchrun``: DDP or FSDP2, with the single-process loss curve.

    torchrun --nproc_per_node 2 -m olsm.cli train lm --parallel ddp  ...
    torchrun --nproc_per_node 2 -m olsm.cli train lm --parallel fsdp ...

How a run with ``N`` processes stays the same run as one process (same losses up to float
rounding, same checkpoints, resumable with any ``N``):

* **Global batch.** ``--batch-size`` is the global batch. Every rank draws the *whole* batch of
  step ``s`` from the generator seeded by ``(seed, s)`` (cheap: random windows or MQAR rows) and
  keeps its contiguous block of ``batch_size / N`` rows, so the N shards are exactly the
  single-process batch. ``batch_size`` must be divisible by ``N``.
* **Loss.** DDP and FSDP2 average gradients over ranks. Each rank's mean loss is weighted by
  ``N * n_rank / n_global`` (``n``: scored targets), so the average is the mean over the global
  batch even when ranks hold different numbers of scored targets.
* **Init and seeds.** Every rank builds the model from ``cfg.seed`` (identical weights; DDP also
  broadcasts rank 0's) and restores the same RNG states on resume.
* **Checkpoints.** One file in the single-process format. DDP: rank 0 writes its (replicated)
  state. FSDP2: the shards are gathered into full tensors (``DTensor.full_tensor``, every rank
  takes part) and rank 0 writes them; loading re-shards the full tensors on every rank. A full
  state dict (rather than a sharded ``torch.distributed.checkpoint``) keeps one format across
  ``none``/``ddp``/``fsdp`` and any world size, so resumption is exact and portable; its cost is
  the full model and optimiser state in rank 0's CPU memory, fine for the models olsm trains.
* **Output.** Progress bars, metric files, plots and tables come from rank 0 only; every rank
  runs the (cheap, identical) evaluation because FSDP2's forward needs all ranks.
* **Interrupts.** Ctrl-C under torchrun keeps the last periodic checkpoint: ranks stop at
  different points, so a save that needs every rank could hang.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..errors import BackendError, InputError
from .checkpoint import load_checkpoint, save_checkpoint

#: values of ``--parallel`` (``auto``: ``ddp`` when launched with WORLD_SIZE > 1, else ``none``)
PARALLEL = ("auto", "none", "ddp", "fsdp")
IGNORE = -100  # same as .mqar.IGNORE (not imported: keeps this module free of the data code)


def is_main() -> bool:
    """True on rank 0 of a process group, and always without one (a plain single-process run)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def launch_env() -> tuple:
    """``(rank, world_size, local_rank)`` set by torchrun (``(0, 1, 0)`` when not launched by it)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def resolve_mode(parallel: str, world: int) -> str:
    """The strategy to use, checked against the launch.

    Args:
        parallel: ``auto``, ``none``, ``ddp`` or ``fsdp``.
        world: WORLD_SIZE of the launch (1 without torchrun).

    Returns:
        ``none``, ``ddp`` or ``fsdp``.

    Raises:
        InputError: unknown value, or ``none`` with several processes (each would train alone and
            overwrite the others' files).
    """
    if parallel not in PARALLEL:
        raise InputError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    if parallel == "auto":
        return "ddp" if world > 1 else "none"
    if parallel == "none" and world > 1:
        raise InputError(f"--parallel none was given but {world} processes were launched (WORLD_SIZE={world}); "
                         "use --parallel ddp or fsdp, or run without torchrun")
    return parallel


def check_batch(batch_size: int, world: int):
    """Raise :class:`InputError` unless the global batch splits evenly over ``world`` ranks."""
    if batch_size % world:
        lo, hi = batch_size // world * world, -(-batch_size // world) * world
        raise InputError(f"--batch-size {batch_size} (the global batch) is not divisible by the {world} processes; "
                         f"use a multiple of {world} (e.g. {lo or hi} or {hi}) or another --nproc_per_node")


@dataclass
class Parallel:
    """How this process takes part in a run; the loop calls it at the few points that differ.

    Attributes:
        mode: ``none``, ``ddp`` or ``fsdp``.
        rank, world: this process and the number of processes.
        device: where this rank computes (``cuda:LOCAL_RANK`` under torchrun on GPUs).
    """

    mode: str = "none"
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _weight: float = field(default=1.0, repr=False)  # loss weight of the current shard (see shard/loss)

    @property
    def distributed(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if not self.distributed:
            return
        if self.device.type == "cuda":  # NCCL wants to know the device it synchronises on
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    # -- model -----------------------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        """Prepare ``model`` (already on :attr:`device`) for this strategy.

        Args:
            model: the model; FSDP2 shards it in place (its parameters become DTensors), so build
                the optimiser from ``model`` after this call.

        Returns:
            the module to call in training (DDP: a wrapper; FSDP2 and none: ``model`` itself).
        """
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids)
        if self.mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh

            try:
                from torch.distributed.fsdp import fully_shard
            except ImportError:  # public since torch 2.6
                raise BackendError(f"--parallel fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); "
                                   f"this is torch {torch.__version__}: use --parallel ddp") from None

            # fully_shard swaps in new Parameter objects, dropping attributes such as the
            # _no_weight_decay flag that MixerLM.param_groups reads: carry them over by name
            flagged = {n for n, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}
            mesh = init_device_mesh(self.device.type, (self.world,))
            for block in getattr(model, "blocks", []):  # one all-gather unit per block, then the rest
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            for n, p in model.named_parameters():
                if n in flagged:
                    p._no_weight_decay = True
        return model

    # -- data and loss ---------------------------------------------------------------------------
    def shard(self, inputs: torch.Tensor, targets: torch.Tensor):
        """This rank's rows of the global batch (and remember its loss weight).

        Args:
            inputs, targets: the global batch ``[B, T]`` (identical on every rank).

        Returns:
            ``(inputs, targets)`` rows ``[rank * B / N, (rank + 1) * B / N)``.
        """
        if not self.distributed:
            return inputs, targets
        check_batch(inputs.shape[0], self.world)
        b = inputs.shape[0] // self.world
        rows = slice(self.rank * b, (self.rank + 1) * b)
        n_all = int((targets != IGNORE).sum())
        n_mine = int((targets[rows] != IGNORE).sum())
        self._weight = self.world * n_mine / n_all if n_all else 0.0
        return inputs[rows], targets[rows]

    def loss(self, loss_fn, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``loss_fn(logits, targets)`` weighted so that the ranks' average is the global-batch mean.

        Args:
            loss_fn: mean loss over scored targets (``lm_loss``).
            logits, targets: this rank's shard.

        Returns:
            a scalar to call ``backward`` on (unchanged in a single process).
        """
        if not self.distributed:
            return loss_fn(logits, targets)
        if self._weight == 0.0:  # nothing scored here: a zero that still joins the gradient reduction
            return logits.float().sum() * 0.0
        return loss_fn(logits, targets) * self._weight

    def mean(self, loss: torch.Tensor) -> float:
        """The global-batch loss as a float (an all-reduce over ranks; ``loss.item()`` alone)."""
        if not self.distributed:
            return loss.item()
        t = loss.detach().float().reshape(1).clone()
        dist.all_reduce(t)  # SUM: gloo has no AVG
        return t.item() / self.world

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self, path: Path, *, model, optimizer, **kw):
        """Write a single-process-format checkpoint (rank 0 writes; every rank must call this).

        Args:
            path: the checkpoint file.
            model, optimizer: the unwrapped (possibly sharded) model and its optimiser.
            **kw: ``scheduler``, ``step``, ``config``, ``metrics`` for :func:`save_checkpoint`.
        """
        if self.mode == "fsdp":  # collectives: every rank gathers, rank 0 keeps the result
            model, optimizer = _Snapshot(_full_model(model)), _Snapshot(_full_optimizer(optimizer))
        if self.is_main:
            save_checkpoint(path, model=model, optimizer=optimizer, **kw)
        self.barrier()  # nobody reads or moves on before the file is complete

    def load(self, path: Path, config, *, model, optimizer, scheduler) -> dict:
        """Every rank restores the run from ``path`` (written by any mode and world size).

        Returns:
            the checkpoint dict, as :func:`load_checkpoint`.

        Raises:
            CheckpointError: as :func:`load_checkpoint`.
        """
        if self.mode == "fsdp":
            model, optimizer = _ShardedModel(model), _ShardedOptimizer(optimizer)
        return load_checkpoint(path, config, model=model, optimizer=optimizer, scheduler=scheduler)


def setup(cfg, device: torch.device) -> Parallel:
    """Join the process group torchrun set up (once per process) and pick this rank's device.

    Args:
        cfg: the run (reads ``parallel`` and ``batch_size``).
        device: the device ``cfg.device`` resolves to (``cuda`` becomes ``cuda:LOCAL_RANK``).

    Returns:
        the :class:`Parallel` of this process (``mode="none"`` without torchrun).

    Raises:
        InputError: bad ``--parallel``, a global batch not divisible by the world size, a DDP/FSDP
            run without a launcher, or more processes than GPUs.
    """
    rank, world, local = launch_env()
    mode = resolve_mode(getattr(cfg, "parallel", "auto"), world)
    if mode == "none":
        return Parallel(device=device)
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        raise InputError(f"--parallel {mode} needs a launcher that sets RANK/WORLD_SIZE/MASTER_ADDR: "
                         "torchrun --nproc_per_node N -m olsm.cli train ... (or --parallel none)")
    check_batch(cfg.batch_size, world)  # before any collective: every rank fails the same way
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible; "
                             "use --nproc_per_node <= the number of GPUs")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)  # so plain "cuda" (e.g. in evaluation) means this rank's GPU
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_shutdown)
    return Parallel(mode=mode, rank=dist.get_rank(), world=dist.get_world_size(), device=device)


def _shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()


# -- FSDP2 state <-> the single-process checkpoint format ----------------------------------------
def _full(v):
    from torch.distributed.tensor import DTensor

    return v.full_tensor().cpu() if isinstance(v, DTensor) else v


def _full_model(model: nn.Module) -> dict:
    """The model's state dict with every shard gathered (a collective, same order on all ranks)."""
    return {k: _full(v) for k, v in model.state_dict().items()}


def _full_optimizer(optimizer) -> dict:
    """``optimizer.state_dict()`` with gathered tensors: the int-keyed single-process layout."""
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: _full(v) for k, v in s.items()} for i, s in sd["state"].items()}
    return sd


def _like(full: torch.Tensor, ref, name: str):
    """``full`` laid out as ``ref``: re-sharded when ``ref`` is a DTensor (every rank holds ``full``)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(ref, DTensor):
        return full
    if tuple(full.shape) != tuple(ref.shape):
        raise RuntimeError(f"{name}: checkpoint shape {tuple(full.shape)} vs model {tuple(ref.shape)}")
    # src_data_rank=None: each rank cuts its shard from its own copy, no communication
    return distribute_tensor(full.to(ref.device, ref.dtype), ref.device_mesh, ref.placements, src_data_rank=None)


class _Snapshot:
    """A gathered state dict posing as the module/optimiser that :func:`save_checkpoint` reads."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


class _ShardedModel:
    """Loads a full (single-process) state dict into an FSDP2 model, shard by shard."""

    def __init__(self, model: nn.Module):
        self.model = model

    def load_state_dict(self, state: dict):
        ref = self.model.state_dict()
        self.model.load_state_dict({k: _like(v, ref[k], k) for k, v in state.items()})


class _ShardedOptimizer:
    """Loads a full optimiser state dict into an optimiser over FSDP2 (DTensor) parameters."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def load_state_dict(self, state: dict):
        # int ids number the parameters in param-group order, as Optimizer.state_dict does
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if len(params) != sum(len(g["params"]) for g in state["param_groups"]):
            raise ValueError("the checkpoint's optimiser has a different number of parameters")
        moments = {}
        for i, s in state["state"].items():
            p = params[int(i)]
            # per-parameter moments (exp_avg...) have the parameter's shape; the step count is a scalar
            moments[i] = {k: _like(v, p, f"optimizer state {k} of parameter {i}")
                          if torch.is_tensor(v) and v.dim() > 0 else v for k, v in s.items()}
        self.optimizer.load_state_dict({**state, "state": moments})
