"""A concrete small instance of the per-token problem, for proofs and affinity checks.

The objective's terms are written in index-free IR symbols (``k_n``, ``beta_j``, ``kk``).
Here they are instantiated on a K×V memory of plain symbols, where sympy can differentiate,
solve and simplify without any matrix-calculus rules.
"""
from __future__ import annotations

import sympy as sp

from .symbols import axes_of, k_n, kk, v_j


class Concrete:
    """K×V symbolic instance: unknown ``S``, previous memory ``X``, key ``k``, value ``v``.

    Args:
        K, V: concrete key and value dimensions (2 or 3 is plenty for a proof).
    """

    def __init__(self, K: int, V: int):
        self.K, self.V = K, V
        self.S = sp.Matrix(K, V, lambda n, j: sp.Symbol(f"S[{n},{j}]", real=True))
        self.X = sp.Matrix(K, V, lambda n, j: sp.Symbol(f"X[{n},{j}]", real=True))
        self.k = [sp.Symbol(f"k[{n}]", real=True) for n in range(K)]
        self.v = [sp.Symbol(f"v[{j}]", real=True) for j in range(V)]
        self.unknowns = list(self.S)

    def pred(self, j: int) -> sp.Expr:
        """(Sᵀk)_j, the memory's prediction of value channel j."""
        return sum(self.S[n, j] * self.k[n] for n in range(self.K))

    def at(self, expr, n=None, j=None) -> sp.Expr:
        """Instantiate an IR expression at key index ``n`` and value index ``j``."""
        expr = sp.sympify(expr)
        subs = {}
        for s in expr.free_symbols:
            if s == k_n:
                subs[s] = self._need(self.k, n, s)
            elif s == v_j:
                subs[s] = self._need(self.v, j, s)
            elif s == kk:
                subs[s] = sum(x**2 for x in self.k)
            else:
                axes = axes_of(s)
                if not axes:
                    continue
                base = s.name[: -len({("K",): "_n", ("V",): "_j", ("V", "K"): "_jn"}[axes])]
                idx = [self._index(j, s) if a == "V" else self._index(n, s) for a in axes]
                subs[s] = sp.Symbol(f"{base}[{','.join(map(str, idx))}]", **s.assumptions0)
        return expr.xreplace(subs)

    @staticmethod
    def _need(seq, i, s):
        if i is None:
            raise ValueError(f"{s} used where its index is not defined")
        return seq[i]

    @staticmethod
    def _index(i, s):
        if i is None:
            raise ValueError(f"{s} used where its index is not defined")
        return i
