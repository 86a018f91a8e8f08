"""What a coefficient input of a recurrence is: name, shape, constraint.

Coefficients are either per-token (``beta [B, T, H]``, ``log_alpha [B, T, H, K]``) or fixed
per head (RetNet's ``log_alpha [H]``, Mamba-1's ``A [H, V, K]``). The axes say which of
K and V the input varies along besides (B, T, H) or (H).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import sympy as sp

from .symbols import indexed

#: constraint name -> (predicate on a tensor, words for the error message)
CONSTRAINTS = ("positive", "nonnegative", "nonpositive", "negative", None)


@dataclass(frozen=True)
class InputSpec:
    """One coefficient a recurrence takes as a keyword argument.

    Attributes:
        name: keyword name (``beta``, ``log_alpha``, ``dt``, ``A``).
        axes: subset of ``("V", "K")`` in that order: the axes besides batch/time/head.
        per_token: ``True`` for ``[B, T, H, ...]`` inputs, ``False`` for ``[H, ...]`` params.
        constraint: one of ``positive``, ``nonnegative``, ``nonpositive``, ``negative`` or None.
        doc: one line for ``olsm derive`` and error messages.
    """

    name: str
    axes: Tuple[str, ...] = ()
    per_token: bool = True
    constraint: Optional[str] = None
    doc: str = ""

    def __post_init__(self):
        if self.constraint not in CONSTRAINTS:
            raise ValueError(f"constraint must be one of {CONSTRAINTS}, got {self.constraint!r}")
        if tuple(self.axes) not in ((), ("K",), ("V",), ("V", "K")):
            raise ValueError(f"axes must be (), ('K',), ('V',) or ('V', 'K'), got {self.axes!r}")
        if self.per_token and self.axes == ("V", "K"):
            raise ValueError("per-token inputs of shape [B, T, H, V, K] are not supported")

    @property
    def symbol(self) -> sp.Symbol:
        """The sympy symbol standing for this input inside IR expressions."""
        assumptions = {}
        if self.constraint:
            assumptions[self.constraint] = True
        return indexed(self.name, self.axes, self.per_token, **assumptions)

    @property
    def shape(self) -> str:
        """Human-readable shape, e.g. ``[B, T, H, V]`` or ``[H, V, K]``."""
        lead = ["B", "T", "H"] if self.per_token else ["H"]
        return "[" + ", ".join(lead + list(self.axes)) + "]"

    def expected_shape(self, B: int, T: int, H: int, K: int, V: int) -> tuple:
        """The concrete shape this input must have for the given sizes."""
        size = {"K": K, "V": V}
        lead = (B, T, H) if self.per_token else (H,)
        return lead + tuple(size[a] for a in self.axes)
