"""From an objective to a proven recurrence.

Every supported objective is, per value column j, the quadratic

    f(s_j) = ½ s_jᵀ (d I + b_j k kᵀ) s_j − (ρ M x_j + e_j v_j k)ᵀ s_j + const

(d = ρ + μ). The implicit update solves it with Sherman–Morrison,

    s_j = (ρ/d) (I − ε_j k kᵀ) M x_j + (e_j/d)(1 − ε_j kᵀk) v_j k,   ε_j = b_j / (d + b_j kᵀk),

and the explicit update takes one step of size η on the losses from the anchor M x_j,

    s_j = ((1 − ημ) I − η b_j k kᵀ) M x_j + η e_j v_j k.

Both read ``s_j = (p0 I + p1_j k kᵀ) M x_j + r_j v_j k``; :func:`classify` maps that onto
the IR and :mod:`olsm.proof` checks it against the declared terms.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Optional

import sympy as sp

from .affine import check_affine
from .errors import ObjectiveError, UnsupportedObjectiveError
from .ir import LowRank
from .objective import Objective
from .symbols import expr_axes, indexed, k_n, kk, v_j
from .terms import Quadratic


@dataclass(frozen=True)
class Closed:
    """The exact per-column closed form ``s_j = (p0 I + p1_j k kᵀ) M x_j + r_j v_j k``.

    Attributes:
        p0, p1, r: coefficient expressions (p1 and r may use the aux symbol ``eps``).
        log_anchor: log of M (axes (), K or (V, K)).
        aux: ``((symbol, expr), ...)``.
    """

    p0: sp.Expr
    p1: sp.Expr
    r: sp.Expr
    log_anchor: sp.Expr
    aux: tuple


def quadratic_form(objective: Objective) -> Quadratic:
    """Collect every term's share of the structured quadratic form."""
    q = Quadratic()
    for term in objective.terms:
        term.contribute(q)
    return q


def closed_form(objective: Objective, q: Quadratic) -> Closed:
    """Solve (implicit) or step (explicit) the quadratic form in closed form."""
    if q.regularizer is None:
        raise ObjectiveError(
            f"objective {objective.name!r} has no proximal term: the {objective.update} update needs "
            "one (proximal() or decayed_proximal(log_alpha)) to anchor S_t to S_{t-1}")
    rho, mu, b, e = q.prox_weight, q.mu, q.curvature, q.write
    aux = ()
    if objective.update == "implicit":
        d = rho + mu
        p0 = sp.simplify(rho / d)
        if b != 0:
            eps_expr = sp.factor(sp.simplify(b / (d + b * kk)))
            eps = indexed("eps", expr_axes(eps_expr), positive=True)
            aux = ((eps, eps_expr),)
            p1 = -p0 * eps
            r_full = sp.simplify(e / d * (1 - eps_expr * kk))
            ratio = sp.simplify(r_full / eps_expr)
            # print the write coefficient through ε when that removes kᵀk (Longhorn: r = ε)
            r = ratio * eps if kk not in ratio.free_symbols else r_full
        else:
            p1 = sp.Integer(0)
            r = sp.simplify(e / d)
    else:
        eta = objective.eta
        p0 = sp.simplify(1 - eta * mu)
        p1 = sp.simplify(-eta * b)
        r = sp.simplify(eta * e)
    return Closed(p0, p1, r, q.log_anchor, aux)


def classify(objective: Objective, c: Closed) -> dict:
    """Map a closed form onto the IR: matrix (diagonal + low rank) or elementwise gate.

    Returns:
        keyword arguments for :class:`olsm.ir.RecurrenceIR` (kind, write_*, log_decay,
        lowrank, gate, approximation).
    """
    anchor_axes = expr_axes(c.log_anchor)
    column_dependent = "V" in anchor_axes or "V" in expr_axes(c.p1)
    common = dict(write_key=k_n, write_value=sp.simplify(c.r * v_j), aux=c.aux,
                  approximation=objective.approximation)
    if column_dependent and c.p1 != 0 and objective.approximation != "diagonal":
        raise UnsupportedObjectiveError(
            f"objective {objective.name!r}: each value column j gets its own transition "
            f"({c.p0} I + {c.p1} k kᵀ) M, which is neither one matrix for all columns nor an "
            "elementwise gate. Declare approximation='diagonal' to keep only its diagonal "
            "(the Longhorn paper's form), or make the loss weight per head.")
    if column_dependent or objective.approximation == "diagonal":
        gate = (c.p0 + c.p1 * k_n**2) * sp.exp(c.log_anchor)
        return dict(kind="elementwise", gate=sp.simplify(gate), **common)
    log_decay = sp.simplify(sp.expand_log(sp.log(c.p0), force=True) + c.log_anchor)
    lowrank = ()
    if c.p1 != 0:
        if anchor_axes:  # diag(α) per key: (p0 I + p1 k kᵀ) diag(α) = p0 diag(α) + p1 k (α⊙k)ᵀ
            lowrank = (LowRank(c.p1, k_n, sp.exp(c.log_anchor) * k_n),)
        else:  # α scalar folds into the rank-one coefficient
            lowrank = (LowRank(sp.simplify(c.p1 * sp.exp(c.log_anchor)), k_n, k_n),)
    return dict(kind="matrix", log_decay=log_decay, lowrank=lowrank, **common)


_CACHE: dict = {}
_LOCK = threading.Lock()


def derive(objective, *, prove: bool = True):
    """Derive, prove and classify the recurrence of an objective (cached).

    Args:
        objective: an :class:`~olsm.objective.Objective`, a catalogue name (``"longhorn"``)
            or ``"path/to/file.py:NAME"``.
        prove: run the sympy proof (default). Turning it off is for debugging only.

    Returns:
        A frozen :class:`olsm.Recurrence`.

    Raises:
        NonAffineObjectiveError: a term is not quadratic in S (the message names it).
        UnsupportedObjectiveError: affine, but not a class the IR has.
        ProofError: the closed form does not solve the declared objective.
    """
    from .load import load_objective
    from .proof import prove as run_proof
    from .recurrence import Recurrence

    objective = load_objective(objective)
    key = (objective, prove)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
    start = time.perf_counter()
    inputs = tuple(c.spec for c in objective.coefficients)
    check_affine(objective)
    closed = closed_form(objective, quadratic_form(objective))
    fields = classify(objective, closed)
    proof = run_proof(objective, closed, fields) if prove else None
    rec = Recurrence(name=objective.name, inputs=inputs, proof=proof, objective=objective, **fields)
    object.__setattr__(rec, "derive_seconds", time.perf_counter() - start)
    with _LOCK:
        _CACHE[key] = rec
    return rec
