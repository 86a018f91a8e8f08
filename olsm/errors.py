"""Errors olsm raises. Each one says what went wrong and what to do about it."""


class OlsmError(Exception):
    """Base class of every error olsm raises on purpose."""


class ObjectiveError(OlsmError, ValueError):
    """The objective is malformed (unknown term, two anchors, bad option)."""


class NonAffineObjectiveError(ObjectiveError):
    """A term is not quadratic in S, so the update is not affine in S_{t-1}."""


class UnsupportedObjectiveError(ObjectiveError):
    """The objective is affine but its recurrence has no class in the IR."""


class ProofError(OlsmError, AssertionError):
    """sympy could not confirm that the closed form solves the declared objective."""


class InputError(OlsmError, ValueError):
    """A tensor passed to a recurrence or layer has the wrong shape, dtype, device or value."""


class BackendError(OlsmError, RuntimeError):
    """The requested backend cannot run here (no CUDA, old Triton, unsupported size)."""
