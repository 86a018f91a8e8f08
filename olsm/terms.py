"""Terms an objective is built from.

Each term knows two things:

* ``energy(ctx)``: its literal formula on a concrete problem (K×V matrix of symbols) —
  what the proof and the affinity check differentiate; this is the *declaration*.
* ``contribute(q)``: its share of the structured quadratic form per value column j,
  ``½ s_jᵀ (d I + b_j k kᵀ) s_j − (ρ M x_j + e_j v_j k)ᵀ s_j`` — what the closed-form
  derivation uses. The proof checks that the two agree.

Notation: ``S`` the new memory, ``X`` = S_{t-1}, ``r_j = (Sᵀk)_j − v_j``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import sympy as sp

from .errors import NonAffineObjectiveError, ObjectiveError
from .symbols import expr_axes


class Quadratic:
    """Accumulates the structured quadratic form of an objective (per value column j).

    Attributes:
        prox_weight: ρ, weight of the proximal term (the regulariser).
        log_anchor: log of the anchor map M (0: identity; axes (), K or (V, K)).
        mu: total weight decay.
        curvature: b_j, total weight of squared losses (axes () or V).
        write: e_j, total weight on k v_jᵀ in the linear part (axes () or V).
        regularizer: label of the regulariser term.
    """

    def __init__(self):
        self.prox_weight = sp.Integer(0)
        self.log_anchor = sp.Integer(0)
        self.mu = sp.Integer(0)
        self.curvature = sp.Integer(0)
        self.write = sp.Integer(0)
        self.regularizer = None


class Term:
    """Base class. Subclasses set ``label`` and implement the methods below."""

    label = "term"

    def exprs(self) -> Tuple[sp.Expr, ...]:
        """Every coefficient expression the term uses (to find its inputs)."""
        return ()

    def energy(self, ctx) -> sp.Expr:  # pragma: no cover - abstract
        raise NotImplementedError

    def contribute(self, q: Quadratic) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def formula(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def __add__(self, other):
        return TermSum((self,)) + other

    def __repr__(self):
        return self.label

    # terms are values: two declarations of the same term are equal, so derive's cache hits
    def _key(self):
        return (type(self), self.label, self.exprs())

    def __eq__(self, other):
        return isinstance(other, Term) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())


@dataclass(frozen=True)
class TermSum:
    """A sum of terms (what ``+`` builds)."""

    terms: Tuple[Term, ...]

    def __add__(self, other):
        if isinstance(other, Term):
            return TermSum(self.terms + (other,))
        if isinstance(other, TermSum):
            return TermSum(self.terms + other.terms)
        return NotImplemented


def _s(x) -> sp.Expr:
    # 0.1 -> 1/10: exact constants keep the proof exact and the printout readable
    if isinstance(x, float):
        return sp.nsimplify(x, rational=True)
    return sp.sympify(x)


def _axes_subset(expr, allowed, what):
    axes = expr_axes(expr)
    if not set(axes) <= set(allowed):
        raise ObjectiveError(f"{what} may vary along {allowed or 'no axis'} only, but {expr} varies along {axes}")


def _str(x) -> str:
    from .pretty import text  # paper symbols: beta -> β, exp(log_alpha) -> α

    return text(x)


# --------------------------------------------------------------------------- regulariser

class Proximal(Term):
    """``(ρ/2) ‖S − M(S_{t-1})‖²_F``: stay close to the (decayed) old memory.

    ``M`` is the identity, ``α·`` (log_decay per head), ``diag(α)`` (per key) or ``G ⊙``
    (log_decay varying per value and key, Mamba-1's ``exp(Δ_j A_{j,n})``).
    """

    def __init__(self, log_decay=0, weight=1):
        self.log_decay = _s(log_decay)
        self.weight = _s(weight)
        _axes_subset(self.log_decay, ("V", "K"), "a proximal log-decay")
        _axes_subset(self.weight, (), "a proximal weight")
        if self.log_decay == 0:
            self.label = "proximal()"
        else:
            self.label = f"proximal(log_decay={_str(self.log_decay)})"

    def exprs(self):
        return (self.log_decay, self.weight)

    def energy(self, ctx):
        total = 0
        for n in range(ctx.K):
            for j in range(ctx.V):
                m = sp.exp(ctx.at(self.log_decay, n, j))
                total += (ctx.S[n, j] - m * ctx.X[n, j]) ** 2
        return ctx.at(self.weight) / 2 * total

    def contribute(self, q):
        if q.regularizer is not None:
            raise ObjectiveError(
                f"an objective has one proximal regulariser; got {q.regularizer} and {self.label}. "
                "Fold the decays into one log_decay.")
        q.regularizer = self.label
        q.prox_weight = self.weight
        q.log_anchor = self.log_decay

    def formula(self):
        w = "" if self.weight == 1 else f"{_str(self.weight)}·"
        if self.log_decay == 0:
            return f"{w}½‖S − S_{{t-1}}‖²"
        return f"{w}½‖S − {_str(sp.exp(self.log_decay))} ⊙ S_{{t-1}}‖²"


def proximal(log_decay=0, weight=1) -> Proximal:
    """``(weight/2)‖S − exp(log_decay) ⊙ S_{t-1}‖²``; see :class:`Proximal`."""
    return Proximal(log_decay, weight)


def decayed_proximal(log_alpha, weight=1) -> Proximal:
    """``½‖S − diag(α) S_{t-1}‖²`` with ``α = exp(log_alpha)`` (per head or per key)."""
    return Proximal(log_alpha, weight)


def weight_decay(mu) -> "WeightDecay":
    """``(μ/2)‖S‖²_F``: shrink the memory."""
    return WeightDecay(mu)


class WeightDecay(Term):
    def __init__(self, mu):
        self.mu = _s(mu)
        _axes_subset(self.mu, (), "weight decay")
        self.label = f"weight_decay({_str(self.mu)})"

    def exprs(self):
        return (self.mu,)

    def energy(self, ctx):
        return ctx.at(self.mu) / 2 * sum(ctx.S[n, j] ** 2 for n in range(ctx.K) for j in range(ctx.V))

    def contribute(self, q):
        q.mu += self.mu

    def formula(self):
        return f"({_str(self.mu)}/2)‖S‖²"


# --------------------------------------------------------------------------- losses

class LinearLoss(Term):
    """``−Σ_j w_j (Sᵀk)_j v_j``: the Hebbian loss of linear attention (w per value: Mamba's Δ)."""

    def __init__(self, weight=1):
        self.weight = _s(weight)
        _axes_subset(self.weight, ("V",), "a linear-loss weight")
        self.label = "linear_loss()" if self.weight == 1 else f"linear_loss({_str(self.weight)})"

    def exprs(self):
        return (self.weight,)

    def energy(self, ctx):
        return -sum(ctx.at(self.weight, j=j) * ctx.pred(j) * ctx.v[j] for j in range(ctx.V))

    def contribute(self, q):
        q.write += self.weight

    def formula(self):
        w = "" if self.weight == 1 else f"{_str(self.weight)}·"
        return f"−{w}⟨Sᵀk, v⟩"


class SquaredLoss(Term):
    """``Σ_j (β_j/2)((Sᵀk)_j − v_j)²``: the regression loss of the delta rule / Longhorn."""

    def __init__(self, beta=1):
        self.beta = _s(beta)
        _axes_subset(self.beta, ("V",), "a squared-loss weight")
        self.label = f"squared_loss({_str(self.beta)})"

    def exprs(self):
        return (self.beta,)

    def energy(self, ctx):
        return sum(ctx.at(self.beta, j=j) / 2 * (ctx.pred(j) - ctx.v[j]) ** 2 for j in range(ctx.V))

    def contribute(self, q):
        q.curvature += self.beta
        q.write += self.beta

    def formula(self):
        return f"({_str(self.beta)}/2)‖Sᵀk − v‖²"


class LpLoss(Term):
    """``Σ_j (β_j/p)|(Sᵀk)_j − v_j|^p``. Only p = 2 gives an affine update."""

    def __init__(self, p, beta=1):
        self.p = _s(p)
        self.beta = _s(beta)
        self.label = f"lp_loss(p={_str(self.p)}, beta={_str(self.beta)})"

    def exprs(self):
        return (self.beta,)

    def energy(self, ctx):
        return sum(ctx.at(self.beta, j=j) / self.p * sp.Abs(ctx.pred(j) - ctx.v[j]) ** self.p
                   for j in range(ctx.V))

    def contribute(self, q):
        if self.p == 2:
            return SquaredLoss(self.beta).contribute(q)
        raise NonAffineObjectiveError(f"{self.label} is not quadratic in S (p = {self.p} ≠ 2)")

    def formula(self):
        return f"({_str(self.beta)}/{_str(self.p)})‖Sᵀk − v‖_{_str(self.p)}^{_str(self.p)}"


class HuberLoss(Term):
    """Huber loss of the residual: quadratic inside ``|r| ≤ δ``, linear outside (not affine)."""

    def __init__(self, delta=1, beta=1):
        self.delta = _s(delta)
        self.beta = _s(beta)
        self.label = f"huber_loss(delta={_str(self.delta)}, beta={_str(self.beta)})"

    def exprs(self):
        return (self.beta, self.delta)

    def energy(self, ctx):
        total = 0
        for j in range(ctx.V):
            r = ctx.pred(j) - ctx.v[j]
            d = ctx.at(self.delta)
            total += ctx.at(self.beta, j=j) * sp.Piecewise(
                (r**2 / 2, sp.Abs(r) <= d), (d * (sp.Abs(r) - d / 2), True))
        return total

    def contribute(self, q):
        raise NonAffineObjectiveError(f"{self.label} is piecewise in S")

    def formula(self):
        return f"{_str(self.beta)}·Huber_{_str(self.delta)}(Sᵀk − v)"


def linear_loss(weight=1) -> LinearLoss:
    """``−Σ_j w_j (Sᵀk)_j v_j`` (Hebbian; w per head or per value channel)."""
    return LinearLoss(weight)


def squared_loss(beta=1) -> SquaredLoss:
    """``Σ_j (β_j/2)((Sᵀk)_j − v_j)²`` (β per head or per value channel)."""
    return SquaredLoss(beta)


def lp_loss(p, beta=1) -> LpLoss:
    """``Σ_j (β/p)|(Sᵀk)_j − v_j|^p``; compiles only for p = 2."""
    return LpLoss(p, beta)


def huber_loss(delta=1, beta=1) -> HuberLoss:
    """Huber loss of the prediction error; declared so olsm can explain why it won't compile."""
    return HuberLoss(delta, beta)
