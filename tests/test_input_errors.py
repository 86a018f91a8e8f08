"""Bad input to a recurrence gets a clear error that says what to do."""
import pytest
import torch

import olsm
from olsm import BackendError, InputError
from olsm.testing import random_inputs

rec = olsm.derive("gated_longhorn")
DIMS = (1, 10, 2, 4, 3)


def call(**over):
    q, k, v, coefs, h0 = random_inputs(rec, DIMS, seed=0)
    args = dict(q=q, k=k, v=v, **coefs)
    args.update(over)
    args = {n: x for n, x in args.items() if x is not None or n in ("initial_state", "cu_seqlens")}
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    args.setdefault("backend", "torch")
    return rec(q, k, v, **args)


def test_good_call_runs():
    o, _ = call()
    assert o.shape == (1, 10, 2, 3)


def test_missing_and_extra_coefficients():
    with pytest.raises(InputError, match=r"missing \['beta'\].*takes log_alpha=\[B, T, H\], beta=\[B, T, H\]"):
        call(beta=None)
    with pytest.raises(InputError, match=r"unexpected \['gamma'\]"):
        call(gamma=torch.ones(1, 10, 2))


@pytest.mark.parametrize("over, match", [
    (dict(q=torch.randn(1, 10, 2)), r"q must be \[B, T, H, K\]"),
    (dict(k=torch.randn(1, 10, 2, 5)), "same shape"),
    (dict(v=torch.randn(1, 9, 2, 3)), r"v must be \[B, T, H, V\]"),
    (dict(beta=torch.rand(1, 10, 3) + 0.1), r"beta must be \[B, T, H\] = \(1, 10, 2\)"),
    (dict(q=torch.randn(1, 10, 2, 4, dtype=torch.float32)), "share a dtype"),
    (dict(beta=torch.ones(1, 10, 2, dtype=torch.int64)), "floating-point"),
    (dict(beta=torch.full((1, 10, 2), float("nan"))), "NaN"),
    (dict(beta=-torch.ones(1, 10, 2)), r"beta must be > 0 \(positive\).*softplus"),
    (dict(log_alpha=torch.ones(1, 10, 2)), r"log_alpha must be <= 0.*logsigmoid"),
    (dict(beta=torch.ones(1, 10, 2, device="meta")), "is on meta but q is on cpu"),
    (dict(q=[1, 2]), "must be a torch.Tensor"),
])
def test_bad_tensors(over, match):
    with pytest.raises(InputError, match=match):
        call(**over)


@pytest.mark.parametrize("cu, match", [
    (torch.tensor([0, 5, 5, 10]), "strictly increasing"),
    (torch.tensor([0, 7, 4, 10]), "strictly increasing"),
    (torch.tensor([1, 5, 10]), "start at 0 and end at T"),
    (torch.tensor([0, 5, 9]), "start at 0 and end at T"),
    (torch.tensor([0.0, 5.0, 10.0]), "integer"),
    (torch.tensor([0]), "at least two"),
])
def test_bad_cu_seqlens(cu, match):
    with pytest.raises(InputError, match=match):
        call(cu_seqlens=cu)


def test_cu_seqlens_needs_packed_batch_and_matching_state():
    q, k, v, coefs, _ = random_inputs(rec, (2, 10, 2, 4, 3), seed=0)
    with pytest.raises(InputError, match="B == 1"):
        rec(q, k, v, cu_seqlens=torch.tensor([0, 4, 10]), **coefs)
    with pytest.raises(InputError, match=r"initial_state must be \[N, H, K, V\] = \(2, 2, 4, 3\)"):
        call(cu_seqlens=torch.tensor([0, 4, 10]), initial_state=torch.zeros(1, 2, 4, 3, dtype=torch.float64))


def test_bad_initial_state_and_options():
    with pytest.raises(InputError, match=r"initial_state must be \[B, H, K, V\]"):
        call(initial_state=torch.zeros(1, 2, 3, 4, dtype=torch.float64))
    with pytest.raises(BackendError, match="unknown backend"):
        call(backend="cuda")
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        call(chunk_size=0)


def test_check_inputs_false_skips_value_checks_only():
    call(beta=-torch.ones(1, 10, 2), check_inputs=False)  # runs: the caller vouched for values
    with pytest.raises(InputError):
        call(beta=torch.ones(1, 10, 3), check_inputs=False)  # shapes are always checked


def test_triton_backend_without_cuda_says_what_to_do(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendError, match="torch"):
        call(backend="triton")
