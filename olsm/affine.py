"""Is each term quadratic in S? If not, say which term breaks affinity, and why."""
from __future__ import annotations

import sympy as sp

from .concrete import Concrete
from .errors import NonAffineObjectiveError

SUPPORTED = "proximal, decayed_proximal, squared_loss, linear_loss, weight_decay (lp_loss with p = 2)"


def check_affine(objective) -> None:
    """Raise :class:`NonAffineObjectiveError` naming the first term not quadratic in S.

    A term's update contribution is affine in S_{t-1} exactly when its energy is a quadratic
    polynomial in S, i.e. its Hessian w.r.t. S is constant. That is checked on a 2×2 instance.
    """
    ctx = Concrete(2, 2)
    unknowns = set(ctx.unknowns)
    for term in objective.terms:
        energy = term.energy(ctx)
        if energy.has(sp.Piecewise):
            _fail(term, "it is piecewise in S (a different formula on each side of a threshold)")
        for s1 in ctx.unknowns:
            g = sp.diff(energy, s1)
            for s2 in ctx.unknowns:
                h = sp.diff(g, s2)
                if h.free_symbols & unknowns or h.has(sp.DiracDelta, sp.sign, sp.Abs, sp.Piecewise):
                    _fail(term, f"its second derivative ∂²/∂{s1}∂{s2} = {h} depends on S")


def _fail(term, why):
    raise NonAffineObjectiveError(
        f"term {term.label} is not quadratic in S: {why}, so the per-token argmin is not an "
        f"affine function of S_{{t-1}} and has no chunked linear recurrence. olsm compiles "
        f"objectives whose terms are quadratic in S: {SUPPORTED}.")
