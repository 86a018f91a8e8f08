"""The elementwise-gate recurrence in plain torch, by materialising G: the kernels' truth.

It evaluates the IR's ``aux``, ``gate``, ``write_key`` and ``write_value`` with torch
(``sympy.lambdify`` over broadcast views of the inputs), builds the full gate tensor
``G [B, T, H, K, V]`` and hands everything to :func:`olsm.backends.reference.elementwise`,
the step-by-step definition of the class. Autograd through it gives reference gradients.
Memory is ``O(B·T·H·K·V)``: fine for tests, not for training.
"""
from __future__ import annotations

from typing import Dict, Optional

import sympy as sp
import torch

from olsm.backends import reference
from olsm.errors import InputError

#: sympy function name -> torch callable, for lambdify
TORCH_FUNCTIONS = {
    "exp": torch.exp,
    "log": torch.log,
    "sqrt": torch.sqrt,
    "Abs": torch.abs,
    "sin": torch.sin,
    "cos": torch.cos,
    "tanh": torch.tanh,
    "erf": torch.erf,
    "log1p": torch.log1p,
    "expm1": torch.expm1,
    "sign": torch.sign,
}


def _views(rec, q, k, v, coefs) -> Dict[str, torch.Tensor]:
    """Every symbol the IR may use, as a tensor broadcastable to ``[B, T, H, K, V]``."""
    views = {
        "k_n": k[..., :, None],
        "v_j": v[..., None, :],
        "kk": (k * k).sum(-1)[..., None, None],
    }
    for spec in rec.inputs:
        if spec.name not in coefs:
            raise InputError(f"missing coefficient {spec.name!r} {spec.shape} for {rec.name!r}")
        x = coefs[spec.name].to(q.dtype)
        axes = tuple(spec.axes)
        if spec.per_token:
            x = {(): x[..., None, None], ("K",): x[..., :, None], ("V",): x[..., None, :]}[axes]
        else:  # [H, ...] parameter -> [1, 1, H, K or 1, V or 1]
            if axes == ():
                x = x[:, None, None]
            elif axes == ("K",):
                x = x[:, :, None]
            elif axes == ("V",):
                x = x[:, None, :]
            else:  # [H, V, K] -> [H, K, V]
                x = x.transpose(-1, -2)
            x = x[None, None]
        views[spec.symbol.name] = x
    return views


def _evaluate(expr: sp.Expr, env: Dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    expr = sp.sympify(expr)
    syms = sorted(expr.free_symbols, key=lambda s: s.name)
    fn = sp.lambdify(syms, expr, modules=[TORCH_FUNCTIONS, "math"])
    out = fn(*[env[s.name] for s in syms])
    return out if torch.is_tensor(out) else torch.full((), float(out), dtype=like.dtype, device=like.device)


def coefficients(rec, q, k, v, coefs):
    """Evaluate the IR on tensors.

    Returns:
        ``(G [B, T, H, K, V], k̃ [B, T, H, K], ṽ [B, T, H, V])`` in q's dtype.
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    env = _views(rec, q, k, v, coefs)
    for sym, e in rec.aux:  # in order: later definitions may use earlier ones
        env[sym.name] = _evaluate(e, env, q)
    G = _evaluate(rec.gate, env, q).expand(B, T, H, K, V)
    wk = _evaluate(rec.write_key, env, q).expand(B, T, H, K, 1)[..., 0]
    wv = _evaluate(rec.write_value, env, q).expand(B, T, H, 1, V)[..., 0, :]
    return G, wk, wv


def elementwise_scan_torch(
    rec,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    coefs: dict,
    *,
    scale: float = 1.0,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
    D: Optional[torch.Tensor] = None,
):
    """Same contract as :func:`olsm.kernels.elementwise.elementwise_scan`, in plain torch.

    Args:
        rec: elementwise-class recurrence IR.
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        coefs: coefficient tensors keyed by input name.
        scale: readout scale.
        initial_state: ``[N, H, K, V]`` or ``None``.
        output_final_state: return the final state.
        cu_seqlens: ``[N + 1]`` packed-sequence boundaries (``B == 1``).
        chunk_size: ignored.
        D: optional skip ``[H, V]``: ``o += D[h, j] · v``.

    Returns:
        ``(o [B, T, H, V] in q's dtype, S [N, H, K, V] or None)``.
    """
    acc = reference.accumulation_dtype(q.dtype)
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    G, wk, wv = coefficients(rec, qa, ka, va, {n: c.to(acc) for n, c in coefs.items()})
    o, S = reference.elementwise(
        qa, wk, wv, G, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens,
    )
    if D is not None:
        o = o + D.to(acc)[None, None] * va
    return o.to(q.dtype), S
