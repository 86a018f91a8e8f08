r"""Chunked torch backend for the elementwise-gate class (DESIGN §3, class 2).

Per head the recurrence is::

    S_t = G_t ⊙ S_{t-1} + w_t u_tᵀ,    o_t = scale · S_tᵀ q_t

Each step is the affine map S -> G ⊙ S + X (X_t = w_t u_tᵀ), and affine maps compose
associatively: applying (G1, X1) then (G2, X2) is (G2 ⊙ G1, G2 ⊙ X1 + X2). So within a chunk a
log-depth inclusive scan (Hillis-Steele) over the pairs gives, for every t, the map from the
chunk start, S_t = Ĝ_t ⊙ S_0 + X̂_t. The chunk-end map (Ĝ_C, X̂_C) carries the state to the next
chunk, and the outputs follow in parallel. Only products of gates are formed, never quotients:
a cumulative gate may underflow to 0 (or a gate may be 0 or negative), where dividing by it, as
a "cumulative product / cumulative product" formulation would, breaks.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from einops import einsum

from .chunked_common import DEFAULT_CHUNK_SIZE, check_chunk_size, chunk_length, from_chunks, to_chunks
from .reference import accumulation_dtype
from .varlen import run_per_sequence


def elementwise(
    q: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    gate: torch.Tensor,
    *,
    scale: float = 1.0,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE,
):
    """Elementwise-gate recurrence, chunked scan (same contract as ``reference.elementwise``).

    Args:
        q: queries ``[B, T, H, K]``.
        w: written keys ``[B, T, H, K]``.
        u: written values ``[B, T, H, V]``.
        gate: G ``[B, T, H, K, V]`` (the gate itself, not its log; any real value).
        scale: readout scale.
        initial_state: ``[B, H, K, V]`` (``[N, H, K, V]`` with ``cu_seqlens``) or ``None``.
        output_final_state: return the last state.
        cu_seqlens: ``[N + 1]`` boundaries of packed sequences (then ``B == 1``).
        chunk_size: tokens per chunk (positive int; ``None`` means 64).

    Returns:
        ``o [B, T, H, V]`` in q's dtype and the final state ``[B, H, K, V]`` (float32 or
        float64) or ``None``.

    Raises:
        InputError: bad ``chunk_size``.
    """
    chunk_size = check_chunk_size(chunk_size)
    if cu_seqlens is not None:
        return run_per_sequence(
            elementwise, dict(q=q, w=w, u=u, gate=gate),
            cu_seqlens, initial_state, output_final_state, scale=scale, chunk_size=chunk_size,
        )
    B, T, H, K = q.shape
    V = u.shape[-1]
    acc = accumulation_dtype(q.dtype)
    C = chunk_length(chunk_size, T)

    # Padded tokens are the identity map (G = 1, X = 0), so the final state is exact.
    qc, wc, uc = (to_chunks(x.to(acc), C, 0.0) for x in (q, w, u))   # [B, H, N, C, K|V]
    Gc = to_chunks(gate.to(acc), C, 1.0)                              # [B, H, N, C, K, V]
    Xc = wc[..., :, None] * uc[..., None, :]                          # w_t u_tᵀ
    G_hat, X_hat = scan_affine(Gc, Xc)                                # maps from each chunk start

    # Sequential part: one elementwise affine map per chunk.
    S = q.new_zeros(B, H, K, V, dtype=acc) if initial_state is None else initial_state.to(acc)
    starts = []
    for n in range(Gc.shape[2]):
        starts.append(S)
        S = G_hat[:, :, n, -1] * S + X_hat[:, :, n, -1]
    S0 = torch.stack(starts, dim=2)                                   # [B, H, N, K, V]

    states = G_hat * S0[:, :, :, None] + X_hat                        # S_t, [B, H, N, C, K, V]
    o = einsum(qc, states, "b h n c k, b h n c k v -> b h n c v") * scale
    return from_chunks(o, T).to(q.dtype), (S if output_final_state else None)


def scan_affine(G: torch.Tensor, X: torch.Tensor, dim: int = -3) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inclusive Hillis-Steele scan of elementwise affine maps along ``dim``.

    Step t is the map S -> G_t ⊙ S + X_t; the result at t is the composition of steps 0..t,
    ``(Ĝ_t, X̂_t)`` with ``S_t = Ĝ_t ⊙ S_{-1} + X̂_t``. After the round with offset d, position t
    holds the composition of steps max(0, t-2d+1)..t; log2(C) rounds cover the chunk. Every round
    is out of place so autograd can differentiate it.

    Args:
        G: gates ``[..., C, K, V]`` (time at ``dim``).
        X: writes, same shape.
        dim: the time dimension.

    Returns:
        ``(Ĝ, X̂)``, same shapes.
    """
    dim = dim % G.dim()
    C = G.shape[dim]
    d = 1
    while d < C:
        head = lambda x: x.narrow(dim, 0, d)          # positions < d: already complete
        earlier = lambda x: x.narrow(dim, 0, C - d)   # the map ending at t - d
        later = lambda x: x.narrow(dim, d, C - d)     # the map ending at t
        # compose (earlier, then later): (G2 G1, G2 X1 + X2), both from the old G
        G, X = (
            torch.cat([head(G), later(G) * earlier(G)], dim=dim),
            torch.cat([head(X), later(G) * earlier(X) + later(X)], dim=dim),
        )
        d *= 2
    return G, X
