r"""The delta form of the matrix class on Triton: one low-rank pair that shares the written key,

    S_t = (e^{g_t} I − c_t k_t k_tᵀ) S_{t−1} + k_t u_tᵀ,      o_t = scale · S_tᵀ q_t

(DeltaNet: c = β, u = βv; gated DeltaNet: c = αβ with g = log α; Longhorn: c = ε, u = εv; gated
Longhorn likewise). It is ``chunk_matrix`` with ``w = b = k`` and ``a = −c k``, but the shared key
lets the chunked form carry one effective value per token instead of a probe and a write, the
way FLA's ``chunk_delta_rule`` does (DeltaNet arXiv 2406.06484, Gated DeltaNet arXiv 2412.06464):
with ν_t = u_t − c_t k_tᵀ S_{t−1} the step is S_t = e^{g_t} S_{t−1} + k_t ν_tᵀ, a linear-attention
step with values ν. Per chunk n (G, R, D, Ŵ, Q̂ as in :mod:`.fused`; L' = K Kᵀ ⊙ R strictly lower)::

    A = (I + diag(c) L')⁻¹,  X = −A diag(c e^{G_{t−1}}) K,  Y = A U,  ν = X S_n + Y      (WY kernel, DELTA)
    S_{n+1} = γ_n S_n + Ŵᵀ ν                                                        (state pass, DELTA)
    o = scale · (Q̂ S_n + (Q Kᵀ ⊙ D) ν)                                               (output, DELTA)

Backward (``kernels/matrix/README.md`` §8 derives it), given dO and dS_final:

1. the WY kernel again, reading the A the forward kept (no second inverse) and writing
   X and ν = X S_n + Y from the saved states;
2. the reverse pass of :mod:`.fused_bwd` with ``a = k``: dν = scale · (Q Kᵀ ⊙ D)ᵀ dO + Ŵ dS_{n+1},
   dS_n = γ_n dS_{n+1} + scale · Q̂ᵀ dO + Xᵀ dν;
3. :func:`_delta_wy_bwd_kernel` (per chunk): du = Aᵀ dν; with F = dν (K S_n)ᵀ (= dX Kᵀ, dX = dν S_nᵀ),
   dA = dν Uᵀ − F diag(c e^{G_{t−1}}), dM = −Aᵀ dA Aᵀ (strictly lower), E = diag(c) dM ⊙ R (the
   gradient of the Gram K Kᵀ) and dc = rowsum(dM ⊙ L') − e^{G_{t−1}} colsum(A ⊙ F);
4. the dq/dw kernel of :mod:`.fused_bwd` with DELTA: the linear-attention gradients with values ν
   plus dk += E K + Eᵀ K − c e^{G_{t−1}} Aᵀ dX, and the per-token decay terms;
5. the decay-gradient suffix sum of :mod:`.fused_bwd`.

With ``kk_coef`` b the coefficients are c / (1 + b ‖k‖²) and u_scale / (1 + b ‖k‖²), the implicit
step's normaliser (Longhorn's ε), formed in the forward WY kernel from its key rows; the backward
chains through it on per-token scalars and adds its 2 d‖k‖² k to dk in step 4 (README §8).

Where it does not apply (K or V > 128, a per-key decay, ``OLSM_MATRIX_PATH=general``)
:func:`chunk_delta` runs ``chunk_matrix`` with the pair ``(−c k, k)``; so does an
``OutOfResources`` at launch, forward or backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable
from triton.runtime.errors import OutOfResources

from olsm.errors import InputError

from .chunk import _check_backend, _check_inputs, _interpreting, _layout, chunk_matrix, leaf_grads
from .fused import (
    MAX_FUSED_DIM, _launch_state, _output_fwd_kernel, dots_lowp, env_choice, launch_shape, launch_wy,
    no_segments, sequence_launch, state_dtype, state_warps, walk_log_decay,
)
from .decay_grad import decay_gradient
from .fused_bwd import _dqdw_bwd_kernel, dstate_warps, dw_transposed, launch_dstate
from .split import walk_sequences
from ..ints import cdiv
from .tiles import chunk_decay, chunk_key_tiles


@triton.jit
def _value_rows(u, tok, i_h, H, V: tl.constexpr, valid, v0, BV: tl.constexpr):
    """Columns ``[v0, v0 + BV)`` of u ``[B·T, H, V]`` at one chunk's tokens × head ``i_h``:
    ``[C, BV]``, zeros outside (all of it for ``v0 >= V``: nothing is read)."""
    offs_v = v0 + tl.arange(0, BV)
    return tl.load(u + (tok[:, None] * H + i_h) * V + offs_v[None, :], mask=valid[:, None] & (offs_v < V)[None, :],
                   other=0.)


@triton.jit
def _delta_wy_bwd_kernel(
    k, u, c, g, states, dprobes, t_wy, e_cc, du, dc, tok_start, tok_stop, u_scale, d_scale,
    kk_coef, kk, c_norm, d_kk, d_kk_coef,
    H, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, DECAY: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, U_SCALE: tl.constexpr = False,
    LOWP: tl.constexpr = False, NORM: tl.constexpr = False,
):
    """Step 3 of the module docstring for one chunk × head: du, dc and E.

    Shapes: k ``[B·T, H, K]``, u ``[B·T, H, V]`` (input dtype); c, g ``[B·T, H]`` fp32; states
    ``[NC, H, K, V]``; dprobes (dν) ``[NC, H, C, V]``; t_wy (A) ``[NC, H, C, C]`` fp32; writes
    e_cc ``[NC, H, C, C]`` fp32, du ``[B·T, H, V]`` and dc ``[B·T, H]`` fp32. With U_SCALE the
    written values are s u (s = u_scale ``[B·T, H]`` fp32): du is then s ⊙ ∂L/∂(s u) and
    d_scale ``[B·T, H]`` fp32 gets Σ_j u_j ∂L/∂(s u)_j. LOWP: the value loop's dots take
    operands in the storage dtype (A rounded to it, as FLA stores A), fp32 accumulators; the
    [C, C] products after the loop stay fp32.

    NORM (``kk_coef``): c and u_scale are the raw ones, the kernel divides them by r⁻¹ = 1 +
    b ‖k‖² (kk_coef b and the forward's kk ‖k‖², ``[B·T, H]`` fp32), writes the normalised c to
    c_norm for step 4, and chains the gradients through r on the token's scalars: dc and d_scale
    with respect to the raw c and s, d_kk_coef = −‖k‖² r² ρ and d_kk = −b r² ρ, ρ = ∂L/∂(c r)·c +
    ∂L/∂(s r)·s (all ``[B·T, H]`` fp32). One launch instead of a dozen [B·T, H] torch ops, which
    cost Longhorn more in launches than in bytes.
    """
    nh = tl.program_id(0).to(tl.int64)
    # transposed operands are loaded transposed, never tl.trans'ed (DESIGN §7)
    i_h, offs_c, valid, tok, offs_k, mask_k, row_k, m_ck, col_k, m_kc = chunk_key_tiles(
        tok_start, tok_stop, nh, H, K, C, BK, 0)
    od = dprobes.dtype.element_ty if LOWP else tl.float32     # dot operands: fp32 copies or as stored
    K_T = tl.load(k + col_k, mask=m_kc, other=0.).to(od)                           # [BK, C]
    rows = nh * C * C + offs_c[:, None] * C + offs_c[None, :]
    cols = nh * C * C + offs_c[None, :] * C + offs_c[:, None]
    A_T = tl.load(t_wy + cols)
    A_T_op = A_T.to(od)                 # rounded to the storage dtype with LOWP (as FLA stores A)

    dA = tl.zeros([C, C], dtype=tl.float32)        # dν Uᵀ
    F = tl.zeros([C, C], dtype=tl.float32)         # dν (K S_n)ᵀ
    if NORM:
        kk_t = tl.load(kk + tok * H + i_h, mask=valid, other=0.)
        b_t = tl.load(kk_coef + tok * H + i_h, mask=valid, other=0.)
        r_t = 1. / (1. + b_t * kk_t)
    if U_SCALE:
        s0_t = tl.load(u_scale + tok * H + i_h, mask=valid, other=0.)
        s_t = s0_t * r_t if NORM else s0_t
        ds = tl.zeros([C], dtype=tl.float32)
        # u's rows for ds, loaded a value block ahead by hand: they feed a sum, not a dot, so
        # Triton's pipeliner left the load synchronous in every step (kernel_resources.py)
        U_rows = _value_rows(u, tok, i_h, H, V, valid, 0, BV)
    for i_v in range(0, (V + BV - 1) // BV):
        offs_v = i_v * BV + tl.arange(0, BV)
        mask_v = offs_v < V
        dnu = tl.load(dprobes + nh * C * V + offs_c[:, None] * V + offs_v[None, :], mask=mask_v[None, :],
                      other=0.).to(od)                                              # [C, BV]
        U_T = tl.load(u + (tok[None, :] * H + i_h) * V + offs_v[:, None], mask=mask_v[:, None] & valid[None, :],
                      other=0.)                                                     # [BV, C]
        S_T = tl.load(states + nh * K * V + offs_v[:, None] + offs_k[None, :] * V,
                      mask=mask_v[:, None] & mask_k[None, :], other=0.).to(od)      # [BV, BK]
        KS_T = tl.dot(S_T, K_T, input_precision=PRECISION)                          # (K S_n)ᵀ [BV, C]
        if U_SCALE:
            U_T = U_T.to(tl.float32) * s_t[None, :]
        U_T = U_T.to(od)
        dA += tl.dot(dnu, U_T, input_precision=PRECISION)
        F += tl.dot(dnu, KS_T.to(od), input_precision=PRECISION)
        dU = tl.dot(A_T_op, dnu, input_precision=PRECISION)
        rows_v = (tok[:, None] * H + i_h) * V + offs_v[None, :]
        if U_SCALE:
            ds += tl.sum(dU * U_rows.to(tl.float32), axis=1)
            U_rows = _value_rows(u, tok, i_h, H, V, valid, (i_v + 1) * BV, BV)
            dU = dU * s_t[:, None]
        tl.store(du + rows_v, dU.to(du.dtype.element_ty), mask=valid[:, None] & mask_v[None, :])

    strict = offs_c[:, None] > offs_c[None, :]
    e_b = tl.full([C], 1., tl.float32)
    if DECAY == 1:
        g_c, G, _ = chunk_decay(g, tok, valid, i_h, H, offs_c)
        G_prev = G - g_c
        e_b = tl.exp(G_prev)
        R = tl.exp(tl.where(strict, G_prev[:, None] - G[None, :], float("-inf")))
    else:
        R = tl.where(strict, 1., 0.)
    c_t = tl.load(c + tok * H + i_h, mask=valid, other=0.)
    if NORM:
        c0_t = c_t
        c_t = c0_t * r_t
        tl.store(c_norm + tok * H + i_h, c_t, mask=valid)
    dA = dA - F * (c_t * e_b)[None, :]
    dM = -tl.dot(tl.dot(A_T, dA, input_precision=PRECISION), A_T, input_precision=PRECISION)
    dM = tl.where(strict, dM, 0.)
    Kr = tl.load(k + row_k, mask=m_ck, other=0.).to(od)
    Lp = tl.dot(Kr, K_T, input_precision=PRECISION) * R                            # L' = K Kᵀ ⊙ R
    A = tl.load(t_wy + rows)
    dcv = tl.sum(dM * Lp, axis=1) - e_b * tl.sum(A * F, axis=0)
    if NORM:
        # chain rule through r: ∂r/∂b = −‖k‖² r², ∂r/∂‖k‖² = −b r²
        rho = dcv * c0_t
        if U_SCALE:
            rho += ds * s0_t
            ds = ds * r_t
        dcv = dcv * r_t
        tl.store(d_kk_coef + tok * H + i_h, -kk_t * r_t * r_t * rho, mask=valid)
        tl.store(d_kk + tok * H + i_h, -b_t * r_t * r_t * rho, mask=valid)
    if U_SCALE:
        tl.store(d_scale + tok * H + i_h, ds, mask=valid)
    tl.store(dc + tok * H + i_h, dcv, mask=valid)
    tl.store(e_cc + rows, c_t[:, None] * dM * R)


def delta_applies(log_decay, K: int, V: int) -> bool:
    """Whether the delta kernels take this call: no or a scalar decay, K, V <= 128, and
    ``OLSM_MATRIX_PATH`` is not ``general``."""
    if env_choice("OLSM_MATRIX_PATH", ("auto", "general")) == "general":
        return False
    return (log_decay is None or log_decay.dim() == 3) and max(K, V) <= MAX_FUSED_DIM


def _flat_c(c, B, T, H):
    return c.reshape(B * T, H).float().contiguous()


def _sequence_launch(meta, shape, N, H, K, V, dev):
    """:func:`.fused.sequence_launch` of the sequential passes, kept in the call's ``meta`` so the
    backward reuses the forward's (host time on every call otherwise)."""
    key = (shape, N, H, K, V, dev)
    hit = meta.get("_sequence_launch")
    if hit is None or hit[0] != key:
        hit = meta["_sequence_launch"] = (key, sequence_launch(shape, N, H, K, V, True, dev))
    return hit[1]


def _sizes(q, u, lay):
    """``(B, T, H, K, V, NC, C, N, device)`` of one call."""
    B, T, H, K = q.shape
    return B, T, H, K, u.shape[-1], lay.tok_start.numel(), lay.C, lay.chunk_offsets.numel() - 1, q.device


def _same(a, b) -> bool:
    """``a`` and ``b`` are the same tensor (also after a save/unpack round trip through autograd)."""
    return a is b or (a is not None and b is not None and a.data_ptr() == b.data_ptr() and a.dtype == b.dtype
                      and a.shape == b.shape and a.stride() == b.stride())


def _operands(q, k, u, c, u_scale, log_decay, meta, C, kk_coef=None):
    """What the kernels read: contiguous q, k, u; c, u_scale and kk_coef flat ``[B·T, H]`` fp32
    (one copy where they are the same tensor, as Longhorn's c = u_scale = kk_coef = β); the
    log-decay fp32 (or None); the DECAY flag, dot precision and launch shape."""
    B, T, H, K = q.shape
    g = None if log_decay is None else log_decay.float().contiguous()
    prec = meta["precision"]
    cf = _flat_c(c, B, T, H)
    sf = None if u_scale is None else (cf if _same(u_scale, c) else _flat_c(u_scale, B, T, H))
    kb = (None if kk_coef is None else cf if _same(kk_coef, c) else sf if _same(kk_coef, u_scale)
          else _flat_c(kk_coef, B, T, H))
    return ((q.contiguous(), k.contiguous(), u.contiguous(), cf, sf, g, 0 if g is None else 1, prec,
             launch_shape(K, u.shape[-1], C, fp32=prec == "ieee")), kb)


def delta_forward(q, k, u, c, log_decay, h0, lay, meta, u_scale=None, kk_coef=None, ops=None):
    """Forward of :func:`chunk_delta` (module docstring). Returns ``(o, final, states, A, kk, X, ν)``:
    as :func:`.fused.fused_forward` does, the chunks' A ``[NC, H, C, C]`` fp32, with ``kk_coef``
    every token's ‖k_t‖² ``[B·T, H]`` fp32 (else None), and X ``[NC, H, C, K]``, ν
    ``[NC, H, C, V]`` in the state dtype. ``ops``: :func:`_operands` of this call if the caller
    formed them already (:class:`ChunkDeltaFunction` keeps them for the backward)."""
    B, T, H, K, V, NC, C, N, dev = _sizes(q, u, lay)
    if ops is None:
        ops = _operands(q, k, u, c, u_scale, log_decay, meta, C, kk_coef)
    (q, k, u, cf, sf, g, decay, prec, shape), kb = ops
    # every token lies in a chunk (cu_seqlens span [0, T)), so the WY kernel writes all of kk
    kk = None if kb is None else torch.empty(B * T, H, device=dev, dtype=torch.float32)
    states = torch.empty(NC, H, K, V, device=dev, dtype=state_dtype(q.dtype))
    final = torch.empty(N, H, K, V, device=dev, dtype=torch.float32)
    o = torch.empty(B, T, H, V, device=dev, dtype=meta["out_dtype"])
    low = dict(device=dev, dtype=states.dtype)
    x_wy, y_wy, nu = torch.empty(NC, H, C, K, **low), torch.empty(NC, H, C, V, **low), torch.empty(NC, H, C, V, **low)
    # A is kept for the backward (fp32, C² per chunk and head: a quarter of the states at
    # C = 64, K = V = 128), which then skips the blocked inverse
    t_wy = torch.empty(NC, H, C, C, device=dev, dtype=torch.float32)
    launch_wy(shape, k, k, k, u, g, lay.tok_start, lay.tok_stop, x_wy, y_wy, t_wy, H, K, V, C, decay, prec, c=cf,
              u_scale=sf, kk_coef=kb, kk_out=kk)
    h0_ = None if h0 is None else h0.float().contiguous()
    grid, BK_seq, BV = _sequence_launch(meta, shape, N, H, K, V, dev)
    g_walk, g_cum = walk_log_decay(g, decay, True, BK_seq, lay.tok_start, lay.tok_stop, H, C)
    gd, gw = (g, g_walk) if g is not None else (u, u)
    kw = dict(K=K, V=V, C=C, DECAY=decay, LOWRANK=True, HAS_H0=h0 is not None, BK=BK_seq, BV=BV,
              PRECISION=prec, DELTA=True, G_CUM=g_cum, num_warps=state_warps(shape, decay, True, BV, delta=True))
    walk_sequences(lambda grid_, args_, **extra: _launch_state(grid_, args_, **kw, **extra),
                   grid, (k, k, u, gw, x_wy, y_wy, h0_ if h0_ is not None else u, states, nu, final, lay.tok_start,
                          lay.tok_stop, lay.chunk_offsets, H) + no_segments(u),
                   h0_, final, lay.chunk_offsets, H, K, V, BK_seq, BV, decay, lay.max_chunks, dev, lowrank=True,
                   delta=True)
    if NC > 0:
        _output_fwd_kernel[(cdiv(V, shape.BV_out), NC * H)](
            q, k, k, u, gd, states, nu, o, u, lay.tok_start, lay.tok_stop, meta["scale"], H, K=K, V=V, C=C,
            DECAY=decay, LOWRANK=False, BK=shape.BK, BV=shape.BV_out, PRECISION=prec, DELTA=True,
            LOWP=dots_lowp(), num_warps=shape.warps_out,
        )
    return o, final, states, t_wy, kk, x_wy, nu


def _coef_buffer(R, B, T, H, dev):
    """``R`` per-token fp32 buffers ``[B, T, H]`` (what the kernels index as ``[B·T, H]``) from one
    allocation ``[R, B, T, H]``: rows start 16-byte aligned (padded if B·T·H is not a multiple of
    4, as separate allocations would be), and tied gradients sum over neighbouring rows in one op.
    Returns the ``[R, B, T, H]`` view and its rows. (An untied fp32 coefficient's gradient is then
    a row of it, keeping the other R − 1 rows alive with it: 1/64 of a bf16 dq's bytes each at
    D = 128.)"""
    n = B * T * H
    if n % 4 == 0:
        buf = torch.empty(R, B, T, H, device=dev, dtype=torch.float32)
    else:
        buf = torch.empty(R, n + 4 - n % 4, device=dev, dtype=torch.float32)[:, :n].view(R, B, T, H)
    return buf, buf.unbind(0)


def _tied_grads(buf, rows, slots, ties):
    """The gradients of (c, u_scale, kk_coef): ``slots[i]`` the row of ``buf`` holding input i's
    (None: no such input), ``ties[i]`` the first input that is the same tensor as input i. A
    tensor passed several times (Longhorn's β thrice, DeltaNet's twice) gets the sum of its rows
    once, at its first position, and None at the others: one fp32 reduction and one cast instead
    of a cast per position and autograd's adds in the input dtype."""
    out = [None, None, None]
    for i in range(3):
        if slots[i] is None or ties[i] != i:
            continue
        members = [slots[j] for j in range(3) if slots[j] is not None and ties[j] == i]
        if len(members) == 1:
            out[i] = rows[members[0]]
        elif members == list(range(members[0], members[-1] + 1)):
            out[i] = buf[members[0]:members[-1] + 1].sum(0)
        else:
            out[i] = rows[members[0]] + rows[members[1]]
    return out


def delta_backward(q, k, u, c, log_decay, h0, states, t_wy, final, d_o, d_final, lay, meta, needs, u_scale=None,
                   kk_coef=None, kk=None, x_wy=None, nu=None, ops=None, ties=None):
    """Gradients of :func:`chunk_delta` (module docstring, backward); ``kk``: the forward's ‖k_t‖²
    when ``kk_coef`` is given; ``x_wy``, ``nu``: the forward's X and ν if it kept them (step 1 is
    then skipped); ``ops``: the forward's :func:`_operands` (else formed again); ``ties``: for c,
    u_scale, kk_coef, the position (0, 1, 2) of the first of them that is the same tensor (None:
    no ties, each gets its own gradient).

    Returns:
        ``(dq, dk, du, dc, d_log_decay, dh0, d_u_scale, d_kk_coef)``, None where ``needs`` (q, k,
        u, c, log_decay, h0, u_scale, kk_coef) says no gradient is wanted; of tied coefficients
        only the first position gets the (summed) gradient, the others None.
    """
    B, T, H, K, V, NC, C, N, dev = _sizes(q, u, lay)
    if ops is None:
        ops = _operands(q, k, u, c, u_scale, log_decay, meta, C, kk_coef)
    (q, k, u, cf, sf, g, decay, prec, shape), kb = ops
    d_o = torch.zeros_like(u) if d_o is None else d_o.contiguous()
    gd = g if g is not None else u
    scale = float(meta["scale"])
    NK = cdiv(K, shape.BKS)
    f32 = dict(device=dev, dtype=torch.float32)
    low = dict(device=dev, dtype=states.dtype)

    if x_wy is None:
        # 1. X and ν = X S_n + Y of every chunk, from the saved A and states, with the normalised
        # coefficients c r, s r (r = 1 / (1 + b ‖k‖²)) when there is a kk_coef b
        x_wy, nu = torch.empty(NC, H, C, K, **low), torch.empty(NC, H, C, V, **low)
        r = None if kb is None else 1. / (1. + kb * kk)
        launch_wy(shape, k, k, k, u, g, lay.tok_start, lay.tok_stop, x_wy, nu, t_wy, H, K, V, C, decay, prec,
                  c=cf if r is None else cf * r, states=states, load_t=True,
                  u_scale=sf if r is None or sf is None else sf * r)
    # 2. reverse pass: dS_n and dν
    dstates, dnu = torch.empty(NC, H, K, V, **low), torch.empty(NC, H, C, V, **low)
    dh0 = torch.empty(N, H, K, V, **f32)
    df = None if d_final is None else d_final.float().contiguous()
    grid, BK_seq, BV = _sequence_launch(meta, shape, N, H, K, V, dev)
    g_walk, g_cum = walk_log_decay(g, decay, True, BK_seq, lay.tok_start, lay.tok_stop, H, C)
    gw = g_walk if g is not None else u
    kw = dict(K=K, V=V, C=C, DECAY=decay, HAS_DFINAL=df is not None, LOWRANK=True, BK=BK_seq, BV=BV,
              PRECISION=prec, LOWP=True, G_CUM=g_cum, num_warps=dstate_warps(shape, decay, True, delta=True))
    walk_sequences(lambda grid_, args_, **extra: launch_dstate(grid_, args_, **kw, **extra),
                   grid, (q, k, d_o, gw, x_wy, df if df is not None else u, dstates, dnu, dh0, lay.tok_start,
                          lay.tok_stop, lay.chunk_offsets, scale, u, H) + no_segments(u),
                   df, dh0, lay.chunk_offsets, H, K, V, BK_seq, BV, decay, lay.max_chunks, dev, reverse=True,
                   lowrank=True, delta=True)
    dq, dk, du = torch.empty_like(q), torch.empty_like(k), torch.empty_like(u)
    # the per-token fp32 buffers in one allocation: the gradients of c (, u_scale) (, kk_coef)
    # (neighbouring rows, so tied ones sum in one op), then with kk_coef the normalised c and d‖k‖²
    slots = (0, None if sf is None else 1, None if kb is None else 1 + (sf is not None))
    nco = 1 + (sf is not None) + (kb is not None)
    cbuf, rows = _coef_buffer(nco + (2 if kb is not None else 0), B, T, H, dev)
    dc = rows[0]
    ds = None if sf is None else rows[1]
    # the dq/dw kernel writes every token's λ and k·d(b-role) (each token lies in a chunk): no memset
    dlam, dbb = torch.empty(NK, B * T, H, **f32), torch.empty(NK, B * T, H, **f32)
    lowp = dots_lowp()
    dkk = db = None
    if NC > 0:
        # 3. through the WY form: du, dc and the Gram gradient E (with kk_coef: the normalised c,
        # and the chain through the normaliser, in the same kernel)
        e_cc = torch.empty(NC, H, C, C, **f32)
        cn, dkk, db = (cf, None, None) if kb is None else (rows[nco], rows[nco + 1], rows[slots[2]])
        _delta_wy_bwd_kernel[(NC * H,)](
            k, u, cf, gd, states, dnu, t_wy, e_cc, du, dc, lay.tok_start, lay.tok_stop,
            sf if sf is not None else cf, ds if ds is not None else dc,
            *((kb, kk, cn, dkk, db) if kb is not None else (cf,) * 5), H, K=K, V=V, C=C, DECAY=decay,
            BK=shape.BK, BV=shape.BV_rank1, PRECISION=prec, U_SCALE=sf is not None, LOWP=lowp,
            NORM=kb is not None, num_warps=shape.warps_rank1,
        )
        # 4. dq, dk (with the normaliser's 2 dkk k) and the decay terms
        _dqdw_bwd_kernel[(NK, NC * H)](
            q, k, u, d_o, gd, states, dstates, dq, dk, dlam, lay.tok_start, lay.tok_stop, scale, B * T,
            nu, dnu, t_wy, e_cc, cn, dbb, dkk if dkk is not None else dbb, dbb, H, K=K, V=V, C=C, DECAY=decay,
            BKS=shape.BKS, BV=shape.BV_dqdw, PRECISION=prec, DELTA=True, LOWP=lowp, KK_GRAD=dkk is not None,
            DW_T=dw_transposed(decay, delta=True), num_warps=shape.warps_chunk,
        )
    else:
        for t in (dq, dk, du, cbuf):
            t.zero_()
    dg = None
    if g is not None and needs[4]:
        dg = decay_gradient(dlam, dbb, df, final, lay.tok_start, lay.tok_stop, lay.chunk_offsets, C)
        dg = dg.reshape(B, T, H).to(log_decay.dtype)
    dcs = _tied_grads(cbuf, rows, slots, (0, 1, 2) if ties is None else ties)
    grads = (dq, dk, du, None if dcs[0] is None else dcs[0].to(c.dtype), dg, dh0 if h0 is not None else None,
             None if dcs[1] is None else dcs[1].to(u_scale.dtype),
             None if dcs[2] is None else dcs[2].to(kk_coef.dtype))
    return tuple(x if (x is not None and n) else None for x, n in zip(grads, needs))


def _ties(c, u_scale, kk_coef):
    """For c, u_scale, kk_coef: the position of the first of them that is the same tensor object
    (Longhorn's β thrice: ``(0, 0, 0)``; DeltaNet's twice: ``(0, 0, 2)``). Identity, not equal
    storage: two tensors over one storage may still have different autograd histories."""
    return (0, 1 if u_scale is None or u_scale is not c else 0,
            2 if kk_coef is None else 0 if kk_coef is c else 1 if kk_coef is u_scale else 2)


class ChunkDeltaFunction(torch.autograd.Function):
    """Autograd of :func:`chunk_delta`: keeps the inputs, the chunk-boundary states, A, the final
    state and X and ν (``OLSM_MATRIX_DELTA_SAVE=keep``, the default: two ``[B, T, H, D]`` tensors
    in the storage dtype, and the backward skips re-deriving them; ``recompute`` re-derives them
    with one more WY launch, about 0.23 ms of DeltaNet's 2.39 ms fwd+bwd at (8, 2048, 16, 128) on
    the H200, run 9); the backward is :func:`delta_backward`. It also keeps the kernels' operands
    (:func:`_operands`: the flat fp32 ``[B·T, H]`` coefficients, each a copy only where the input
    is not fp32 (4 bytes a token and head: 1 MiB at (8, 2048, 16)), and the launch shape), so the
    backward converts nothing again, and it returns one summed gradient for a tensor passed as
    several of c, u_scale, kk_coef (Longhorn's β, DeltaNet's), which autograd would otherwise sum
    in the input dtype after a cast per position."""

    @staticmethod
    def forward(ctx, q, k, u, c, log_decay, h0, u_scale, kk_coef, lay, meta, opts):
        with torch.no_grad():
            ops = _operands(q, k, u, c, u_scale, log_decay, meta, lay.C, kk_coef)
            o, final, states, t_wy, kk, x_wy, nu = delta_forward(q, k, u, c, log_decay, h0, lay, meta, u_scale,
                                                                 kk_coef, ops=ops)
        if env_choice("OLSM_MATRIX_DELTA_SAVE", ("keep", "recompute")) == "recompute":
            x_wy = nu = None        # the backward re-derives them from A and the states (less memory)
        (qc, kc, uc, cf, sf, g, decay, prec, shape), kb = ops
        # q, k, u as the kernels read them (contiguous; the inputs themselves when they are)
        ctx.save_for_backward(qc, kc, uc, c, log_decay, h0, u_scale, kk_coef, kk, states, t_wy, final, x_wy, nu,
                              cf, sf, kb, g)
        ctx.lay, ctx.meta, ctx.opts = lay, meta, opts
        ctx.launch = (decay, prec, shape)
        ctx.ties = _ties(c, u_scale, kk_coef)
        ctx.set_materialize_grads(False)
        return o, final

    @staticmethod
    @once_differentiable      # a second derivative through the kernels is an error, not a silent zero
    def backward(ctx, d_o, d_final):
        q, k, u, c, log_decay, h0, u_scale, kk_coef, kk, states, t_wy, final, x_wy, nu, cf, sf, kb, g = \
            ctx.saved_tensors
        needs = ctx.needs_input_grad[:8]
        decay, prec, shape = ctx.launch
        try:
            grads = delta_backward(q, k, u, c, log_decay, h0, states, t_wy, final, d_o, d_final, ctx.lay,
                                   ctx.meta, needs, u_scale, kk_coef, kk, x_wy, nu,
                                   ops=((q, k, u, cf, sf, g, decay, prec, shape), kb), ties=ctx.ties)
        except OutOfResources:
            # this GPU's shared memory is too small for the tiles: differentiate the general pair
            grads = _general_pair_grads((q, k, u, c, log_decay, h0, u_scale, kk_coef), needs, d_o, d_final,
                                        ctx.meta, ctx.opts)
        return (*grads, None, None, None)


def _general_pair(q, k, u, c, log_decay, h0, u_scale, kk_coef, scale, cu_seqlens, chunk_size):
    """``chunk_matrix`` with the pair ``(−c k, k)``: the fallback of :func:`chunk_delta`."""
    if kk_coef is not None:
        r = 1. / (1. + kk_coef.float() * k.float().pow(2).sum(-1))
        c, u_scale = c.float() * r, None if u_scale is None else u_scale.float() * r
    a = (-c[..., None].float() * k.float()).to(k.dtype)     # rounded once, as the fast path's c k
    if u_scale is not None:
        u = (u_scale[..., None].float() * u.float()).to(u.dtype)
    return chunk_matrix(q, k, u, log_decay, [(a, k)], scale=scale, initial_state=h0, output_final_state=True,
                        cu_seqlens=cu_seqlens, chunk_size=chunk_size)


def _general_pair_grads(inputs, needs, d_o, d_final, meta, opts):
    leaves = [None if t is None else t.detach().requires_grad_(n) for t, n in zip(inputs, needs)]
    with torch.enable_grad():
        o, fin = _general_pair(*leaves, meta["scale"], *opts)
        return tuple(leaf_grads(leaves, o, fin, d_o, d_final))


def _check_c(c, q, name="c"):
    """A per-token coefficient ``[B, T, H]``: a float tensor on q's device."""
    B, T, H, _ = q.shape
    if not isinstance(c, torch.Tensor):
        raise InputError(f"{name} must be a tensor, got {type(c).__name__}")
    if tuple(c.shape) != (B, T, H):
        raise InputError(f"{name} must be [B, T, H] = {(B, T, H)}, got {tuple(c.shape)}")
    if not c.is_floating_point():
        raise InputError(f"{name} must be floating point, got {c.dtype}")
    if c.device != q.device:
        raise InputError(f"{name} is on {c.device} but q is on {q.device}")


def chunk_delta(
    q: torch.Tensor,
    k: torch.Tensor,
    u: torch.Tensor,
    c: torch.Tensor,
    log_decay: Optional[torch.Tensor] = None,
    *,
    scale: float = 1.0,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
    u_scale: Optional[torch.Tensor] = None,
    kk_coef: Optional[torch.Tensor] = None,
):
    """The delta form ``S_t = (e^{g_t} I − c_t k_t k_tᵀ) S_{t−1} + k_t u_tᵀ`` on Triton: the same
    result as ``chunk_matrix(q, k, u, log_decay, [(−c k, k)])``, faster (module docstring).

    Args:
        q, k: ``[B, T, H, K]``; u: ``[B, T, H, V]``; one dtype (float32, float16 or bfloat16).
        c: ``[B, T, H]`` per-token coefficient of the rank-1 term, any float dtype (used in fp32).
        log_decay: ``None`` or ``[B, T, H]`` (values ``<= 0``), or ``[B, T, H, K]`` (then the
            general path runs).
        scale, initial_state, output_final_state, cu_seqlens, chunk_size: as :func:`chunk_matrix`.
        u_scale: ``None`` or ``[B, T, H]``: the written value is then ``u_scale ⊙ u`` (DeltaNet's
            β v with ``u = v``), formed inside the kernels, not as a ``[B, T, H, V]`` tensor.
        kk_coef: ``None`` or ``[B, T, H]`` b: c and u_scale are then divided by ``1 + b_t ‖k_t‖²``,
            the normaliser of an implicit (proximal) step, formed inside the kernels (Longhorn:
            ``c = u_scale = kk_coef = β`` gives ε = β / (1 + β kᵀk)).

    Returns:
        ``o [B, T, H, V]`` in q's dtype and the final state ``[N, H, K, V]`` float32 (or ``None``).
        Gradients flow to q, k, u, c, log_decay, initial_state, u_scale and kk_coef.

    Raises:
        BackendError, InputError: as :func:`chunk_matrix`; also for c or u_scale of the wrong shape.
    """
    _check_backend(q.device, q.dtype)
    _check_c(c, q)
    for name, x in (("u_scale", u_scale), ("kk_coef", kk_coef)):
        if x is not None and x is not c:       # Longhorn's β thrice: checked once
            _check_c(x, q, name)
    _check_inputs(q, k, u, log_decay, (), initial_state, cu_seqlens, chunk_size)
    B, T, H, K = q.shape
    if delta_applies(log_decay, K, u.shape[-1]):
        lay = _layout(B, T, chunk_size, cu_seqlens, q.device)
        precision = "ieee" if (q.dtype == torch.float32 or _interpreting()) else "tf32"
        meta = dict(scale=float(scale), out_dtype=q.dtype, precision=precision)
        try:
            o, final = ChunkDeltaFunction.apply(q, k, u, c, log_decay, initial_state, u_scale, kk_coef, lay, meta,
                                                (cu_seqlens, chunk_size))
            return o, (final if output_final_state else None)
        except OutOfResources:
            pass  # this GPU's shared memory is too small for the tiles: the general pair below
    o, final = _general_pair(q, k, u, c, log_decay, initial_state, u_scale, kk_coef, scale, cu_seqlens,
                             chunk_size)
    return o, (final if output_final_state else None)
