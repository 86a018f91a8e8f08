"""Training: synthetic MQAR, byte-level LM, a resumable loop, metrics and plots.

    olsm train mqar --objective longhorn --objective mamba2 --d-model 64 --d-model 128 --out runs/mqar
    olsm train lm --objective longhorn_diag --block longhorn --steps 2000 --out runs/lm

or from Python: :func:`olsm.train.run_mqar`, :func:`olsm.train.run_lm` with a :class:`TrainConfig`.
"""
from .checkpoint import CheckpointError
from .config import TrainConfig
from .experiments import build_model, run_lm, run_mqar, sweep
from .mqar import MQARConfig, mqar_batch, parse_mqar_configs

__all__ = ["TrainConfig", "run_mqar", "run_lm", "sweep", "build_model", "mqar_batch", "MQARConfig",
           "parse_mqar_configs", "CheckpointError"]
