"""Print a recurrence the way a paper writes it: ``S_t = (I − ε k kᵀ) S_{t-1} + ε k vᵀ``."""
from __future__ import annotations

import re

import sympy as sp

from .symbols import k_n, kk, v_j

GREEK = {"alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "eps": "ε", "eta": "η",
         "mu": "μ", "lambda": "λ", "dt": "Δ", "tau": "τ", "theta": "θ", "rho": "ρ", "omega": "ω"}
LATEX = {"alpha": r"\alpha", "beta": r"\beta", "gamma": r"\gamma", "delta": r"\delta",
         "eps": r"\epsilon", "eta": r"\eta", "mu": r"\mu", "lambda": r"\lambda", "dt": r"\Delta",
         "tau": r"\tau", "theta": r"\theta", "rho": r"\rho", "omega": r"\omega"}


def _name(sym: sp.Symbol, table) -> str:
    if sym == kk:
        return "kᵀk" if table is GREEK else r"k^\top k"
    m = re.match(r"(.*?)(?:_(jn|n|j))?$", sym.name)
    base, idx = m.group(1), m.group(2)
    word = table.get(base, base)
    if base.startswith("log_") and base[4:] in table:
        word = ("log " if table is GREEK else r"\log ") + table[base[4:]]
    if idx:
        return f"{word}_{idx}" if table is GREEK else f"{word}_{{{idx}}}"
    return word


def _named_exps(expr):
    """exp(log_alpha) -> alpha, so decays print as α rather than exp(log α)."""
    return expr.replace(
        lambda e: isinstance(e, sp.exp) and isinstance(e.args[0], sp.Symbol) and e.args[0].name.startswith("log_"),
        lambda e: sp.Symbol(e.args[0].name[4:], real=True))


def text(expr) -> str:
    """sympy expression -> compact unicode text with paper symbols."""
    expr = _named_exps(sp.sympify(expr))
    names = {s: sp.Symbol(_name(s, GREEK)) for s in expr.free_symbols}
    out = sp.sstr(expr.xreplace(names))
    return out.replace("**", "^").replace("*", "·")


def latex(expr) -> str:
    """sympy expression -> LaTeX with paper symbols."""
    expr = _named_exps(sp.sympify(expr))
    return sp.latex(expr, symbol_names={s: _name(s, LATEX) for s in expr.free_symbols})


def _coef(e, fmt):
    """Render a scalar coefficient in front of a vector product (``''`` for 1, ``-`` for -1)."""
    e = sp.simplify(e)
    if e == 1:
        return ""
    if e == -1:
        return "-"
    s = fmt(e)
    return f"({s})" if isinstance(e, sp.Add) else s


def _split_write(rec):
    """write coefficient c with ṽ = c · v (c may vary per value channel)."""
    return sp.simplify(rec.write_value / v_j), sp.simplify(rec.write_key / k_n)


def update_text(rec) -> str:
    """``S_t = ...`` as unicode text, followed by the aux definitions."""
    cv, ck = _split_write(rec)
    kvec = "k" if ck == 1 else f"({text(ck)} ⊙ k)"
    if "j" in "".join(s.name for s in cv.free_symbols if s.name.endswith("_j")):
        write = f"{kvec} ({text(cv)} ⊙ v)ᵀ"
    else:
        write = f"{_coef(cv, text)} {kvec} vᵀ".strip()
    if rec.kind == "elementwise":
        lines = [f"S_t = G_t ⊙ S_{{t-1}} + {write}", f"G_t[n, j] = {text(rec.gate)}"]
    else:
        trans = _transition_text(rec)
        lines = [f"S_t = {'' if trans == 'I' else trans + ' '}S_{{t-1}} + {write}"]
    lines += [f"{text(s)} = {text(e)}" for s, e in rec.aux]
    return "\n".join(lines)


def _has_key_index(e) -> bool:
    return any(x.name.endswith("_n") for x in sp.sympify(e).free_symbols)


def _combination(c0, coefs) -> str:
    """``c0 I + Σ c k kᵀ`` as text, signs pulled out (``I − ε k kᵀ``)."""
    out = "I" if c0 == 1 else f"{_coef(c0, text)} I"
    for c in coefs:
        c = sp.simplify(c)
        neg = c.could_extract_minus_sign()
        out += f" {'−' if neg else '+'} {_coef(-c if neg else c, text)} k kᵀ".replace("  ", " ")
    return out


def _transition_text(rec) -> str:
    """The transition as a paper writes it: ``α·(I − β k kᵀ)``, ``(I − ε k kᵀ) diag(α)``."""
    ld = sp.sympify(rec.log_decay)
    D = sp.exp(ld)
    per_key = _has_key_index(ld)
    if not rec.lowrank:
        return "I" if ld == 0 else (f"diag({text(D)})" if per_key else text(D))
    gs = [sp.simplify(lr.b / k_n) for lr in rec.lowrank]
    if all(lr.a == k_n for lr in rec.lowrank) and all(sp.simplify(g - gs[0]) == 0 for g in gs):
        g = gs[0]
        if per_key or _has_key_index(g):
            # D = c0·diag(g) and the rank-one terms are c k (g ⊙ k)ᵀ: (c0 I + c k kᵀ) diag(g)
            c0 = sp.simplify(D / g)
            if not _has_key_index(c0):
                inner = _combination(c0, [lr.coef for lr in rec.lowrank])
                return f"({inner})" + ("" if g == 1 else f" diag({text(g)})")
        else:
            # scalar D factors out on the left: D·(I + (c g / D) k kᵀ)
            inner = _combination(1, [lr.coef * g / D for lr in rec.lowrank])
            return f"({inner})" if ld == 0 else f"{text(D)}·({inner})"
    low = " + ".join(f"{_coef(lr.coef, text)} ({text(lr.a)})({text(lr.b)})ᵀ" for lr in rec.lowrank)
    diag = "I" if ld == 0 else (f"diag({text(D)})" if per_key else f"{text(D)} I")
    return f"({diag} + {low})"


def update_latex(rec) -> str:
    """The update as one LaTeX string."""
    cv, ck = _split_write(rec)
    kvec = "k_t" if ck == 1 else rf"({latex(ck)} \odot k_t)"
    write = rf"{kvec}\,({latex(cv)} \odot v_t)^\top"
    if rec.kind == "elementwise":
        body = rf"S_t = G_t \odot S_{{t-1}} + {write},\quad G_t[n,j] = {latex(rec.gate)}"
    else:
        trans = latex(sp.exp(rec.log_decay)) if rec.log_decay != 0 else "I"
        low = "".join(rf" + \left({latex(lr.coef)}\right)({latex(lr.a)})({latex(lr.b)})^\top" for lr in rec.lowrank)
        body = rf"S_t = \left(\mathrm{{diag}}\!\left({trans}\right){low}\right) S_{{t-1}} + {write}"
    aux = "".join(rf",\quad {latex(s)} = {latex(e)}" for s, e in rec.aux)
    return body + aux
