"""The recurrence IR: what the compiler emits, whatever the objective.

Two classes (DESIGN §3):

* ``matrix``: ``S_t = (diag(exp(log_decay)) + Σ_r coef_r a_r b_rᵀ) S_{t-1} + w uᵀ``
* ``elementwise``: ``S_t = G ⊙ S_{t-1} + w uᵀ`` with ``G[n, j]`` a scalar expression of
  per-key (``_n``) and per-value (``_j``) symbols, never materialised by fast kernels.

Every coefficient is a sympy expression in the symbols of :mod:`olsm.symbols`; ``aux``
holds named sub-expressions (``eps = beta / (1 + beta*kk)``) that are evaluated first, in
order. The IR knows no backend: backends read these expressions (lambdified to torch by
:mod:`olsm.materialize`, printed to Triton by the kernels' code generator).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

import sympy as sp

from .spec import InputSpec


@dataclass(frozen=True)
class LowRank:
    """One rank-one term ``coef · a bᵀ`` of a matrix transition.

    Attributes:
        coef: per-head scalar expression (no ``_n``/``_j`` symbols).
        a, b: per-key vector expressions (only ``_n`` and per-head symbols).
    """

    coef: sp.Expr
    a: sp.Expr
    b: sp.Expr

    @property
    def is_delta(self) -> bool:
        """True for the delta-rule form ``coef · k kᵀ`` (WY representation applies)."""
        from .symbols import k_n

        return sp.simplify(self.a - k_n) == 0 and sp.simplify(self.b - k_n) == 0


@dataclass(frozen=True)
class Proof:
    """What sympy established about the closed form.

    Attributes:
        status: ``"proved"`` (closed form == solve/gradient step on concrete dimensions)
            or ``"proved+approximation"`` when a declared approximation was applied after.
        checks: human-readable lines, one per check made.
        seconds: time the proof took.
    """

    status: str
    checks: Tuple[str, ...]
    seconds: float = 0.0


@dataclass(frozen=True, eq=False)
class RecurrenceIR:
    """The data of a derived recurrence (see :class:`olsm.Recurrence` for the callable).

    Attributes:
        name: objective name.
        kind: ``"matrix"`` or ``"elementwise"``.
        inputs: coefficient inputs, in keyword order.
        aux: ``((symbol, expr), ...)`` definitions evaluated in order before the rest.
        write_key: expression of the written key k̃ (axes ⊆ K).
        write_value: expression of the written value ṽ (axes ⊆ V).
        log_decay: matrix class: log of the diagonal part (0: identity; axes () or K).
        lowrank: matrix class: rank-one terms.
        gate: elementwise class: G (axes ⊆ (V, K)).
        approximation: ``None`` or the declared approximation (``"diagonal"``).
        proof: what was proved.
    """

    name: str
    kind: str
    inputs: Tuple[InputSpec, ...]
    aux: Tuple[Tuple[sp.Symbol, sp.Expr], ...]
    write_key: sp.Expr
    write_value: sp.Expr
    log_decay: sp.Expr = sp.Integer(0)
    lowrank: Tuple[LowRank, ...] = ()
    gate: Optional[sp.Expr] = None
    approximation: Optional[str] = None
    proof: Optional[Proof] = None
    objective: Any = field(default=None, repr=False)

    @functools.cached_property
    def is_delta_form(self) -> bool:
        """True for ``S_t = (diag(e^g) − c k kᵀ) S_{t−1} + k ũᵀ``: one delta-rule term and the
        written key is k itself (DeltaNet, gated DeltaNet, Longhorn, gated Longhorn), which the
        Triton backend runs with one effective value per token (``olsm.kernels.matrix.chunk_delta``)."""
        from .symbols import k_n

        return (self.kind == "matrix" and len(self.lowrank) == 1 and self.lowrank[0].is_delta
                and sp.simplify(self.write_key - k_n) == 0)
