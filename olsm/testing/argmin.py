"""The update an objective *declares*, computed numerically (float64, autograd, no algebra).

The derived recurrence must equal:

* implicit: the minimiser of the declared energy, found by one Newton step from S = 0 with
  the autograd Hessian (exact, since the energy is quadratic in S — olsm checked that);
* explicit: ``anchor − η ∇L(anchor)``, anchor = minimiser of the proximal term alone;
* with ``approximation="diagonal"``: the exact update's diagonal Jacobian ∂S_t[n,j]/∂S_{t-1}[n,j]
  (the gate) and its value at S_{t-1} = 0 (the write term).
"""
from __future__ import annotations

import functools

import sympy as sp
import torch

from ..concrete import Concrete
from ..terms import Proximal


@functools.lru_cache(maxsize=256)
def _energy_fns(objective, K: int, V: int):
    """Lambdified (regulariser, rest) energies on a K×V instance, and their symbol lists."""
    ctx = Concrete(K, V)
    reg = sum((t.energy(ctx) for t in objective.terms if isinstance(t, Proximal)), sp.Integer(0))
    rest = sum((t.energy(ctx) for t in objective.terms if not isinstance(t, Proximal)), sp.Integer(0))
    syms = sorted((reg + rest).free_symbols | set(ctx.S) | set(ctx.X), key=lambda s: s.name)
    mods = [{"exp": torch.exp, "Abs": torch.abs, "log": torch.log}]
    return ctx, syms, sp.lambdify(syms, reg, modules=mods), sp.lambdify(syms, rest, modules=mods)


def _values(ctx, syms, S, X, k, v, coefs, specs):
    """Numbers for every concrete symbol, by name (``k[1]``, ``beta[0]``, ``A[1,0]``...)."""
    table = {}
    for n in range(ctx.K):
        table[f"k[{n}]"] = k[n]
        for j in range(ctx.V):
            table[f"S[{n},{j}]"] = S[n, j]
            table[f"X[{n},{j}]"] = X[n, j]
    for j in range(ctx.V):
        table[f"v[{j}]"] = v[j]
    for spec in specs:
        x = coefs[spec.name]
        if spec.axes == ():
            table[spec.name] = x
        elif spec.axes == ("V", "K"):
            for j in range(ctx.V):
                for n in range(ctx.K):
                    table[f"{spec.name}[{j},{n}]"] = x[j, n]
        else:
            for i in range(x.shape[-1]):
                table[f"{spec.name}[{i}]"] = x[i]
    return [table[s.name] for s in syms]


def declared_update(objective, specs, X, k, v, coefs):
    """S_t for one head and token from the declared energy.

    Args:
        objective: the Objective.
        specs: its InputSpecs (``derive(objective).inputs``).
        X: S_{t-1} ``[K, V]`` float64; k ``[K]``; v ``[V]``.
        coefs: per-token coefficients for this token and head (``beta`` scalar or ``[V]``...),
            params for this head (``A [V, K]``).

    Returns:
        S_t ``[K, V]`` (for ``approximation="diagonal"``: the exact update, see module doc).
    """
    K, V = X.shape
    ctx, syms, reg_fn, rest_fn = _energy_fns(objective, K, V)

    def f(fn, S):
        return fn(*_values(ctx, syms, S, X, k, v, coefs, specs))

    def newton(fn):
        zero = torch.zeros(K, V, dtype=torch.float64)
        # create_graph keeps the solve differentiable in S_{t-1} (the diagonal check needs it)
        g = torch.autograd.functional.jacobian(lambda S: f(fn, S), zero, create_graph=True).reshape(-1)
        Hm = torch.autograd.functional.hessian(lambda S: f(fn, S), zero, create_graph=True).reshape(K * V, K * V)
        return torch.linalg.solve(Hm, -g).reshape(K, V)

    if objective.update == "implicit":
        return newton(lambda *a: reg_fn(*a) + rest_fn(*a))
    anchor = newton(reg_fn)
    grad = torch.autograd.functional.jacobian(lambda S: f(rest_fn, S), anchor, create_graph=True)
    eta = objective.eta
    eta = float(eta) if eta.is_number else coefs[str(eta).removesuffix("_j").removesuffix("_n")]
    return anchor - eta * grad


def declared_gate_and_write(objective, specs, X, k, v, coefs):
    """Diagonal of the exact transition (the gate) and the write term, by autograd.

    Returns:
        ``(G [K, V], W [K, V])`` with ``S_t ≈ G ⊙ S_{t-1} + W`` the declared diagonal form.
    """
    Xg = X.detach().clone().requires_grad_(True)
    W = declared_update(objective, specs, torch.zeros_like(X), k, v, coefs).detach()
    S = declared_update(objective, specs, Xg, k, v, coefs)
    G = torch.zeros_like(X)
    for n in range(X.shape[0]):
        for j in range(X.shape[1]):
            G[n, j] = torch.autograd.grad(S[n, j], Xg, retain_graph=True)[0][n, j]
    return G, W
