"""Check your own objectives the way olsm checks its catalogue.

    from olsm.testing import check_objective
    check_objective(my_objective)          # raises AssertionError naming what failed
    check_objective(my_objective, checks=ALL_CHECKS)   # + the Triton kernels against the reference

With hypothesis::

    from hypothesis import given
    from olsm.testing.strategies import objectives

    @given(objectives())
    def test_mine(obj): ...
"""
from .argmin import declared_gate_and_write, declared_update
from .checks import (
    ALL_CHECKS,
    CHECKS,
    CheckResult,
    argmin_error,
    check_objective,
    chunked_error,
    kernel_error,
    rel_err,
    run_check,
    split_error,
)
from .inputs import random_coefficient, random_inputs

__all__ = ["check_objective", "run_check", "CHECKS", "ALL_CHECKS", "CheckResult", "argmin_error", "chunked_error",
           "split_error", "kernel_error", "rel_err", "declared_update", "declared_gate_and_write", "random_inputs",
           "random_coefficient"]
