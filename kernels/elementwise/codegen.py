"""Generate, cache and import the Triton source of one elementwise-gate recurrence.

A recurrence of the elementwise class (DESIGN §3, class 2) is

    S_t = G_t ⊙ S_{t-1} + k̃_t ṽ_tᵀ,      o_t = scale · S_tᵀ q_t  (+ D ⊙ v_t)

where ``G_t[n, j]``, ``k̃_t[n]`` and ``ṽ_t[j]`` are scalar sympy expressions of per-token
factors (``k_n``, ``v_j``, ``kk``, the coefficient inputs). Rather than one generic kernel
that interprets those formulas at run time, we *print* them into a kernel specialised to
the recurrence:

1. :class:`Plan` expands the ``aux`` definitions, checks every symbol is one the kernel can
   load, and differentiates G, k̃, ṽ with respect to every factor with ``sp.diff`` (the
   backward's chain rule then needs no hand-written code per objective);
2. :func:`generate_source` writes a forward and a backward ``@triton.jit`` kernel whose
   coefficient lines come out of :class:`~.printer.TritonPrinter` after common
   sub-expression elimination;
3. :func:`load_kernels` writes the source under ``$OLSM_CACHE`` (default
   ``~/.cache/olsm/kernels``), named by a hash of the expressions and
   :data:`GENERATOR_VERSION`, and imports it with importlib (``@triton.jit`` reads the
   function's source file, so the kernel must live in a real file).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Optional, Tuple

import sympy as sp

from olsm.errors import BackendError
from olsm.symbols import expr_axes

from .printer import TritonPrinter

#: bump whenever the generated source changes for the same expressions
GENERATOR_VERSION = "elementwise-3"

#: largest key dimension (d_state) the register-resident state tile supports
MAX_K = 256

#: the factor symbols every recurrence may use besides its coefficient inputs
_BUILTIN = ("k_n", "v_j", "kk")

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
        """The kernel variable holding the factor, broadcastable to the [BK, BV] tile."""
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
            known[n] for n in list(_BUILTIN) + [f.name for f in known.values() if f.input]
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

    def key(self, prefetch: Tuple[int, int] = (1, 1)) -> str:
        """Hash naming the generated source: expressions, inputs, generator, prefetch depths."""
        h = hashlib.sha256()
        h.update(GENERATOR_VERSION.encode())
        h.update(repr(tuple(prefetch)).encode())
        for e in (self.gate, self.wk, self.wv):
            h.update(sp.srepr(e).encode())
        for spec in self.inputs:
            h.update(repr((spec.name, tuple(spec.axes), spec.per_token, spec.symbol.name)).encode())
        return h.hexdigest()[:20]


# ------------------------------------------------------------------------------------------
# source generation
# ------------------------------------------------------------------------------------------


class _Src:
    """Lines of Python source with an indentation cursor."""

    def __init__(self):
        self.lines: List[str] = []
        self.level = 0

    def __call__(self, *lines: str):
        for text in lines:
            for ln in text.split("\n"):
                self.lines.append(("    " * self.level + ln) if ln.strip() else "")
        return self

    def indent(self):
        self.level += 1

    def dedent(self):
        self.level -= 1

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _addr(fac: Factor, tok: str) -> Tuple[str, str]:
    """Pointer expression and mask of a per-token factor at token index ``tok``."""
    p = "x_" + fac.input
    if fac.axes == "":
        return f"{p} + {tok} * H + i_h", None
    if fac.axes == "K":
        return f"{p} + ({tok} * H + i_h) * K + n_k", "m_k"
    return f"{p} + ({tok} * H + i_h) * V + j_v", "m_v"


def _broadcast(var: str, axes: str) -> str:
    """A [BK] or [BV] vector as a broadcastable column/row of the [BK, BV] tile."""
    return {"": var, "K": f"{var}[:, None]", "V": f"{var}[None, :]", "VK": var}[axes]


class _Loads:
    """The per-token loads of one loop, emitted in prefetch style.

    Each value is loaded ``depth`` iterations ahead into a ring of named slots
    ``<name>_p0 .. <name>_p{depth-1}`` (raw dtype) and converted to float32 ``<name>_c``
    when its token comes up, so the global-memory latency of step t+depth overlaps the
    arithmetic of steps t .. t+depth-1. A sequential scan is bound by that latency, not by
    bandwidth: the depth trades registers for it.
    """

    def __init__(self, plan: Plan, with_q: bool, with_do: bool, depth: int = 1):
        self.depth = int(depth)
        self.items: List[Tuple[str, str, Optional[str], str]] = []  # (name, addr fn, mask, other)
        if with_q:
            self.items.append(("q", "q + ({tok} * H + i_h) * K + n_k", "m_k", "0.0"))
        self.items.append(("k", "k + ({tok} * H + i_h) * K + n_k", "m_k", "0.0"))
        self.items.append(("v", "v + ({tok} * H + i_h) * V + j_v", "m_v", "0.0"))
        if with_do:
            self.items.append(("do", "do + ({tok} * H + i_h) * V + j_v", "m_v", "0.0"))
        for fac in plan.factors:
            if fac.input and fac.per_token:
                addr, mask = _addr(fac, "{tok}")
                # coefficient padding is 1.0: harmless in log, division and sqrt
                self.items.append(("in_" + fac.input, addr, mask, "1.0"))

    def _issue(self, src: _Src, tok: str, valid: str, slot: int):
        # (a vector mask `and` a scalar condition is written as one comparison against a
        # conditional bound: the Triton interpreter mistypes `bool_vector & bool_scalar`)
        bound = {"m_k": ("n_k", "K"), "m_v": ("j_v", "V")}
        for name, addr, mask, other in self.items:
            if mask is None:
                m = f"({valid})"
            else:
                idx, size = bound[mask]
                m = f"{idx} < tl.where({valid}, {size}, 0)"
            src(f"{name}_p{slot} = tl.load({addr.format(tok='(' + tok + ')')}, mask={m}, other={other})")

    def prologue(self, src: _Src, first: str, step: str, n: str):
        """Fill the ring with tokens ``first + s*step`` for s < depth (valid while s < n)."""
        for s in range(self.depth):
            self._issue(src, f"{first} + {s} * ({step})" if s else first, f"{s} < {n}", s)

    def advance(self, src: _Src, tok: str, step: str, i: str, n: str):
        """Take token ``tok`` (the i-th of n) out of the ring and load token ``tok + depth*step``."""
        for name, *_ in self.items:
            src(f"{name}_c = {name}_p0.to(tl.float32)")
        for s in range(self.depth - 1):
            for name, *_ in self.items:
                src(f"{name}_p{s} = {name}_p{s + 1}")
        self._issue(src, f"{tok} + {self.depth} * ({step})", f"{i} + {self.depth} < {n}", self.depth - 1)


def _emit_factors(src: _Src, plan: Plan):
    """Per-token factor variables from the current token's float32 values."""
    for fac in plan.factors:
        if fac.name == "k_n":
            src("s_k_n = k_c[:, None]")
        elif fac.name == "v_j":
            src("s_v_j = v_c[None, :]")
        elif fac.name == "kk":
            src("s_kk = _sum(k_c * k_c, 0)  # kᵀk over the whole key (K fits one tile)")
        elif fac.per_token:
            src(f"{fac.var} = {_broadcast('in_' + fac.input + '_c', fac.axes)}")


def _emit_params(src: _Src, plan: Plan):
    """Load per-head parameters once, before the time loop."""
    for fac in plan.factors:
        if fac.per_token:
            continue
        p = "x_" + fac.input
        if fac.axes == "":
            src(f"{fac.var} = tl.load({p} + i_h).to(tl.float32)")
        elif fac.axes == "K":
            src(f"{fac.var} = tl.load({p} + i_h * K + n_k, mask=m_k, other=1.0).to(tl.float32)[:, None]")
        elif fac.axes == "V":
            src(f"{fac.var} = tl.load({p} + i_h * V + j_v, mask=m_v, other=1.0).to(tl.float32)[None, :]")
        else:  # [H, V, K]: the tile is [BK, BV], so n runs down rows and j across columns
            src(
                f"{fac.var} = tl.load({p} + (i_h * V + j_v[None, :]) * K + n_k[:, None], "
                f"mask=m_kv, other=1.0).to(tl.float32)"
            )


def _cse_lines(exprs: List[sp.Expr], printer: TritonPrinter, prefix: str) -> Tuple[List[str], List[str]]:
    """Common sub-expressions as assignment lines, and the reduced expressions' source."""
    repl, reduced = sp.cse(exprs, symbols=sp.numbered_symbols(prefix), optimizations="basic")
    lines = []
    for sym, e in repl:
        printer.names[sym.name] = sym.name
        lines.append(f"{sym.name} = {printer.doprint(e)}")
    return lines, [printer.doprint(e) for e in reduced]


def _coef_block(src: _Src, plan: Plan, with_partials: bool) -> Dict[Tuple[str, str], str]:
    """Emit G, k̃, ṽ (and the partials) for the current token.

    Returns:
        (of, factor) -> source of that partial derivative (only when ``with_partials``).
    """
    names = {f.name: f.var for f in plan.factors}
    printer = TritonPrinter(names, sigmoid="_sigmoid")
    exprs = [plan.gate, plan.wk, plan.wv]
    if with_partials:
        exprs += [p.expr for p in plan.partials]
    lines, out = _cse_lines(exprs, printer, "c")
    if lines:
        src(*lines)
    # G, k̃, ṽ are masked to the valid tile so that padded lanes stay exactly zero in S and dS
    # whatever the formulas give on padding (log(0), 1/0, ...)
    src(f"G = tl.where(m_kv, {out[0]}, 0.0)")
    src(f"wk = tl.where(m_k[:, None], {out[1]}, 0.0)")
    src(f"wv = tl.where(m_v[None, :], {out[2]}, 0.0)")
    parts = {}
    if with_partials:
        for p, code in zip(plan.partials, out[3:]):
            parts[(p.of, p.factor)] = code
    return parts


def _reduce(term: str, space: str, target: str) -> str:
    """Sum a gradient term living on ``space`` (KV, K, V) down to the ``target`` axes."""
    mask = {"KV": "m_kv", "K": "m_k[:, None]", "V": "m_v[None, :]"}[space]
    t = f"tl.where({mask}, {term}, 0.0)"
    if target == "VK":
        return t
    if target == "K":
        return f"_sum({t}, 1)"
    if target == "V":
        return f"_sum({t}, 0)"
    return f"_sum(_sum({t}, 1), 0)"


def _grad_expr(plan: Plan, parts: Dict[Tuple[str, str], str], fac: Factor) -> Optional[str]:
    """Source of dL/d(factor) for this token, reduced to the factor's own axes."""
    terms = []
    for of, space, adj in (("G", "KV", "dG"), ("wk", "K", "dwk"), ("wv", "V", "dwv")):
        code = parts.get((of, fac.name))
        if code is not None:
            term = adj if code == "1.0" else f"{adj} * ({code})"
            terms.append(_reduce(term, space, fac.axes))
    return " + ".join(terms) if terms else None


def generate_source(plan: Plan, prefetch: Tuple[int, int] = (1, 1)) -> str:
    """The Python module text holding ``fwd_kernel`` and ``bwd_kernel`` for ``plan``.

    Args:
        plan: what to compute.
        prefetch: how many tokens ahead the forward and the backward loops load.
    """
    src = _Src()
    src(
        f'"""Generated by olsm.kernels.elementwise ({GENERATOR_VERSION}) for {plan.name!r}. Do not edit.',
        "",
        f"gate        G[n, j] = {plan.gate}",
        f"write key   k̃[n]    = {plan.wk}",
        f"write value ṽ[j]    = {plan.wv}",
        '"""',
        "import triton",
        "import triton.language as tl",
        "",
        "",
        "# Local helpers instead of tl.sum / tl.cdiv / tl.sigmoid: those are @jit functions of",
        "# triton.language, built for the compiler or the interpreter once, when triton.language",
        "# is first imported. These are built when this module is, so the kernels run under",
        "# TRITON_INTERPRET=1 whatever imported triton first.",
        "@triton.jit",
        "def _add(a, b):",
        "    return a + b",
        "",
        "",
        "@triton.jit",
        "def _sum(x, axis: tl.constexpr):",
        "    return tl.reduce(x, axis, _add)",
        "",
        "",
        "@triton.jit",
        "def _cdiv(a, b: tl.constexpr):",
        "    return (a + b - 1) // b",
        "",
        "",
        "@triton.jit",
        "def _sigmoid(x):",
        "    return 1.0 / (1.0 + tl.exp(-x))",
        "",
        "",
    )
    coef_args = "".join(f"x_{s.name}, " for s in plan.inputs)
    grad_args = "".join(f"g_{s.name}, " for s in plan.inputs)
    common_head = (
        "i_bh = tl.program_id(0)\n"
        "i_v = tl.program_id(1)\n"
        "i_b = i_bh // H\n"
        "i_h = i_bh % H\n"
        "if IS_VARLEN:\n"
        "    bos = tl.load(cu_seqlens + i_b).to(tl.int64)\n"
        "    eos = tl.load(cu_seqlens + i_b + 1).to(tl.int64)\n"
        "    ck0 = tl.load(chunk_offsets + i_b).to(tl.int64)\n"
        "else:\n"
        "    bos = i_b.to(tl.int64) * T\n"
        "    eos = bos + T\n"
        "    ck0 = i_b.to(tl.int64) * _cdiv(T, C)\n"
        "n_tok = (eos - bos).to(tl.int32)\n"
        "n_k = tl.arange(0, BK)\n"
        "j_v = i_v * BV + tl.arange(0, BV)\n"
        "m_k = n_k < K\n"
        "m_v = j_v < V\n"
        "m_kv = m_k[:, None] & m_v[None, :]\n"
        "# offsets of this program's [K, BV] slice inside a [.., H, K, V] state\n"
        "o_state = n_k[:, None] * V + j_v[None, :]"
    )

    # ---------------------------------------------------------------- forward kernel
    fwd_loads = _Loads(plan, with_q=True, with_do=False, depth=prefetch[0])
    src("@triton.jit")
    src(
        "def fwd_kernel(\n"
        f"    q, k, v, o, {coef_args}d_skip, h0, ht, ckpt, cu_seqlens, chunk_offsets,\n"
        "    scale, T,\n"
        "    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,\n"
        "    C: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,\n"
        "    STORE_CKPT: tl.constexpr, HAS_D: tl.constexpr, IS_VARLEN: tl.constexpr,\n"
        "):"
    )
    src.indent()
    src(
        '"""One program scans one (sequence, head) over all its tokens for a BV-wide slice of',
        "the value dimension; the [K, BV] state never leaves registers. Every C tokens the",
        'state entering the chunk is written to ``ckpt`` so the backward can restart there."""',
    )
    src(common_head)
    _emit_params(src, plan)
    src("S = tl.full([BK, BV], 0.0, dtype=tl.float32)")
    src("if HAS_H0:")
    src("    S = tl.load(h0 + i_bh.to(tl.int64) * K * V + o_state, mask=m_kv, other=0.0).to(tl.float32)")
    src("if HAS_D:")
    src("    d_j = tl.load(d_skip + i_h * V + j_v, mask=m_v, other=0.0).to(tl.float32)")
    src("# prefetch the first tokens")
    fwd_loads.prologue(src, "bos", "1", "n_tok")
    src("for i_c in range(0, _cdiv(n_tok, C)):")
    src.indent()
    src("if STORE_CKPT:")
    src("    tl.store(ckpt + ((ck0 + i_c) * H + i_h) * K * V + o_state, S, mask=m_kv)")
    src("t0 = bos + i_c * C")
    src("for i_t in range(0, tl.minimum(C, n_tok - i_c * C)):")
    src.indent()
    src("tok = t0 + i_t")
    fwd_loads.advance(src, "tok", "1", "i_c * C + i_t", "n_tok")
    _emit_factors(src, plan)
    _coef_block(src, plan, with_partials=False)
    src("S = G * S + wk * wv")
    src("o_t = _sum(S * q_c[:, None], 0) * scale")
    src("if HAS_D:")
    src("    o_t += d_j * v_c")
    src("tl.store(o + (tok * H + i_h) * V + j_v, o_t.to(o.dtype.element_ty), mask=m_v)")
    src.dedent()
    src.dedent()
    src("if STORE_HT:")
    src("    tl.store(ht + i_bh.to(tl.int64) * K * V + o_state, S, mask=m_kv)")
    src.dedent()
    src("")
    src("")

    # ---------------------------------------------------------------- backward kernel
    rec_loads = _Loads(plan, with_q=False, with_do=False, depth=prefetch[1])
    rev_loads = _Loads(plan, with_q=True, with_do=True, depth=prefetch[1])
    src("@triton.jit")
    src(
        "def bwd_kernel(\n"
        f"    q, k, v, do, {coef_args}d_skip, dht, dh0, ckpt, scratch,\n"
        f"    dq, dk, dv, dd_skip, {grad_args}cu_seqlens, chunk_offsets,\n"
        "    scale, T, NTOK, NV,\n"
        "    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,\n"
        "    C: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,\n"
        "    HAS_D: tl.constexpr, IS_VARLEN: tl.constexpr,\n"
        "):"
    )
    src.indent()
    src(
        '"""Reverse scan. For each chunk, last to first: replay the forward from the chunk\'s',
        "checkpoint, stashing the C+1 states in this program's private scratch slab, then walk",
        "the tokens backwards carrying dS = ∂L/∂S_t:",
        "",
        "    dS_t  = scale · q_t do_tᵀ + G_{t+1} ⊙ dS_{t+1}",
        "    dq_t  = scale · S_t do_t          dG_t = dS_t ⊙ S_{t-1}",
        "    dk̃_t = dS_t ṽ_t                  dṽ_t = dS_tᵀ k̃_t",
        "",
        "and push dG, dk̃, dṽ through the printed partial derivatives to every factor. Outputs",
        "that sum over the value axis (dq, dk, per-key/per-head coefficients) are written per",
        'V-tile and summed by the caller; parameters are summed over time here."""',
    )
    src(common_head)
    src("o_slab = n_k[:, None] * BV + tl.arange(0, BV)[None, :]")
    src("scr = scratch + (i_bh * NV + i_v).to(tl.int64) * (C + 1) * BK * BV")
    _emit_params(src, plan)
    # parameter-gradient accumulators, shaped like the parameter's slice
    acc_shape = {"": "[1]", "K": "[BK]", "V": "[BV]", "VK": "[BK, BV]"}
    for fac in plan.factors:
        if not fac.per_token:
            src(f"acc_{fac.input} = tl.full({acc_shape[fac.axes]}, 0.0, dtype=tl.float32)")
    src("if HAS_D:")
    src("    d_j = tl.load(d_skip + i_h * V + j_v, mask=m_v, other=0.0).to(tl.float32)")
    src("acc_d = tl.full([BV], 0.0, dtype=tl.float32)")
    src("dS = tl.full([BK, BV], 0.0, dtype=tl.float32)")
    src("if HAS_DHT:")
    src("    dS = tl.load(dht + i_bh.to(tl.int64) * K * V + o_state, mask=m_kv, other=0.0).to(tl.float32)")
    src("for i_r in range(0, _cdiv(n_tok, C)):")
    src.indent()
    src("i_c = _cdiv(n_tok, C) - 1 - i_r")
    src("t0 = bos + i_c * C")
    src("n_c = tl.minimum(C, n_tok - i_c * C)")
    src("# 1) replay the chunk forward from its checkpoint; slot s holds the state after s tokens")
    src("S = tl.load(ckpt + ((ck0 + i_c) * H + i_h) * K * V + o_state, mask=m_kv, other=0.0)")
    src("tl.store(scr + o_slab, S)")
    rec_loads.prologue(src, "t0", "1", "n_c")
    src("for i_t in range(0, n_c):")
    src.indent()
    src("tok = t0 + i_t")
    rec_loads.advance(src, "tok", "1", "i_t", "n_c")
    _emit_factors(src, plan)
    _coef_block(src, plan, with_partials=False)
    src("S = G * S + wk * wv")
    src("tl.store(scr + (i_t + 1) * BK * BV + o_slab, S)")
    src.dedent()
    src("# the slab is re-read below with the same layout; the barrier orders it all the same")
    src("tl.debug_barrier()")
    src("# 2) walk the chunk backwards; S holds S_t, the slab gives S_{t-1}")
    rev_loads.prologue(src, "t0 + n_c - 1", "-1", "n_c")
    src("for i_t in range(0, n_c):")
    src.indent()
    src("tok = t0 + n_c - 1 - i_t")
    rev_loads.advance(src, "tok", "-1", "i_t", "n_c")
    _emit_factors(src, plan)
    parts = _coef_block(src, plan, with_partials=True)
    src("dS += scale * q_c[:, None] * do_c[None, :]")
    src("dq_t = _sum(S * do_c[None, :], 1) * scale")
    src("S = tl.load(scr + (n_c - 1 - i_t) * BK * BV + o_slab)  # S_{t-1}")
    src("dG = dS * S")
    src("dwk = _sum(dS * wv, 1)[:, None]")
    src("dwv = _sum(dS * wk, 0)[None, :]")
    # gradients of the factors
    kk = plan.symbols.get("kk")
    dkk = _grad_expr(plan, parts, Factor("kk", None, "", True)) if kk is not None else None
    dk_terms = []
    if "k_n" in plan.symbols:
        g = _grad_expr(plan, parts, Factor("k_n", None, "K", True))
        if g:
            dk_terms.append(g)
    if dkk:
        src(f"dkk = {dkk}")
        dk_terms.append("2.0 * dkk * k_c")
    src(f"dk_t = {' + '.join(dk_terms) if dk_terms else 'tl.full([BK], 0.0, dtype=tl.float32)'}")
    dv_terms = ["tl.full([BV], 0.0, dtype=tl.float32)"]
    if "v_j" in plan.symbols:
        g = _grad_expr(plan, parts, Factor("v_j", None, "V", True))
        if g:
            dv_terms = [g]
    src(f"dv_t = {' + '.join(dv_terms)}")
    src("if HAS_D:")
    src("    dv_t += d_j * do_c")
    src("    acc_d += do_c * v_c")
    src("row = tok * H + i_h")
    src("part = (i_v.to(tl.int64) * NTOK + tok) * H + i_h  # row of this V-tile's partial sum")
    src("tl.store(dq + part * K + n_k, dq_t, mask=m_k)")
    src("tl.store(dk + part * K + n_k, dk_t, mask=m_k)")
    src("tl.store(dv + row * V + j_v, dv_t.to(dv.dtype.element_ty), mask=m_v)")
    for fac in plan.factors:
        if fac.input is None:
            continue
        g = _grad_expr(plan, parts, fac) or "0.0"
        gp = "g_" + fac.input
        if not fac.per_token:
            src(f"acc_{fac.input} += {g}")
        elif fac.axes == "":
            src(f"tl.store({gp} + part, {g})")
        elif fac.axes == "K":
            src(f"tl.store({gp} + part * K + n_k, {g}, mask=m_k)")
        else:
            src(f"tl.store({gp} + row * V + j_v, {g}, mask=m_v)")
    src("dS = dS * G  # carry to t-1: G_t ⊙ dS_t")
    src.dedent()
    src("tl.debug_barrier()  # the next chunk overwrites the slab")
    src.dedent()
    src("if STORE_DH0:")
    src("    tl.store(dh0 + i_bh.to(tl.int64) * K * V + o_state, dS, mask=m_kv)")
    src("if HAS_D:")
    src("    tl.store(dd_skip + (i_b * H + i_h) * V + j_v, acc_d, mask=m_v)")
    # parameters: [NB, NV or 1, H, ...] partial sums, reduced by the caller
    for fac in plan.factors:
        if fac.per_token:
            continue
        gp, acc = "g_" + fac.input, "acc_" + fac.input
        if fac.axes == "":
            src(f"tl.store({gp} + (i_b * NV + i_v) * H + i_h + tl.arange(0, 1), {acc})")
        elif fac.axes == "K":
            src(f"tl.store({gp} + ((i_b * NV + i_v) * H + i_h) * K + n_k, {acc}, mask=m_k)")
        elif fac.axes == "V":
            src(f"tl.store({gp} + (i_b * H + i_h) * V + j_v, {acc}, mask=m_v)")
        else:
            src(f"tl.store({gp} + ((i_b * H + i_h) * V + j_v[None, :]) * K + n_k[:, None], {acc}, mask=m_kv)")
    src.dedent()
    return src.text()


# ------------------------------------------------------------------------------------------
# disk cache + import
# ------------------------------------------------------------------------------------------

_LOADED: Dict[str, ModuleType] = {}
_LOCK = threading.Lock()


def cache_dir() -> Path:
    """Where generated kernels live: ``$OLSM_CACHE/kernels`` or ``~/.cache/olsm/kernels``."""
    root = os.environ.get("OLSM_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "olsm"
    return base / "kernels"


def load_kernels(plan: Plan, prefetch: Tuple[int, int] = (1, 1)) -> ModuleType:
    """Generate (once), write (once per machine) and import the kernel module of ``plan``.

    Returns:
        The imported module; ``module.fwd_kernel`` and ``module.bwd_kernel`` are
        ``@triton.jit`` functions, ``module.__file__`` the generated source.
    """
    prefetch = (int(prefetch[0]), int(prefetch[1]))
    if min(prefetch) < 1:
        raise BackendError(f"prefetch depths must be >= 1, got {prefetch}")
    key = plan.key(prefetch)
    with _LOCK:
        mod = _LOADED.get(key)
        if mod is not None:
            return mod
        text = generate_source(plan, prefetch)
        path = cache_dir() / f"elementwise_{key}.py"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:  # read-only home (some CI runners): fall back to the temp dir
            path = Path(tempfile.gettempdir()) / "olsm-kernels" / path.name
            path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            # write-then-rename: concurrent test workers never import a half-written file
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        name = f"olsm_generated_elementwise_{key}"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        _LOADED[key] = mod
        return mod
