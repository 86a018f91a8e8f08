"""What the kernels of one elementwise-gate recurrence compute, before any source exists.

A recurrence of the elementwise class (DESIGN §3, class 2) is

    S_t = G_t ⊙ S_{t-1} + k̃_t ṽ_tᵀ,      o_t = scale · S_tᵀ q_t  (+ D ⊙ v_t)

with ``G_t[n, j]``, ``k̃_t[n]`` and ``ṽ_t[j]`` scalar sympy expressions of per-token factors
(``k_n``, ``v_j``, ``kk``, the coefficient inputs). :class:`Plan` expands the ``aux``
definitions, checks that every symbol is one a kernel can load, and differentiates G, k̃, ṽ
with respect to every factor with ``sp.diff``, so the backward's chain rule needs no
hand-written code per objective.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import sympy as sp

from olsm.errors import BackendError
from olsm.symbols import expr_axes

#: the factor symbols every recurrence may use besides its coefficient inputs
BUILTIN = ("k_n", "v_j", "kk")

_AXES_CODE = {(): "", ("K",): "K", ("V",): "V", ("V", "K"): "VK"}


@dataclass(frozen=True)
class Factor:
    """One symbol the kernel loads or computes per token (or once per head for params).

    Attributes:
        name: the sympy symbol's name (``beta_j``, ``k_n``, ``A_jn``).
        input: the coefficient keyword name (``beta``) or ``None`` for k, v, kk.
        axes: ``""``, ``"K"``, ``"V"`` or ``"VK"``.
        per_token: whether it changes with t.
    """

    name: str
    input: Optional[str]
    axes: str
    per_token: bool

    @property
    def var(self) -> str:
        """The kernel variable holding the factor, broadcastable to the [BT, BK, BV] tile."""
        return "s_" + self.name


@dataclass(frozen=True)
class Partial:
    """∂(coefficient)/∂(factor): one non-zero partial derivative the backward needs.

    Attributes:
        of: ``"G"``, ``"wk"`` (k̃) or ``"wv"`` (ṽ).
        factor: the factor's symbol name.
        expr: the derivative (aux expanded).
    """

    of: str
    factor: str
    expr: sp.Expr


def _expand_aux(expr: sp.Expr, defs: Dict[str, sp.Expr]) -> sp.Expr:
    """Replace auxiliary symbols by their (already expanded) definitions, matched by name."""
    expr = sp.sympify(expr)
    sub = {s: defs[s.name] for s in expr.free_symbols if s.name in defs}
    return expr.xreplace(sub) if sub else expr


def _drop_delta(expr: sp.Expr) -> sp.Expr:
    """Derivatives of Max/Abs/Heaviside carry DiracDelta terms: zero almost everywhere."""
    if expr.has(sp.DiracDelta):
        expr = expr.replace(sp.DiracDelta, lambda *a: sp.S.Zero)
    return expr


class Plan:
    """What the kernels of one recurrence compute, before any source is printed.

    Args:
        rec: a :class:`olsm.ir.RecurrenceIR` (or ``olsm.Recurrence``) of kind ``elementwise``.

    Raises:
        BackendError: wrong kind, a symbol the kernel cannot load, or coefficients varying
            along the wrong axis (k̃ must not depend on ``_j`` symbols, ṽ not on ``_n``).
    """

    def __init__(self, rec):
        if getattr(rec, "kind", None) != "elementwise" or rec.gate is None:
            raise BackendError(
                f"the elementwise Triton kernel needs an elementwise-gate recurrence, got kind "
                f"{getattr(rec, 'kind', None)!r} ({getattr(rec, 'name', rec)!r})"
            )
        self.name = rec.name
        self.inputs = tuple(rec.inputs)
        defs: Dict[str, sp.Expr] = {}
        for sym, e in rec.aux:
            defs[sym.name] = _expand_aux(e, defs)
        self.gate = _expand_aux(rec.gate, defs)
        self.wk = _expand_aux(rec.write_key, defs)
        self.wv = _expand_aux(rec.write_value, defs)

        known: Dict[str, Factor] = {
            "k_n": Factor("k_n", None, "K", True),
            "v_j": Factor("v_j", None, "V", True),
            "kk": Factor("kk", None, "", True),
        }
        for spec in self.inputs:
            fac = Factor(spec.symbol.name, spec.name, _AXES_CODE[tuple(spec.axes)], spec.per_token)
            known[fac.name] = fac
        symbols: Dict[str, sp.Symbol] = {}
        for label, e in (("gate", self.gate), ("write_key", self.wk), ("write_value", self.wv)):
            for s in e.free_symbols:
                if s.name not in known:
                    raise BackendError(
                        f"{label} of {self.name!r} uses the symbol {s.name!r}, which is neither "
                        f"k_n, v_j, kk nor an input ({', '.join(known)}); the kernel cannot load it"
                    )
                symbols[s.name] = s
        if "V" in expr_axes(self.wk):
            raise BackendError(f"write_key {self.wk} varies along V; it must be per-key only")
        if "K" in expr_axes(self.wv):
            raise BackendError(f"write_value {self.wv} varies along K; it must be per-value only")

        #: factors used by some expression, in a fixed order (builtins, then inputs)
        self.factors: Tuple[Factor, ...] = tuple(
            known[n] for n in list(BUILTIN) + [f.name for f in known.values() if f.input]
            if n in symbols
        )
        self.symbols = symbols
        #: factor of each input keyword (None when the input appears nowhere: zero gradient)
        self.input_factor: Dict[str, Optional[Factor]] = {
            spec.name: next((f for f in self.factors if f.input == spec.name), None)
            for spec in self.inputs
        }

        partials: List[Partial] = []
        for fac in self.factors:
            s = symbols[fac.name]
            for of, e in (("G", self.gate), ("wk", self.wk), ("wv", self.wv)):
                d = _drop_delta(sp.diff(e, s))
                if d != 0:
                    partials.append(Partial(of, fac.name, d))
        self.partials: Tuple[Partial, ...] = tuple(partials)

    def key(self, generator: str, prefetch: Tuple[int, int]) -> str:
        """Hash naming the generated source: generator version, prefetch depths, expressions
        and inputs (two plans with one key print the same kernels)."""
        h = hashlib.sha256()
        h.update(generator.encode())
        h.update(repr(tuple(prefetch)).encode())
        for e in (self.gate, self.wk, self.wv):
            h.update(sp.srepr(e).encode())
        for spec in self.inputs:
            h.update(repr((spec.name, tuple(spec.axes), spec.per_token, spec.symbol.name)).encode())
        return h.hexdigest()[:20]
