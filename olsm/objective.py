"""The objective DSL: declare what the memory learns at each token.

An objective is a sum of terms plus an update rule::

    from olsm import Input, Objective, proximal, squared_loss

    beta = Input("beta", constraint="positive")           # [B, T, H]
    longhorn = Objective(proximal() + squared_loss(beta), update="implicit", name="longhorn")

Coefficients are :func:`Input` (per token, ``[B, T, H, ...]``) or :func:`Param` (fixed per
head, ``[H, ...]``). They behave like sympy expressions, so gates can be written as formulas
(``dt * A`` is Mamba-1's log-gate ``Δ_j A_{j,n}``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

import sympy as sp

from .errors import ObjectiveError
from .spec import InputSpec

#: user-facing shape names -> axes besides (B, T, H) / (H)
SHAPES = {"head": (), "key": ("K",), "value": ("V",), "value_key": ("V", "K")}


class Coefficient:
    """A declared coefficient: a named input that also behaves like a sympy symbol.

    Arithmetic with coefficients (``dt * A``, ``-softplus``-free formulas, ``2 * beta``)
    returns sympy expressions in the IR symbols of :mod:`olsm.symbols`.
    """

    def __init__(self, spec: InputSpec):
        self.spec = spec

    # sympy calls this when a Coefficient meets a sympy expression
    def _sympy_(self):
        return self.spec.symbol

    @property
    def name(self) -> str:
        return self.spec.name

    def __repr__(self):
        kind = "Input" if self.spec.per_token else "Param"
        return f"{kind}({self.spec.name!r}, {self.spec.shape})"

    def __eq__(self, other):
        return isinstance(other, Coefficient) and other.spec == self.spec

    def __hash__(self):
        return hash(self.spec)

    def _binary(op):
        def f(self, other):
            return getattr(self.spec.symbol, op)(sp.sympify(other))
        return f

    __add__, __radd__ = _binary("__add__"), _binary("__radd__")
    __sub__, __rsub__ = _binary("__sub__"), _binary("__rsub__")
    __mul__, __rmul__ = _binary("__mul__"), _binary("__rmul__")
    __truediv__, __rtruediv__ = _binary("__truediv__"), _binary("__rtruediv__")
    __pow__, __rpow__ = _binary("__pow__"), _binary("__rpow__")
    del _binary

    def __neg__(self):
        return -self.spec.symbol


#: IR symbol -> the InputSpec that declared it (how terms find their coefficients back
#: from plain sympy expressions such as ``dt * A``)
REGISTRY: dict = {}

RESERVED = ("q", "k", "v", "kk", "scale", "initial_state", "output_final_state", "cu_seqlens",
            "backend", "chunk_size")


def _check_name(name: str):
    if not name.isidentifier() or name in RESERVED or name.endswith(("_n", "_j", "_jn")):
        raise ObjectiveError(
            f"coefficient name {name!r} must be a Python identifier, not one of {RESERVED}, "
            "and not end in _n, _j or _jn (those suffixes mark indices)")


def _register(spec: InputSpec) -> Coefficient:
    REGISTRY[spec.symbol] = spec
    return Coefficient(spec)


def _shape_axes(shape: str) -> tuple:
    if shape not in SHAPES:
        raise ObjectiveError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    return SHAPES[shape]


def Input(name: str, shape: str = "head", constraint: Optional[str] = None, doc: str = "") -> Coefficient:
    """A per-token coefficient.

    Args:
        name: keyword name the recurrence takes (``beta``, ``log_alpha``, ``dt``).
        shape: ``"head"`` ``[B, T, H]``, ``"key"`` ``[B, T, H, K]`` or ``"value"`` ``[B, T, H, V]``.
        constraint: ``"positive"``, ``"nonnegative"``, ``"nonpositive"``, ``"negative"`` or None;
            checked on every call.
        doc: one line shown by ``olsm derive``.

    Returns:
        A :class:`Coefficient`.
    """
    _check_name(name)
    if shape == "value_key":
        raise ObjectiveError("per-token inputs cannot be [B, T, H, V, K]; use Param(..., 'value_key') for a fixed one")
    return _register(InputSpec(name, _shape_axes(shape), True, constraint, doc))


def Param(name: str, shape: str = "head", constraint: Optional[str] = None, doc: str = "") -> Coefficient:
    """A coefficient fixed per head (not per token), e.g. RetNet's decay or Mamba-1's A.

    Args:
        name: keyword name.
        shape: ``"head"`` ``[H]``, ``"key"`` ``[H, K]``, ``"value"`` ``[H, V]`` or
            ``"value_key"`` ``[H, V, K]``.
        constraint, doc: as in :func:`Input`.

    Returns:
        A :class:`Coefficient`.
    """
    _check_name(name)
    return _register(InputSpec(name, _shape_axes(shape), False, constraint, doc))


Scalar = Union[int, float, sp.Expr, Coefficient]


@dataclass(frozen=True)
class Objective:
    """An online-learning objective: ``S_t = argmin_S Σ terms`` or one gradient step of it.

    Attributes:
        terms: the terms (build them with ``+``).
        update: ``"implicit"`` (exact argmin, proximal update) or ``"explicit"`` (one gradient
            step of size ``eta`` on the losses, from the regulariser's anchor).
        eta: step size of the explicit update (number or coefficient).
        approximation: ``None`` or ``"diagonal"``: keep only the diagonal of each value
            column's transition (the Longhorn paper's form for beta per value channel).
        name: short name (``longhorn``).
        doc: what it is, with the paper.
    """

    terms: Tuple = ()
    update: str = "implicit"
    eta: Scalar = 1
    approximation: Optional[str] = None
    name: str = "objective"
    doc: str = field(default="", compare=False)

    def __post_init__(self):
        from .terms import Term, TermSum

        terms = self.terms
        if isinstance(terms, Term):
            terms = (terms,)
        elif isinstance(terms, TermSum):
            terms = terms.terms
        terms = tuple(terms)
        if not terms or not all(isinstance(t, Term) for t in terms):
            raise ObjectiveError("an Objective needs at least one term, e.g. proximal() + squared_loss(beta)")
        object.__setattr__(self, "terms", terms)
        if self.update not in ("implicit", "explicit"):
            raise ObjectiveError(f"update must be 'implicit' or 'explicit', got {self.update!r}")
        if self.approximation not in (None, "diagonal"):
            raise ObjectiveError(f"approximation must be None or 'diagonal', got {self.approximation!r}")
        eta = sp.nsimplify(self.eta, rational=True) if isinstance(self.eta, float) else sp.sympify(self.eta)
        object.__setattr__(self, "eta", eta)

    @property
    def coefficients(self) -> Tuple[Coefficient, ...]:
        """Every coefficient the objective declares, in order of first use.

        Raises:
            ObjectiveError: an expression uses a symbol no :func:`Input`/:func:`Param` declared.
        """
        from .symbols import k_n, kk, v_j

        exprs = [e for t in self.terms for e in t.exprs()] + [sp.sympify(self.eta)]
        found = {}
        for e in exprs:
            for s in sorted(e.free_symbols, key=lambda s: s.name):
                if s in (k_n, v_j, kk):
                    continue
                if s not in REGISTRY:
                    raise ObjectiveError(
                        f"symbol {s} in objective {self.name!r} was not declared: make it with "
                        "olsm.Input(...) or olsm.Param(...)")
                spec = REGISTRY[s]
                if spec.name in found and found[spec.name].spec != spec:
                    raise ObjectiveError(f"coefficient {spec.name!r} is declared twice with different shapes")
                found.setdefault(spec.name, Coefficient(spec))
        return tuple(found.values())

    def formula(self) -> str:
        """The objective as text, e.g. ``argmin_S ½‖S − S_{t-1}‖² + β/2 ‖Sᵀk − v‖²``."""
        body = ""
        for t in self.terms:
            f = t.formula()
            body += (f" − {f[1:]}" if f.startswith("−") else f" + {f}") if body else f
        if self.update == "implicit":
            return f"S_t = argmin_S  {body}"
        from .pretty import text

        return f"S_t = A_t − η ∇L_t(A_t) for  {body}  (A_t: the proximal anchor, η = {text(self.eta)})"

    def __str__(self):
        return f"{self.name}: {self.formula()}"
