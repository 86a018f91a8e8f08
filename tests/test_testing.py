"""olsm.testing works for users' objectives, and its checks can fail."""
import dataclasses

import pytest

import olsm
from olsm import Input, Objective, proximal, squared_loss, weight_decay
from olsm.testing import argmin_error, check_objective, chunked_error


def test_check_objective_passes_on_a_user_objective():
    beta = Input("beta", constraint="positive")
    mine = Objective(proximal() + squared_loss(beta) + weight_decay(0.1), name="ridge_longhorn")
    rows = check_objective(mine, examples=1)
    assert {r.check for r in rows} == {"argmin", "chunked", "split"} and all(r.passed for r in rows)


def test_argmin_check_catches_a_wrong_recurrence():
    rec = olsm.derive("longhorn")
    # Longhorn with DeltaNet's coefficient: a plausible bug the check must see
    wrong = dataclasses.replace(rec, aux=((rec.aux[0][0], rec.aux[0][1] * 1.05),))
    assert argmin_error(wrong) > 1e-3


def test_check_objective_reports_failures(monkeypatch):
    import olsm.testing.checks as checks

    monkeypatch.setattr(checks, "_FNS", {**checks._FNS, "chunked": lambda rec, seed: 1.0})
    with pytest.raises(AssertionError, match="chunked"):
        check_objective("deltanet", examples=1)


def test_chunked_check_detects_a_broken_backend(monkeypatch):
    import olsm.backends.chunked as chunked

    real = chunked.matrix

    def off_by_one(q, w, u, *a, **kw):
        o, S = real(q, w, u, *a, **kw)
        return o.roll(1, dims=1), S

    monkeypatch.setattr(chunked, "matrix", off_by_one)
    assert chunked_error(olsm.derive("mamba2")) > 1e-3


def test_kernel_check_passes_on_a_user_objective_and_the_catalogue():
    """The opt-in kernel check: the Triton backend in float32 (here in the interpreter) against
    the float64 reference, gradients included, for a user's objective of each class."""
    from olsm.testing import ALL_CHECKS, kernel_error

    beta = Input("beta", constraint="positive")
    mine = Objective(proximal() + squared_loss(beta) + weight_decay(0.1), name="ridge_longhorn")
    rows = check_objective(mine, examples=1, checks=("kernel",))
    assert rows[0].check == "kernel" and rows[0].max_error < 1e-5 and "kernel" in ALL_CHECKS
    assert kernel_error(olsm.derive("longhorn_diag"), dims=(1, 21, 1, 4, 3)) < 1e-5


def test_kernel_check_detects_a_broken_kernel(monkeypatch):
    import olsm.kernels.elementwise as elementwise

    real = elementwise.elementwise_scan

    def off(*a, **kw):
        o, S = real(*a, **kw)
        return o * 1.01, S

    monkeypatch.setattr(elementwise, "elementwise_scan", off)
    from olsm.testing import kernel_error

    assert kernel_error(olsm.derive("mamba1"), dims=(1, 21, 1, 4, 3)) > 5e-3
