r"""Chunked torch backend for the matrix class (DESIGN §3, class 1).

Per head the recurrence is::

    S_t = (D_t + Σ_r a_{t,r} b_{t,r}ᵀ) S_{t-1} + w_t u_tᵀ,    D_t = diag(exp(log_decay_t))
    o_t = scale · S_tᵀ q_t

Derivation of the chunked form. Fix a chunk of C tokens t = 1..C starting from state S_0.
Let Γ_t = D_1 ⋯ D_t (Γ_0 = I) and call x_{t,r} = b_{t,r}ᵀ S_{t-1} ∈ R^{1×V} the "probe" of rank r
at step t. The transition then reads S_t = D_t S_{t-1} + Σ_r a_{t,r} x_{t,r} + w_t u_tᵀ, a purely
diagonal recurrence with extra writes a_{t,r} x_{t,r}, so it unrolls to::

    S_t = Γ_t S_0 + Σ_{s≤t} (Γ_t/Γ_s) (Σ_r a_{s,r} x_{s,r} + w_s u_sᵀ)                      (1)

Multiplying (1) at t-1 by b_{t,r}ᵀ gives a linear system for the probes; it only couples x_t
to earlier x_s (s < t), so in the (t, r) ordering it is unit lower triangular::

    (I − M) X = B̃ S_0 + N U
    M[(t,r),(s,r')] = b_{t,r}ᵀ (Γ_{t-1}/Γ_s) a_{s,r'}   (s < t)
    N[(t,r), s]     = b_{t,r}ᵀ (Γ_{t-1}/Γ_s) w_s        (s < t)
    B̃[(t,r), :]     = b_{t,r}ᵀ Γ_{t-1}

(the WY/UT idea of DeltaNet, arXiv 2406.06484, generalised to per-key decay and any rank).
Solving it once per chunk for both right-hand sides gives X = T₁ S_0 + T₂ (T₁ = (I−M)⁻¹B̃,
T₂ = (I−M)⁻¹NU), all chunks in parallel. By (1), the chunk is then an affine map of its start
state, S_C = P S_0 + Q, with P = Γ_C + Aᵀ T₁ and Q = Aᵀ T₂ + Wᵀ U (A, W = a, w scaled by Γ_C/Γ_s).
Only this [K, K]/[K, V] map is carried sequentially from chunk to chunk; the outputs follow from
(1) in parallel once every chunk's S_0 is known.

Stability: every decay factor is a ratio Γ_t/Γ_s = exp(cum_t − cum_s) with s ≤ t and cum the
chunk-relative cumulative log-decay, so only exp of non-positive numbers is ever taken (no
GLA-style exp(−cum_s) that overflows). For per-key decay the ratios form a [C, C, K] tensor,
for a scalar decay [C, C]. Everything is plain torch, so autograd differentiates it.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from einops import rearrange

from .chunked_common import DEFAULT_CHUNK_SIZE, check_chunk_size, chunk_length, from_chunks, to_chunks
from .reference import accumulation_dtype
from .varlen import run_per_sequence
from ..errors import InputError


def matrix(
    q: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    log_decay: Optional[torch.Tensor] = None,
    lowrank: Sequence[Tuple[torch.Tensor, torch.Tensor]] = (),
    *,
    scale: float = 1.0,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE,
):
    """Matrix-transition recurrence, chunked (same contract as ``reference.matrix``).

    Args:
        q: queries ``[B, T, H, K]``.
        w: written keys k̃ ``[B, T, H, K]``.
        u: written values ṽ ``[B, T, H, V]``.
        log_decay: ``None``, ``[B, T, H]`` (scalar per head) or ``[B, T, H, K]`` (per key).
        lowrank: pairs ``(a, b)``, each ``[B, T, H, K]``; the transition gains ``a bᵀ``.
        scale: readout scale.
        initial_state: ``[B, H, K, V]`` (``[N, H, K, V]`` with ``cu_seqlens``) or ``None``.
        output_final_state: return the last state.
        cu_seqlens: ``[N + 1]`` boundaries of packed sequences (then ``B == 1``).
        chunk_size: tokens per chunk (positive int; ``None`` means 64).

    Returns:
        ``o [B, T, H, V]`` in q's dtype and the final state ``[B, H, K, V]`` (float32 or
        float64) or ``None``.

    Raises:
        InputError: bad ``chunk_size`` or a ``log_decay`` of the wrong rank.
    """
    chunk_size = check_chunk_size(chunk_size)
    lowrank = tuple(lowrank)
    if cu_seqlens is not None:
        return run_per_sequence(
            matrix, dict(q=q, w=w, u=u, log_decay=log_decay, lowrank=lowrank),
            cu_seqlens, initial_state, output_final_state, scale=scale, chunk_size=chunk_size,
        )
    B, T, H, K = q.shape
    V = u.shape[-1]
    acc = accumulation_dtype(q.dtype)
    C = chunk_length(chunk_size, T)

    # Log-decay as [B, T, H, Kd] with Kd = 1 (scalar, broadcasts over keys) or K; "no decay" is a
    # zero log-decay, so one code path serves all three kinds.
    if log_decay is None:
        g = q.new_zeros(B, T, H, 1, dtype=acc)
    elif log_decay.dim() == 3:
        g = log_decay.to(acc)[..., None]
    elif log_decay.dim() == 4:
        g = log_decay.to(acc)
    else:
        raise InputError(f"log_decay must be [B, T, H] or [B, T, H, K], got {tuple(log_decay.shape)}")

    # Padded tokens: zero write, zero low-rank, zero log-decay -> S_t = S_{t-1}.
    qc, wc, uc = (to_chunks(x.to(acc), C, 0.0) for x in (q, w, u))   # [B, H, N, C, K|V]
    gc = to_chunks(g, C, 0.0)                                         # [B, H, N, C, Kd]
    R = len(lowrank)
    if R:
        ac = torch.stack([to_chunks(a.to(acc), C, 0.0) for a, _ in lowrank], dim=-2)  # [.., C, R, K]
        bc = torch.stack([to_chunks(b.to(acc), C, 0.0) for _, b in lowrank], dim=-2)

    # Chunk-relative cumulative log-decays: cum_t = log Γ_t, cum_prev_t = log Γ_{t-1}.
    cum = gc.cumsum(dim=-2)
    cum_prev = torch.cat([torch.zeros_like(cum[..., :1, :]), cum[..., :-1, :]], dim=-2)
    gamma, gamma_prev = cum.exp(), cum_prev.exp()                     # [.., C, Kd], entries <= 1
    # F[t, s] = Γ_t/Γ_s for s <= t (0 above the diagonal); masking the exponent with -inf
    # before exp keeps both the value and its gradient finite.
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()[:, :, None]
    F = torch.where(causal, cum[..., :, None, :] - cum[..., None, :, :], float("-inf")).exp()
    # E[t, s] = Γ_{t-1}/Γ_s for s < t: F shifted down one row (what the probe x_t = b_tᵀ S_{t-1} sees).
    E = torch.cat([torch.zeros_like(F[..., :1, :, :]), F[..., :-1, :, :]], dim=-3)
    to_end = F[..., -1, :, :]                                         # Γ_C/Γ_s, [.., C(s), Kd]
    gamma_end = gamma[..., -1, :]                                     # Γ_C, [.., Kd]

    w1, q1 = wc[..., None, :], qc[..., None, :]                       # rank-1 views [.., C, 1, K]
    flat = lambda x: rearrange(x, "... t i s j -> ... (t i) (s j)")
    # Intra-chunk readout of the writes w_s u_sᵀ (s <= t), and the chunk-end write Σ_s (Γ_C/Γ_s) w_s u_sᵀ.
    o_w = flat(_pair(q1, F, w1)) @ uc                                 # [.., C, V]
    Q = (wc * to_end).transpose(-1, -2) @ uc                          # [.., K, V]
    if R:
        # Probe system (I - M) X = B̃ S_0 + N U, solved for both right-hand sides at once.
        M = flat(_pair(bc, E, ac))                                    # [.., CR, CR], strictly lower
        N_U = flat(_pair(bc, E, w1)) @ uc                             # [.., CR, V]
        B_tilde = rearrange(bc * gamma_prev[..., None, :], "... c r k -> ... (c r) k")
        eye = torch.eye(C * R, dtype=acc, device=q.device)
        sol = torch.linalg.solve_triangular(
            eye - M, torch.cat([B_tilde, N_U], dim=-1), upper=False, unitriangular=True
        )
        T1, T2 = sol[..., :K], sol[..., K:]                           # X = T1 S_0 + T2
        A_end = rearrange(ac * to_end[..., None, :], "... c r k -> ... (c r) k")
        P_lowrank = A_end.transpose(-1, -2) @ T1                      # [.., K, K]
        Q = Q + A_end.transpose(-1, -2) @ T2

    # Sequential part: carry the chunk-start state through the affine map S -> Γ_C S + P S + Q.
    S = q.new_zeros(B, H, K, V, dtype=acc) if initial_state is None else initial_state.to(acc)
    starts = []
    for n in range(qc.shape[2]):
        starts.append(S)
        S_next = gamma_end[:, :, n, :, None] * S + Q[:, :, n]
        if R:
            S_next = S_next + P_lowrank[:, :, n] @ S
        S = S_next
    S0 = torch.stack(starts, dim=2)                                   # [B, H, N, K, V]

    # Readout by (1): o_t = scale (Γ_t q_t)ᵀ S_0 + intra-chunk writes + intra-chunk probes.
    o = (qc * gamma) @ S0 + o_w
    if R:
        X = T1 @ S0 + T2                                              # [.., CR, V]
        o = o + flat(_pair(q1, F, ac)) @ X
    o = from_chunks(o * scale, T)
    return o.to(q.dtype), (S if output_final_state else None)


def _pair(x: torch.Tensor, F: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Decayed inner products ``Σ_k x[t,i,k] F[t,s,k] y[s,j,k]`` within a chunk.

    Args:
        x: ``[..., C, I, K]`` (row side, time t).
        F: ``[..., C, C, Kd]`` decay ratios, ``Kd`` 1 (scalar decay) or ``K``.
        y: ``[..., C, J, K]`` (column side, time s).

    Returns:
        ``[..., C, I, C, J]``.
    """
    if F.shape[-1] == 1:
        # A scalar ratio factors out of the key sum: one matmul, then scale.
        return torch.einsum("...tik,...sjk->...tisj", x, y) * F[..., :, None, :, None, 0]
    return torch.einsum("...tik,...tsk,...sjk->...tisj", x, F, y)
