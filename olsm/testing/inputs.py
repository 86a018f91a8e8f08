"""Random, well-conditioned inputs for a recurrence (respecting declared constraints)."""
from __future__ import annotations

import torch


def random_coefficient(spec, dims, generator, dtype=torch.float64, device="cpu"):
    """A tensor for one InputSpec, inside its constraint and in a stable range.

    Positive inputs lie in [0.1, 1] (β, Δ: keeps ``I − βkkᵀ`` a contraction with unit keys);
    non-positive ones in [−1, 0] (log-decays); negative ones in [−1, −0.1] (Mamba's A).
    """
    B, T, H, K, V = dims
    shape = spec.expected_shape(B, T, H, K, V)
    u = torch.rand(shape, generator=generator, dtype=dtype).to(device)
    c = spec.constraint
    if c in ("positive", "nonnegative"):
        return 0.1 + 0.9 * u
    if c == "nonpositive":
        return -u
    if c == "negative":
        return -(0.1 + 0.9 * u)
    return 2 * u - 1


def random_inputs(rec, dims, seed=0, dtype=torch.float64, device="cpu", requires_grad=False):
    """q, k (unit rows), v, coefficients and an initial state for ``rec``.

    Args:
        rec: a Recurrence.
        dims: ``(B, T, H, K, V)``.
        seed: RNG seed (inputs are reproducible).

    Returns:
        ``(q, k, v, coefs, h0)`` with h0 ``[B, H, K, V]``.
    """
    g = torch.Generator().manual_seed(seed)
    B, T, H, K, V = dims
    q = torch.randn(B, T, H, K, generator=g, dtype=dtype)
    k = torch.randn(B, T, H, K, generator=g, dtype=dtype)
    k = k / k.norm(dim=-1, keepdim=True)  # unit keys keep delta-type transitions contractive
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    coefs = {s.name: random_coefficient(s, dims, g, dtype) for s in rec.inputs}
    h0 = torch.randn(B, H, K, V, generator=g, dtype=dtype)
    out = [q, k, v, coefs, h0]
    out = [x.to(device) if torch.is_tensor(x) else {n: t.to(device) for n, t in x.items()} for x in out]
    if requires_grad:
        for x in (out[0], out[1], out[2], out[4], *out[3].values()):
            x.requires_grad_(True)
    return tuple(out)
