"""Prove that a derived recurrence solves the objective as declared.

On concrete symbolic instances (K = 2 and 3 keys, V = 2 values) the *declared* terms are
differentiated directly (no matrix-calculus identities), then:

* implicit: the stationarity system ``A vec(S) = c`` of the total energy is built; A must be
  nonsingular and ``A · closed_form − c`` must simplify to exactly 0, i.e. the closed form
  *is* the linear solve;
* explicit: the anchor is the argmin of the regulariser alone, the gradient of the other
  terms is taken there, and ``anchor − η ∇`` must equal the closed form;
* the IR instantiated on the same instance must equal the closed form (or, with a declared
  diagonal approximation, keep exactly its diagonal), and be affine in S_{t-1}.
"""
from __future__ import annotations

import time

import sympy as sp

from .concrete import Concrete
from .errors import ProofError
from .ir import Proof
from .terms import Proximal


def _zero(expr) -> bool:
    # exp(...) atoms become plain symbols (sound: an identity in independent symbols holds
    # for every value of them); then a rational function is zero iff its numerator expands
    # to zero. simplify is only the fallback.
    plain = expr.xreplace({a: sp.Dummy() for a in expr.atoms(sp.exp)})
    num = sp.expand(sp.numer(sp.together(plain)))
    return num == 0 or sp.simplify(sp.expand(sp.numer(sp.together(expr)))) == 0


def _with_aux(expr, aux):
    for sym, val in reversed(aux):
        expr = expr.xreplace({sym: val})
    return sp.sympify(expr)


def normal_equations(objective, ctx: Concrete):
    """``A vec(S) = c``: the stationarity condition ∇f(S) = 0 of the declared terms.

    Returns:
        ``(A, c)``; A is the Hessian, and must be nonsingular for a unique argmin.
    """
    total = sum(t.energy(ctx) for t in objective.terms)
    grad = [sp.diff(total, s) for s in ctx.unknowns]
    A, c = sp.linear_eq_to_matrix(grad, ctx.unknowns)
    if A.det() == 0:
        raise ProofError(f"{objective.name}: the objective's Hessian is singular, its argmin is not unique")
    return A, c


def truth(objective, ctx: Concrete) -> sp.Matrix:
    """The explicit update computed from the declared terms alone (no closed-form algebra)."""
    energies = [t.energy(ctx) for t in objective.terms]
    total = sum(energies)
    out = sp.zeros(ctx.K, ctx.V)
    reg = sum(e for t, e in zip(objective.terms, energies) if isinstance(t, Proximal))
    grad_reg = [sp.diff(reg, s) for s in ctx.unknowns]
    A, c = sp.linear_eq_to_matrix(grad_reg, ctx.unknowns)
    anchor = dict(zip(ctx.unknowns, _block_solve(A, c, ctx)))
    loss = total - reg
    for idx, s in enumerate(ctx.unknowns):
        out[idx] = anchor[s] - objective.eta * sp.diff(loss, s).xreplace(anchor)
    return out


def _block_solve(A, c, ctx):
    """Solve A s = c, one value column at a time when A is block-diagonal (it is, for
    every column-separable objective); fall back to one full solve otherwise."""
    n = len(ctx.unknowns)
    cols = {j: [i for i, s in enumerate(ctx.unknowns) if s.name.endswith(f",{j}]")] for j in range(ctx.V)}
    separable = all(A[i, m] == 0 for j in cols for i in cols[j] for m in range(n) if m not in cols[j])
    sol = [None] * n
    if not separable:
        return list(A.LUsolve(c))
    for j, idx in cols.items():
        block = A.extract(idx, idx)
        if block.det() == 0:
            raise ProofError("the objective's Hessian is singular: its argmin is not unique")
        for i, val in zip(idx, block.LUsolve(c.extract(idx, [0]))):
            sol[i] = val
    return sol


def closed_exact(closed, ctx: Concrete) -> sp.Matrix:
    """``s_j = (p0 I + p1_j k kᵀ) M x_j + r_j v_j k`` instantiated (before any approximation)."""
    out = sp.zeros(ctx.K, ctx.V)
    for j in range(ctx.V):
        mx = [sp.exp(ctx.at(closed.log_anchor, n, j)) * ctx.X[n, j] for n in range(ctx.K)]
        p0 = ctx.at(_with_aux(closed.p0, closed.aux), j=j)
        p1 = ctx.at(_with_aux(closed.p1, closed.aux), j=j)
        r = ctx.at(_with_aux(closed.r, closed.aux), j=j)
        kmx = sum(ctx.k[m] * mx[m] for m in range(ctx.K))
        for n in range(ctx.K):
            out[n, j] = p0 * mx[n] + p1 * ctx.k[n] * kmx + r * ctx.v[j] * ctx.k[n]
    return out


def ir_update(fields, ctx: Concrete) -> sp.Matrix:
    """The IR's ``S_t`` on the concrete instance."""
    aux = fields["aux"]
    at = lambda e, n=None, j=None: ctx.at(_with_aux(e, aux), n, j)  # noqa: E731
    out = sp.zeros(ctx.K, ctx.V)
    for n in range(ctx.K):
        for j in range(ctx.V):
            write = at(fields["write_key"], n=n) * at(fields["write_value"], j=j)
            if fields["kind"] == "elementwise":
                out[n, j] = at(fields["gate"], n, j) * ctx.X[n, j] + write
                continue
            val = sp.exp(at(fields["log_decay"], n=n)) * ctx.X[n, j]
            for lr in fields["lowrank"]:
                bx = sum(at(lr.b, n=m) * ctx.X[m, j] for m in range(ctx.K))
                val += at(lr.coef) * at(lr.a, n=n) * bx
            out[n, j] = val + write
    return out


def prove(objective, closed, fields, dims=((2, 2), (3, 2))) -> Proof:
    """Run every check; raise :class:`ProofError` on the first that fails.

    Returns:
        A :class:`~olsm.ir.Proof` listing the checks made.
    """
    start = time.perf_counter()
    checks = []
    for K, V in dims:
        ctx = Concrete(K, V)
        got = ir_update(fields, ctx)
        approx = fields["approximation"] is not None
        # without an approximation the IR itself is checked against the declared terms;
        # with one, the exact closed form is, and the IR must be its declared approximation
        exact = closed_exact(closed, ctx) if approx else got
        if objective.update == "implicit":
            # A nonsingular and A·S* = c  <=>  S* is the (unique) solution of the linear solve
            A, c = normal_equations(objective, ctx)
            gap = A * exact.reshape(K * V, 1) - c
            how = "solution of the normal equations ∇f = 0 (A nonsingular, A·S* = c)"
        else:
            gap = exact - truth(objective, ctx)
            how = "anchor − η∇L(anchor)"
        what = "exact closed form" if approx else f"IR ({fields['kind']}) update"
        for idx in range(K * V):
            if not _zero(gap[idx]):
                raise ProofError(
                    f"{objective.name}: {what} is not the {how} at K={K}, V={V}, "
                    f"entry {idx}: residual {sp.simplify(gap[idx])}")
        checks.append(f"{what} == {how} of the declared terms (K={K}, V={V})")
        if fields["approximation"] == "diagonal":
            for n in range(K):
                for j in range(V):
                    g_exact = sp.diff(exact[n, j], ctx.X[n, j])
                    if not _zero(sp.diff(got[n, j], ctx.X[n, j]) - g_exact):
                        raise ProofError(f"{objective.name}: gate is not the diagonal of the transition")
                    w_exact = exact[n, j].xreplace({x: 0 for x in ctx.X})
                    if not _zero(got[n, j].xreplace({x: 0 for x in ctx.X}) - w_exact):
                        raise ProofError(f"{objective.name}: write term changed by the approximation")
            checks.append(f"IR gate == diagonal of the exact transition, write term exact (K={K}, V={V})")
        X = set(ctx.X)
        for idx in range(K * V):
            for x in X:
                if sp.diff(got[idx], x).free_symbols & X:
                    raise ProofError(f"{objective.name}: update is not affine in S_{{t-1}}")
        checks.append(f"update affine in S_{{t-1}} (K={K}, V={V})")
    status = "proved" if fields["approximation"] is None else f"proved (exact), then {fields['approximation']} approximation as declared"
    return Proof(status, tuple(checks), time.perf_counter() - start)
