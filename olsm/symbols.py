"""The sympy symbols every IR expression is written in.

An IR coefficient is a scalar sympy expression of per-token and per-head quantities. Which
axis a symbol varies along is part of its name, so expressions need no index objects:

======================  =============================  ==============================
symbol                  meaning                        tensor it stands for
======================  =============================  ==============================
``k_n``                 key component n                k ``[B, T, H, K]``
``v_j``                 value component j              v ``[B, T, H, V]``
``kk``                  kᵀk                            ``(k * k).sum(-1)`` ``[B, T, H]``
``NAME``                per-token per-head input       ``[B, T, H]``
``NAME_n``              per-token per-key input        ``[B, T, H, K]``
``NAME_j``              per-token per-value input      ``[B, T, H, V]``
``NAME`` (param)        fixed per head                 ``[H]``
``NAME_n`` (param)      fixed per head and key         ``[H, K]``
``NAME_j`` (param)      fixed per head and value       ``[H, V]``
``NAME_jn`` (param)     fixed per head, value, key     ``[H, V, K]`` (Mamba-1's A)
======================  =============================  ==============================

Derived coefficients (``eps = beta / (1 + beta*kk)``) are auxiliary symbols defined in the
Recurrence's ``aux`` list, named the same way (``eps`` or ``eps_j``).
"""
from __future__ import annotations

import sympy as sp

#: index suffix -> axes the symbol varies along (besides B, T, H)
SUFFIX_AXES = {"": (), "_n": ("K",), "_j": ("V",), "_jn": ("V", "K")}

k_n = sp.Symbol("k_n", real=True)
v_j = sp.Symbol("v_j", real=True)
kk = sp.Symbol("kk", nonnegative=True)


class FixedSymbol(sp.Symbol):
    """The symbol of a per-head parameter (``Param``): distinct from a per-token input of the
    same name (RetNet's fixed ``log_alpha [H]`` is not Mamba-2's ``log_alpha [B, T, H]``),
    while printing, lambdifying and naming exactly like a plain Symbol."""

    def _hashable_content(self):
        return super()._hashable_content() + ("fixed",)


def indexed(name: str, axes: tuple, per_token: bool = True, **assumptions) -> sp.Symbol:
    """The symbol of a quantity named ``name`` varying along ``axes`` (subset of K, V).

    ``per_token=False`` gives a :class:`FixedSymbol` (a parameter fixed per head).
    """
    suffix = {(): "", ("K",): "_n", ("V",): "_j", ("V", "K"): "_jn"}[tuple(axes)]
    cls = sp.Symbol if per_token else FixedSymbol
    return cls(name + suffix, real=True, **assumptions)


def axes_of(symbol: sp.Symbol) -> tuple:
    """Axes (subset of ("V", "K")) a symbol varies along, read from its name."""
    for suffix in ("_jn", "_n", "_j"):
        if symbol.name.endswith(suffix):
            return SUFFIX_AXES[suffix]
    return ()


def expr_axes(expr: sp.Expr) -> tuple:
    """Axes an expression varies along: the union of its symbols' axes, ordered (V, K)."""
    found = set()
    for s in expr.free_symbols:
        found.update(axes_of(s))
    return tuple(a for a in ("V", "K") if a in found)
