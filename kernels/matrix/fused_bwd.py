r"""Triton backward of the matrix class for no decay or a scalar decay per head and at most one
low-rank pair, and for a per-key decay without one (its extra kernels in :mod:`.perkey`). Pairs
with the fused forward of :mod:`.fused`, whose chunk-boundary states S_n it reuses.

**Without a low-rank part** (linear attention, RetNet, Mamba-2 / simple GLA; the default). Per
chunk n and head, with G the chunk-relative cumulative log-decay, D[t, s] = e^{G_t − G_s} for
s ≤ t (0 above the diagonal), Q̂ = q e^{G_t}, Ŵ = w e^{G_C − G_s} and γ_n = e^{G_C}::

    forward    o = scale · (Q̂ S_n + (Q Wᵀ ⊙ D) U),     S_{n+1} = γ_n S_n + Ŵᵀ U

    kernel 1   dS_n = γ_n dS_{n+1} + scale · Q̂ᵀ dO           (reverse, sequential over chunks;
               dS_N = ∂L/∂final, and dS_0 = ∂L/∂h0)
    kernel 2   dA = scale · (dO Uᵀ) ⊙ D
               dq = scale · e^{G_t} dO S_nᵀ + dA W
               dw = e^{G_C − G_s} U dS_{n+1}ᵀ + dAᵀ Q
    kernel 3   du = e^{G_C − G_s} W dS_{n+1} + scale · (Q Wᵀ ⊙ D)ᵀ dO

**With one low-rank pair (a, b)** (DeltaNet, gated DeltaNet, Longhorn, gated Longhorn, rank-1
DPLR with a scalar decay; the default since it ran on an H100: DeltaNet fwd+bwd 9.2 ms against
17.0 ms with the autograd backward at (8, 2048, 16, 128), bf16).
The forward of :mod:`.fused` adds the probes P = X S_n + Y (X = T B̂, Y = T N U, T = (I − L)⁻¹,
L = strict(b aᵀ ⊙ R), N = strict(b wᵀ ⊙ R), R[t, s] = e^{G_{t−1} − G_s}), o += scale · M_qa P
and S_{n+1} += Âᵀ P. The backward recomputes X, Y and T (the forward's kernel 1, storing T), then

    kernel 1   dP = scale · M_qaᵀ dO + Â dS_{n+1}
               dS_n = γ_n dS_{n+1} + scale · Q̂ᵀ dO + Xᵀ dP          (same reverse pass)
    kernel 2'a per chunk, a loop over value blocks: dT = Σ_v dP_v (B̂ S_v + N U_v)ᵀ (= dX B̂ᵀ +
               dP (N U)ᵀ with dX = dP S_nᵀ), dN = (Tᵀ dP) Uᵀ ⊙ R, the output's dM_qa = scale ·
               dO Pᵀ ⊙ D and dM_qw = scale · dO Uᵀ ⊙ D, dL = (Tᵀ dT Tᵀ) ⊙ R, and du
    kernel 2'b per K-slice × chunk: dq, dw, da, db from dO S_nᵀ, P dS_{n+1}ᵀ, U dS_{n+1}ᵀ, dX
               and the [C, C] gradients of 2'a

The decay gradient needs no pass of its own over the states. Write Λ_t for the cumulative log-decay of the
sequence up to token t. Rescaling S̃_t = e^{−Λ_t} S_t turns the recurrence into one without decay
in the variables q̃ = e^{Λ_t} q, w̃ = e^{−Λ_t} w, ã = e^{−Λ_t} a, b̃ = e^{Λ_{t−1}} b (and the
final state e^{Λ_end} S̃), so ∂L/∂Λ_t = q_t·dq_t − w_t·dw_t − a_t·da_t + b_{t+1}·db_{t+1}
(+ ⟨dS_final, S_final⟩ at the sequence's last token) and ∂L/∂g_j = Σ_{t ≥ j} ∂L/∂Λ_t within its
sequence: the kernels write those dot products per token, and :func:`.decay_grad.decay_gradient`
sums them backwards within each sequence (the same identity FLA uses for its scalar-gate kernels; GLA, arXiv 2312.06635).

Every exponent is ≤ 0 after masking. Everything accumulates in float32; gradients are returned in
the inputs' dtype. ``OLSM_MATRIX_BWD`` (read at each call): ``auto`` (default: these kernels
wherever they apply), ``autograd`` (the general path's autograd backward, for A/B timing).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import perkey, perkey_pair
from .fused import (bwd_dots_lowp, env_choice, launch_shape, launch_staged, launch_wy, no_segments, rank0_warps,
                    sequence_launch, split_warps, walk_log_decay)
from .decay_grad import decay_gradient, decay_gradient_per_key
from .perkey_pair import BA, BW, QA, QW
from .split import walk_sequences
from ..ints import cdiv
from .tiles import (
    chunk_decay, chunk_gamma, chunk_key_tiles, chunk_tokens, gamma_at, kslice_program, segment_start,
    store_segment_end, walk_bounds, walk_decay, walk_program, walk_tokens,
)


def dstate_stages(decay: int, lowrank: bool) -> int:
    """num_stages of :func:`_dstate_bwd_kernel` (also read by ``kernel_resources.py``): Triton's
    default 3, which pipelines every chunk load since the walk's addresses are arithmetic
    (tiles.walk_tokens); a per-key decay with a pair then needs 312 KB of shared memory (sm_90
    compile), so it takes 2 (177 KB)."""
    return 2 if decay == 2 and lowrank else 3


def dstate_warps(shape, decay: int, lowrank: bool, delta: bool = False) -> int:
    """num_warps of :func:`_dstate_bwd_kernel` (also read by ``kernel_resources.py``): without a
    pair :func:`.fused.rank0_warps`; with one ``warps_seq``, and the delta form with a decay
    ``warps_delta_decay`` (4). It was 8 in runs 14–15, when the decay's fp32 copies of A and Qᵀ
    spilled at 4; with the scales moved onto the [C, BV] tiles its loop issues 4 × 1160 SASS
    instructions per chunk at 4 warps against 8 × 1068 at 8 (Triton 3.6, sm_90, BV = 32), and
    gated DeltaNet's reverse pass went 2.42 → 1.49 ms at (1, 32768, 16, 128) on the H200 (2.01 at
    8 warps)."""
    if not lowrank:
        return rank0_warps(shape, decay)
    return shape.warps_delta_decay if delta and decay else shape.warps_seq


def launch_dstate(grid, args, **kw):
    """:func:`_dstate_bwd_kernel` at :func:`dstate_stages` (:func:`.fused.launch_staged`: one
    stage fewer after each ``OutOfResources``)."""
    return launch_staged(_dstate_bwd_kernel, grid, args, dstate_stages(kw["DECAY"], kw["LOWRANK"]), **kw)


def dw_transposed(decay: int, delta: bool = False) -> bool:
    """``OLSM_MATRIX_DQDW`` (read at each call): whether :func:`_dqdw_bwd_kernel` forms dw
    transposed from dA alone (its DW_T) instead of dA and dAᵀ by two products per value block.
    ``auto`` (the default): transposed without a low-rank part, both in the delta form;
    ``transposed`` / ``both``: everywhere. A per-key decay always keeps both (its kernel returns
    early). On the H200 (run 18, bf16, fwd+bwd): transposed took linear attention from 0.972 to
    0.906 ms at (8, 2048, 16, 128) in CUDA graphs and from 2.15 to 2.02 at (1, 32768), Mamba-2 from
    1.216 to 1.131 and from 2.64 to 2.45; DeltaNet went 1.36 -> 1.39 and 3.51 -> 3.58 (its delta
    terms spill 56 bytes there), so the delta form keeps both."""
    choice = env_choice("OLSM_MATRIX_DQDW", ("auto", "both", "transposed"))
    if decay == 2 or choice == "both":
        return False
    return choice == "transposed" or not delta


@triton.jit
def _dstate_bwd_kernel(
    q, a, do, g, x_wy, d_final, dstates, dprobes, dh0, tok_start, tok_stop, chunk_offsets, scale, amat,
    H, seg_end, seg_g, NSEG,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, DECAY: tl.constexpr, HAS_DFINAL: tl.constexpr,
    LOWRANK: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
    LOWP: tl.constexpr = False, SEG_L: tl.constexpr = 0, SEG_START: tl.constexpr = False,
    SEG_W: tl.constexpr = 0, SEG_EXT: tl.constexpr = False, G_CUM: tl.constexpr = False,
):
    """Kernel 1: one sequence × head × BV value columns (× a BK key block without a low-rank
    part, :func:`~.fused.sequence_launch`) walks its chunks backwards. LOWP (the delta form, with
    LOWRANK): dot operands in the storage dtype of dprobes (bf16/fp16 inputs), fp32 accumulation.

    Shapes: q, a ``[B·T, H, K]``, do ``[B·T, H, V]``; g ``[B·T, H]`` fp32; x_wy ``[NC, H, C, K]``;
    d_final, dh0 ``[N, H, K, V]``; writes dstates ``[NC, H, K, V]`` (∂L/∂S_{n+1}, the state chunk
    n ends in) and, with LOWRANK, dprobes ``[NC, H, C, V]`` (∂L/∂P of the chunk's probes).
    DECAY = 2 (per key): g is the cumulative G ``[B·T, H, K]`` fp32 and, with LOWRANK, M_qa is read
    from amat, the four Grams ``[NC, H, 4, C, C]`` of :mod:`.perkey_pair`.

    SEG_L > 0 (:mod:`.split`, reversed): segment j of the sequence walked backwards, as
    :func:`.fused._state_fwd_kernel`'s segments: without SEG_START from zero, to its start's dS
    and total log-decay (seg_end, seg_g), with a low-rank part (SEG_EXT) also its transposed
    transition from the identity in the columns ``[V, V + K)``; with SEG_START from the true dS at
    its end (left in seg_end by the join), storing dstates and dprobes. dh0 is left to the join.
    """
    i_nh, i_h, c_start, c_end, offs_k, mask_k, offs_v, mask_v, mask_kv, kv, kvs, j, lead = walk_program(
        chunk_offsets, H, K, V, BK, BV, SEG_L, SEG_W, SEG_EXT)
    mask_u = offs_v < V                         # the value columns (SEG_EXT walks more: .split)
    store = SEG_L == 0 or SEG_START             # dstates and dprobes (not in split step 1)
    # with SEG_L: log-decay from the segment's end (per key: a [BK] vector)
    if DECAY == 2:
        cum = tl.zeros([BK], dtype=tl.float32)
    else:
        cum = tl.zeros([1], dtype=tl.float32)

    # dot operands: fp32 copies, or with LOWP as stored (dprobes' dtype: the inputs' for bf16/fp16)
    od = dprobes.dtype.element_ty if LOWP else tl.float32
    dS = segment_start(seg_end, i_nh, NSEG, j, kvs, mask_kv, offs_k, offs_v, K, V, BK, BV, SEG_W, SEG_START,
                       SEG_EXT)
    if HAS_DFINAL and SEG_L == 0:
        dS += tl.load(d_final + i_nh.to(tl.int64) * K * V + kv, mask=mask_kv, other=0.)
    t_first, t_end = walk_bounds(tok_start, tok_stop, c_start, c_end)
    for i in range(0, c_end - c_start):
        c = c_end - 1 - i
        nh = (c * H + i_h).to(tl.int64)
        if store:
            tl.store(dstates + nh * K * V + kv, dS.to(dstates.dtype.element_ty), mask=mask_kv)
        offs_c, valid, tok, last = walk_tokens(t_first, t_end, c, c_start, C)
        Q_T = tl.load(q + (tok[None, :] * H + i_h) * K + offs_k[:, None],
                      mask=mask_k[:, None] & valid[None, :], other=0.)                  # [BK, C]
        dO = tl.load(do + (tok[:, None] * H + i_h) * V + offs_v[None, :],
                     mask=valid[:, None] & mask_u[None, :], other=0.).to(od)           # [C, BV]
        if DECAY == 1:
            G, g_total = walk_decay(g, tok, valid, last, i_h, H, offs_c, G_CUM)
        if DECAY == 2:
            # per key: g is the cumulative G [B·T, H, K] of .perkey, γ its chunk's last row
            # loaded in the step that uses it (sync loads 1 without a pair): a hand prefetch a
            # chunk ahead was measured slower, GLA's fwd+bwd at (1, 32768) 5.41 → 5.47 ms
            gam = gamma_at(g, last, i_h, H, K, offs_k, mask_k)
        if LOWRANK:
            # dP = scale · M_qaᵀ dO + Â dS_{n+1}, with M_qaᵀ[s, t] = a_s·q_t e^{G_t − G_s} (s ≤ t)
            row_k = (tok[:, None] * H + i_h) * K + offs_k[None, :]
            A = tl.load(a + row_k, mask=valid[:, None] & mask_k[None, :], other=0.)     # [C, BK]
            upper = offs_c[:, None] <= offs_c[None, :]
            if DECAY == 2:
                M_T = tl.load(amat + (nh * 4 + QA) * C * C + offs_c[None, :] * C + offs_c[:, None])
                A = A.to(tl.float32) * tl.exp(gam[None, :] - tl.load(g + row_k, mask=valid[:, None] & mask_k[None, :],
                                                                     other=0.))
            else:
                M_T = tl.dot(A.to(od), Q_T.to(od), input_precision=PRECISION)
            if DECAY == 1:
                M_T = M_T * tl.exp(tl.where(upper, G[None, :] - G[:, None], float("-inf")))
                if not LOWP:
                    A = A.to(tl.float32) * tl.exp(g_total - G)[:, None]
            elif DECAY == 0:
                M_T = tl.where(upper, M_T, 0.)
            dP = scale * tl.dot(M_T.to(od), dO, input_precision=PRECISION)
            if DECAY == 1 and LOWP:
                # Â = diag(e^{g_total − G}) A: with storage-dtype operands the row scale goes on
                # the [C, BV] product, not on an fp32 copy of A [C, BK] (those copies spilled on
                # Triton 3.6 and forced 8 warps: dstate_warps). With fp32 operands A is an fp32
                # copy anyway, and scaling the product spilled more (sm_90: 512 → 800 B)
                dP += tl.dot(A.to(od), dS.to(od), input_precision=PRECISION) * tl.exp(g_total - G)[:, None]
            else:
                dP += tl.dot(A.to(od), dS.to(od), input_precision=PRECISION)
            if store:
                tl.store(dprobes + nh * C * V + offs_c[:, None] * V + offs_v[None, :],
                         dP.to(dprobes.dtype.element_ty), mask=mask_v[None, :])
            X_T = tl.load(x_wy + nh * C * K + offs_c[None, :] * K + offs_k[:, None],
                          mask=mask_k[:, None], other=0.)                               # [BK, C]
        if DECAY == 1:
            if LOWP:
                # Q̂ᵀ dO = Qᵀ (diag(e^G) dO): the scale on dO's [C, BV] rows, not on Qᵀ [BK, C]
                dO = (dO.to(tl.float32) * tl.exp(G)[:, None]).to(od)
            else:
                Q_T = Q_T.to(tl.float32) * tl.exp(G)[None, :]
            dS = tl.exp(g_total) * dS
            if SEG_L > 0:
                cum += g_total
        if DECAY == 2:
            # per key (no low-rank part): g is the cumulative G [B·T, H, K] of .perkey
            Q_T = Q_T.to(tl.float32) * tl.exp(tl.load(g + (tok[None, :] * H + i_h) * K + offs_k[:, None],
                                                      mask=mask_k[:, None] & valid[None, :], other=0.))
            dS = tl.exp(gam)[:, None] * dS
            if SEG_L > 0:
                cum += gam
        dS += scale * tl.dot(Q_T.to(od), dO, input_precision=PRECISION)
        if LOWRANK:
            dS += tl.dot(X_T.to(od), dP.to(od), input_precision=PRECISION)
    if SEG_L > 0:
        if not SEG_START:
            store_segment_end(seg_end, seg_g, i_nh, NSEG, j, dS, cum, kvs, mask_kv, lead, offs_k, mask_k, K, SEG_W,
                              0 if SEG_EXT else DECAY)
    else:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + kv, dS, mask=mask_kv)


@triton.jit
def _dqdw_bwd_kernel(
    q, w, u, do, g, states, dstates, dq, dw, dlam, tok_start, tok_stop, scale, BT,
    probes, dprobes, t_wy, e_cc, c, dbb, dkk, amat,
    H, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, DECAY: tl.constexpr,
    BKS: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, DELTA: tl.constexpr = False,
    LOWP: tl.constexpr = False, KK_GRAD: tl.constexpr = False, DW_T: tl.constexpr = False,
):
    """Kernel 2: dq, dw and the per-token decay term for one K-slice × chunk × head.

    Shapes: q, w ``[B·T, H, K]``; u, do ``[B·T, H, V]``; states, dstates ``[NC, H, K, V]``;
    writes dq, dw ``[B·T, H, K]`` and dlam ``[NK, B·T, H]`` fp32 (this slice's q·dq − w·dw).
    DECAY = 2 (per key, :mod:`.perkey`; g the cumulative G ``[B·T, H, K]``): dq, dw are fp32 and
    get only the inter-chunk parts, the first key slice writes dA = scale · dO Uᵀ (lower,
    inclusive) to amat ``[NC, H, C, C]`` fp32, and dlam is not written (the intra kernel forms λ).

    DELTA (the delta form of :mod:`.delta`, w = k): the values are ν (probes ``[NC, H, C, V]``)
    instead of u, and dw gains the WY terms from dν (dprobes), A (t_wy ``[NC, H, C, C]``), the
    Gram gradient E (e_cc ``[NC, H, C, C]``) and c ``[B·T, H]``: dX = dν S_nᵀ,
    d(b-role) = E K − c e^{G_{t−1}} Aᵀ dX, dw += d(b-role) + Eᵀ K; dlam gains 2 k·d(b-role)
    (the b-role's own term and the part of k·dk that is not w's or a's) and dbb ``[NK, B·T, H]`` k·d(b-role).
    LOWP: the value-loop dots and the dA products take operands in their storage dtype (bf16 /
    fp16 inputs; fp32 accumulators) instead of fp32 copies. KK_GRAD (DELTA): dw also gets
    2 dkk_t w_t, dkk ``[B·T, H]`` fp32 the gradient of ‖k_t‖² through the implicit step's
    normaliser (:mod:`.delta`); that path lies outside the recurrence, so dlam does not see it.
    DW_T (DECAY 0 or 1; :func:`dw_transposed`: the default without DELTA): dw is formed transposed, ``[BKS, C]``,
    from dA alone (dWᵀ = dS Uᵀ + scale · Qᵀ dA, the delta terms likewise) and stored through
    transposed addresses: one C×C product per value block instead of two, and neither dO nor U
    loaded twice (no ``tl.trans``: DESIGN §7).
    """
    nh, i_h, offs_c, valid, tok, i_k, offs_k, mask_k, row_k, mask_row = kslice_program(tok_start, tok_stop, H, K,
                                                                                       C, BKS)

    if DW_T:
        _dqdw_transposed(q, w, u, do, g, states, dstates, dq, dw, dlam, tok_start, tok_stop, scale, BT,
                         probes, dprobes, t_wy, e_cc, c, dbb, dkk, nh, i_h, offs_c, valid, tok, i_k, offs_k,
                         mask_k, row_k, mask_row, H, K, V, C, DECAY, BKS, BV, PRECISION, DELTA, LOWP, KK_GRAD)
        return
    od = q.dtype.element_ty if LOWP else tl.float32   # dot operands: fp32 copies, or as stored (LOWP)
    dA = tl.zeros([C, C], dtype=tl.float32)       # [t, s]: scale · dO_t · u_s (masked below)
    dA_T = tl.zeros([C, C], dtype=tl.float32)     # [s, t]
    dq_s = tl.zeros([C, BKS], dtype=tl.float32)   # dO S_nᵀ
    dw_s = tl.zeros([C, BKS], dtype=tl.float32)   # U dS_{n+1}ᵀ
    if DELTA:
        dX = tl.zeros([C, BKS], dtype=tl.float32)     # dν S_nᵀ
    for i_v in range(0, (V + BV - 1) // BV):
        offs_v = i_v * BV + tl.arange(0, BV)
        mask_v = offs_v < V
        row_v = (tok[:, None] * H + i_h) * V + offs_v[None, :]
        col_v = (tok[None, :] * H + i_h) * V + offs_v[:, None]
        mask_rv = valid[:, None] & mask_v[None, :]
        mask_cv = mask_v[:, None] & valid[None, :]
        if DELTA:   # the values are ν, chunk-major [NC, H, C, V]
            src, row_u, col_u = probes, nh * C * V + offs_c[:, None] * V + offs_v[None, :], \
                nh * C * V + offs_c[None, :] * V + offs_v[:, None]
        else:
            src, row_u, col_u = u, row_v, col_v
        dO = tl.load(do + row_v, mask=mask_rv, other=0.).to(od)        # [C, BV]
        U = tl.load(src + row_u, mask=mask_rv, other=0.).to(od)
        dO_T = tl.load(do + col_v, mask=mask_cv, other=0.).to(od)      # [BV, C]
        U_T = tl.load(src + col_u, mask=mask_cv, other=0.).to(od)
        dA += tl.dot(dO, U_T, input_precision=PRECISION)
        if DECAY != 2:
            dA_T += tl.dot(U, dO_T, input_precision=PRECISION)
        # S_nᵀ and dS_{n+1}ᵀ of this (K-slice, V-block), transposed by pointer arithmetic
        vk = nh * K * V + offs_v[:, None] + offs_k[None, :] * V
        mask_vk = mask_v[:, None] & mask_k[None, :]
        S_T = tl.load(states + vk, mask=mask_vk, other=0.).to(od)      # [BV, BKS]
        dS_T = tl.load(dstates + vk, mask=mask_vk, other=0.).to(od)
        dq_s += tl.dot(dO, S_T, input_precision=PRECISION)
        dw_s += tl.dot(U, dS_T, input_precision=PRECISION)
        if DELTA:
            dnu = tl.load(dprobes + row_u, mask=mask_rv, other=0.).to(od)
            dX += tl.dot(dnu, S_T, input_precision=PRECISION)

    incl = offs_c[:, None] >= offs_c[None, :]
    if DECAY == 2:
        # per key (.perkey): the inter-chunk parts in fp32 into dq, dw, and (first key slice)
        # dA = scale · dO Uᵀ into amat; .perkey's intra kernel finishes dq, dw and the decay terms
        G = tl.load(g + row_k, mask=mask_row, other=0.)
        gam = chunk_gamma(g, tok_stop, nh // H, i_h, H, K, offs_k, mask_k)
        tl.store(dq + row_k, scale * dq_s * tl.exp(G), mask=mask_row)
        tl.store(dw + row_k, dw_s * tl.exp(gam[None, :] - G), mask=mask_row)
        tl.store(amat + nh * C * C + offs_c[:, None] * C + offs_c[None, :], scale * tl.where(incl, dA, 0.),
                 mask=(offs_c[:, None] * 0 + offs_c[None, :] * 0 + i_k) == 0)
        return
    Q = tl.load(q + row_k, mask=mask_row, other=0.).to(tl.float32)             # [C, BKS]
    W = tl.load(w + row_k, mask=mask_row, other=0.).to(tl.float32)
    if DECAY == 1:
        g_c, G, g_total = chunk_decay(g, tok, valid, i_h, H, offs_c)
        D = tl.exp(tl.where(incl, G[:, None] - G[None, :], float("-inf")))   # [t, s]
        D_T = tl.exp(tl.where(offs_c[:, None] <= offs_c[None, :], G[None, :] - G[:, None], float("-inf")))
        dq_s = dq_s * tl.exp(G)[:, None]
        dw_s = dw_s * tl.exp(g_total - G)[:, None]
        dA = dA * D
        dA_T = dA_T * D_T
    else:
        dA = tl.where(incl, dA, 0.)
        dA_T = tl.where(offs_c[:, None] <= offs_c[None, :], dA_T, 0.)
    dQ = scale * (dq_s + tl.dot(dA.to(od), W.to(od), input_precision=PRECISION))
    dW = dw_s + scale * tl.dot(dA_T.to(od), Q.to(od), input_precision=PRECISION)
    part = i_k.to(tl.int64) * BT * H + tok * H + i_h
    if DELTA:
        rows = nh * C * C + offs_c[:, None] * C + offs_c[None, :]
        cols = nh * C * C + offs_c[None, :] * C + offs_c[:, None]              # transposed
        cb = tl.load(c + tok * H + i_h, mask=valid, other=0.)                  # c e^{G_{t−1}}
        if DECAY == 1:
            cb = cb * tl.exp(G - g_c)
        dWc = tl.dot(tl.load(t_wy + cols), dX, input_precision=PRECISION)       # −∂L/∂(c e^{G_{t−1}} k)
        dB = tl.dot(tl.load(e_cc + rows), W, input_precision=PRECISION) - cb[:, None] * dWc
        dW += dB + tl.dot(tl.load(e_cc + cols), W, input_precision=PRECISION)
        bb = tl.sum(W * dB, axis=1)
        tl.store(dbb + part, bb, mask=valid)
    tl.store(dq + row_k, dQ.to(dq.dtype.element_ty), mask=mask_row)
    if KK_GRAD:
        dkk_t = tl.load(dkk + tok * H + i_h, mask=valid, other=0.)
        tl.store(dw + row_k, (dW + 2. * dkk_t[:, None] * W).to(dw.dtype.element_ty), mask=mask_row)
    else:
        tl.store(dw + row_k, dW.to(dw.dtype.element_ty), mask=mask_row)
    lam = tl.sum(Q * dQ - W * dW, axis=1)
    if DELTA:
        # q·dq − w·dw − a·da + b·db with w = b = k, a = −c k: −w·dw − a·da = −k·dk + k·db
        lam += 2. * bb
    tl.store(dlam + part, lam, mask=valid)


@triton.jit
def _dqdw_transposed(
    q, w, u, do, g, states, dstates, dq, dw, dlam, tok_start, tok_stop, scale, BT,
    probes, dprobes, t_wy, e_cc, c, dbb, dkk, nh, i_h, offs_c, valid, tok, i_k, offs_k, mask_k, row_k, mask_row,
    H, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, DECAY: tl.constexpr,
    BKS: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, DELTA: tl.constexpr,
    LOWP: tl.constexpr, KK_GRAD: tl.constexpr,
):
    """:func:`_dqdw_bwd_kernel` with DW_T (DECAY 0 or 1): dq as ``[C, BKS]``, dw as ``[BKS, C]``.

    With dA ``[t, s]`` = dO_t · u_s (masked, decayed), the transposed dw needs no dA_T:
    dW_intraᵀ = scale · Qᵀ dA, dW_interᵀ = dS_{n+1} Uᵀ, and in the delta form
    dB_roleᵀ = Wᵀ Eᵀ − c e^{G_{t−1}} ⊙ (dXᵀ T), dWᵀ += dB_roleᵀ + Wᵀ E with dXᵀ = S_n dνᵀ.
    """
    od = q.dtype.element_ty if LOWP else tl.float32
    dA = tl.zeros([C, C], dtype=tl.float32)        # [t, s]: dO_t · u_s (masked below)
    dq_s = tl.zeros([C, BKS], dtype=tl.float32)    # dO S_nᵀ
    dw_sT = tl.zeros([BKS, C], dtype=tl.float32)   # (U dS_{n+1}ᵀ)ᵀ = dS_{n+1} Uᵀ
    if DELTA:
        dX_T = tl.zeros([BKS, C], dtype=tl.float32)    # (dν S_nᵀ)ᵀ = S_n dνᵀ
    for i_v in range(0, (V + BV - 1) // BV):
        offs_v = i_v * BV + tl.arange(0, BV)
        mask_v = offs_v < V
        row_v = (tok[:, None] * H + i_h) * V + offs_v[None, :]
        mask_rv = valid[:, None] & mask_v[None, :]
        mask_cv = mask_v[:, None] & valid[None, :]
        if DELTA:   # the values are ν, chunk-major [NC, H, C, V]
            src, col_u = probes, nh * C * V + offs_c[None, :] * V + offs_v[:, None]
        else:
            src, col_u = u, (tok[None, :] * H + i_h) * V + offs_v[:, None]
        dO = tl.load(do + row_v, mask=mask_rv, other=0.).to(od)        # [C, BV]
        U_T = tl.load(src + col_u, mask=mask_cv, other=0.).to(od)      # [BV, C]
        dA += tl.dot(dO, U_T, input_precision=PRECISION)
        vk = nh * K * V + offs_v[:, None] + offs_k[None, :] * V        # S_nᵀ [BV, BKS] by address
        kv = nh * K * V + offs_k[:, None] * V + offs_v[None, :]        # dS_{n+1} [BKS, BV] as stored
        mask_vk = mask_v[:, None] & mask_k[None, :]
        mask_kv = mask_k[:, None] & mask_v[None, :]
        S_T = tl.load(states + vk, mask=mask_vk, other=0.).to(od)
        dS = tl.load(dstates + kv, mask=mask_kv, other=0.).to(od)
        dq_s += tl.dot(dO, S_T, input_precision=PRECISION)
        dw_sT += tl.dot(dS, U_T, input_precision=PRECISION)
        if DELTA:
            S = tl.load(states + kv, mask=mask_kv, other=0.).to(od)
            dnu_T = tl.load(dprobes + col_u, mask=mask_cv, other=0.).to(od)
            dX_T += tl.dot(S, dnu_T, input_precision=PRECISION)

    col_k = (tok[None, :] * H + i_h) * K + offs_k[:, None]             # [BKS, C] addresses of [C, BKS]
    mask_col = mask_k[:, None] & valid[None, :]
    incl = offs_c[:, None] >= offs_c[None, :]
    if DELTA:   # first, so the dXᵀ accumulator ends before the epilogue's tiles
        rows = nh * C * C + offs_c[:, None] * C + offs_c[None, :]
        cols = nh * C * C + offs_c[None, :] * C + offs_c[:, None]              # transposed
        dWc_T = tl.dot(dX_T, tl.load(t_wy + rows), input_precision=PRECISION)  # (−∂L/∂(c e^{G_{t−1}} k))ᵀ
    if DECAY == 1:
        g_c, G, g_total = chunk_decay(g, tok, valid, i_h, H, offs_c)
        dA = dA * tl.exp(tl.where(incl, G[:, None] - G[None, :], float("-inf")))
        dq_s = dq_s * tl.exp(G)[:, None]
        dw_sT = dw_sT * tl.exp(g_total - G)[None, :]
    else:
        dA = tl.where(incl, dA, 0.)
    W = tl.load(w + row_k, mask=mask_row, other=0.)
    dQ = scale * (dq_s + tl.dot(dA.to(od), W.to(od), input_precision=PRECISION))
    tl.store(dq + row_k, dQ.to(dq.dtype.element_ty), mask=mask_row)
    Q = tl.load(q + row_k, mask=mask_row, other=0.).to(tl.float32)
    lam = tl.sum(Q * dQ, axis=1)     # dQ and Q end here, before the transposed tiles
    # Qᵀ, Wᵀ [BKS, C] as stored (dot operands; widened where they meet fp32 sums)
    Q_T = tl.load(q + col_k, mask=mask_col, other=0.)
    dW_T = dw_sT + scale * tl.dot(Q_T.to(od), dA.to(od), input_precision=PRECISION)
    W_T = tl.load(w + col_k, mask=mask_col, other=0.)
    part = i_k.to(tl.int64) * BT * H + tok * H + i_h
    if DELTA:
        cb = tl.load(c + tok * H + i_h, mask=valid, other=0.)                  # c e^{G_{t−1}}
        if DECAY == 1:
            cb = cb * tl.exp(G - g_c)
        dB_T = tl.dot(W_T.to(tl.float32), tl.load(e_cc + cols), input_precision=PRECISION) - cb[None, :] * dWc_T
        dW_T += dB_T + tl.dot(W_T.to(tl.float32), tl.load(e_cc + rows), input_precision=PRECISION)
        bb = tl.sum(W_T.to(tl.float32) * dB_T, axis=0)
        tl.store(dbb + part, bb, mask=valid)
    if KK_GRAD:
        dkk_t = tl.load(dkk + tok * H + i_h, mask=valid, other=0.)
        tl.store(dw + col_k, (dW_T + 2. * dkk_t[None, :] * W_T.to(tl.float32)).to(dw.dtype.element_ty), mask=mask_col)
    else:
        tl.store(dw + col_k, dW_T.to(dw.dtype.element_ty), mask=mask_col)
    lam -= tl.sum(W_T.to(tl.float32) * dW_T, axis=0)
    if DELTA:
        lam += 2. * bb
    tl.store(dlam + part, lam, mask=valid)


@triton.jit
def _du_bwd_kernel(
    q, w, do, g, dstates, du, amat, tok_start, tok_stop, scale,
    H, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, DECAY: tl.constexpr,
    BKS: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, LOWP: tl.constexpr = False,
):
    """Kernel 3: du for one V-block × chunk × head.

    Shapes: q, w ``[B·T, H, K]``; do ``[B·T, H, V]``; dstates ``[NC, H, K, V]``; writes du
    ``[B·T, H, V]``. DECAY = 2 (per key): g is the cumulative G ``[B·T, H, K]`` and the intra-chunk
    matrix is the forward's A read from amat ``[NC, H, C, C]`` (:mod:`.perkey`), not q wᵀ.
    LOWP (:func:`~.fused.bwd_dots_lowp`): both products take operands in the storage dtype (the
    intra-chunk matrix and the decayed W rounded to it once), else fp32 copies.
    """
    i_v = tl.program_id(0)
    nh = tl.program_id(1).to(tl.int64)
    i_h = nh % H
    offs_c, valid, tok = chunk_tokens(tok_start, tok_stop, nh // H, C)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_v = offs_v < V
    od = q.dtype.element_ty if LOWP else tl.float32   # dot operands: fp32 copies, or as stored (LOWP)

    M_T = tl.zeros([C, C], dtype=tl.float32)       # [s, t] = w_s · q_t
    acc = tl.zeros([C, BV], dtype=tl.float32)      # W dS_{n+1}
    for i_k in range(0, (K + BKS - 1) // BKS):
        offs_k = i_k * BKS + tl.arange(0, BKS)
        mask_k = offs_k < K
        W = tl.load(w + (tok[:, None] * H + i_h) * K + offs_k[None, :],
                    mask=valid[:, None] & mask_k[None, :], other=0.)
        dS = tl.load(dstates + nh * K * V + offs_k[:, None] * V + offs_v[None, :],
                     mask=mask_k[:, None] & mask_v[None, :], other=0.).to(tl.float32)
        if DECAY == 2:
            # per key: Ŵ = W ⊙ e^{γ − G} (g is the cumulative G); M_T is .perkey's A, read below
            G = tl.load(g + (tok[:, None] * H + i_h) * K + offs_k[None, :],
                        mask=valid[:, None] & mask_k[None, :], other=0.)
            gam = chunk_gamma(g, tok_stop, nh // H, i_h, H, K, offs_k, mask_k)
            acc += tl.dot((W.to(tl.float32) * tl.exp(gam[None, :] - G)).to(od), dS.to(od), input_precision=PRECISION)
        else:
            Q_T = tl.load(q + (tok[None, :] * H + i_h) * K + offs_k[:, None],
                          mask=mask_k[:, None] & valid[None, :], other=0.)
            M_T += tl.dot(W, Q_T, input_precision=PRECISION)
            acc += tl.dot(W.to(od), dS.to(od), input_precision=PRECISION)
    upper = offs_c[:, None] <= offs_c[None, :]
    if DECAY == 2:
        M_T = tl.load(amat + nh * C * C + offs_c[None, :] * C + offs_c[:, None])   # Aᵀ, zeros below the diagonal
    if DECAY == 1:
        _, G, g_total = chunk_decay(g, tok, valid, i_h, H, offs_c)
        M_T = M_T * tl.exp(tl.where(upper, G[None, :] - G[:, None], float("-inf")))
        acc = acc * tl.exp(g_total - G)[:, None]
    elif DECAY == 0:
        M_T = tl.where(upper, M_T, 0.)
    dO = tl.load(do + (tok[:, None] * H + i_h) * V + offs_v[None, :],
                 mask=valid[:, None] & mask_v[None, :], other=0.).to(od)
    acc += scale * tl.dot(M_T.to(od), dO, input_precision=PRECISION)
    tl.store(du + (tok[:, None] * H + i_h) * V + offs_v[None, :], acc.to(du.dtype.element_ty),
             mask=valid[:, None] & mask_v[None, :])


@triton.jit
def _chunk_masks(g, tok, valid, i_h, H, offs_c, C: tl.constexpr, DECAY: tl.constexpr):
    """Decay masks of one chunk: D (inclusive, D[t, s] = e^{G_t − G_s}, s ≤ t), R (strict,
    R[t, s] = e^{G_{t−1} − G_s}, s < t), their transposes formed directly (no ``tl.trans``), and
    the scalings e^{G_t}, e^{G_{t−1}}, e^{G_C − G_t} (0/1 masks and ones without decay).
    Returns ``(D, D_T, R, R_T, e_q, e_b, e_end)``; what a kernel leaves unused is compiled away."""
    incl = offs_c[:, None] >= offs_c[None, :]
    strict = offs_c[:, None] > offs_c[None, :]
    upper = offs_c[:, None] <= offs_c[None, :]
    strict_upper = offs_c[:, None] < offs_c[None, :]
    if DECAY == 1:
        g_c, G, g_total = chunk_decay(g, tok, valid, i_h, H, offs_c)
        G_prev = G - g_c
        D = tl.exp(tl.where(incl, G[:, None] - G[None, :], float("-inf")))
        D_T = tl.exp(tl.where(upper, G[None, :] - G[:, None], float("-inf")))
        R = tl.exp(tl.where(strict, G_prev[:, None] - G[None, :], float("-inf")))
        R_T = tl.exp(tl.where(strict_upper, G_prev[None, :] - G[:, None], float("-inf")))
        e_q = tl.exp(G)
        e_b = tl.exp(G_prev)
        e_end = tl.exp(g_total - G)
    else:
        D = tl.where(incl, 1., 0.)
        D_T = tl.where(upper, 1., 0.)
        R = tl.where(strict, 1., 0.)
        R_T = tl.where(strict_upper, 1., 0.)
        e_q = tl.full([C], 1., tl.float32)
        e_b = e_q
        e_end = e_q
    return D, D_T, R, R_T, e_q, e_b, e_end


@triton.jit
def _value_block(u, do, dprobes, nh, i_h, H, tok, valid, offs_c, i_v, V: tl.constexpr, C: tl.constexpr,
                 BV: tl.constexpr):
    """Value block ``i_v`` of one chunk × head for the rank-1 kernels: offsets and masks, then U and
    dO (token-major, as fp32) and dP (``[NC, H, C, V]``), each ``[C, BV]``."""
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_v = offs_v < V
    row_v = (tok[:, None] * H + i_h) * V + offs_v[None, :]
    m_cv = valid[:, None] & mask_v[None, :]
    cv = nh * C * V + offs_c[:, None] * V + offs_v[None, :]
    U = tl.load(u + row_v, mask=m_cv, other=0.).to(tl.float32)
    dO = tl.load(do + row_v, mask=m_cv, other=0.).to(tl.float32)
    dP = tl.load(dprobes + cv, mask=mask_v[None, :], other=0.).to(tl.float32)
    return offs_v, mask_v, row_v, m_cv, cv, U, dO, dP


@triton.jit
def _block_T(y, nh, C: tl.constexpr, V: tl.constexpr, offs_c, v0, BV: tl.constexpr):
    """Columns ``[v0, v0 + BV)`` of chunk × head ``nh`` of y ``[NC, H, C, V]``, transposed:
    ``[BV, C]``, zeros outside (all of it for ``v0 >= V``: nothing is read)."""
    offs_v = v0 + tl.arange(0, BV)
    return tl.load(y + nh * C * V + offs_c[None, :] * V + offs_v[:, None], mask=(offs_v < V)[:, None], other=0.)


@triton.jit
def _lowrank_cc_kernel(
    q, w, u, b, do, g, states, dstates, dprobes, x_wy, y_wy, t_wy, probes, cc, du, grams,
    tok_start, tok_stop, scale,
    H, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, DECAY: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):
    """Kernel 2'a (rank 1), one chunk × head: a loop over BV-blocks of the values accumulates the
    [C, C] products and writes du; stores P and cc = (scale·dO Pᵀ ⊙ D, scale·dO Uᵀ ⊙ D,
    dL = Tᵀ dT Tᵀ ⊙ R, dN ⊙ R) for kernel 2'b. dT = Σ_v dP_v (B̂ S_v + N U_v)ᵀ needs no
    full-K gradient (dX B̂ᵀ = dP (B̂ S)ᵀ).

    Shapes: q, w, b ``[B·T, H, K]``; u, do ``[B·T, H, V]``; states, dstates ``[NC, H, K, V]``;
    dprobes, y_wy, probes ``[NC, H, C, V]``; x_wy ``[NC, H, C, K]``; t_wy ``[NC, H, C, C]``;
    cc ``[NC, H, 4, C, C]`` fp32; du ``[B·T, H, V]``. DECAY = 2 (per key, :mod:`.perkey_pair`): g is
    the cumulative G ``[B·T, H, K]``, N, M_qw and L are read from grams ``[NC, H, 4, C, C]``, P is
    read from probes (the forward's) and Z = (I − L) P instead of B̂ S_n + N U (no states, X or
    Y read), and cc holds the gradients of the four decayed Grams (only the causal masks applied).
    """
    nh = tl.program_id(0).to(tl.int64)
    # No tl.trans anywhere (DESIGN §7: a transposed MMA result broke a backward on Hopper with
    # Triton 3.6): transposed operands are loaded transposed (col_k), or formed transposed directly.
    i_h, offs_c, valid, tok, offs_k, mask_k, row_k, m_ck, col_k, m_kc = chunk_key_tiles(
        tok_start, tok_stop, nh, H, K, C, BK, 0)
    D, D_T, R, R_T, e_q, e_b, e_end = _chunk_masks(g, tok, valid, i_h, H, offs_c, C, DECAY)
    T_T = tl.load(t_wy + nh * C * C + offs_c[None, :] * C + offs_c[:, None])
    W = tl.load(w + row_k, mask=m_ck, other=0.).to(tl.float32)
    if DECAY == 2:
        # per key: the Grams from .perkey_pair (transposed loads), Ŵ = W ⊙ e^{γ − G}; P is the
        # forward's (kept) and Z = (I − L) P, so neither X, S_n nor B̂ is needed here
        gram_T = grams + nh * 4 * C * C + offs_c[None, :] * C + offs_c[:, None]
        N_T = tl.load(gram_T + BW * C * C)
        M_qw_T = tl.load(gram_T + QW * C * C)
        L_T = tl.load(gram_T + BA * C * C)
        gam = chunk_gamma(g, tok_stop, nh // H, i_h, H, K, offs_k, mask_k)
        W_hat = W * tl.exp(gam[None, :] - tl.load(g + row_k, mask=m_ck, other=0.))
    else:
        X_T = tl.load(x_wy + nh * C * K + offs_c[None, :] * K + offs_k[:, None], mask=mask_k[:, None],
                      other=0.).to(tl.float32)
        B_T = tl.load(b + col_k, mask=m_kc, other=0.).to(tl.float32)
        Q_T = tl.load(q + col_k, mask=m_kc, other=0.).to(tl.float32)
        N_T = tl.dot(W, B_T, input_precision=PRECISION) * R_T                    # [s, t] = N[t, s]
        M_qw_T = tl.dot(W, Q_T, input_precision=PRECISION) * D_T
        W_hat = W * e_end[:, None]
        B_hat_T = B_T * e_b[None, :]

    dM_qa = tl.zeros([C, C], dtype=tl.float32)     # dO Pᵀ
    dM_qw = tl.zeros([C, C], dtype=tl.float32)     # dO Uᵀ
    dT = tl.zeros([C, C], dtype=tl.float32)        # dP (B̂ S + N U)ᵀ
    dN = tl.zeros([C, C], dtype=tl.float32)        # (Tᵀ dP) Uᵀ
    # P (per key: the forward's probes) or Y of each value block, loaded a block ahead by hand: Y
    # joins its dot as the accumulator, and Triton's pipeliner prefetches only dot operands, so
    # both loads were the loop's synchronous ones (kernel_resources.py's sync loads)
    py = probes if DECAY == 2 else y_wy
    PY_T = _block_T(py, nh, C, V, offs_c, 0, BV)
    for i_v in range(0, (V + BV - 1) // BV):
        offs_v, mask_v, row_v, m_cv, cv, U, dO, dP = _value_block(u, do, dprobes, nh, i_h, H, tok, valid, offs_c,
                                                                   i_v, V, C, BV)
        col_v = (tok[None, :] * H + i_h) * V + offs_v[:, None]                  # [BV, C]
        m_vc = mask_v[:, None] & valid[None, :]
        U_T = tl.load(u + col_v, mask=m_vc, other=0.).to(tl.float32)
        dSn = tl.load(dstates + nh * K * V + offs_k[:, None] * V + offs_v[None, :],
                      mask=mask_k[:, None] & mask_v[None, :], other=0.).to(tl.float32)
        if DECAY == 2:
            P_T = PY_T.to(tl.float32)
            Z_T = P_T - tl.dot(P_T, L_T, input_precision=PRECISION)
        else:
            vk = nh * K * V + offs_v[:, None] + offs_k[None, :] * V              # [BV, BK]: Sᵀ
            S_T = tl.load(states + vk, mask=mask_v[:, None] & mask_k[None, :], other=0.).to(tl.float32)
            P_T = tl.dot(S_T, X_T, input_precision=PRECISION) + PY_T.to(tl.float32)
            cv_T = nh * C * V + offs_c[None, :] * V + offs_v[:, None]           # [BV, C]
            tl.store(probes + cv_T, P_T.to(probes.dtype.element_ty), mask=mask_v[:, None])
            Z_T = tl.dot(S_T, B_hat_T, input_precision=PRECISION) + tl.dot(U_T, N_T, input_precision=PRECISION)
        PY_T = _block_T(py, nh, C, V, offs_c, (i_v + 1) * BV, BV)
        dNU = tl.dot(T_T, dP, input_precision=PRECISION)
        dM_qa += tl.dot(dO, P_T, input_precision=PRECISION)
        dM_qw += tl.dot(dO, U_T, input_precision=PRECISION)
        dT += tl.dot(dP, Z_T, input_precision=PRECISION)
        dN += tl.dot(dNU, U_T, input_precision=PRECISION)
        dU = (scale * tl.dot(M_qw_T, dO, input_precision=PRECISION) + tl.dot(W_hat, dSn, input_precision=PRECISION)
              + tl.dot(N_T, dNU, input_precision=PRECISION))
        tl.store(du + row_v, dU.to(du.dtype.element_ty), mask=m_cv)

    dL = tl.dot(tl.dot(T_T, dT, input_precision=PRECISION), T_T, input_precision=PRECISION) * R
    cc_nh = cc + nh * 4 * C * C + offs_c[:, None] * C + offs_c[None, :]
    tl.store(cc_nh, scale * dM_qa * D)
    tl.store(cc_nh + C * C, scale * dM_qw * D)
    tl.store(cc_nh + 2 * C * C, dL)
    tl.store(cc_nh + 3 * C * C, dN * R)


@triton.jit
def _lowrank_dk_kernel(
    q, w, u, a, b, do, g, states, dstates, dprobes, probes, t_wy, cc,
    dq, dw, da, db, dlam, dbb, tok_start, tok_stop, scale, BT,
    H, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, DECAY: tl.constexpr,
    BKS: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):
    """Kernel 2'b (rank 1), one K-slice × chunk × head: dq, dw, da, db from a V-loop over
    dO S_nᵀ, P dS_{n+1}ᵀ, U dS_{n+1}ᵀ, dP S_nᵀ and the [C, C] matrices of kernel 2'a; writes this
    slice's part of the decay terms dlam, dbb ``[NK, B·T, H]``. DECAY = 2 (per key; g the cumulative
    G ``[B·T, H, K]``): dq, dw, da, db are fp32 buffers that get only the inter-chunk parts, cc and
    the decay terms are left to :mod:`.perkey_pair`.
    """
    nh, i_h, offs_c, valid, tok, i_k, offs_k, mask_k, row_k, m_ck = kslice_program(tok_start, tok_stop, H, K,
                                                                                       C, BKS)

    dQ_hat = tl.zeros([C, BKS], dtype=tl.float32)
    dA_hat = tl.zeros([C, BKS], dtype=tl.float32)
    dW_hat = tl.zeros([C, BKS], dtype=tl.float32)
    dX = tl.zeros([C, BKS], dtype=tl.float32)
    for i_v in range(0, (V + BV - 1) // BV):
        offs_v, mask_v, row_v, m_cv, cv, U, dO, dP = _value_block(u, do, dprobes, nh, i_h, H, tok, valid, offs_c,
                                                                   i_v, V, C, BV)
        P = tl.load(probes + cv, mask=mask_v[None, :], other=0.).to(tl.float32)
        vk = nh * K * V + offs_v[:, None] + offs_k[None, :] * V                  # [BV, BKS]: transposed
        m_vk = mask_v[:, None] & mask_k[None, :]
        S_T = tl.load(states + vk, mask=m_vk, other=0.).to(tl.float32)
        dSn_T = tl.load(dstates + vk, mask=m_vk, other=0.).to(tl.float32)
        dQ_hat += tl.dot(dO, S_T, input_precision=PRECISION)
        dA_hat += tl.dot(P, dSn_T, input_precision=PRECISION)
        dW_hat += tl.dot(U, dSn_T, input_precision=PRECISION)
        dX += tl.dot(dP, S_T, input_precision=PRECISION)

    if DECAY == 2:
        G = tl.load(g + row_k, mask=m_ck, other=0.)
        G_prev = tl.load(g + row_k - H * K, mask=m_ck & (offs_c >= 1)[:, None], other=0.)
        e_end_k = tl.exp(chunk_gamma(g, tok_stop, nh // H, i_h, H, K, offs_k, mask_k)[None, :] - G)
        tl.store(dq + row_k, scale * dQ_hat * tl.exp(G), mask=m_ck)
        tl.store(da + row_k, dA_hat * e_end_k, mask=m_ck)
        tl.store(dw + row_k, dW_hat * e_end_k, mask=m_ck)
        T_T = tl.load(t_wy + nh * C * C + offs_c[None, :] * C + offs_c[:, None])
        tl.store(db + row_k, tl.dot(T_T, dX, input_precision=PRECISION) * tl.exp(G_prev), mask=m_ck)
        return
    D, _, R, _, e_q, e_b, e_end = _chunk_masks(g, tok, valid, i_h, H, offs_c, C, DECAY)
    Q = tl.load(q + row_k, mask=m_ck, other=0.).to(tl.float32)
    W = tl.load(w + row_k, mask=m_ck, other=0.).to(tl.float32)
    A = tl.load(a + row_k, mask=m_ck, other=0.).to(tl.float32)
    Bm = tl.load(b + row_k, mask=m_ck, other=0.).to(tl.float32)
    cc_nh = cc + nh * 4 * C * C
    cc_rows = offs_c[:, None] * C + offs_c[None, :]
    cc_cols = offs_c[None, :] * C + offs_c[:, None]                              # transposed
    dQ = scale * dQ_hat * e_q[:, None]
    dQ += tl.dot(tl.load(cc_nh + cc_rows), A, input_precision=PRECISION)
    dQ += tl.dot(tl.load(cc_nh + C * C + cc_rows), W, input_precision=PRECISION)
    dA = dA_hat * e_end[:, None]
    dA += tl.dot(tl.load(cc_nh + 2 * C * C + cc_cols), Bm, input_precision=PRECISION)
    dA += tl.dot(tl.load(cc_nh + cc_cols), Q, input_precision=PRECISION)
    dW = dW_hat * e_end[:, None]
    dW += tl.dot(tl.load(cc_nh + 3 * C * C + cc_cols), Bm, input_precision=PRECISION)
    dW += tl.dot(tl.load(cc_nh + C * C + cc_cols), Q, input_precision=PRECISION)
    T_T = tl.load(t_wy + nh * C * C + cc_cols)
    dB = tl.dot(T_T, dX, input_precision=PRECISION) * e_b[:, None]
    dB += tl.dot(tl.load(cc_nh + 2 * C * C + cc_rows), A, input_precision=PRECISION)
    dB += tl.dot(tl.load(cc_nh + 3 * C * C + cc_rows), W, input_precision=PRECISION)
    tl.store(dq + row_k, dQ.to(dq.dtype.element_ty), mask=m_ck)
    tl.store(dw + row_k, dW.to(dw.dtype.element_ty), mask=m_ck)
    tl.store(da + row_k, dA.to(da.dtype.element_ty), mask=m_ck)
    tl.store(db + row_k, dB.to(db.dtype.element_ty), mask=m_ck)
    bb = tl.sum(Bm * dB, axis=1)
    part = i_k.to(tl.int64) * BT * H + tok * H + i_h
    tl.store(dlam + part, tl.sum(Q * dQ - A * dA - W * dW, axis=1) + bb, mask=valid)
    tl.store(dbb + part, bb, mask=valid)


def fused_backward_applies(log_decay, lowrank, K: int, V: int) -> bool:
    """Whether :func:`fused_backward` handles this call: any decay with at most one low-rank pair;
    K, V <= 128; and the user did not ask for the autograd backward with
    ``OLSM_MATRIX_BWD=autograd``. ``lowrank`` is the flat ``(a, b, ...)`` tuple."""
    if env_choice("OLSM_MATRIX_BWD", ("auto", "autograd")) == "autograd":
        return False
    return len(lowrank) in (0, 2) and max(K, V) <= 128


def fused_backward(q, w, u, log_decay, h0, states, final, d_o, d_final, lay, meta, needs, lowrank_flat=(),
                   kept=()):
    """Gradients of :func:`.chunk.chunk_matrix` for no / scalar decay and rank <= 1, or a per-key
    decay and rank 0 (:mod:`.perkey`).

    Args:
        q, w: ``[B, T, H, K]``; u: ``[B, T, H, V]``; log_decay: ``None``, ``[B, T, H]`` or
        (no pair) ``[B, T, H, K]``;
        h0: ``None`` or ``[N, H, K, V]``; states ``[NC, H, K, V]`` and final ``[N, H, K, V]``
        (from the forward; states in :func:`.fused.state_dtype`, final fp32); d_o ``[B, T, H, V]`` or None; d_final ``[N, H, K, V]`` or None;
        lay: the chunk layout; meta: ``scale``, ``precision``; needs: which of
        (q, w, u, log_decay, h0) need a gradient; lowrank_flat: ``()`` or ``(a, b)``;
        kept: what :func:`.fused.fused_forward` kept for the backward: with a per-key decay
            ``(A,)`` without a pair, ``(grams, T, X, P)`` with one; with a scalar decay whose walks
            read G (:func:`.fused.walk_log_decay`) ``(G,)``; ``()``: made again.

    Returns:
        ``(dq, dw, du, d_log_decay, dh0)``, then ``(da, db)`` with a low-rank pair; None where
        not needed.
    """
    B, T, H, K = q.shape
    V = u.shape[-1]
    NC, C = lay.tok_start.numel(), lay.C
    N = lay.chunk_offsets.numel() - 1
    dev = q.device
    q, w, u = (t.contiguous() for t in (q, w, u))
    R = len(lowrank_flat) // 2
    a, b = (t.contiguous() for t in lowrank_flat) if R else (u, u)
    d_o = torch.zeros_like(u) if d_o is None else d_o.contiguous()
    # a per-key log-decay is read in its own dtype by .perkey's cumsum (fp32 out), no cast here
    g = None if log_decay is None else log_decay.contiguous() if log_decay.dim() == 4 else log_decay.float().contiguous()
    decay = 0 if g is None else 1 if g.dim() == 3 else 2
    amat = kept[0] if kept and decay == 2 else None
    g_made = kept[0] if kept and decay == 1 else None
    dummy = u
    prec, scale = meta["precision"], float(meta["scale"])
    shape = launch_shape(K, V, C, fp32=prec == "ieee")
    BK, BV, BKS = shape.BK, shape.BV, shape.BKS
    NK = cdiv(K, BKS)
    if decay == 2:
        g = perkey.chunk_cumsum(g, lay.tok_start, lay.tok_stop, H, K, C)     # the kernels read G

    f32 = dict(device=dev, dtype=torch.float32)
    dstates = torch.empty(NC, H, K, V, device=q.device, dtype=states.dtype)   # as the forward's S_n
    dh0 = torch.empty(N, H, K, V, **f32)
    df = None if d_final is None else d_final.float().contiguous()
    if R:
        low = dict(device=q.device, dtype=states.dtype)   # stored like the states; T stays fp32
        dprobes = torch.empty(NC, H, C, V, **low)
        probes = torch.empty(NC, H, C, V, **low) if NC else dummy   # 2'a writes them (per key: kept)
        if decay == 2 and len(kept) == 4:
            amat, t_wy, x_wy, probes = kept      # the fused forward kept T, X and P: no WY launch
            y_wy = x_wy                          # (2'a reads P, not Y, with a per-key decay)
        else:
            # the forward's WY factors, recomputed, and T itself (kernel 1 of the fused forward)
            x_wy, y_wy = torch.empty(NC, H, C, K, **low), torch.empty(NC, H, C, V, **low)
            t_wy = torch.empty(NC, H, C, C, **f32)
            if decay == 2:      # the forward ran on the general path: its Grams and P made here
                amat = perkey_pair.pair_grams(q, w, a, b, g, lay.tok_start, lay.tok_stop, H, K, C, prec,
                                              shape.warps_pair, shape.stages_pair)
            launch_wy(shape, w, a, b, u, g, lay.tok_start, lay.tok_stop, x_wy, y_wy, t_wy, H, K, V, C, decay, prec,
                      grams=amat)
            if decay == 2:
                probes = (x_wy.float() @ states.float() + y_wy.float()).to(states.dtype)
    else:
        x_wy = dprobes = dstates
    grid, BK_seq, BV = sequence_launch(shape, N, H, K, V, R > 0, dev)
    g_walk, g_cum = walk_log_decay(g, decay, R > 0, BK_seq, lay.tok_start, lay.tok_stop, H, C, made=g_made)
    args = (q, a, d_o, g_walk if g is not None else dummy, x_wy, df if df is not None else dummy, dstates,
            dprobes, dh0, lay.tok_start, lay.tok_stop, lay.chunk_offsets, scale,
            amat if R and decay == 2 else dummy, H) + no_segments(dummy)
    kw = dict(K=K, V=V, C=C, DECAY=decay, HAS_DFINAL=df is not None, LOWRANK=R > 0, BK=BK_seq, BV=BV,
              PRECISION=prec, G_CUM=g_cum, num_warps=dstate_warps(shape, decay, R > 0))
    walk_sequences(lambda grid_, args_, **extra: launch_dstate(grid_, args_, **{**kw, **extra}),
                   grid, args, df, dh0, lay.chunk_offsets, H, K, V, BK_seq, BV, decay, lay.max_chunks, dev,
                   reverse=True, lowrank=R > 0, split_warps=split_warps(shape, decay, R > 0, BK_seq))
    dq, dw, du = torch.empty_like(q), torch.empty_like(w), torch.empty_like(u)
    da = db = None
    if R:
        pk = decay == 2
        if pk:
            # per key (.perkey_pair): 2'b leaves the fp32 inter-chunk parts, the pair kernel
            # finishes the gradients and leaves λ in dq32 and bb in db32
            d32 = torch.empty(4, B * T, H, K, **f32)
            dq32, dw32, da32, db32 = d32.unbind(0)
        da, db = torch.empty_like(a), torch.empty_like(b)
        dlam, dbb = (dummy, dummy) if pk else (torch.zeros(NK, B * T, H, **f32), torch.zeros(NK, B * T, H, **f32))
        if NC > 0:
            cc = torch.empty(NC, H, 4, C, C, **f32)
            _lowrank_cc_kernel[(NC * H,)](
                q, w, u, b, d_o, g if g is not None else dummy, states, dstates, dprobes, x_wy, y_wy, t_wy,
                probes, cc, du, amat if pk else dummy, lay.tok_start, lay.tok_stop, scale, H, K=K, V=V, C=C,
                DECAY=decay,
                BK=BK, BV=shape.BV_rank1, PRECISION=prec, num_warps=shape.warps_rank1,
                # fp32 inputs (ieee dots) with a decay need 233 KB of shared memory at 3 stages
                # and K = 128, 205 KB at 2 (sm_90 compile): 2 stages keep them on an H100
                num_stages=2 if prec == "ieee" else 3,
            )
            _lowrank_dk_kernel[(NK, NC * H)](
                q, w, u, a, b, d_o, g if g is not None else dummy, states, dstates, dprobes, probes, t_wy, cc,
                *((dq32, dw32, da32, db32) if pk else (dq, dw, da, db)), dlam, dbb, lay.tok_start, lay.tok_stop,
                scale, B * T, H, K=K, V=V, C=C,
                DECAY=decay, BKS=BKS, BV=shape.BV_rank1, PRECISION=prec, num_warps=shape.warps_rank1,
            )
            if pk:
                dq, dw, da, db = perkey_pair.pair_backward(q, w, a, b, g, cc, (dq32, dw32, da32, db32),
                                                           lay.tok_start, lay.tok_stop, H, K, C, prec,
                                                           shape.warps_pair)
        elif pk:
            dq.zero_(), dw.zero_(), du.zero_(), da.zero_(), db.zero_(), d32.zero_()
    else:
        pk = decay == 2
        dw_t = dw_transposed(decay)
        lowp = bwd_dots_lowp()
        dlam = dbb = dummy if pk else torch.empty(NK, B * T, H, **f32)   # per key: λ goes to dq32
        # per key (.perkey): the dq/dw kernel leaves fp32 inter-chunk parts and dA, the intra
        # kernel finishes dq, dw and leaves the decay terms λ in dq32; du reads the forward's A
        dq32, dw32 = (torch.empty(B * T, H, K, **f32) for _ in range(2)) if pk else (dq, dw)
        dA = torch.empty(NC, H, C, C, **f32) if pk else dummy
        if NC > 0:
            _dqdw_bwd_kernel[(NK, NC * H)](
                q, w, u, d_o, g if g is not None else dummy, states, dstates, dq32, dw32, dlam,
                lay.tok_start, lay.tok_stop, scale, B * T, *(dummy,) * 7, dA, H, K=K, V=V, C=C, DECAY=decay,
                BKS=BKS, BV=shape.BV_dqdw, PRECISION=prec, DW_T=dw_t, LOWP=lowp, num_warps=shape.warps_chunk,
            )
            if pk and amat is None:
                amat = perkey.intra_gram(q, w, g, lay.tok_start, lay.tok_stop, H, K, C, prec, shape.warps_pair)
            _du_bwd_kernel[(cdiv(V, shape.BV_wide), NC * H)](
                q, w, d_o, g if g is not None else dummy, dstates, du, amat if pk else dummy, lay.tok_start,
                lay.tok_stop, scale,
                H, K=K, V=V, C=C, DECAY=decay, BKS=shape.BKS_du, BV=shape.BV_wide, PRECISION=prec, LOWP=lowp,
                num_warps=shape.warps_chunk,
            )
            if pk:
                dq, dw = perkey.intra_backward(q, w, g, dA, dq32, dw32, lay.tok_start, lay.tok_stop, H, K, C, prec,
                                               shape.warps_pair)
        elif pk:
            dq.zero_(), dw.zero_(), du.zero_(), dq32.zero_()
    dg = None
    if decay == 2 and needs[3]:
        # per key: λ was left in dq32 by the intra kernel (and with a pair bb in db32)
        dg = decay_gradient_per_key(dq32, df, final, lay.tok_start, lay.tok_stop, lay.chunk_offsets, C,
                                    bb=db32 if R else None)
        dg = dg.reshape(B, T, H, K).to(log_decay.dtype)
    elif g is not None and needs[3]:
        dg = decay_gradient(dlam, dbb if R > 0 else None, df, final, lay.tok_start, lay.tok_stop,
                            lay.chunk_offsets, C)
        dg = dg.reshape(B, T, H).to(log_decay.dtype)
    grads = (dq if needs[0] else None, dw if needs[1] else None, du if needs[2] else None, dg,
             dh0 if (h0 is not None and needs[4]) else None)
    return grads + ((da, db) if R else ())
