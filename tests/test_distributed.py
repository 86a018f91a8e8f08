"""olsm.train under torchrun (2 CPU processes, gloo): DDP and FSDP2 follow the single-process run.

Each test launches this file with ``python -m torch.distributed.run --standalone`` (a free port
is picked by the launcher). The workers (``__main__`` below) run in one launch:

* ``cli``: ``olsm train lm`` through the Typer app, unchanged, 6 steps with ``--parallel MODE``;
* ``part``: 3 steps (``stop_at``), a copy of that checkpoint for a 1-process resume, then the
  same 2 processes resume it to step 6;
* ``from1``: a checkpoint the test wrote with 1 process at step 3, resumed by the 2 processes;
* a global batch not divisible by 2, which must fail with a clear InputError on every rank.

The test compares all of it with a single-process run of the same config.
"""
import json
import os
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from olsm.errors import InputError
from olsm.train import TrainConfig, run_lm
from olsm.train.distributed import check_batch, resolve_mode, setup

ROOT = Path(__file__).resolve().parents[1]
TEXT = "def add(a, b):\n    return a + b  # the quick brown fox jumps over the lazy dog\n" * 30
STEPS = 6
#: float32; DDP/FSDP2 sum gradients of two half batches, so they differ from one process by rounding
RTOL = 2e-5


def tiny(corpus, out, **kw) -> TrainConfig:
    base = dict(task="lm", objective="gated_longhorn", d_model=16, num_heads=2, n_layers=2, steps=STEPS,
                batch_size=4, seq_len=16, corpus=str(corpus), eval_windows=4, eval_every=1, checkpoint_every=3,
                log_every=1, warmup=2, lr=3e-3, device="cpu", backend="torch", progress=False, out=str(out))
    base.update(kw)
    return TrainConfig(**base)


def cli_args(cfg: TrainConfig):
    """The ``olsm train lm`` arguments of ``cfg`` (one objective, one width)."""
    return ["lm", "-o", cfg.objective, "--d-model", str(cfg.d_model), "--num-heads", str(cfg.num_heads),
            "--n-layers", str(cfg.n_layers), "--steps", str(cfg.steps), "--batch-size", str(cfg.batch_size),
            "--seq-len", str(cfg.seq_len), "--corpus", cfg.corpus, "--eval-windows", str(cfg.eval_windows),
            "--eval-every", str(cfg.eval_every), "--checkpoint-every", str(cfg.checkpoint_every),
            "--warmup", str(cfg.warmup), "--lr", str(cfg.lr), "--device", "cpu", "--backend", "torch",
            "--no-progress", "--parallel", cfg.parallel, "--out", cfg.out]


def rows(run: Path):
    return json.loads((run / "metrics.json").read_text())["rows"]


def same_curve(a, b, rtol=RTOL):
    """Same steps, tokens and lr; losses (train and eval) equal within ``rtol``."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"] and x["lr"] == pytest.approx(y["lr"], rel=1e-12), (x, y)
        for k in ("loss", "eval_loss", "eval_bpb"):
            assert (k in x) == (k in y), (k, x, y)
            if k in x:
                assert x[k] == pytest.approx(y[k], rel=rtol), (k, x, y)


@lru_cache(maxsize=None)
def single(tmp: str):
    """The 1-process reference run (once per test worker and folder)."""
    corpus = Path(tmp) / "corpus.txt"
    corpus.write_text(TEXT)
    run_lm(tiny(corpus, Path(tmp) / "single"))
    return rows(Path(tmp) / "single")


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ref"))


def launch(mode: str, tmp: Path):
    """Run this file's workers in 2 processes (torchrun) and fail with their output if they fail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    # --standalone: the launcher picks a free port; a short monitor interval saves seconds at exit
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--monitor-interval", "0.2", __file__, mode, str(tmp)]
    for attempt in (1, 2):
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
        # the launcher's free port can be taken by another program before the workers bind it:
        # that (and only that) is worth a second try
        if p.returncode == 0 or "address already in use" not in (p.stdout + p.stderr).lower():
            break
    assert p.returncode == 0, f"torchrun failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-12000:]}"
    return p.stdout


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="this torch build has no gloo backend (needed for CPU multi-process training)")
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_follow_one(mode, tmp_path, ref_dir):
    ref = single(ref_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    run_lm(tiny(corpus, tmp_path / "from1"), stop_at=3)  # for the workers to resume
    out = launch(mode, tmp_path)
    # (1)/(2) the CLI under torchrun: same loss curve as one process at the same global batch
    cli = tmp_path / "cli" / "gated_longhorn-d16"
    same_curve(rows(cli), ref)
    assert out.count("olsm train lm") == 1, out  # the table is printed by rank 0 only
    assert out.count("tokens/s") == 1, out  # global throughput, once
    a = torch.load(cli / "checkpoint.pt", weights_only=False)
    b = torch.load(Path(ref_dir) / "single" / "checkpoint.pt", weights_only=False)
    assert a["step"] == STEPS and a["model"].keys() == b["model"].keys()
    for k in a["model"]:  # one file format whatever the strategy (FSDP2: gathered full tensors)
        assert torch.allclose(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-6), k
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    # (3) stopped after 3 steps and resumed by 2 processes: the uninterrupted 2-process run
    part = rows(tmp_path / "part")
    same_curve(part, rows(cli), rtol=1e-6)
    # ... and by 1 process (the checkpoint copied at step 3)
    resumed = tmp_path / "stop3"
    assert torch.load(resumed / "checkpoint.pt", weights_only=False)["step"] == 3
    run_lm(tiny(corpus, resumed, parallel="none"))
    same_curve(rows(resumed), ref)
    # ... and a 1-process checkpoint resumed by 2 processes (FSDP2: re-sharded)
    same_curve(rows(tmp_path / "from1"), ref)
    # (4) a global batch that does not split over the ranks: a clear error on every rank
    for r in (0, 1):
        assert "not divisible by the 2 processes" in (tmp_path / f"bad{r}.txt").read_text()


def test_bad_configuration(monkeypatch):
    with pytest.raises(InputError, match="not divisible by the 2 processes.*multiple of 2"):
        check_batch(5, 2)
    check_batch(6, 3)
    with pytest.raises(InputError, match="parallel must be one of"):
        resolve_mode("zero3", 1)
    assert resolve_mode("auto", 1) == "none" and resolve_mode("auto", 4) == "ddp"
    with pytest.raises(InputError, match="--parallel none .* 2 processes"):
        resolve_mode("none", 2)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(InputError, match="torchrun --nproc_per_node"):  # ddp asked for, no launcher
        setup(TrainConfig(parallel="ddp"), torch.device("cpu"))
    assert setup(TrainConfig(), torch.device("cpu")).mode == "none"


# -- the workers (run by torchrun, not by pytest) ---------------------------------------------------
def _worker(mode: str, tmp: Path):
    import torch.distributed as dist

    from olsm.train.cli import app

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    corpus = tmp / "corpus.txt"
    app(cli_args(tiny(corpus, tmp / "cli", parallel=mode)), standalone_mode=False)
    # a global batch of 5 cannot split over 2 ranks; checked before any collective
    try:
        run_lm(tiny(corpus, tmp / "bad", parallel=mode, batch_size=5))
    except InputError as e:
        (tmp / f"bad{rank}.txt").write_text(str(e))
    cfg = tiny(corpus, tmp / "part", parallel=mode)
    run_lm(cfg, stop_at=3)
    if rank == 0:
        shutil.copytree(tmp / "part", tmp / "stop3")
    dist.barrier()
    run_lm(cfg)  # a fresh model and optimiser, restored from part/checkpoint.pt
    run_lm(tiny(corpus, tmp / "from1", parallel=mode))  # written by one process at step 3


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
