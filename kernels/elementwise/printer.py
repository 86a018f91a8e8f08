"""Print scalar sympy expressions as Triton (``tl.*``) source.

The elementwise-gate kernel computes its gate ``G[n, j]``, written key ``k̃[n]`` and written
value ``ṽ[j]`` (and, in the backward, their partial derivatives) from per-token factors that
sit in registers. Those formulas come out of the derivation as sympy expressions; this
printer turns one expression into one Triton expression over named kernel variables.

What it emits, and why:

* integer powers become products (``k_n**2`` -> ``(k_n*k_n)``): exact, and much cheaper than
  ``exp(2*log(x))``, which is also wrong for negative ``x``;
* ``x**(1/2)`` -> ``tl.sqrt``, ``x**(-1/2)`` -> ``tl.math.rsqrt``; other non-integer powers
  -> ``tl.exp(p*tl.log(x))`` (valid for ``x > 0``, the only case a real power is defined for);
* ``1/(1 + exp(-x))`` -> ``tl.sigmoid(x)`` (or the kernel's own helper; 1/(1 + inf) = 0, no NaN);
* rationals and integers -> float literals, so no integer division can sneak in;
* ``exp, log, sqrt, Abs, sin, cos, erf, Max, Min, sign, Heaviside, Piecewise, log1p, expm1,
  tanh``
  map to ``tl``/``tl.math`` calls or short compositions of them.

Anything else (``gamma``, ``besselj``, an undefined function, ``oo``) raises
:class:`olsm.errors.BackendError` naming the offending sub-expression, so a user learns at
compile time which part of a new objective the Triton backend cannot run.
"""
from __future__ import annotations

from typing import Dict, Optional

import sympy as sp
from sympy.codegen.cfunctions import expm1 as cf_expm1
from sympy.codegen.cfunctions import log1p as cf_log1p
from sympy.printing.pycode import PythonCodePrinter

from olsm.errors import BackendError

#: sympy function class name -> Triton call (one argument)
_UNARY = {
    "exp": "tl.exp",
    "log": "tl.log",
    "sqrt": "tl.sqrt",
    "Abs": "tl.abs",
    "sin": "tl.sin",
    "cos": "tl.cos",
    "erf": "tl.math.erf",
}

#: applied-function classes the printer knows (everything else is refused)
_FUNCTIONS = set(_UNARY) | {"Max", "Min", "sign", "Heaviside", "Piecewise", "log1p", "expm1", "tanh"}

#: structural node classes that print without a function call
_STRUCTURE = (
    sp.Symbol, sp.Number, sp.NumberSymbol, sp.Add, sp.Mul, sp.Pow,
    sp.core.relational.Relational, sp.logic.boolalg.BooleanAtom,
    sp.And, sp.Or, sp.Not, sp.functions.elementary.piecewise.ExprCondPair,
)

#: integer powers up to this are expanded into products
MAX_EXPANDED_POWER = 8


class TritonPrinter(PythonCodePrinter):
    """sympy code printer that emits Triton language expressions.

    Args:
        names: symbol name -> Triton variable name. A symbol missing from it is an error
            (the kernel would reference an undefined variable).
        sigmoid: the function to call for sigmoids (generated kernels use their own
            ``_sigmoid`` helper, see :mod:`.codegen`).
        exp: the function to call for exponentials (generated kernels: their ``_exp`` helper,
            ``ex2.approx.ftz`` on a GPU).
    """

    printmethod = "_tritoncode"
    language = "Triton"

    def __init__(self, names: Optional[Dict[str, str]] = None, sigmoid: str = "tl.sigmoid",
                 exp: str = "tl.exp"):
        super().__init__({"fully_qualified_modules": False, "strict": False})
        self.names = dict(names or {})
        self.sigmoid = sigmoid
        self.exp = exp

    # -- the gatekeeper: refuse what the kernel cannot compute, naming the culprit ---------
    def _print(self, expr, **kwargs):
        if isinstance(expr, sp.Basic) and not isinstance(expr, sp.Tuple):
            if isinstance(expr, (sp.core.function.AppliedUndef,)):
                raise BackendError(
                    f"the Triton printer cannot emit the undefined function {expr} "
                    "(give it a closed form in terms of exp/log/sqrt/... before compiling)"
                )
            name = type(expr).__name__
            if name in _FUNCTIONS:
                pass
            elif isinstance(expr, sp.Function):
                raise BackendError(
                    f"the Triton printer has no translation for {name} "
                    f"in the sub-expression {expr}; supported functions: "
                    f"{', '.join(sorted(_FUNCTIONS))}"
                )
            elif not isinstance(expr, _STRUCTURE) or expr in (sp.oo, -sp.oo, sp.zoo, sp.nan):
                raise BackendError(
                    f"the Triton printer cannot emit the sub-expression {expr} ({name})"
                )
        return super()._print(expr, **kwargs)

    def _print_not_supported(self, expr):
        raise BackendError(f"the Triton printer cannot emit the sub-expression {expr}")

    # -- atoms -----------------------------------------------------------------------------
    def _print_Symbol(self, expr):
        if expr.name not in self.names:
            raise BackendError(
                f"symbol {expr.name!r} has no kernel variable (known: {sorted(self.names)})"
            )
        return self.names[expr.name]

    _print_Dummy = _print_Symbol

    def _print_Integer(self, expr):
        return repr(float(expr))

    def _print_Rational(self, expr):
        return repr(float(expr))

    _print_Half = _print_Rational

    def _print_Float(self, expr):
        return repr(float(expr))

    def _print_NumberSymbol(self, expr):
        return repr(float(expr))

    _print_Pi = _print_NumberSymbol
    _print_Exp1 = _print_NumberSymbol
    _print_EulerGamma = _print_NumberSymbol
    _print_GoldenRatio = _print_NumberSymbol

    def _print_Zero(self, expr):
        return "0.0"

    def _print_BooleanTrue(self, expr):
        return "True"

    def _print_BooleanFalse(self, expr):
        return "False"

    # -- arithmetic ------------------------------------------------------------------------
    def _print_Pow(self, expr, rational=False):
        base, p = expr.base, expr.exp
        if base is sp.E:
            return f"{self.exp}({self._print(p)})"
        # sigmoid: 1/(1 + exp(a)) == sigmoid(-a), one call instead of three nodes
        if p == -1 and isinstance(base, sp.Add) and len(base.args) == 2 and sp.S.One in base.args:
            other = base.args[0] if base.args[1] == sp.S.One else base.args[1]
            if isinstance(other, sp.exp):
                return f"{self.sigmoid}({self._print(-other.args[0])})"
        if p.is_Integer:
            n = int(p)
            if n == 0:
                return "1.0"
            b = self._print(base)
            if abs(n) <= MAX_EXPANDED_POWER:
                prod = "*".join([f"({b})"] * abs(n))
                return f"({prod})" if n > 0 else f"(1.0/({prod}))"
            # |x|^n through exp/log, with the sign of x^n restored for odd n
            mag = f"{self.exp}({float(abs(n))!r}*tl.log(tl.abs({b})))"
            if n % 2:
                mag = f"tl.where(({b}) < 0.0, -{mag}, {mag})"
            return mag if n > 0 else f"(1.0/{mag})"
        if p == sp.Rational(1, 2):
            return f"tl.sqrt({self._print(base)})"
        if p == sp.Rational(-1, 2):
            return f"tl.math.rsqrt({self._print(base)})"
        return f"{self.exp}(({self._print(p)})*tl.log({self._print(base)}))"

    # -- functions -------------------------------------------------------------------------
    def _print_Function(self, expr):
        name = type(expr).__name__
        if name in _UNARY:
            return f"{_UNARY[name]}({self._print(expr.args[0])})"
        raise BackendError(f"the Triton printer has no translation for {expr}")

    def _print_exp(self, expr):
        return f"{self.exp}({self._print(expr.args[0])})"

    def _print_log(self, expr):
        return f"tl.log({self._print(expr.args[0])})"

    def _print_sqrt(self, expr):
        return f"tl.sqrt({self._print(expr.args[0])})"

    def _print_Abs(self, expr):
        return f"tl.abs({self._print(expr.args[0])})"

    def _print_sin(self, expr):
        return f"tl.sin({self._print(expr.args[0])})"

    def _print_cos(self, expr):
        return f"tl.cos({self._print(expr.args[0])})"

    def _print_erf(self, expr):
        return f"tl.math.erf({self._print(expr.args[0])})"

    def _print_tanh(self, expr):
        # tanh(x) = 2 sigmoid(2x) - 1: Triton has no portable tanh across 3.6 and 3.9
        return f"(2.0*{self.sigmoid}(2.0*({self._print(expr.args[0])})) - 1.0)"

    def _print_log1p(self, expr):
        return f"tl.log(1.0 + ({self._print(expr.args[0])}))"

    def _print_expm1(self, expr):
        return f"({self.exp}({self._print(expr.args[0])}) - 1.0)"

    def _print_sign(self, expr):
        a = self._print(expr.args[0])
        return f"tl.where(({a}) > 0.0, 1.0, tl.where(({a}) < 0.0, -1.0, 0.0))"

    def _print_Heaviside(self, expr):
        # derivative of Max/Min/Abs-like gates; the value at 0 is H(0) (sympy's default 1/2)
        a = self._print(expr.args[0])
        h0 = self._print(expr.args[1]) if len(expr.args) > 1 else "0.5"
        return f"tl.where(({a}) > 0.0, 1.0, tl.where(({a}) < 0.0, 0.0, {h0}))"

    def _print_Max(self, expr):
        out = self._print(expr.args[0])
        for a in expr.args[1:]:
            out = f"tl.maximum({out}, {self._print(a)})"
        return out

    def _print_Min(self, expr):
        out = self._print(expr.args[0])
        for a in expr.args[1:]:
            out = f"tl.minimum({out}, {self._print(a)})"
        return out

    def _print_Piecewise(self, expr):
        *pieces, (last_e, last_c) = expr.args
        if last_c != sp.true:
            raise BackendError(f"Piecewise without an otherwise branch cannot be emitted: {expr}")
        out = self._print(last_e)
        for e, c in reversed(pieces):
            out = f"tl.where({self._print(c)}, {self._print(e)}, {out})"
        return out

    def _print_And(self, expr):
        return "(" + " & ".join(f"({self._print(a)})" for a in expr.args) + ")"

    def _print_Or(self, expr):
        return "(" + " | ".join(f"({self._print(a)})" for a in expr.args) + ")"

    def _print_Not(self, expr):
        return f"(~({self._print(expr.args[0])}))"


# sympy.codegen's log1p/expm1 are Function subclasses of the same names
assert cf_log1p.__name__ == "log1p" and cf_expm1.__name__ == "expm1"


def triton_code(expr: sp.Expr, names: Optional[Dict[str, str]] = None) -> str:
    """One Triton expression computing ``expr``.

    Args:
        expr: scalar sympy expression.
        names: symbol name -> kernel variable name (default: the symbol's own name).

    Returns:
        Source text of a Triton expression.

    Raises:
        BackendError: ``expr`` contains something the kernel cannot compute.
    """
    expr = sp.sympify(expr)
    if names is None:
        names = {s.name: s.name for s in expr.free_symbols}
    return TritonPrinter(names).doprint(expr)
