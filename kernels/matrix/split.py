r"""The sequential passes split along the sequence: ``OLSM_MATRIX_STATE=auto`` (the default)
splits rank-0 passes without a decay (linear attention) when the single walk has at most one
program per SM, and the delta form's forward pass without a decay (DeltaNet, Longhorn) at half
an SM's worth of programs or fewer; ``split`` splits every pass with more than one segment (any
decay, with or without a pair: below), ``walk`` none. Run 9 on the H200 (bf16, H = 16, D = 128): linear attention's
forward at (1, 32768) took 0.554 ms split and 0.752 walked (fwd+bwd 2.337 / 2.574), but fwd+bwd
at (2, 8192), 256 programs, 1.231 split vs 1.106 walked, and Mamba-2's fwd+bwd at (1, 32768)
5.90 split vs 4.91 walked (hence no decay in ``auto``). A likely cause, found on the sm_90 compile
(run 21): the scalar decay's walks run on 8 warps, at which 2–3 of the split's programs fit on an
SM where it launches about 4 per SM (linear attention's, on 4 warps, fit 8); its segment walks now
take ``warps_split_decay`` (4; :func:`.fused.split_warps`), untimed on a GPU.

The state pass walks each sequence's chunks in order, one latency-bound step per chunk: at
B = 1, T = 32768 (512 chunks) its few programs take most of the forward. Without a low-rank
part the chunk step is affine with a scalar transition, S_{n+1} = γ_n S_n + Ŵ_nᵀ U_n, so a
sequence cut into segments of L chunks can be walked in parallel and joined afterwards:

1. every segment from a zero state (:func:`.fused._state_fwd_kernel` with ``SEG_L = L``),
   storing nothing per chunk: its end state E_j and total log-decay Γ_j;
2. the segments' true start states, sequentially over segments (:func:`_combine_kernel`):
   Z_0 = h0 (or 0), Z_{j+1} = e^{Γ_j} Z_j + E_j, and the final state Z_{nseg};
3. every segment again, in parallel, from Z_j (``SEG_START``), storing the chunk states S_n as
   the single walk does.

The states are those of the single walk up to float32 rounding of the join, and are rounded to
the storage dtype once, as there. With a pair and storage-dtype dot operands (the delta form),
the transition's columns are also rounded to that dtype at each chunk. The reverse pass of the
backward (dS_n = γ_n dS_{n+1} + scale Q̂ᵀ dO) is the same recurrence run backwards and is split
the same way (segments walked last chunk first, joined last segment first from d_final, ending
in dh0). The cost: a second
read of the segment walks' inputs (k and v, or q and dO) and the [K, V] segment states (fp32);
a re-walk was chosen over adding e^{c_n} Z_j to stored local states because that costs a read
and write of every state and rounds them twice. The segment length is picked so that steps 1
and 3 have about four programs per SM (:func:`segment_length`).

With a per-key decay the total log-decay Γ_j is a per-key vector. With a pair the transition of a
chunk is a dense ``[K, K]`` matrix (``γ_n I + Âᵀ X``): step 1 then also walks K columns from the
identity with no input (``SEG_EXT``), which leaves the segment's transition T_j beside E_j, and
the join is ``Z_{j+1} = T_j Z_j + E_j`` (the reverse pass leaves T_jᵀ, joined the same way).
That was slower than the whole walk on an H200 in run 13 (the transition's columns and the second
walk re-read each chunk's X and W) except in a few forwards, hence in ``auto`` only for the
delta form's forward without a decay at very few programs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ints import cdiv, sm_count

from .fused import env_choice


@triton.jit
def _combine_kernel(seg_end, seg_g, init, out, chunk_offsets, H, NSEG, SEG_L,
                    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    HAS_INIT: tl.constexpr, DECAY: tl.constexpr, REVERSE: tl.constexpr = False,
                    MAT: tl.constexpr = False, PRECISION: tl.constexpr = "tf32x3"):
    """Step 2 for one sequence × head × value block × key block: seg_end ``[N·H, NSEG, K, W]``
    fp32 holds E_j (its first V columns) on entry and Z_j on exit; Z starts from init
    ``[N, H, K, V]`` (h0; with REVERSE, the reverse pass's d_final, segments taken last to first)
    and its last value goes to out ``[N, H, K, V]`` fp32 (the final state; with REVERSE, dh0).
    The segment's transition: e^{Γ_j} (DECAY = 1, seg_g ``[N·H, NSEG]``), diag(e^{Γ_j}) (DECAY =
    2, seg_g ``[N·H, NSEG, K]``), or with MAT the ``[K, K]`` matrix T_j in seg_end's columns
    ``[V, V + K)`` (W = V + K; one key block holds all of K), Z_{j+1} = T_j Z_j + E_j."""
    W: tl.constexpr = V + K * MAT
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    offs_k = tl.program_id(2) * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k = offs_k < K
    mask = mask_k[:, None] & (offs_v < V)[None, :]
    kv = offs_k[:, None] * V + offs_v[None, :]
    kvs = offs_k[:, None] * W + offs_v[None, :]
    n_seg = (tl.load(chunk_offsets + i_nh // H + 1) - tl.load(chunk_offsets + i_nh // H) + SEG_L - 1) // SEG_L
    Z = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_INIT:
        Z += tl.load(init + i_nh.to(tl.int64) * K * V + kv, mask=mask, other=0.)
    for i in range(0, n_seg):
        j = n_seg - 1 - i if REVERSE else i
        slot = i_nh.to(tl.int64) * NSEG + j
        E = tl.load(seg_end + slot * K * W + kvs, mask=mask, other=0.)
        tl.store(seg_end + slot * K * W + kvs, Z, mask=mask)
        if MAT:
            T_j = tl.load(seg_end + slot * K * W + offs_k[:, None] * W + V + offs_k[None, :],
                          mask=mask_k[:, None] & mask_k[None, :], other=0.)
            # near-fp32 on tensor cores (three tf32 products): a handful of these per sequence, each
            # feeding every later segment; "ieee" (FMA) compiled to 7 KB of spills per thread on sm_90
            Z = tl.dot(T_j, Z, input_precision=PRECISION) + E
        elif DECAY == 1:
            Z = tl.exp(tl.load(seg_g + slot)) * Z + E
        elif DECAY == 2:
            Z = tl.exp(tl.load(seg_g + slot * K + offs_k, mask=mask_k, other=0.))[:, None] * Z + E
        else:
            Z = Z + E
    tl.store(out + i_nh.to(tl.int64) * K * V + kv, Z, mask=mask)


def segment_length(programs: int, max_chunks: int, device) -> int:
    """Chunks per segment: the whole sequence when its programs already fill the GPU, else short
    enough that the segment walks have about ``OLSM_MATRIX_SPLIT_PER_SM`` (default 4) programs
    per SM (at least 4 chunks each)."""
    if max_chunks <= 4:
        return max(max_chunks, 1)
    per_sm = int(env_choice("OLSM_MATRIX_SPLIT_PER_SM", ("4", "1", "2", "8")))
    nseg = max(1, min(max_chunks // 4, -(-per_sm * sm_count(device) // max(programs, 1))))
    return -(-max_chunks // nseg)


def split_state_pass(launch, grid, args, init, out, chunk_offsets, H, K, V, BK, BV, decay, max_chunks,
                     device, reverse=False, lowrank=False, warps=None):
    """Steps 1–3 of the module docstring. ``launch(grid, args, **constexprs)`` runs the sequence
    kernel (:func:`.fused._state_fwd_kernel`, or with ``reverse`` the reverse pass
    :func:`.fused_bwd._dstate_bwd_kernel`) with ``args`` as for the single walk, ``args[-3:]``
    the segment arguments filled in here; ``grid`` is the single walk's. Step 3 writes the chunk
    states (S_n, or dS_{n+1}) where the single walk would; ``init`` (h0 or d_final, or None)
    starts the join and ``out`` (final state or dh0) receives its end. ``lowrank``: the walk has
    a low-rank part (one key block of all K), so step 1 also walks the transition (``SEG_EXT``).
    ``warps``: num_warps of steps 1 and 3 (None: the single walk's; :func:`.fused.split_warps`).

    Returns:
        whether it ran (False: one segment would cover every sequence; the caller walks them whole).
    """
    nv, NH, nk = grid
    L = segment_length(nv * NH * nk, max_chunks, device)
    nseg = -(-max_chunks // L)
    if nseg <= 1:
        return False
    W = V + K if lowrank else V
    f32 = dict(device=device, dtype=torch.float32)
    seg_end = torch.empty(NH, nseg, K, W, **f32)
    seg_g = torch.empty(NH, nseg, K if decay == 2 else 1, **f32)
    seg_args = args[:-3] + (seg_end, seg_g, nseg)
    seg_kw = dict(num_warps=warps) if warps else {}
    launch((cdiv(W, BV) * nseg, NH, nk), seg_args, SEG_L=L, SEG_W=W, SEG_EXT=lowrank, **seg_kw)
    _combine_kernel[(nv, NH, nk)](seg_end, seg_g, init if init is not None else seg_end, out, chunk_offsets, H, nseg,
                                  L, K=K, V=V, BK=BK, BV=BV, HAS_INIT=init is not None, DECAY=decay,
                                  REVERSE=reverse, MAT=lowrank, num_warps=8 if lowrank else 4)
    launch((nv * nseg, NH, nk), seg_args, SEG_L=L, SEG_W=W, SEG_START=True, **seg_kw)
    return True


def walk_sequences(launch, grid, args, init, out, chunk_offsets, H, K, V, BK, BV, decay, max_chunks,
                   device, reverse=False, lowrank=False, delta=False, split_warps=None):
    """Run a sequential pass: split along the sequence (:func:`split_state_pass`) when
    ``OLSM_MATRIX_STATE`` asks for it (module docstring) and there is more than one segment;
    else one launch ``launch(grid, args)`` walking whole sequences. ``lowrank``: the pass has a
    low-rank part (its segments carry their ``[K, K]`` transitions); ``delta``: it is the delta
    form's (:mod:`.delta`); ``split_warps``: num_warps of the split's segment walks (None: the
    single walk's)."""
    mode = env_choice("OLSM_MATRIX_STATE", ("auto", "walk", "split"))
    if mode == "auto":
        # rank 0 without decay; and the delta form's forward without decay at half an SM's worth
        # of programs or fewer (H200, run 13: DeltaNet at (1, 32768), 64 programs, 2.089 ms walked,
        # 1.964 split; at (2, 8192), 128 programs, 0.773 vs 0.976, and its reverse pass lost).
        # Mamba-2 was slower split in run 9 (not understood); the other pairs and the per-key
        # decay were slower or within noise (run 13, benchmarks/README.md): the transition's
        # columns and the second walk re-read X and W.
        programs = grid[0] * grid[1] * grid[2]
        rank0 = decay == 0 and not lowrank and programs <= sm_count(device)
        delta_fwd = delta and not reverse and decay == 0 and 2 * programs <= sm_count(device)
        mode = "split" if rank0 or delta_fwd else "walk"
    if mode == "split":
        if split_state_pass(launch, grid, args, init, out, chunk_offsets, H, K, V, BK, BV, decay,
                            max_chunks, device, reverse, lowrank, split_warps):
            return
    launch(grid, args)
