"""Property checks users run on their own objectives: ``check_objective(obj)``.

=========  ===================================================================
check      property
=========  ===================================================================
argmin     derived update == the declared objective's update, computed numerically
chunked    torch (chunked) backend == reference: outputs, final state, every gradient
split      one run == the same sequence in pieces with the state carried over,
           == token-by-token decoding with ``rec.step``
kernel     (opt-in) the Triton backend in float32 == the float64 reference: outputs,
           final state, every gradient; compiled on a GPU, or in Triton's interpreter
           on a CPU (``TRITON_INTERPRET=1`` before triton is imported)
=========  ===================================================================

``CHECKS`` are the default ones (``olsm verify``); ``ALL_CHECKS`` adds ``kernel``
(``olsm verify NAME --checks kernel``, ``check_objective(obj, checks=ALL_CHECKS)``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..derivation import derive
from ..load import load_objective
from .argmin import declared_gate_and_write, declared_update
from .inputs import random_inputs

CHECKS = ("argmin", "chunked", "split")
ALL_CHECKS = CHECKS + ("kernel",)
#: float64 checks near rounding; the kernel check's float32 (and, on a GPU, tf32 dots for the
#: matrix class) errors as the GPU tests bound them
TOLERANCE = {"argmin": 1e-9, "chunked": 1e-10, "split": 1e-10, "kernel": 1e-3}


@dataclass
class CheckResult:
    """One row of ``olsm verify``."""

    objective: str
    check: str
    passed: bool
    max_error: float
    tolerance: float
    message: str = ""


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|x − ref| / max(1, max|ref|)``: relative for large values, absolute near 0."""
    return ((x - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item() if ref.numel() else 0.0


def _token_coefs(rec, coefs, b, t, h):
    out = {}
    for s in rec.inputs:
        x = coefs[s.name]
        out[s.name] = x[b, t, h] if s.per_token else x[h]
    return out


def argmin_error(rec, dims=(1, 1, 1, 3, 2), seed=0) -> float:
    """Max relative error between the derived step and the declared objective's update."""
    q, k, v, coefs, h0 = random_inputs(rec, dims, seed)
    B, T, H, K, V = dims
    _, S1 = rec(q[:, :1], k[:, :1], v[:, :1], initial_state=h0, output_final_state=True, backend="reference",
                **{n: (x[:, :1] if s.per_token else x) for s, (n, x) in zip(rec.inputs, coefs.items())})
    err = 0.0
    for b in range(B):
        for h in range(H):
            c = _token_coefs(rec, coefs, b, 0, h)
            if rec.approximation == "diagonal":
                G, W = declared_gate_and_write(rec.objective, rec.inputs, h0[b, h], k[b, 0, h], v[b, 0, h], c)
                want = G * h0[b, h] + W
            else:
                want = declared_update(rec.objective, rec.inputs, h0[b, h], k[b, 0, h], v[b, 0, h], c)
            err = max(err, rel_err(S1[b, h], want.detach()))
    return err


def _loss_weights(dims, seed):
    """Random float64 weights of the outputs and the final state in the checks' scalar loss."""
    g = torch.Generator().manual_seed(seed + 1)
    B, T, H, K, V = dims
    return torch.randn(B, T, H, V, generator=g, dtype=torch.float64), torch.randn(B, H, K, V, generator=g,
                                                                                  dtype=torch.float64)


def _outputs_and_grads(rec, leaves, names, backend, chunk_size, weights):
    """``[o, S, d/d leaf ...]`` (float64, on the CPU) of one run of ``rec`` on ``leaves`` =
    ``[q, k, v, h0, *coefficients named names]``, the loss weighting o and S by ``weights``."""
    q, k, v, h0, *cs = leaves
    o, S = rec(q, k, v, initial_state=h0, output_final_state=True, backend=backend, chunk_size=chunk_size,
               **dict(zip(names, cs)))
    w_o, w_S = weights
    loss = (o.double() * w_o.to(o.device)).sum() + (S.double() * w_S.to(S.device)).sum()
    # an objective may ignore an input (weight decay alone never reads v): its grad is 0
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if d is None else d for x, d in zip(leaves, grads)]
    return [t.detach().double().cpu() for t in (o, S, *grads)]


def chunked_error(rec, dims=(2, 37, 2, 8, 5), seed=0, chunk_size=16, backend="torch") -> float:
    """Max relative error of ``backend`` vs reference over outputs, final state and gradients."""
    q, k, v, coefs, h0 = random_inputs(rec, dims, seed, requires_grad=True)
    leaves, weights = [q, k, v, h0, *coefs.values()], _loss_weights(dims, seed)
    ref, got = (_outputs_and_grads(rec, leaves, coefs, name, chunk_size, weights) for name in ("reference", backend))
    return max(rel_err(x, r) for x, r in zip(got, ref))


def split_error(rec, dims=(1, 29, 2, 6, 4), seed=0, cut=(11, 12), backend="torch") -> float:
    """One run vs. pieces with carried state vs. token-by-token ``rec.step``."""
    q, k, v, coefs, h0 = random_inputs(rec, dims, seed)
    per_token = {s.name for s in rec.inputs if s.per_token}
    o_full, S_full = rec(q, k, v, initial_state=h0, output_final_state=True, backend=backend, chunk_size=8, **coefs)
    bounds = [0, *cut, dims[1]]
    outs, S = [], h0
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        piece = {n: (x[:, lo:hi] if n in per_token else x) for n, x in coefs.items()}
        o, S = rec(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], initial_state=S, output_final_state=True,
                   backend=backend, chunk_size=8, **piece)
        outs.append(o)
    err = max(rel_err(torch.cat(outs, 1), o_full), rel_err(S, S_full))
    S, steps = h0, []
    for t in range(dims[1]):
        one = {n: (x[:, t] if n in per_token else x) for n, x in coefs.items()}
        o, S = rec.step(q[:, t], k[:, t], v[:, t], S, **one)
        steps.append(o)
    return max(err, rel_err(torch.stack(steps, 1), o_full), rel_err(S, S_full))


def kernel_error(rec, dims=(2, 37, 2, 8, 5), seed=0, chunk_size=16) -> float:
    """Max error of the Triton backend, run in float32, against the float64 reference over
    outputs, final state and every gradient, each as ``‖x − ref‖ / ‖ref‖`` (a norm, as the GPU
    tests measure: float32 sums round differently from one token to the next).

    The kernels run compiled on a CUDA device, or in Triton's interpreter on a CPU, which needs
    ``TRITON_INTERPRET=1`` in the environment before triton is first imported (otherwise the
    backend raises a ``BackendError`` that says so). Long sequences on a GPU also take the
    launch decisions of real calls (e.g. the elementwise backward's split along the sequence).
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, coefs, h0 = random_inputs(rec, dims, seed, requires_grad=True)
    leaves, weights = [q, k, v, h0, *coefs.values()], _loss_weights(dims, seed)
    ref = _outputs_and_grads(rec, leaves, coefs, "reference", chunk_size, weights)
    leaves32 = [x.detach().to(device, torch.float32).requires_grad_() for x in leaves]
    got = _outputs_and_grads(rec, leaves32, coefs, "triton", chunk_size, weights)
    return max(((x - r).norm() / r.norm().clamp(min=1e-30)).item() for x, r in zip(got, ref))


_FNS = {"argmin": argmin_error, "chunked": chunked_error, "split": split_error, "kernel": kernel_error}


def run_check(objective, check: str, examples: int = 5, seed: int = 0) -> CheckResult:
    """Run one property on ``examples`` random problems; never raises on a failed check."""
    obj = load_objective(objective)
    tol = TOLERANCE[check]
    try:
        rec = derive(obj)
        err = max(_FNS[check](rec, seed=seed + i) for i in range(examples))
    except Exception as e:  # a crash is a failure, reported in the table
        return CheckResult(obj.name, check, False, float("nan"), tol, f"{type(e).__name__}: {e}")
    ok = err <= tol
    return CheckResult(obj.name, check, ok, err, tol, "" if ok else f"error {err:.2e} > {tol:.0e}")


def check_objective(objective, examples: int = 5, seed: int = 0, checks=CHECKS):
    """Check a (user's) objective: derivation, backends and state carrying.

    Args:
        objective: an Objective, catalogue name or ``FILE.py:NAME``.
        examples: random problems per property.
        seed: first seed.
        checks: subset of :data:`ALL_CHECKS` (default :data:`CHECKS`; ``kernel`` is opt-in).

    Returns:
        list of :class:`CheckResult`.

    Raises:
        AssertionError: listing every failed property and its error.
    """
    rows = [run_check(objective, c, examples, seed) for c in checks]
    bad = [r for r in rows if not r.passed]
    if bad:
        raise AssertionError("; ".join(f"{r.objective}/{r.check}: {r.message}" for r in bad))
    return rows
