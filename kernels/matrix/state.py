r"""The two Triton passes that need chunk-boundary states: the sequential state pass and the
parallel output pass.

After the chunk-local preparation (see :mod:`.chunk`) each chunk n is an affine map of the
state S_n it starts from (per head, ``[K, V]``)::

    S_{n+1} = Γ_n S_n + Âᵀ_n (X_n S_n + Y_n) + Ŵᵀ_n U_n                        (state pass)
    o_n     = scale · (Q'_n S_n + O_n)                                         (output pass)

with Γ_n the chunk's total decay (none, a scalar or a per-key vector), X_n ``[CR, K]`` the
low-rank probes' dependence on S_n (WY/UT form, arXiv 2406.06484) and Y_n ``[CR, V]`` their
part independent of S_n, Â_n ``[CR, K]`` / Ŵ_n ``[C, K]`` the low-rank / written keys decayed to
the chunk's end, U_n ``[C, V]`` the written values, Q'_n ``[C, K]`` the
effective queries and O_n ``[C, V]`` the intra-chunk outputs.

The state pass walks the chunks of each sequence in order (one program per sequence, head
and V-block: the map acts column by column, so V-blocks are independent). It stores every
S_n, which the output pass and the backward read. Its backward walks back with the
gradient G_n = ∂L/∂S_{n+1}::

    ∂L/∂S_n = Γ_n G_n + X_nᵀ (Â_n G_n) + scale · Q'_nᵀ dO_n

and stores every G_n; the gradients of Γ, Â, X, Y, Ŵ, U then follow in parallel (torch).
Transposed operands are loaded transposed through pointer arithmetic: no ``tl.trans`` of a
dot result (DESIGN §7: that broke a backward on Hopper with Triton 3.6).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ints import cdiv, next_pow2

DECAY_NONE, DECAY_SCALAR, DECAY_KEY = 0, 1, 2


@triton.jit
def _state_fwd_kernel(
    gamma, a_hat, x_wy, y_wy, w_hat, u, h0, states, final, chunk_offsets,
    H, C: tl.constexpr, K: tl.constexpr, V: tl.constexpr, CR: tl.constexpr,
    DECAY: tl.constexpr, LOWRANK: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BR: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program = one sequence × one head × one block of BV value columns.

    Shapes: gamma [NC, H] or [NC, H, K]; a_hat, x_wy [NC, H, CR, K]; y_wy [NC, H, CR, V];
    w_hat [NC, H, C, K]; u [NC, H, C, V]; states [NC, H, K, V]; h0, final [N, H, K, V];
    chunk_offsets [N + 1] (chunks of sequence i: offsets[i]..[i+1]).

    Z_n = Ŵ_nᵀ U_n + Â_nᵀ Y_n is formed here from its factors rather than read: it is as large
    as a state, and the factors are no larger.
    """
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    c_start = tl.load(chunk_offsets + i_n)
    c_end = tl.load(chunk_offsets + i_n + 1)

    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_kv = (offs_k[:, None] < K) & (offs_v[None, :] < V)
    kv = offs_k[:, None] * V + offs_v[None, :]
    offs_c = tl.arange(0, C)
    if LOWRANK:
        offs_r = tl.arange(0, BR)
        mask_rk = (offs_r[:, None] < CR) & (offs_k[None, :] < K)
        mask_kr = (offs_k[:, None] < K) & (offs_r[None, :] < CR)
        mask_rv = (offs_r[:, None] < CR) & (offs_v[None, :] < V)

    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        S += tl.load(h0 + (i_nh.to(tl.int64) * K * V) + kv, mask=mask_kv, other=0.)

    for c in range(c_start, c_end):
        nh = (c * H + i_h).to(tl.int64)
        tl.store(states + nh * K * V + kv, S, mask=mask_kv)
        # the chunk's decayed writes Ŵᵀ U (Ŵ loaded transposed)
        W_T = tl.load(w_hat + nh * C * K + offs_c[None, :] * K + offs_k[:, None],
                      mask=offs_k[:, None] < K, other=0.)                              # [BK, C]
        U = tl.load(u + nh * C * V + offs_c[:, None] * V + offs_v[None, :],
                    mask=offs_v[None, :] < V, other=0.)                                # [C, BV]
        S_next = tl.dot(W_T, U, input_precision=PRECISION)
        if LOWRANK:
            # probes of S_n (before the decay is applied), then their decayed writes
            X = tl.load(x_wy + nh * CR * K + offs_r[:, None] * K + offs_k[None, :], mask=mask_rk, other=0.)
            probes = tl.dot(X, S, input_precision=PRECISION)                           # [BR, BV]
            probes += tl.load(y_wy + nh * CR * V + offs_r[:, None] * V + offs_v[None, :],
                              mask=mask_rv, other=0.)
            A_T = tl.load(a_hat + nh * CR * K + offs_r[None, :] * K + offs_k[:, None],
                          mask=mask_kr, other=0.)                                     # [BK, BR]
            S_next += tl.dot(A_T, probes, input_precision=PRECISION)
        if DECAY == 1:
            S_next += tl.load(gamma + nh) * S
        elif DECAY == 2:
            S_next += tl.load(gamma + nh * K + offs_k, mask=offs_k < K, other=0.)[:, None] * S
        else:
            S_next += S
        S = S_next

    if STORE_FINAL:
        tl.store(final + (i_nh.to(tl.int64) * K * V) + kv, S, mask=mask_kv)


@triton.jit
def _state_bwd_kernel(
    gamma, a_hat, x_wy, q_eff, d_out, d_final, d_z, d_h0, chunk_offsets, scale,
    H, C: tl.constexpr, K: tl.constexpr, V: tl.constexpr, CR: tl.constexpr,
    DECAY: tl.constexpr, LOWRANK: tl.constexpr, HAS_DFINAL: tl.constexpr, STORE_DH0: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BR: tl.constexpr, PRECISION: tl.constexpr,
):
    """Reverse walk of :func:`_state_fwd_kernel`, fused with the output pass's ∂o/∂S_n.

    Shapes: q_eff [NC, H, C, K] (Q'); d_out [NC, C, H, V] (gradient of the chunked outputs);
    d_final [N, H, K, V]; writes d_z [NC, H, K, V] (= ∂L/∂S_{n+1}) and d_h0 [N, H, K, V].
    """
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    c_start = tl.load(chunk_offsets + i_n)
    c_end = tl.load(chunk_offsets + i_n + 1)

    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    offs_c = tl.arange(0, C)
    mask_kv = (offs_k[:, None] < K) & (offs_v[None, :] < V)
    kv = offs_k[:, None] * V + offs_v[None, :]
    if LOWRANK:
        offs_r = tl.arange(0, BR)
        mask_rk = (offs_r[:, None] < CR) & (offs_k[None, :] < K)
        mask_kr = (offs_k[:, None] < K) & (offs_r[None, :] < CR)

    G = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DFINAL:
        G += tl.load(d_final + (i_nh.to(tl.int64) * K * V) + kv, mask=mask_kv, other=0.)

    for j in range(0, c_end - c_start):
        c = c_end - 1 - j
        nh = (c * H + i_h).to(tl.int64)
        tl.store(d_z + nh * K * V + kv, G, mask=mask_kv)
        # output pass: o_n = scale · Q'_n S_n  =>  ∂L/∂S_n += scale · Q'_nᵀ dO_n
        Qt = tl.load(q_eff + nh * C * K + offs_c[None, :] * K + offs_k[:, None],
                     mask=offs_k[:, None] < K, other=0.)                              # [BK, C]
        dO = tl.load(d_out + (c * C + offs_c[:, None]).to(tl.int64) * H * V + i_h * V + offs_v[None, :],
                     mask=offs_v[None, :] < V, other=0.).to(tl.float32)               # [C, BV]
        G_prev = scale * tl.dot(Qt, dO, input_precision=PRECISION)
        if LOWRANK:
            A = tl.load(a_hat + nh * CR * K + offs_r[:, None] * K + offs_k[None, :], mask=mask_rk, other=0.)
            AG = tl.dot(A, G, input_precision=PRECISION)                              # [BR, BV]
            X_T = tl.load(x_wy + nh * CR * K + offs_r[None, :] * K + offs_k[:, None],
                          mask=mask_kr, other=0.)                                  # [BK, BR]
            G_prev += tl.dot(X_T, AG, input_precision=PRECISION)
        if DECAY == 1:
            G_prev += tl.load(gamma + nh) * G
        elif DECAY == 2:
            G_prev += tl.load(gamma + nh * K + offs_k, mask=offs_k < K, other=0.)[:, None] * G
        else:
            G_prev += G
        G = G_prev

    if STORE_DH0:
        tl.store(d_h0 + (i_nh.to(tl.int64) * K * V) + kv, G, mask=mask_kv)


@triton.jit
def _output_kernel(
    q_eff, o_intra, states, o, scale,
    H, C: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):
    """o_n = scale · (Q'_n S_n + O_n) for one chunk × head × V-block (all chunks in parallel).

    Shapes: q_eff [NC, H, C, K]; o_intra [NC, H, C, V] fp32; states [NC, H, K, V];
    o [NC, C, H, V] in the output dtype (token-major, so un-chunking is a reshape).
    """
    i_v = tl.program_id(0)
    nh = tl.program_id(1).to(tl.int64)
    c = nh // H
    i_h = nh % H
    offs_k = tl.arange(0, BK)
    offs_c = tl.arange(0, C)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_v = offs_v[None, :] < V

    Q = tl.load(q_eff + nh * C * K + offs_c[:, None] * K + offs_k[None, :], mask=offs_k[None, :] < K, other=0.)
    S = tl.load(states + nh * K * V + offs_k[:, None] * V + offs_v[None, :],
                mask=(offs_k[:, None] < K) & mask_v, other=0.)
    acc = tl.dot(Q, S, input_precision=PRECISION)
    acc += tl.load(o_intra + nh * C * V + offs_c[:, None] * V + offs_v[None, :], mask=mask_v, other=0.)
    tl.store(o + (c * C + offs_c[:, None]) * H * V + i_h * V + offs_v[None, :],
             (scale * acc).to(o.dtype.element_ty), mask=mask_v)


def _blocks(K: int, V: int, CR: int):
    BK = max(16, next_pow2(K))
    BV = max(16, min(64 if BK <= 64 else 32, next_pow2(V)))
    BR = max(16, next_pow2(CR)) if CR else 16
    return BK, BV, BR


class _ChunkRecurrence(torch.autograd.Function):
    """States and outputs of the chunked recurrence from the per-chunk quantities.

    Forward: the Triton state pass (sequential over each sequence's chunks), then the Triton
    output pass. Backward: the reverse state pass (Triton, fused with ∂o/∂S), then the
    gradients of the per-chunk quantities as parallel batched products.

    ``replay`` (a tuple ``(states, final)`` or ``None``): when the caller already holds the
    chunk-boundary states (the backward of :class:`.chunk.ChunkMatrixFunction` recomputes the
    preparation but not the sequential pass), they are reused instead of recomputed.
    """

    @staticmethod
    def forward(ctx, gamma, a_hat, x_wy, y_wy, w_hat, u, q_eff, o_intra, h0, chunk_offsets, meta, replay):
        NC, H, C, K = w_hat.shape
        V = u.shape[-1]
        N = chunk_offsets.numel() - 1
        CR = x_wy.shape[2] if x_wy is not None else 0
        BK, BV, BR = _blocks(K, V, CR)
        decay = DECAY_NONE if gamma is None else (DECAY_SCALAR if gamma.dim() == 2 else DECAY_KEY)
        dummy = u  # stands in for absent pointers; constexpr flags keep it unread
        if replay is None:
            states = torch.empty(NC, H, K, V, device=u.device, dtype=torch.float32)
            final = torch.empty(N, H, K, V, device=u.device, dtype=torch.float32)
            _state_fwd_kernel[(cdiv(V, BV), N * H)](
                gamma if gamma is not None else dummy,
                a_hat if a_hat is not None else dummy,
                x_wy if x_wy is not None else dummy,
                y_wy if y_wy is not None else dummy,
                w_hat, u, h0 if h0 is not None else dummy, states, final, chunk_offsets,
                H, C=C, K=K, V=V, CR=CR, DECAY=decay, LOWRANK=CR > 0, HAS_H0=h0 is not None,
                STORE_FINAL=True, BK=BK, BV=BV, BR=BR, PRECISION=meta["precision"],
                num_warps=4 if BK <= 64 else 8, num_stages=1,
            )
        else:
            # detach: fresh tensor objects sharing the saved storage, so that this node
            # becomes their producer without touching the forward's graph
            states, final = replay[0].detach(), replay[1].detach()
        o = torch.empty(NC, C, H, V, device=u.device, dtype=meta["out_dtype"])
        if NC > 0 and replay is None:
            # wider V-blocks than the state pass: fewer re-reads of the [C, K] queries
            BVO = max(16, min(64 if BK <= 128 else 32, next_pow2(V)))
            _output_kernel[(cdiv(V, BVO), NC * H)](
                q_eff, o_intra, states, o, meta["scale"], H, C=C, K=K, V=V, BK=BK, BV=BVO,
                PRECISION=meta["precision"], num_warps=4 if BK * C <= 64 * 64 else 8,
            )
        ctx.save_for_backward(gamma, a_hat, x_wy, y_wy, w_hat, u, q_eff, h0, chunk_offsets, states)
        ctx.meta, ctx.decay = meta, decay
        ctx.mark_non_differentiable(states)
        ctx.set_materialize_grads(False)
        return o, final, states

    @staticmethod
    def backward(ctx, d_o, d_final, _d_states):
        gamma, a_hat, x_wy, y_wy, w_hat, u, q_eff, h0, chunk_offsets, states = ctx.saved_tensors
        meta, decay = ctx.meta, ctx.decay
        NC, H, K, V = states.shape
        C = q_eff.shape[2]
        N = chunk_offsets.numel() - 1
        CR = x_wy.shape[2] if x_wy is not None else 0
        BK, BV, BR = _blocks(K, V, CR)
        scale = meta["scale"]
        d_o = torch.zeros(NC, C, H, V, device=states.device) if d_o is None else d_o.contiguous()
        d_z = torch.empty_like(states)
        d_h0 = torch.empty(N, H, K, V, device=states.device, dtype=torch.float32)
        dummy = states
        _state_bwd_kernel[(cdiv(V, BV), N * H)](
            gamma if gamma is not None else dummy,
            a_hat if a_hat is not None else dummy,
            x_wy if x_wy is not None else dummy,
            q_eff, d_o, d_final.contiguous() if d_final is not None else dummy, d_z, d_h0,
            chunk_offsets, scale,
            H, C=C, K=K, V=V, CR=CR, DECAY=decay, LOWRANK=CR > 0, HAS_DFINAL=d_final is not None,
            STORE_DH0=True, BK=BK, BV=BV, BR=BR, PRECISION=meta["precision"],
            num_warps=4 if BK <= 64 else 8, num_stages=1,
        )
        # Parallel gradients of the per-chunk quantities. d_o is [NC, C, H, V]: head-major view.
        d_o_h = d_o.float().transpose(1, 2)                                      # [NC, H, C, V]
        d_o_intra = scale * d_o_h
        d_q_eff = scale * (d_o_h @ states.transpose(-1, -2))                      # [NC, H, C, K]
        # Z_n = Ŵ_nᵀ U_n + Â_nᵀ Y_n
        d_w_hat = u @ d_z.transpose(-1, -2)                                      # [NC, H, C, K]
        d_u = w_hat @ d_z                                                         # [NC, H, C, V]
        d_gamma = d_a_hat = d_x = d_y = None
        if gamma is not None:
            gs = (d_z * states).sum(-1)                                           # [NC, H, K]
            d_gamma = gs.sum(-1) if decay == DECAY_SCALAR else gs
        if CR > 0:
            probes = x_wy @ states + y_wy                                         # [NC, H, CR, V]
            d_a_hat = probes @ d_z.transpose(-1, -2)                              # [NC, H, CR, K]
            d_y = a_hat @ d_z                                                     # [NC, H, CR, V]
            d_x = d_y @ states.transpose(-1, -2)                                  # [NC, H, CR, K]
        return (d_gamma, d_a_hat, d_x, d_y, d_w_hat, d_u, d_q_eff, d_o_intra,
                d_h0 if h0 is not None else None, None, None, None)
