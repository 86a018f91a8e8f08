"""Shared memory, registers and spills of every fused matrix kernel and of the generated
elementwise-gate kernels, compiled for Hopper (sm_90) on this machine — no GPU needed (see
``olsm.kernels.aot``).

    python benchmarks/kernel_resources.py [--default-only]     (CPU is fine; prints a markdown table;
                                                                exit 1 if a default-path launch does not fit)
    python benchmarks/kernel_resources.py --loop "ROW" [BV=32 warps=4 ...]   (one row's loop, SASS mix)

It compiles with the Triton it imports; the GPU machine's is 3.6, which can differ from a newer
one by hundreds of bytes of spills. To see what the GPU will get, put that Triton first on the
path: ``pip install --no-deps --target /tmp/tr36 triton==3.6.0`` then ``PYTHONPATH=/tmp/tr36``.

The configurations are the launches of ``kernels/matrix/fused.py`` / ``fused_bwd.py`` at
K = V = 128, C = 64, bf16 inputs (bf16 dots where the default takes storage-dtype operands, else
tf32), with their num_warps and the library's default switches (``default path``); the elementwise ones are
longhorn_diag's and mamba1's forward and backward at the benchmark shape (N = 16, E = 1536, one
head, bf16) with the tiles ``choose_config`` picks. A default-path launch fails the run (exit 1)
if it needs more shared memory than Hopper has or, for the elementwise kernels (whose speed is
bound by registers, ``benchmarks/README.md``), if it spills. ``sync loads`` counts the loads in
a kernel's loops that Triton's pipeliner left synchronous (``olsm.kernels.aot.synchronous_loop_loads``):
on the sequential walks each is a memory latency per chunk, and ``tests/test_kernel_resources.py``
holds the default walks at zero.
"""
from __future__ import annotations

import itertools
import sys

import triton

from olsm.kernels.aot import HOPPER_SHARED_BYTES, compile_for, loop_mix
from olsm.kernels.matrix import decay_grad as DG
from olsm.kernels.matrix import delta as D
from olsm.kernels.matrix import fused as F
from olsm.kernels.matrix import fused_bwd as FB
from olsm.kernels.matrix import perkey as PK
from olsm.kernels.matrix import perkey_pair as PP
from olsm.kernels.matrix import split as SP

# the inputs, their gradients and what the wrappers store in the inputs' dtype (fused.state_dtype)
BF16 = {p: "*bf16" for p in ("q", "w", "a", "b", "u", "do", "o", "dq", "dw", "du", "da", "db",
                             "states", "dstates", "x_wy", "y_wy", "probes", "dprobes", "k", "nu")}
TYPES = dict(BF16, dq32="*fp32", dw32="*fp32", da32="*fp32", db32="*fp32", tok_start="*i32", tok_stop="*i32", chunk_offsets="*i32", H="i32", BT="i32", scale="fp32",
             NSEG="i32", SEG_L="i32")


def segments(name, kernel, consts, warps, lowrank, K, V, walk=True, seg_warps=None):
    """A sequential pass's launches: the whole walk (unless ``walk`` is False) and the two
    segment walks of :mod:`olsm.kernels.matrix.split`, with a pair also walking the segment's
    transition and in value blocks of 32 (the few-program case,
    :func:`~olsm.kernels.matrix.fused.sequence_launch`). The segments are on the default path
    (``OLSM_MATRIX_STATE=auto``, few programs, :func:`~olsm.kernels.matrix.split.walk_sequences`)
    without a decay, for rank 0 and for the delta form's forward pass. ``seg_warps``: the segment
    walks' num_warps when not the whole walk's (:func:`~olsm.kernels.matrix.fused.split_warps`)."""
    if walk:
        yield (name, kernel, consts, warps, True)
    seg = dict(consts, SEG_L=8, SEG_W=V + K if lowrank else V, BV=32 if lowrank else consts["BV"])
    delta_fwd = consts.get("DELTA", False) and kernel is F._state_fwd_kernel
    default = consts["DECAY"] == 0 and (not lowrank or delta_fwd)
    seg_warps = seg_warps or warps
    yield (f"{name}, segments", kernel, dict(seg, SEG_EXT=lowrank), seg_warps, default)
    yield (f"{name}, segments restart", kernel, dict(seg, SEG_START=True), seg_warps, default)


def configs(K=128, V=128, C=64):
    """(name, kernel, constexprs, num_warps, default_path) for every launch the wrappers make,
    with their block sizes and warps from :func:`olsm.kernels.matrix.fused.launch_shape`."""
    sh = F.launch_shape(K, V, C)
    base = dict(K=K, V=V, C=C, PRECISION="tf32")
    for decay in (0, 1):
        d = dict(base, DECAY=decay)
        for lr in (False, True):
            tag = f"decay={decay} rank={int(lr)}"
            lowp = dict(LOWP=True) if not lr else {}    # storage-dtype dots (the default) apply without a pair
            yield (f"fwd output {tag}", F._output_fwd_kernel,
                   dict(d, LOWRANK=lr, BK=sh.BK, BV=F.output_block(sh, lr), **lowp), sh.warps_out, True)
            fwd = dict(d, LOWRANK=lr, HAS_H0=True, BK=sh.BK, BV=sh.BV, **lowp)
            yield from segments(f"fwd state {tag}", F._state_fwd_kernel, fwd, F.state_warps(sh, decay, lr, sh.BV),
                                lr, K, V, seg_warps=F.split_warps(sh, decay, lr, sh.BK))
            yield (f"fwd split combine {tag}", SP._combine_kernel,
                   dict(K=K, V=V, BK=sh.BK, BV=32 if lr else sh.BV, HAS_INIT=True, DECAY=decay, MAT=lr),
                   8 if lr else 4, decay == 0 and not lr)
            if not lr:   # OLSM_MATRIX_DOTS=fp32
                yield (f"fwd state fp32 dots {tag}", F._state_fwd_kernel,
                       dict(d, LOWRANK=lr, HAS_H0=True, BK=sh.BK, BV=sh.BV), F.state_warps(sh, decay, lr, sh.BV),
                       False)
                yield (f"fwd output fp32 dots {tag}", F._output_fwd_kernel,
                       dict(d, LOWRANK=lr, BK=sh.BK, BV=sh.BV_out), sh.warps_out, False)
            bwd = dict(d, HAS_DFINAL=True, LOWRANK=lr, BK=sh.BK, BV=sh.BV)
            wb = FB.dstate_warps(sh, decay, lr)
            yield (f"bwd dstate {tag}", FB._dstate_bwd_kernel, bwd, wb, True)
            yield from segments(f"bwd dstate {tag}", FB._dstate_bwd_kernel, bwd, wb, lr, K, V, walk=False,
                                seg_warps=F.split_warps(sh, decay, lr, sh.BK))
            if decay == 0 and not lr:
                # at few programs the forward walk without a decay narrows its key blocks to
                # BK_walk_fwd_min (64), not 32 (sequence_launch's min_BK; split by default there)
                yield from segments(f"fwd state {tag} BK={sh.BK_walk_fwd_min}", F._state_fwd_kernel,
                                    dict(fwd, BK=sh.BK_walk_fwd_min), F.state_warps(sh, 0, False, sh.BV), lr, K, V)
            if decay == 1 and not lr:
                # at few programs (B = 1, T = 32768: 32 of them) sequence_launch narrows the key
                # blocks to 32, where the split's segment walks take warps_split_decay (opt-in: the
                # split is off with a decay by default)
                for name, kernel, consts, warps in (("fwd state", F._state_fwd_kernel, fwd, F.state_warps(sh, 1, False, sh.BV)),
                                                    ("bwd dstate", FB._dstate_bwd_kernel, bwd, wb)):
                    # the default (OLSM_MATRIX_WALK_DECAY=auto) at 32-key blocks: the walk reads G
                    # made beforehand (fused.walk_log_decay); the inline sums are the opt-out
                    yield (f"{name} {tag} BK=32 cumulative decay", kernel, dict(consts, BK=32, G_CUM=True), warps,
                           True)
                    yield (f"{name} {tag} BK=32", kernel, dict(consts, BK=32), warps, False)
                    yield from segments(f"{name} {tag} BK=32", kernel, dict(consts, BK=32), warps, lr, K, V,
                                        walk=False, seg_warps=F.split_warps(sh, decay, lr, 32))
        wy = F.wy_constexprs(sh, K, V, C, decay, "tf32", store_t=False)
        yield (f"fwd wy decay={decay}", F._wy_fwd_kernel, wy, wy.pop("num_warps"), True)
        # dw formed transposed from dA alone (the default without a low-rank part), and the way
        # back OLSM_MATRIX_DQDW=both (dA and dAᵀ by two products)
        yield (f"bwd dq dw decay={decay}", FB._dqdw_bwd_kernel,
               dict(d, BKS=sh.BKS, BV=sh.BV_dqdw, DW_T=FB.dw_transposed(decay), LOWP=True), sh.warps_chunk, True)
        yield (f"bwd dq dw both products decay={decay}", FB._dqdw_bwd_kernel,
               dict(d, BKS=sh.BKS, BV=sh.BV_dqdw, DW_T=False, LOWP=True), sh.warps_chunk, False)
        yield (f"bwd du decay={decay}", FB._du_bwd_kernel, dict(d, BKS=sh.BKS_du, BV=sh.BV_wide, LOWP=True),
               sh.warps_chunk, True)
        # OLSM_MATRIX_BWD_DOTS=fp32 (the default up to run 20): the dA products and du's on fp32 copies
        yield (f"bwd dq dw fp32 dots decay={decay}", FB._dqdw_bwd_kernel,
               dict(d, BKS=sh.BKS, BV=sh.BV_dqdw, DW_T=FB.dw_transposed(decay)), sh.warps_chunk, False)
        yield (f"bwd du fp32 dots decay={decay}", FB._du_bwd_kernel,
               dict(d, BKS=sh.BKS_du, BV=sh.BV_wide), sh.warps_chunk, False)
        yield (f"bwd rank-1 cc decay={decay}", FB._lowrank_cc_kernel, dict(d, BK=sh.BK, BV=sh.BV_rank1),
               sh.warps_rank1, True)
        yield (f"bwd rank-1 dk decay={decay}", FB._lowrank_dk_kernel, dict(d, BKS=sh.BKS, BV=sh.BV_rank1),
               sh.warps_rank1, True)
        if decay:   # the decay gradient's suffix sums (kernels/matrix/decay_grad.py)
            NK = triton.cdiv(K, sh.BKS)
            yield ("bwd decay chunk totals", DG._chunk_total_kernel, dict(NK=NK, C=C), 4, True)
            yield ("bwd decay carry", DG._carry_kernel, dict(HAS_LAST=True, BLOCK=DG.CARRY_BLOCK), 4, True)
            yield ("bwd decay grad", DG._decay_grad_kernel, dict(NK=NK, C=C, HAS_BB=True), 4, True)
        if decay == 1:   # per-key decay without a pair (GLA; kernels/matrix/perkey.py), DECAY = 2
            d2 = dict(base, DECAY=2)
            yield ("fwd per-key cumsum", PK._cumsum_kernel, dict(K=K, C=C, BK=sh.BK), 4, True)
            # whole chunks (the benchmark's decays) and 16-row sub-blocks (the others)
            yield ("fwd per-key intra gram", PK._intra_gram_whole_kernel,
                   dict(K=K, C=C, BK=sh.BK, BKS=PK.whole_keys(K), PRECISION="tf32",
                        CHUNK_RANGE=PK.CHUNK_RANGE), sh.warps_pair, True)
            yield ("fwd per-key intra gram, sub-blocks", PK._intra_gram_kernel,
                   dict(K=K, C=C, BK=sh.BK, BKS=PK._key_slice(K), SUB=PK.SUB, PRECISION="tf32",
                        FAST_RANGE=PK.FAST_RANGE, CHUNK_RANGE=PK.CHUNK_RANGE), 4, True)
            fwd = dict(d2, LOWRANK=False, HAS_H0=True, BK=sh.BK, BV=sh.BV, LOWP=True)
            yield from segments("fwd state per-key", F._state_fwd_kernel, fwd, F.state_warps(sh, 2, False, sh.BV),
                                False, K, V)
            yield ("fwd split combine per-key", SP._combine_kernel,
                   dict(K=K, V=V, BK=sh.BK, BV=sh.BV, HAS_INIT=True, DECAY=2), 4, False)
            yield ("fwd output per-key", F._output_fwd_kernel, dict(d2, LOWRANK=False, BK=sh.BK, BV=sh.BV_out, LOWP=True),
                   sh.warps_out, True)
            yield from segments("bwd dstate per-key", FB._dstate_bwd_kernel,
                                dict(d2, HAS_DFINAL=True, LOWRANK=False, BK=sh.BK, BV=sh.BV),
                                FB.dstate_warps(sh, 2, False), False, K, V)
            yield ("bwd dq dw per-key", FB._dqdw_bwd_kernel, dict(d2, BKS=sh.BKS, BV=sh.BV_dqdw, LOWP=True),
                   sh.warps_chunk, True)
            yield ("bwd du per-key", FB._du_bwd_kernel, dict(d2, BKS=sh.BKS_du, BV=sh.BV_wide, LOWP=True),
                   sh.warps_chunk, True)
            # OLSM_MATRIX_BWD_DOTS=fp32 (the default up to run 20)
            yield ("bwd dq dw per-key fp32 dots", FB._dqdw_bwd_kernel, dict(d2, BKS=sh.BKS, BV=sh.BV_dqdw),
                   sh.warps_chunk, False)
            yield ("bwd du per-key fp32 dots", FB._du_bwd_kernel, dict(d2, BKS=sh.BKS_du, BV=sh.BV_wide),
                   sh.warps_chunk, False)
            bks = PK.whole_keys(K)
            yield ("bwd per-key intra", PK._intra_bwd_whole_kernel,
                   dict(K=K, C=C, BKS=bks, PRECISION="tf32", CHUNK_RANGE=PK.CHUNK_RANGE), sh.warps_pair, True)
            yield ("bwd per-key intra, sub-blocks", PK._intra_bwd_kernel,
                   dict(K=K, C=C, BKS=bks, SPP=PK._key_slice(K) // bks, SUB=PK.SUB, PRECISION="tf32",
                        FAST_RANGE=PK.FAST_RANGE, CHUNK_RANGE=PK.CHUNK_RANGE), 4, True)
            yield ("bwd per-key decay totals", DG._key_total_kernel, dict(K=K, C=C, BK=64), 4, True)
            yield ("bwd per-key decay carry", DG._key_carry_kernel,
                   dict(K=K, HAS_LAST=True, BLOCK=DG.CARRY_BLOCK, BK=64), 4, True)
            yield ("bwd per-key decay grad", DG._key_grad_kernel, dict(K=K, C=C, BK=64), 4, True)
            # per-key decay with one pair (RWKV-7 / DPLR; kernels/matrix/perkey_pair.py), DECAY = 2
            # whole chunks (the decays the benchmarks draw) and 16-row sub-blocks (the others)
            whole = dict(K=K, C=C, BKS=PP.pair_keys(K, C), PRECISION="tf32", CHUNK_RANGE=PP.CHUNK_RANGE)
            block = dict(whole, BKS=PK._key_slice(K), SUB=PK.SUB, FAST_RANGE=PK.FAST_RANGE)
            yield ("fwd per-key pair grams", PP._pair_gram_kernel, dict(whole, BK=sh.BK), sh.warps_pair, True)
            yield ("fwd per-key pair grams, sub-blocks", PP._pair_gram_block_kernel, dict(block, BK=sh.BK), 4,
                   True)
            wy2 = F.wy_constexprs(sh, K, V, C, 2, "tf32", store_t=True)
            yield ("fwd wy per-key pair", F._wy_fwd_kernel, wy2, wy2.pop("num_warps"), True)
            yield from segments("fwd state per-key pair", F._state_fwd_kernel,
                                dict(d2, LOWRANK=True, HAS_H0=True, BK=sh.BK, BV=sh.BV),
                                F.state_warps(sh, 2, True, sh.BV), True, K, V)
            yield ("fwd output per-key pair", F._output_fwd_kernel, dict(d2, LOWRANK=True, BK=sh.BK,
                                                                         BV=F.output_block(sh, True)),
                   sh.warps_out, True)
            yield from segments("bwd dstate per-key pair", FB._dstate_bwd_kernel,
                                dict(d2, HAS_DFINAL=True, LOWRANK=True, BK=sh.BK, BV=sh.BV),
                                FB.dstate_warps(sh, 2, True), True, K, V)
            yield ("bwd rank-1 cc per-key", FB._lowrank_cc_kernel, dict(d2, BK=sh.BK, BV=sh.BV_rank1),
                   sh.warps_rank1, True)
            yield ("bwd rank-1 dk per-key", FB._lowrank_dk_kernel, dict(d2, BKS=sh.BKS, BV=sh.BV_rank1),
                   sh.warps_rank1, True)
            yield ("bwd per-key pair", PP._pair_bwd_kernel, whole, sh.warps_pair, True)
            yield ("bwd per-key pair, sub-blocks", PP._pair_bwd_block_kernel, dict(block, BKS=whole["BKS"], SPP=PK._key_slice(K) // whole["BKS"]),
                   4, True)
        # the delta form (kernels/matrix/delta.py), as delta_forward / delta_backward launch it
        # (with u_scale: the catalogue's members write s v, formed in the kernels), defaults:
        # rows4 inverse, storage-dtype dots, X and ν kept (no WY launch in the backward)
        wy = dict(F.wy_constexprs(sh, K, V, C, decay, "tf32", store_t=True, delta=True), U_SCALE=True)
        yield (f"delta fwd wy decay={decay}", F._wy_fwd_kernel, wy, wy.pop("num_warps"), True)
        yield (f"delta fwd wy implicit normaliser decay={decay}", F._wy_fwd_kernel, dict(wy, NORM=True),
               sh.warps_wy, True)
        for levels, rows, label in ((2, False, "levels2"), (3, False, "levels3"), (2, True, "rows16")):
            opt = dict(wy, INV_LEVELS=levels, INV_ROWS=rows)
            yield (f"delta fwd wy {label} inverse decay={decay}", F._wy_fwd_kernel, opt, sh.warps_wy, False)
        yield (f"delta fwd wy fp32 dots decay={decay}", F._wy_fwd_kernel, dict(wy, LOWP=False), sh.warps_wy, False)
        wy = dict(F.wy_constexprs(sh, K, V, C, decay, "tf32", store_t=False, delta=True, store_nu=True, load_t=True),
                  U_SCALE=True)
        yield (f"delta bwd wy+nu (recompute) decay={decay}", F._wy_fwd_kernel, wy, wy.pop("num_warps"), False)
        yield from segments(f"delta fwd state decay={decay}", F._state_fwd_kernel,
                            dict(d, LOWRANK=True, DELTA=True, HAS_H0=True, BK=sh.BK, BV=sh.BV),
                            F.state_warps(sh, decay, True, sh.BV, delta=True), True, K, V)
        yield (f"delta fwd split combine decay={decay}", SP._combine_kernel,
               dict(K=K, V=V, BK=sh.BK, BV=32, HAS_INIT=True, DECAY=decay, MAT=True), 8, decay == 0)
        yield from segments(f"delta bwd dstate decay={decay}", FB._dstate_bwd_kernel,
                            dict(d, HAS_DFINAL=True, LOWRANK=True, LOWP=True, BK=sh.BK, BV=sh.BV),
                            FB.dstate_warps(sh, decay, True, delta=True), True, K, V)
        for lowp, default, dots in ((True, True, ""), (False, False, " fp32 dots")):
            yield (f"delta fwd output{dots} decay={decay}", F._output_fwd_kernel,
                   dict(d, LOWRANK=False, DELTA=True, BK=sh.BK, BV=sh.BV_out, LOWP=lowp), sh.warps_out, default)
            yield (f"delta bwd wy{dots} decay={decay}", D._delta_wy_bwd_kernel,
                   dict(d, BK=sh.BK, BV=sh.BV_rank1, U_SCALE=True, LOWP=lowp), sh.warps_rank1, default)
            yield (f"delta bwd wy implicit normaliser{dots} decay={decay}", D._delta_wy_bwd_kernel,
                   dict(d, BK=sh.BK, BV=sh.BV_rank1, U_SCALE=True, NORM=True, LOWP=lowp), sh.warps_rank1, default)
            yield (f"delta bwd dq dk{dots} decay={decay}", FB._dqdw_bwd_kernel,
                   dict(d, BKS=sh.BKS, BV=sh.BV_dqdw, DELTA=True, LOWP=lowp), sh.warps_chunk, default)
            yield (f"delta bwd dq dk implicit normaliser{dots} decay={decay}", FB._dqdw_bwd_kernel,
                   dict(d, BKS=sh.BKS, BV=sh.BV_dqdw, DELTA=True, KK_GRAD=True, LOWP=lowp), sh.warps_chunk,
                   default)
            if lowp:   # OLSM_MATRIX_DQDW=transposed (the delta form's default forms both products)
                yield (f"delta bwd dq dk transposed decay={decay}", FB._dqdw_bwd_kernel,
                       dict(d, BKS=sh.BKS, BV=sh.BV_dqdw, DELTA=True, LOWP=True, DW_T=True), sh.warps_chunk, False)


def elementwise_configs(K=16, V=1536, C=64):
    """(name, kernel, constexprs, types, num_warps, default_path) of the generated elementwise
    launches (default_path :data:`FEW`: taken at few programs per SM; the forward's split along the
    sequence and the classic template are opt-in)."""
    import torch

    import olsm
    from olsm.kernels.elementwise import compile_recurrence
    from olsm.kernels.elementwise.config import carry_block, choose_config
    from olsm.kernels.elementwise.fold import fold_carries_kernel
    from olsm.objectives import longhorn_diag, mamba1

    # the GPU path of choose_config, asked from a CPU machine
    cfg = choose_config(2048, K, V, C, torch.device("cuda"))
    bf16 = {p: "*bf16" for p in ("q", "k", "v", "do", "o", "dv", "x_dt", "x_beta", "g_dt", "g_beta")}
    types = dict(bf16, cu_seqlens="*i32", chunk_offsets="*i32", scale="fp32", T="i32", NV="i32")
    sizes = dict(H=1, K=K, V=V, BK=cfg.BK, C=cfg.C, HAS_D=True, IS_VARLEN=False)
    for name, obj in (("longhorn_diag", longhorn_diag), ("mamba1", mamba1)):
        # the lean template (the default), then the classic one (the way back: OLSM_ELEMENTWISE_LEAN=0)
        for lean in (True, False):
            _, mod = compile_recurrence(olsm.derive(obj), lean=lean)
            tag = "" if lean else " classic"
            t = cfg.fwd
            fwd = dict(sizes, BV=t.BV, BT=t.BT, HAS_H0=True, STORE_HT=False, STORE_CKPT=True)
            yield (f"elementwise fwd {name} [{t.BT},{cfg.BK},{t.BV}]{tag}", mod.fwd_kernel, fwd, types, t.num_warps,
                   lean)
            if lean:  # few programs per SM (choose_config's FEW_PROGRAMS_PER_SM): the doubled block, on
                # the default path but let spill: longhorn_diag's spills (696 B of stack here on Triton
                # 3.6, 344 B on 3.9; the H200 sweep's compiled handle said n_spills 24) and still
                # measured faster (H200 run 18: 0.613 -> 0.539 ms at B = 2, T = 8192)
                few = choose_config(2048, K, V, C, torch.device("cuda"), sequences_heads=1, sms=132).fwd
                yield (f"elementwise fwd {name} [{few.BT},{cfg.BK},{few.BV}] few programs", mod.fwd_kernel,
                       dict(fwd, BT=few.BT, BV=few.BV), types, few.num_warps, FEW)
            # the split along the sequence (opt-in: elementwise_scan(..., seq_split=S), scan.sequence_segments)
            for phase in (1, 2) if lean else ():
                yield (f"elementwise fwd {name} [{t.BT},{cfg.BK},{t.BV}] split phase {phase}", mod.fwd_kernel,
                       dict(fwd, SEG_T=2048, PHASE=phase, STORE_HT=True), dict(types, seg="*fp32", NSEG="i32"),
                       t.num_warps, False)
            t = cfg.bwd
            bwd = dict(sizes, BV=t.BV, BT=t.BT, NB_C=cfg.slots, HAS_DHT=False, STORE_DH0=True, SPLIT_V=True,
                       HAS_H0=True, SLAB_IN_REGS=int(cfg.slab == "registers"), NSEG=cfg.segments)
            yield (f"elementwise bwd {name} [{t.BT},{cfg.BK},{t.BV}]{tag}", mod.bwd_kernel, bwd, types,
                   t.num_warps, lean)
            if lean:  # the gradient-buffer slab (slab="grads", 16-token blocks, a checkpoint every 2048
                # tokens): on the default path (slab="auto") where it spills at most GRADS_MAX_SPILL bytes
                g = choose_config(2048, K, V, C, torch.device("cuda"), slab="grads")
                yield (f"elementwise bwd {name} [{g.bwd.BT},{g.BK},{g.bwd.BV}] grads slab", mod.bwd_kernel,
                       dict(bwd, BT=g.bwd.BT, BV=g.bwd.BV, C=g.C, NB_C=g.slots, SLAB_IN_REGS=2, SLAB_HALVES=2),
                       dict(types, scratch="*bf16"), g.bwd.num_warps, AUTO)
            if lean:  # the backward split along the sequence, automatic at few programs per SM
                # (scan.default_backward_split): the carry pass, then each segment's backward
                split_types = dict(types, carry="*fp32", NSPLIT="i32")
                yield (f"elementwise bwd {name} [{t.BT},{cfg.BK},{t.BV}] split", mod.bwd_kernel,
                       dict(bwd, SPLIT_T=2048), split_types, t.num_warps, FEW)
                cbt = carry_block(cfg)
                carry = dict(H=1, K=K, V=V, BK=cfg.BK, BV=t.BV, BT=cbt, C=cfg.C, IS_VARLEN=False, SPLIT_T=2048)
                yield (f"elementwise bwd carry {name} [{cbt},{cfg.BK},{t.BV}]", mod.bwd_carry_kernel, carry,
                       split_types, t.num_warps, FEW)
                if name == "mamba1":   # the fold between the two (recurrence-independent: one row)
                    yield (f"elementwise bwd carry fold [{cfg.BK},{t.BV}]", fold_carries_kernel,
                           dict(K=K, V=V, BK=cfg.BK, BV=t.BV, HAS_DHT=True), dict(NSPLIT="i32"), 1, FEW)


#: the "default path" mark of a launch taken only at few programs per SM: it must fit, and may spill
FEW = "few programs"

#: the mark of the gradient-slab backward: on the default path (slab="auto") where it spills at most
#: ``slab_choice.GRADS_MAX_SPILL`` bytes a thread, else opt-in; it must fit
AUTO = "auto slab"


def _auto_mark(stack: int) -> str:
    """Whether ``slab="auto"`` takes a gradient-slab backward that spills ``stack`` bytes."""
    from olsm.kernels.elementwise.slab_choice import GRADS_MAX_SPILL

    return "auto: yes" if stack <= GRADS_MAX_SPILL else "auto: no (spills)"


def stages_of(name: str, consts: dict) -> int:
    """num_stages of the launch: the forward state pass :func:`~olsm.kernels.matrix.fused.state_stages`, the
    reverse pass :func:`~olsm.kernels.matrix.fused_bwd.dstate_stages`, the whole-chunk Grams 2
    (``LaunchShape.stages_pair``, ``perkey.intra_gram``), the generated elementwise kernels 1 (as
    their launcher), the rest Triton's default 3."""
    if name.startswith("elementwise"):
        return 1
    if name.startswith(("bwd dstate", "delta bwd dstate")):
        return FB.dstate_stages(consts["DECAY"], consts["LOWRANK"])
    if name.startswith(("fwd state", "delta fwd state")):
        return F.state_stages(consts["DECAY"], consts["LOWRANK"], consts.get("DELTA", False))
    return 2 if name in ("fwd per-key pair grams", "fwd per-key intra gram") else 3


def loop(name, *overrides):
    """Print the SASS instruction mix of one table row's main loop (``olsm.kernels.aot.loop_mix``),
    with ``key=value`` overrides of its constexprs and ``warps``, e.g.
    ``--loop "delta bwd dstate decay=1" BV=32 warps=4`` (the value block of a (1, 32768) launch)."""
    # lazily: the elementwise rows generate their kernels, needed only if no matrix row matches
    rows = itertools.chain(((n, kernel, consts, TYPES, warps) for n, kernel, consts, warps, _ in configs()),
                           ((n, kernel, consts, types, warps)
                            for n, kernel, consts, types, warps, _ in elementwise_configs()))
    for n, kernel, consts, types, warps in rows:
        if n == name:
            extra = dict(kv.split("=") for kv in overrides)
            warps = int(extra.pop("warps", warps))
            consts = dict(consts, **{k: int(v) for k, v in extra.items()})
            mix = loop_mix(kernel, consts, types, num_warps=warps, num_stages=stages_of(n, consts))
            print(f"{name} ({', '.join(overrides) or 'as launched'}), {warps} warps: {mix['total']} instructions "
                  f"per warp per iteration, {warps * mix['total']} per iteration; "
                  + ", ".join(f"{k} {v}" for k, v in list(mix.items())[1:16]))
            return
    raise SystemExit(f"no row named {name!r}")


def main():
    if sys.argv[1:2] == ["--loop"]:
        return loop(*sys.argv[2:])
    only_default = "--default-only" in sys.argv[1:]   # what the test needs; skips the slow opt-in ones
    print(f"triton {triton.__version__}, sm_90, K = V = 128, C = 64, bf16; limit {HOPPER_SHARED_BYTES} B shared\n")
    print("| kernel | default path | num_warps | shared (B) | fits H100 | registers | spill stack (B) | sync loads |")
    print("|---|---|---|---|---|---|---|---|")
    bad = 0
    for name, kernel, consts, warps, default in configs():
        if only_default and not default:
            continue
        r = compile_for(kernel, consts, TYPES, num_warps=warps, num_stages=stages_of(name, consts))
        fits = r["shared"] <= HOPPER_SHARED_BYTES
        bad += default and not fits
        print(f"| {name} | {'yes' if default else 'opt-in'} | {warps} | {r['shared']} | {'yes' if fits else '**no**'} "
              f"| {r['registers']} | {r['stack']} | {r['sync_loads']} |")
    for name, kernel, consts, types, warps, default in elementwise_configs():
        if only_default and not default:
            continue
        r = compile_for(kernel, consts, types, num_warps=warps, num_stages=stages_of(name, consts))
        fits = r["shared"] <= HOPPER_SHARED_BYTES
        bad += bool(default) and (not fits or (r["stack"] > 0 and default not in (FEW, AUTO)))
        mark = {FEW: FEW, AUTO: _auto_mark(r["stack"])}.get(default, "yes" if default else "opt-in")
        print(f"| {name} | {mark} | {warps} | {r['shared']} | {'yes' if fits else '**no**'} "
              f"| {r['registers']} | {r['stack']}{' **spills**' if r['stack'] else ''} | {r['sync_loads']} |")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
