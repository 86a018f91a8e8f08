"""Pieces of generated kernel source that work on one block of BT tokens.

The kernels of :mod:`.codegen` walk a sequence in blocks of ``BT`` tokens and hold, per
block, 3-D tiles ``[BT, BK, BV]`` (token, key, value). This module prints the parts of a
block step that depend on the recurrence:

* :class:`BlockLoads`: the per-block loads of q, k, v, do and the per-token coefficients as
  ``[BT, BK]``, ``[BT, BV]`` or ``[BT]`` tiles, optionally a few blocks ahead (prefetch);
* :func:`emit_block_masks`: which rows of the block are tokens of this sequence;
* :func:`emit_factors` / :func:`emit_params`: every sympy factor as a variable that
  broadcasts against ``[BT, BK, BV]``;
* :class:`Coefficients`: G, k̃, ṽ (and their partial derivatives) printed from sympy;
* :func:`grad_expr`: the source of one factor's gradient, reduced to the factor's axes.

Names the printed code relies on (defined by the kernel head of :mod:`.codegen`): ``rows``
(``tl.arange(0, BT)``), ``r3`` (``rows[:, None, None]``), ``n_k``, ``j_v``, ``m_k``, ``m_v``,
``i_h``, ``eos``, ``H``, ``K``, ``V``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import sympy as sp

from .plan import Factor, Plan
from .printer import TritonPrinter


class Src:
    """Lines of Python source with an indentation cursor."""

    def __init__(self):
        self.lines: List[str] = []
        self.level = 0

    def __call__(self, *lines: str) -> "Src":
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


#: pointer offset and mask of a per-token tile, by the axis it spans besides tokens; the
#: row tokens are ``{tok}`` ([BT] int64) and the valid rows ``{m}`` ([BT] bool)
_TILE = {
    "K": ("(({tok})[:, None] * H + i_h) * K + n_k[None, :]", "({m})[:, None] & m_k[None, :]"),
    "V": ("(({tok})[:, None] * H + i_h) * V + j_v[None, :]", "({m})[:, None] & m_v[None, :]"),
    "": ("({tok}) * H + i_h", "({m})"),
}


def tile_addr(ptr: str, axes: str, tok: str, m: str) -> Tuple[str, str]:
    """Pointer expression and mask of a ``[BT, BK]``, ``[BT, BV]`` or ``[BT]`` token tile."""
    off, mask = _TILE[axes]
    return f"{ptr} + {off.format(tok=tok)}", mask.format(m=m)


class BlockLoads:
    """The per-block loads of one loop over blocks, emitted in prefetch style.

    Each tensor is loaded ``depth`` blocks ahead into a ring of named slots
    ``<name>_p0 .. <name>_p{depth-1}`` (raw dtype) and converted to float32 ``<name>_c`` when
    its block comes up, so the global-memory latency of block i+depth overlaps the arithmetic
    of blocks i .. i+depth-1 (one program walks its blocks in sequence; the few programs in
    flight at small batch cannot hide that latency for each other). ``depth = 0`` loads each
    block when it is used.

    Args:
        plan: the recurrence.
        with_q, with_do: also load q (``[BT, BK]``) and do (``[BT, BV]``).
        depth: blocks loaded ahead.
    """

    def __init__(self, plan: Plan, with_q: bool, with_do: bool, depth: int = 1):
        self.depth = int(depth)
        self.items: List[Tuple[str, str, str, str]] = []  # (name, pointer, axes, padding)
        if with_q:
            self.items.append(("q", "q", "K", "0.0"))
        self.items.append(("k", "k", "K", "0.0"))
        self.items.append(("v", "v", "V", "0.0"))
        if with_do:
            self.items.append(("do", "do", "V", "0.0"))
        for fac in plan.factors:
            if fac.input and fac.per_token:
                # coefficient padding is 1.0: harmless in log, division and sqrt
                self.items.append(("in_" + fac.input, "x_" + fac.input, fac.axes, "1.0"))

    def _issue(self, src: Src, start: str, cond: str, dest: str):
        """Load the block of tokens ``start + rows`` into ``<name><dest>`` (all rows masked
        off unless the scalar ``cond`` holds).

        A vector mask `and` a scalar condition is written as one comparison against a
        conditional bound: the Triton interpreter mistypes ``bool_vector & bool_scalar``.
        """
        src(f"b_tok = ({start}) + rows")
        src(f"b_m = rows < tl.where({cond}, eos - ({start}), 0)")
        for name, ptr, axes, other in self.items:
            addr, mask = tile_addr(ptr, axes, "b_tok", "b_m")
            src(f"{name}{dest} = tl.load({addr}, mask={mask}, other={other})")

    def prologue(self, src: Src, first: str, step: str, n: str):
        """Fill the ring with the blocks starting at ``first + s*step`` for s < depth
        (valid while s < n)."""
        for s in range(self.depth):
            self._issue(src, f"{first} + {s} * ({step})" if s else first, f"{s} < {n}", f"_p{s}")

    def take(self, src: Src, start: str, step: str, i: str, n: str):
        """Make ``<name>_c`` the float32 tiles of the block at ``start`` (the i-th of n) and
        load the block ``depth`` steps further."""
        if self.depth == 0:
            self._issue(src, start, f"{i} < {n}", "_r")
            for name, *_ in self.items:
                src(f"{name}_c = {name}_r.to(tl.float32)")
            return
        for name, *_ in self.items:
            src(f"{name}_c = {name}_p0.to(tl.float32)")
        for s in range(self.depth - 1):
            for name, *_ in self.items:
                src(f"{name}_p{s} = {name}_p{s + 1}")
        self._issue(src, f"{start} + {self.depth} * ({step})", f"{i} + {self.depth} < {n}",
                    f"_p{self.depth - 1}")


def emit_block_masks(src: Src, start: str, full: bool = False):
    """Row tokens ``tok`` of the block at ``start`` and the masks of its valid entries.

    ``m_t`` [BT] marks tokens of this sequence (``full``: all of them, a constant the compiler
    folds); ``m_tk`` [BT, BK], ``m_tv`` [BT, BV] add the key/value padding; ``m_t3``,
    ``m_tk3``, ``m_tv3``, ``m_tkv`` are their 3-D views.
    """
    src(
        f"tok = ({start}) + rows",
        "m_t = tl.full([BT], 1, tl.int1)" if full else f"m_t = rows < (eos - ({start}))",
        "m_t3 = m_t[:, None, None]",
        "m_tk = m_t[:, None] & m_k[None, :]",
        "m_tv = m_t[:, None] & m_v[None, :]",
        "m_tk3 = m_tk[:, :, None]",
        "m_tv3 = m_tv[:, None, :]",
        "m_tkv = m_tk3 & m_v[None, None, :]",
    )


#: a factor of the given axes as a view broadcasting against [BT, BK, BV]
_PER_TOKEN_VIEW = {"": "{x}[:, None, None]", "K": "{x}[:, :, None]", "V": "{x}[:, None, :]"}


def emit_factors(src: Src, plan: Plan):
    """Per-token factor variables of the current block from its float32 tiles."""
    for fac in plan.factors:
        if fac.name == "k_n":
            src("s_k_n = k_c[:, :, None]")
        elif fac.name == "v_j":
            src("s_v_j = v_c[:, None, :]")
        elif fac.name == "kk":
            src("s_kk = _sum(k_c * k_c, 1)[:, None, None]  # kᵀk over the whole key (one tile)")
        elif fac.per_token:
            src(f"{fac.var} = {_PER_TOKEN_VIEW[fac.axes].format(x='in_' + fac.input + '_c')}")


def emit_params(src: Src, plan: Plan):
    """Load the per-head parameters once, before the loop over blocks."""
    for fac in plan.factors:
        if fac.per_token:
            continue
        p = "x_" + fac.input
        if fac.axes == "":
            src(f"{fac.var} = tl.load({p} + i_h).to(tl.float32)")
        elif fac.axes == "K":
            src(f"{fac.var} = tl.load({p} + i_h * K + n_k, mask=m_k, other=1.0).to(tl.float32)[None, :, None]")
        elif fac.axes == "V":
            src(f"{fac.var} = tl.load({p} + i_h * V + j_v, mask=m_v, other=1.0).to(tl.float32)[None, None, :]")
        else:  # [H, V, K]: the tile is [BK, BV], so n runs down rows and j across columns
            src(
                f"{fac.var} = tl.load({p} + (i_h * V + j_v[None, :]) * K + n_k[:, None], "
                f"mask=m_kv, other=1.0).to(tl.float32)[None, :, :]"
            )


class Coefficients:
    """G, k̃, ṽ of a block and (optionally) their partial derivatives, printed from sympy.

    One common-sub-expression elimination covers all of them, but the lines are emitted in
    two groups: :meth:`emit_values` prints what G, k̃, ṽ need, :meth:`emit_partials` the
    rest. The backward prints the partials after its two scans, so their [BT, BK, BV] tiles
    are not alive across the scans (registers are what bounds the tile size). In the partials
    the gate's own expression is replaced by the computed ``G`` (``∂ exp(Δ A)/∂A = Δ · G``).

    Args:
        plan: the recurrence.
        with_partials: also print the partial derivatives.
    """

    def __init__(self, plan: Plan, with_partials: bool):
        gate = sp.Symbol("G_gate_value")
        names = {f.name: f.var for f in plan.factors}
        names[gate.name] = "G"
        printer = TritonPrinter(names, sigmoid="_sigmoid", exp="_exp")
        exprs = [plan.gate, plan.wk, plan.wv]
        if with_partials:
            exprs += [p.expr.subs(plan.gate, gate) for p in plan.partials]
        # cse0, cse1, ...: no clash with kernel names
        repl, reduced = sp.cse(exprs, symbols=sp.numbered_symbols("cse"), optimizations="basic")
        defs = dict(repl)
        needed, todo = set(), [s for e in reduced[:3] for s in e.free_symbols]
        while todo:
            sym = todo.pop()
            if sym in defs and sym not in needed:
                needed.add(sym)
                todo.extend(defs[sym].free_symbols)
        self._values: List[str] = []
        self._partials: List[str] = []
        for sym, e in repl:
            printer.names[sym.name] = sym.name
            line = f"{sym.name} = {printer.doprint(e)}"
            (self._values if sym in needed else self._partials).append(line)
        out = [printer.doprint(e) for e in reduced]
        self.G, self.wk, self.wv = out[:3]
        #: (of, factor) -> source of that partial derivative
        self.parts: Dict[Tuple[str, str], str] = {
            (p.of, p.factor): code for p, code in zip(plan.partials, out[3:])
        } if with_partials else {}

    def emit_values(self, src: Src):
        """Emit ``G`` [BT, BK, BV], ``wk`` (k̃) [BT, BK, 1] and ``wv`` (ṽ) [BT, 1, BV].

        Padded key/value lanes get G = k̃ = ṽ = 0, whatever the formulas give there (log(0),
        1/0, ...), so S and dS stay exactly zero on them. Rows past the sequence's end get
        G = 1 and k̃ = ṽ = 0, the identity step, so a scan carries the last token's state
        through them to the block's last row.
        """
        src(*self._values)
        src(f"G = tl.where(m_tkv, {self.G}, tl.where(m_t3, 0.0, 1.0))")
        src(f"wk = tl.where(m_tk3, {self.wk}, 0.0)")
        src(f"wv = tl.where(m_tv3, {self.wv}, 0.0)")

    def emit_partials(self, src: Src):
        """Emit the sub-expressions only the partial derivatives need (after ``G``)."""
        src(*self._partials)


#: reductions from [BT, BK, BV] down to a per-token factor's axes
_PER_TOKEN_SUM = {"": "_sum(_sum({t}, 2), 1)", "K": "_sum({t}, 2)", "V": "_sum({t}, 1)"}

#: ... and to a parameter's axes (the token axis summed too)
_PARAM_SUM = {
    "": "_sum(_sum(_sum({t}, 2), 1), 0)",
    "K": "_sum(_sum({t}, 2), 0)",
    "V": "_sum(_sum({t}, 1), 0)",
    "VK": "_sum({t}, 0)",
}


def grad_expr(parts: Dict[Tuple[str, str], str], fac: Factor) -> Optional[str]:
    """Source of dL/d(factor) over the block, reduced to the factor's own axes.

    With ``dG = dS ⊙ S_{t-1}``, ``dk̃ = Σ_j dS ṽ`` and ``dṽ = Σ_n dS k̃``, the gradient of a
    factor f is the sum over the axes f does not span of the single [BT, BK, BV] tile

        dG · ∂G/∂f  +  dS ṽ · ∂k̃/∂f  +  dS k̃ · ∂ṽ/∂f

    (∂k̃/∂f does not vary along V, nor ∂ṽ/∂f along K, so they move inside the sums). One
    reduction per factor, not one per term: reductions cross lanes and warps (shuffles,
    shared memory, barriers) and cost more than the extra multiplications. Entries outside
    the sequence or the padded lanes are masked: the scans leave values there.

    Returns:
        ``[BT]``, ``[BT, BK]`` or ``[BT, BV]`` for per-token factors, the factor's own shape
        summed over the block's tokens for parameters; ``None`` when no coefficient depends
        on the factor.
    """
    terms = []
    for of, adj in (("G", "dG"), ("wk", "dS * wv"), ("wv", "dS * wk")):
        code = parts.get((of, fac.name))
        if code is not None:
            terms.append(adj if code == "1.0" else f"{adj} * ({code})")
    if not terms:
        return None
    sums = _PER_TOKEN_SUM if fac.per_token else _PARAM_SUM
    return sums[fac.axes].format(t=f"tl.where(m_tkv, {' + '.join(terms)}, 0.0)")
