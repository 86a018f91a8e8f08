"""Everything that defines a training run, in one dataclass saved with every checkpoint."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional

#: fields that may differ between a run and its resumption (where and how it runs, not what)
RUNTIME_FIELDS = ("device", "out", "eval_every", "checkpoint_every", "log_every", "progress", "backend",
                  "compile", "parallel")


@dataclass
class TrainConfig:
    """A training run (MQAR or byte-level LM).

    Attributes:
        task: ``"mqar"`` or ``"lm"``.
        objective: catalogue name or ``FILE.py:NAME``.
        d_model, n_layers, num_heads, block, mlp_ratio: the model (see :class:`olsm.layers.MixerLM`).
        steps, batch_size, lr, weight_decay, warmup, grad_clip: optimisation (AdamW, linear warmup,
            cosine decay to 10 %).
        seed: seeds the initialisation and every batch.
        vocab_size, train_configs, eval_configs, eval_examples: MQAR (``"SEQ:PAIRS,..."``).
        corpus, seq_len, max_bytes, eval_windows: byte-level LM (corpus None: the stdlib).
        device: ``auto``, ``cpu`` or ``cuda``; precision: ``fp32`` or ``bf16`` (autocast, CUDA).
        backend: recurrence backend; compile: wrap the model in ``torch.compile``.
        parallel: ``auto``, ``none``, ``ddp`` or ``fsdp`` under torchrun (see :mod:`.distributed`);
            ``batch_size`` is then the global batch.
        eval_every, checkpoint_every, log_every: in steps; out: run folder.
    """

    task: str = "mqar"
    objective: str = "longhorn"
    d_model: int = 64
    n_layers: int = 2
    num_heads: int = 1
    block: str = "mixer"
    mlp_ratio: float = 4.0
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 50
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "fp32"
    # MQAR
    vocab_size: int = 8192
    train_configs: str = "64:4,128:8,256:16,256:32,256:64"
    eval_configs: str = "64:4,128:8,256:16,256:32,256:64,512:64"
    eval_examples: int = 256
    # byte LM
    corpus: Optional[str] = None
    seq_len: int = 256
    max_bytes: Optional[int] = None
    eval_windows: int = 64
    # runtime
    device: str = "auto"
    parallel: str = "auto"
    backend: str = "auto"
    compile: bool = False
    eval_every: int = 100
    checkpoint_every: int = 100
    log_every: int = 10
    out: str = "runs/olsm"
    progress: bool = True

    def identity(self) -> dict:
        """The fields a resumed run must share with the checkpoint it resumes."""
        return {k: v for k, v in asdict(self).items() if k not in RUNTIME_FIELDS}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
