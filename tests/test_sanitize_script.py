"""``benchmarks/sanitize_kernels.py`` runs on the GPU machine under compute-sanitizer; here its
case bodies run in Triton's interpreter (small cases of each path), so a broken script is found
before device time is spent on it."""
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sanitize_kernels as SK  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("case", [("delta", 16, 16, "fp32", 1, 1, ""), ("longhorn", 16, 16, "fp32", 1, 1, ""),
                                  ("pair", 16, 16, "fp32", 0, 1, ""), ("rank0", 16, 16, "fp32", 1, 1, ""),
                                  ("rank0", 16, 16, "fp32", 1, 1, "OLSM_MATRIX_STATE=split"),
                                  ("dplr", 16, 16, "fp32", 1, 1, ""), ("dplr128", 16, 16, "fp32", 1, 1, ""),
                                  ("dplr-strong", 16, 16, "fp32", 1, 1, ""),
                                  ("elem:mamba1", 4, 24, "fp32", 0, 1, ""),
                                  ("elem:longhorn_diag", 4, 24, "fp32", 0, 1, ""),
                                  ("elem:mamba1", 4, 24, "fp32", 0, 1, "OLSM_ELEMENTWISE_BWD_SPLIT=2")])
def test_case_bodies_run(case, monkeypatch):
    path, K, V, dtype, decay, H, switches = case
    for kv in filter(None, switches.split(",")):
        monkeypatch.setenv(*kv.split("="))
    SK.run_case(path, K, V, dtype, decay, H, device=DEV, T=130 if not path.startswith("elem") else 9)


def test_cases_are_well_formed():
    # every case names a path the runner knows, seven fields the child process parses, and
    # NAME=value switches of its kernel family
    for case in SK.CASES:
        assert len(case) == 7 and (case[0] in ("delta", "longhorn", "pair", "rank0", "dplr", "dplr128", "dplr-strong", "dplr-strong128") or case[0].startswith("elem:"))
        assert case[3] in SK.DTYPES
        for kv in filter(None, case[-1].split(",")):
            name, value = kv.split("=")
            assert name.startswith("OLSM_MATRIX_" if not case[0].startswith("elem:") else "OLSM_ELEMENTWISE_") and value, case
