"""olsm.train: MQAR data, exact resume, bad input, the ``olsm train`` CLI."""
import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from olsm.errors import InputError, ObjectiveError
from olsm.train import CheckpointError, TrainConfig, mqar_batch, parse_mqar_configs, run_lm, run_mqar
from olsm.train.cli import app
from olsm.train.corpus import load_corpus
from olsm.train.loop import train_loop
from olsm.train.mqar import IGNORE

torch.set_num_threads(1)  # tiny runs: avoid OpenMP contention between xdist workers


def tiny(tmp_path, **kw):
    base = dict(objective="gated_longhorn", d_model=16, num_heads=2, n_layers=1, steps=6, batch_size=4,
                vocab_size=64, train_configs="16:2,32:4", eval_configs="32:4", eval_examples=8, eval_every=2,
                checkpoint_every=2, log_every=1, device="cpu", backend="torch", progress=False, out=str(tmp_path / "run"))
    base.update(kw)
    return TrainConfig(**base)


def test_mqar_batch_is_associative_recall():
    g = torch.Generator().manual_seed(0)
    x, y = mqar_batch(8, 64, 8, vocab_size=100, generator=g)
    assert x.shape == y.shape == (8, 64)
    for b in range(8):
        keys, values = x[b, 0:16:2], x[b, 1:16:2]
        assert len(set(keys.tolist())) == 8 and keys.max() < 50 and values.min() >= 50
        assert (y[b, :16] == IGNORE).all()
        scored = torch.nonzero(y[b] != IGNORE).flatten()
        assert len(scored) == 8  # every key queried once
        for t in scored.tolist():
            key = x[b, t].item()
            assert y[b, t].item() == values[keys.tolist().index(key)].item()
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(mqar_batch(8, 64, 8, vocab_size=100, generator=g2)[0], x)
    with pytest.raises(InputError):
        mqar_batch(2, 16, 8)
    with pytest.raises(InputError, match="SEQ_LEN:PAIRS"):
        parse_mqar_configs("64-4")
    assert [str(c) for c in parse_mqar_configs("64:4, 128:8")] == ["64:4", "128:8"]


def _state(path):
    return torch.load(path / "checkpoint.pt", weights_only=False)


def test_resume_equals_uninterrupted(tmp_path):
    full = run_mqar(tiny(tmp_path, out=str(tmp_path / "a")))
    cfg = tiny(tmp_path, out=str(tmp_path / "b"))
    run_mqar(cfg, stop_at=3)  # "interrupted" after 3 steps (checkpoint saved at 3)
    assert _state(tmp_path / "b")["step"] == 3
    resumed = run_mqar(cfg)
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(a["metrics"]) == strip(b["metrics"])
    assert full["train_loss"] == resumed["train_loss"] and full["accuracy"] == resumed["accuracy"]
    rows = json.loads((tmp_path / "b" / "metrics.json").read_text())["rows"]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert (tmp_path / "b" / "metrics.csv").exists() and (tmp_path / "b" / "loss.png").exists()


def test_keyboard_interrupt_saves_and_resumes(tmp_path):
    from olsm.train.experiments import build_model

    cfg = tiny(tmp_path)
    ref = tiny(tmp_path, out=str(tmp_path / "ref"))
    x = torch.randint(0, 64, (2, 8))

    def batch(step):
        if step == 4 and not batch.fired:
            batch.fired = True
            raise KeyboardInterrupt
        return x, x
    batch.fired = False
    with pytest.raises(KeyboardInterrupt):
        train_loop(build_model(cfg, 64), cfg, batch, lambda m: {})
    assert _state(tmp_path / "run")["step"] == 4
    m1 = build_model(cfg, 64)
    train_loop(m1, cfg, batch, lambda m: {})
    m2 = build_model(ref, 64)
    train_loop(m2, ref, lambda s: (x, x), lambda m: {})
    for (k, p), q in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(p, q), k


def test_bad_checkpoints(tmp_path):
    cfg = tiny(tmp_path, steps=2)
    run_mqar(cfg)
    with pytest.raises(CheckpointError, match="different run.*d_model"):
        run_mqar(dataclasses.replace(cfg, d_model=32, steps=4))
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        run_mqar(cfg)
    torch.save({"hello": 1}, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not an olsm training checkpoint"):
        run_mqar(cfg)
    assert run_mqar(cfg, resume=False)["steps_done"] == 2  # --no-resume starts over


def test_bad_inputs(tmp_path):
    with pytest.raises(ObjectiveError, match="unknown objective"):
        run_mqar(tiny(tmp_path, objective="transformer"))
    with pytest.raises(InputError, match="divisible"):
        run_mqar(tiny(tmp_path, d_model=18, num_heads=4))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(InputError, match="empty"):
        load_corpus(str(empty))
    with pytest.raises(InputError, match="does not exist"):
        load_corpus(str(tmp_path / "missing.txt"))
    short = tmp_path / "short.txt"
    short.write_text("abc")
    with pytest.raises(InputError, match="needs at least"):
        run_lm(tiny(tmp_path, corpus=str(short), seq_len=16))
    with pytest.raises(InputError, match="steps must be positive"):
        run_mqar(tiny(tmp_path, steps=0))


def test_default_corpus_is_stdlib():
    data = load_corpus(None, max_bytes=50_000)
    assert data.dtype == torch.uint8 and data.numel() == 50_000
    assert b"import" in bytes(data[:50_000].tolist())


def test_lm_run_and_generate(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    s = run_lm(tiny(tmp_path, corpus=str(text), seq_len=32, steps=4, objective="longhorn_diag", block="longhorn",
                    eval_windows=4))
    assert s["steps_done"] == 4 and 0 < s["val_bpb"] < 9


def test_cli(tmp_path):
    runner = CliRunner()
    common = ["--steps", "2", "--batch-size", "2", "--device", "cpu", "--backend", "torch", "--no-progress",
              "--n-layers", "1", "--num-heads", "1"]
    r = runner.invoke(app, ["mqar", "-o", "mamba2", "-o", "longhorn", "--d-model", "8", "--d-model", "16",
                            "--vocab-size", "32", "--train-configs", "16:2", "--eval-configs", "16:2",
                            "--eval-examples", "4", "--out", str(tmp_path / "m")] + common)
    assert r.exit_code == 0, r.output
    assert "accuracy" in r.output
    assert (tmp_path / "m" / "accuracy_vs_dmodel.png").exists() and (tmp_path / "m" / "summary.csv").exists()
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    r = runner.invoke(app, ["lm", "-o", "mamba1", "--block", "longhorn", "--d-model", "8", "--corpus", str(text),
                            "--seq-len", "16", "--eval-windows", "2", "--out", str(tmp_path / "l")] + common)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "l" / "mamba1-d8" / "loss.png").exists()
    r = runner.invoke(app, ["mqar", "-o", "nope", "--out", str(tmp_path / "x")] + common)
    assert r.exit_code == 1 and "unknown objective" in r.output
