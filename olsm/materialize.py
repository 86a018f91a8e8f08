"""Evaluate IR expressions on torch tensors (sympy -> lambdified torch functions).

Every expression is evaluated in one broadcast layout ``[B, T, H, K, V]``: a per-key symbol
is ``[B, T, H, K, 1]``, a per-value one ``[B, T, H, 1, V]``, a per-head one
``[B, T, H, 1, 1]``, a ``[H, V, K]`` parameter ``[1, 1, H, K, V]``. Results are then reduced
to their natural shape (a key vector ``[B, T, H, K]``, a gate ``[B, T, H, K, V]``...).
sympy is touched once per expression (lambdify is cached); calls only run torch code.
"""
from __future__ import annotations

import functools
from typing import Dict, Tuple

import sympy as sp
import torch

from .errors import BackendError
from .symbols import expr_axes, k_n, kk, v_j

#: sympy function name -> torch implementation, for lambdify's namespace
TORCH_FUNCS = {
    "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "Abs": torch.abs,
    "log1p": torch.log1p, "expm1": torch.expm1, "tanh": torch.tanh, "sign": torch.sign,
    "sin": torch.sin, "cos": torch.cos, "Max": torch.maximum, "Min": torch.minimum,
    "sigmoid": torch.sigmoid, "pi": torch.pi, "E": torch.e,
}


@functools.lru_cache(maxsize=None)
def compile_expr(expr: sp.Expr, names: Tuple[str, ...]):
    """Lambdify ``expr`` over the symbols named ``names`` (cached)."""
    syms = sorted(expr.free_symbols, key=lambda s: s.name)
    missing = [s.name for s in syms if s.name not in names]
    if missing:
        raise BackendError(f"expression {expr} uses {missing}, which no input provides")
    try:
        fn = sp.lambdify(syms, expr, modules=[TORCH_FUNCS])
    except Exception as e:  # pragma: no cover - sympy printer gaps
        raise BackendError(f"cannot turn {expr} into torch code: {e}") from e
    return fn, tuple(s.name for s in syms)


class Env(dict):
    """Symbol name -> tensor in the broadcast layout, each made on first use: a float copy of k or
    v, kᵀk and an aux value are each a pass over a ``[B, T, H, K]`` (or ``V``) tensor, and
    DeltaNet's delta path, for one, reads none of them."""

    def __init__(self):
        super().__init__()
        self.makers = {}        # name -> zero-argument function making the tensor

    def __missing__(self, name):
        if name not in self.makers:
            raise KeyError(name)
        value = self[name] = self.makers[name]()
        return value

    def names(self) -> Tuple[str, ...]:
        return tuple(sorted(set(self) | set(self.makers)))


def build_env(rec, k: torch.Tensor, v: torch.Tensor, coefs: Dict[str, torch.Tensor], dtype) -> Env:
    """Symbol name -> tensor in the broadcast layout, for k, v, kᵀk, inputs and aux (made when
    an expression first reads them).

    Args:
        rec: the recurrence (for ``inputs`` and ``aux``).
        k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        coefs: coefficient tensors by name (validated already).
        dtype: computation dtype (float32 or float64).

    Returns:
        :class:`Env` name -> tensor.
    """
    env = Env()
    makers = env.makers
    makers.update({k_n.name: lambda: k.to(dtype)[..., :, None], v_j.name: lambda: v.to(dtype)[..., None, :],
              kk.name: lambda: (env[k_n.name] ** 2).sum(-2, keepdim=True)})
    for spec in rec.inputs:
        makers[spec.symbol.name] = functools.partial(lambda spec: _broadcast(coefs[spec.name].to(dtype), spec), spec)
    for sym, expr in rec.aux:
        makers[sym.name] = functools.partial(evaluate, expr, env)
    return env


def _broadcast(x: torch.Tensor, spec) -> torch.Tensor:
    """Put an input into the ``[B, T, H, K, V]`` broadcast layout."""
    if not spec.per_token:
        x = x[None, None]  # [H, ...] -> [1, 1, H, ...]
    if spec.axes == ():
        return x[..., None, None]
    if spec.axes == ("K",):
        return x[..., :, None]
    if spec.axes == ("V",):
        return x[..., None, :]
    return x.transpose(-1, -2)  # [.., H, V, K] -> [.., H, K, V]


@functools.lru_cache(maxsize=None)
def _numeric_constants(expr: sp.Expr) -> sp.Expr:
    """log(4/5) -> -0.2231...: torch functions take tensors, not Python numbers."""
    return expr.replace(lambda e: e.is_number and not e.is_Atom, lambda e: sp.Float(sp.N(e, 30), 30))


def evaluate(expr, env: dict) -> torch.Tensor:
    """Evaluate ``expr`` in ``env`` (broadcast layout); constants become 0-d tensors."""
    fn, names = compile_expr(_numeric_constants(sp.sympify(expr)),
                             env.names() if isinstance(env, Env) else tuple(sorted(env)))
    out = fn(*(env[n] for n in names))
    if not torch.is_tensor(out):
        ref = env[k_n.name]
        out = torch.tensor(float(out), dtype=ref.dtype, device=ref.device)
    return out



@functools.lru_cache(maxsize=None)
def _value_scale(write_value: sp.Expr):
    """``s`` when the written value is ``s · v`` with s free of per-key and per-value symbols, else None."""
    s = sp.simplify(write_value / v_j)
    return s if s != 1 and not s.has(v_j) and not expr_axes(s) else None


@functools.lru_cache(maxsize=None)
def _implicit_split(c: sp.Expr, s, aux: tuple):
    """``(c0, s0, b)`` when ``c = c0 / (1 + b kᵀk)`` and ``s = s0 / (1 + b kᵀk)`` (s may be None)
    with c0, s0, b free of kᵀk once the aux symbols are substituted: the normaliser of an
    implicit step (Longhorn's ε = β / (1 + β kᵀk)), which the delta kernels form themselves.
    None otherwise."""
    def expand(e):
        for sym, expr in reversed(aux):
            e = e.subs(sym, expr)
        return sp.fraction(sp.together(e))

    (c_num, den), parts = expand(c), []
    b = sp.simplify(sp.diff(den, kk))
    if b == 0 or b.has(kk) or sp.simplify(den - 1 - b * kk) != 0 or c_num.has(kk):
        return None
    if s is not None:
        s_num, s_den = expand(s)
        if s_num.has(kk) or sp.simplify(s_den - den) != 0:
            return None
        parts = [s_num]
    return (c_num, *(parts or [None]), b)


def delta_coefficients(rec):
    """``(c, s, b)`` sympy expressions of a delta-form recurrence: the coefficient of ``−c k kᵀ``,
    the per-token scale s of the written value ``s v`` (None if it is not of that form) and the
    implicit step's b when c and s share ``1 / (1 + b kᵀk)`` (then c and s are without it; else
    b is None)."""
    c, s = -sp.sympify(rec.lowrank[0].coef), _value_scale(rec.write_value)
    split = _implicit_split(c, s, tuple(rec.aux))
    return (c, s, None) if split is None else split


def materialize(rec, k, v, coefs, dtype, delta: bool = False) -> dict:
    """Per-token tensors the numeric backends take.

    Args:
        delta: for a recurrence of the delta form (``rec.is_delta_form``) return the coefficient
            ``c [B, T, H]`` of ``−c k kᵀ`` instead of the pair (what ``chunk_delta`` takes) and, when
            the written value is ``s · v`` with a per-token scalar s, ``u = v`` (as given, not cast)
            and ``u_scale = s``; when c and s carry an implicit step's ``1 / (1 + b kᵀk)``, c and s
            without it and ``kk_coef = b``.

    Returns:
        matrix class: ``dict(w, u, log_decay, lowrank)`` (``lowrank`` → ``c`` with ``delta``);
        elementwise: ``dict(w, u, gate)``. Shapes as in :mod:`olsm.backends.reference`.
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    env = build_env(rec, k, v, coefs, dtype)
    full = (B, T, H, K, V)

    def key_vec(e):
        return evaluate(e, env).expand(B, T, H, K, 1)[..., 0]

    def value_vec(e):
        return evaluate(e, env).expand(B, T, H, 1, V)[..., 0, :]

    scalars = {}

    def head_scalar(e):
        # one tensor per expression: Longhorn's c = s = b = β (DeltaNet's c = s = β) reach
        # chunk_delta as one tensor, which sums its gradients once (fp32, one cast) instead of
        # autograd adding one per place; squeeze, not [..., 0, 0]: its backward is a view too,
        # where select's allocates and fills a zero tensor (two GPU launches per select)
        if e not in scalars:
            scalars[e] = evaluate(e, env).expand(B, T, H, 1, 1).squeeze((-2, -1))
        return scalars[e]

    delta = delta and rec.is_delta_form
    if delta:
        out = dict(w=k)       # the written key is k: as given, no float copy (the kernels read its dtype)
    else:
        out = dict(w=key_vec(rec.write_key))
    if rec.kind == "elementwise":
        return dict(out, u=value_vec(rec.write_value), gate=evaluate(rec.gate, env).expand(full))
    ld = sp.sympify(rec.log_decay)
    out["log_decay"] = None if ld == 0 else (key_vec(ld) if "K" in expr_axes(ld) else head_scalar(ld))
    if delta:
        c, s, b = delta_coefficients(rec)
        if b is not None:
            # c and s share the implicit step's 1 / (1 + b kᵀk): the kernels form it from their
            # key rows, so kᵀk (a [B, T, H, K] pass, and its backward) is not made here
            out["kk_coef"] = head_scalar(b)
        out["c"] = head_scalar(c)
        if s is not None:
            # ũ = s v with a per-token scalar s (DeltaNet's β v): the kernel forms it, so neither the
            # [B, T, H, V] product nor a cast of v is made here
            return dict(out, u=v, u_scale=head_scalar(s))
        return dict(out, u=value_vec(rec.write_value))
    out["u"] = value_vec(rec.write_value)
    # the scalar coefficient is folded into a: the backends see pairs (a, b)
    out["lowrank"] = tuple(
        ((evaluate(lr.coef, env) * evaluate(lr.a, env)).expand(B, T, H, K, 1)[..., 0], key_vec(lr.b))
        for lr in rec.lowrank)
    return out
