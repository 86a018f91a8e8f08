"""Launchers and autograd for the generated elementwise-gate scan.

``elementwise_scan`` is the public entry; ``elementwise_step`` the one-token decode step (the
same kernel with blocks of one token). Both take the recurrence IR and compile (once, cached
on disk) a forward and a backward kernel whose coefficient arithmetic was printed from the
IR's sympy expressions (:mod:`.codegen` describes the block-parallel algorithm).

Memory the forward keeps for the backward: the inputs plus one float32 ``[K, V]`` state per
sequence and head at the start of every chunk of ``C`` tokens but the first (which starts
from the initial state or zeros): ``ceil(T / C) - 1`` of them, never a ``[T, K, V]`` tensor.
The backward walks one chunk at a time and needs the state entering each of the chunk's
``C / BT`` blocks. With ``slab="global"`` they go to a float32 scratch slab of
``N · H · K · V · C / BT`` (every program's at once), so C trades checkpoints (∝ T / C)
against slab (∝ C / BT) and stays small (C = ``chunk_size`` rounded to the block, 64). With
``slab="registers"`` they stay in each program's registers: no slab memory, and C grows to
``BT · REG_SLOTS`` (128) by default; ``slab_segments=S`` makes it S times longer for a second
forward replay in the backward. E.g. B = 8, T = 2048, one head, K = 16, V = 1536 (one
checkpoint per sequence: 0.75 MiB; at B = 2, T = 8192: 0.19 MiB):

    global,    C = 64:                  31 checkpoints 23.3 MiB + slab 6 MiB   (T = 8192: 23.8 + 1.5)
    registers, C = 128:                 15 checkpoints 11.3 MiB                (T = 8192: 11.8)
    registers, 8 segments, C = 1024:     1 checkpoint   0.75 MiB               (T = 8192: 1.3)
    registers, 16 segments, C = 2048:    none                                  (T = 8192: 0.56)
    grads,                C = 2048:    none                                  (T = 8192: 0.56)

``slab="grads"`` keeps them in the cells of dv (and of dΔ / dβ for 2-byte inputs) that the
backward has not written yet, with one replay of each interval instead of the segments' two
(:func:`grads_slab_cells`); its backward blocks are at least K tokens long.

The backward also takes one float32 ``[B, T, H, K]`` buffer each for dq and dk (summed over
value slices with atomics) and writes the per-value gradients (dv, dβ, dΔ) straight in their
inputs' dtypes.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple, Optional, Tuple

import torch

from olsm.errors import BackendError, InputError

from .cache import load_kernels
from ..ints import cdiv, next_pow2, sm_count
from .config import (Config, Knob, _pair, auto_backward_split, carry_block, choose_config, default_slab,
                     default_slab_segments, interpreting)
from .fold import fold_carries_kernel
from .plan import Plan
from .slab_choice import backward_spills, choose_slab, pointer_type

#: largest key dimension (d_state): the whole key axis sits in each program's tiles
MAX_K = 256

#: default prefetch depths (forward, backward): blocks loaded ahead of the one being used
DEFAULT_PREFETCH = (1, 1)


@functools.lru_cache(maxsize=128)
def _kernels_for(rec, prefetch, lean):
    plan = Plan(rec)
    return plan, load_kernels(plan, prefetch, lean)


def lean_template() -> bool:
    """``OLSM_ELEMENTWISE_LEAN`` (read at each call): ``1`` or unset, the lean template of
    :func:`~.codegen.generate_source` (the default since run 18: fewer instructions per block, and
    on the H200 0.84–0.97× the classic template's fwd+bwd time at the paper's shapes); ``0``, the
    classic template (the way back, and the A/B baseline)."""
    value = os.environ.get("OLSM_ELEMENTWISE_LEAN", "1")
    if value not in ("0", "1", ""):
        raise BackendError(f"OLSM_ELEMENTWISE_LEAN={value!r} is not 0 or 1; unset it for the default (1, the lean template)")
    return value != "0"


def compile_recurrence(rec, prefetch: Optional[Tuple[int, int]] = None, lean: Optional[bool] = None):
    """Plan and kernel module of ``rec`` (generated and imported on first use).

    Args:
        rec: elementwise-class recurrence IR.
        prefetch: ``(forward, backward)`` load-ahead depths in blocks (default
            :data:`DEFAULT_PREFETCH`; 0 loads each block when it is used).
        lean: the lean template (None: :func:`lean_template`).

    Returns:
        ``(plan, module)``; ``module.fwd_kernel``, ``module.bwd_kernel`` are the kernels and
        ``module.__file__`` the generated source.
    """
    prefetch = tuple(prefetch) if prefetch is not None else DEFAULT_PREFETCH
    lean = lean_template() if lean is None else bool(lean)
    try:
        return _kernels_for(rec, prefetch, lean)
    except TypeError:  # unhashable IR object: no in-process memo, the disk cache still works
        plan = Plan(rec)
        return plan, load_kernels(plan, prefetch, lean)


def _check(rec, plan: Plan, q, k, v, coefs, initial_state, cu_seqlens, D):
    if q.dim() != 4 or k.shape != q.shape:
        raise InputError(f"q and k must both be [B, T, H, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise InputError(f"v must be [B, T, H, V] with q's B, T, H; got {tuple(v.shape)}")
    V = v.shape[-1]
    if K > MAX_K:
        raise BackendError(
            f"the elementwise Triton scan keeps the whole key axis in each program's tiles and supports "
            f"K <= {MAX_K}; got K = {K} (use the torch backend)"
        )
    if q.device != k.device or q.device != v.device:
        raise InputError("q, k, v must be on one device")
    if q.device.type != "cuda" and not interpreting():
        raise BackendError(
            f"the Triton elementwise scan needs a CUDA device (got {q.device}); set "
            "TRITON_INTERPRET=1 before importing triton to run it on the CPU interpreter"
        )
    names = {s.name for s in rec.inputs}
    extra = set(coefs) - names
    if extra:
        raise InputError(f"{rec.name!r} takes no coefficient(s) {sorted(extra)}; inputs: {sorted(names)}")
    for spec in rec.inputs:
        if spec.name not in coefs or coefs[spec.name] is None:
            raise InputError(f"{rec.name!r} needs the coefficient {spec.name!r} {spec.shape}: {spec.doc}")
        want = spec.expected_shape(B, T, H, K, V)
        got = tuple(coefs[spec.name].shape)
        if got != want:
            raise InputError(f"coefficient {spec.name!r} must be {spec.shape} = {want}, got {got}")
    N = B
    if cu_seqlens is not None:
        if B != 1:
            raise InputError(f"cu_seqlens needs packed inputs with B == 1, got B = {B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise InputError("cu_seqlens must be a 1-D tensor [N + 1]")
        N = cu_seqlens.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (N, H, K, V):
        raise InputError(f"initial_state must be [N, H, K, V] = {(N, H, K, V)}, got {tuple(initial_state.shape)}")
    if D is not None and tuple(D.shape) != (H, V):
        raise InputError(f"D must be [H, V] = {(H, V)}, got {tuple(D.shape)}")
    return B, T, H, K, V, N


def _chunk_offsets(cu_seqlens: torch.Tensor, C: int) -> torch.Tensor:
    """Index of each packed sequence's first stored checkpoint (that of its second chunk):
    ``[N]`` int32."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    stored = ((lens + C - 1) // C - 1).clamp_min(0)
    return torch.cat([stored.new_zeros(1), stored.cumsum(0)[:-1]]).to(torch.int32)


def sequence_segments(cfg: Config, T: int, seq_split: Optional[int] = None) -> int:
    """Tokens per segment of a kernel's split along the sequence (0: no split); the forward's
    below, the backward's in :func:`backward_segments`.

    The forward walks each (sequence, head, value slice) in one program, a chain of T / BT
    dependent block steps. Cut into S segments of a whole number of checkpoint intervals, the
    sequence is walked twice: every segment but the last from zero for its gate product and
    end state, then every segment from its true start (h0 carried through the earlier
    segments' pairs), storing outputs and checkpoints as one walk would (the backward is
    unchanged): about (2S − 1) / S times the work on S times the programs.

    Opt-in: on an H200 (run 13, ``benchmarks/results/elementwise_split_h200.md``) three segments
    at B = 2, T = 8192, E = 1536 (384 one-warp programs) left the forward where it was (mamba1
    0.716 vs 0.717 ms unsplit): the single walk is not short of programs there, it runs at the
    throughput B = 8 reaches, and the split's extra pass costs what its parallelism gains.

    Args:
        cfg: the call's launch shape (its checkpoint interval C).
        T: tokens per sequence (packed sequences: the packed length, an upper bound; segments
            past a sequence's end do nothing).
        seq_split: segments asked for; None or 1: none.

    Returns:
        SEG_T, a multiple of ``cfg.C``, or 0.
    """
    if seq_split is None:
        return 0
    if int(seq_split) < 1:
        raise InputError(f"seq_split must be a positive number of segments, got {seq_split}")
    nseg = min(int(seq_split), -(-T // cfg.C))
    if nseg <= 1:
        return 0
    return -(-(-(-T // nseg)) // cfg.C) * cfg.C


def default_backward_split(cfg: Config, sequences_heads: int, T: int, V: int, device, packed: bool,
                           sms: Optional[int] = None) -> int:
    """Segments of the backward's split when the call names none: ``$OLSM_ELEMENTWISE_BWD_SPLIT``
    (a positive integer; 1: none) or, unset or ``auto``, :func:`~.config.auto_backward_split` of
    the unsplit backward's programs. Packed sequences (``cu_seqlens``) are not split
    automatically: segments follow the packed length, and most would be past a short
    sequence's end."""
    value = os.environ.get("OLSM_ELEMENTWISE_BWD_SPLIT", "auto")
    if value not in ("", "auto"):
        if not value.isdigit() or int(value) < 1:
            raise BackendError(f"OLSM_ELEMENTWISE_BWD_SPLIT={value!r} is not a positive integer or 'auto'; "
                               "unset it for the default (auto)")
        return int(value)
    if packed:
        return 1
    programs = sequences_heads * cdiv(V, cfg.bwd.BV)
    return auto_backward_split(programs, T, sm_count(device) if sms is None else sms)


def backward_segments(cfg: Config, T: int, seq_split: Optional[int] = None) -> int:
    """Tokens per segment of the backward's split along the sequence (0: no split).

    The backward walks each (sequence, head, value slice) from its end to its start in one
    program. Cut into S segments of a whole number of checkpoint intervals, each segment's
    walk is its own program and starts from the gradient reaching the segment's end. That
    gradient comes from the later segments alone, and is linear in them: a first, lighter pass
    (``bwd_carry_kernel``: loads q, do and the gate's factors, one product scan per block, no
    replay, no gradients) gives each segment but the first its gate product A and the gradient
    L its own outputs send back; segment i then starts from dht carried through the pairs of
    segments S−1 .. i+1 (``P ← A ⊙ P + L``). Each segment's walk restarts from the forward's
    checkpoints, so the forward is unchanged. About 1 + (S − 1) / S · (carry pass / backward)
    the work, on S times the programs.

    Args:
        cfg: the call's launch shape (its checkpoint interval C).
        T: tokens per sequence (packed: the packed length; segments past a sequence's end do
            nothing).
        seq_split: segments asked for; None or 1: none.

    Returns:
        SPLIT_T, a multiple of ``cfg.C``, or 0.
    """
    return sequence_segments(cfg, T, seq_split)


class _ElementwiseScan(torch.autograd.Function):
    """Autograd wrapper: forward saves checkpoints, backward runs the reverse scan."""

    @staticmethod
    def forward(ctx, plan, mod, cfg: Config, scale, output_final_state, need_ckpt, seg_ts, q, k, v,
                initial_state, D, cu_seqlens, *coefs):
        seg_t, split_t = seg_ts  # the forward's and the backward's segments (0: no split)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        coefs = tuple(c.contiguous() for c in coefs)
        B, T, H, K = q.shape
        V = v.shape[-1]
        N = B if cu_seqlens is None else cu_seqlens.numel() - 1
        tile = cfg.fwd
        chunk_offsets = None
        if cu_seqlens is not None:
            chunk_offsets = _chunk_offsets(cu_seqlens, cfg.C)
            # an upper bound that needs no device sync: Σ (ceil(L_i / C) - 1) <= ceil(T / C)
            total_chunks = -(-T // cfg.C)
        else:
            total_chunks = N * (-(-T // cfg.C) - 1)
        f32 = dict(dtype=torch.float32, device=q.device)
        o = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
        ht = torch.empty(N, H, K, V, **f32) if output_final_state else None
        ckpt = torch.empty(max(total_chunks, 1), H, K, V, **f32) if need_ckpt else None
        h0 = initial_state.contiguous() if initial_state is not None else None
        Dc = D.contiguous() if D is not None else None
        dummy = o
        NV = -(-V // tile.BV)
        args = (q, k, v, o, *coefs,
                Dc if Dc is not None else dummy,
                h0 if h0 is not None else dummy,
                ht if ht is not None else dummy,
                ckpt if ckpt is not None else dummy,
                cu_seqlens if cu_seqlens is not None else dummy,
                chunk_offsets if chunk_offsets is not None else dummy,
                float(scale), T)
        kw = dict(H=H, K=K, V=V, BK=cfg.BK, BV=tile.BV, BT=tile.BT, C=cfg.C,
                  HAS_H0=h0 is not None, STORE_HT=ht is not None, STORE_CKPT=ckpt is not None,
                  HAS_D=Dc is not None, IS_VARLEN=cu_seqlens is not None, **tile.launch_options())
        nseg = -(-T // seg_t) if seg_t else 1
        if nseg > 1:
            # split along the sequence (:func:`sequence_segments`): every segment but the last
            # walked from zero for its (gate product, end state), then every segment from its
            # true start state, storing outputs and checkpoints as the single walk does
            seg = torch.empty(N * H * NV * nseg * 2 * cfg.BK * tile.BV, **f32)
            mod.fwd_kernel[(N * H, NV, nseg - 1)](*args, seg=seg, NSEG=nseg, SEG_T=seg_t, PHASE=1, **kw)
            mod.fwd_kernel[(N * H, NV, nseg)](*args, seg=seg, NSEG=nseg, SEG_T=seg_t, PHASE=2, **kw)
        else:
            mod.fwd_kernel[(N * H, NV)](*args, **kw)
        if need_ckpt:
            ctx.save_for_backward(q, k, v, Dc, h0, cu_seqlens, chunk_offsets, ckpt, *coefs)
            ctx.meta = (plan, mod, cfg, float(scale), h0 is not None, N, split_t)
            ctx.coef_dtypes = [c.dtype for c in coefs]
            ctx.state_dtype = initial_state.dtype if initial_state is not None else None
            ctx.D_dtype = D.dtype if D is not None else None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, D, h0, cu_seqlens, chunk_offsets, ckpt, *coefs = ctx.saved_tensors
        plan, mod, cfg, scale, has_h0, N, split_t = ctx.meta
        B, T, H, K = q.shape
        V = v.shape[-1]
        tile = cfg.bwd
        NV = -(-V // tile.BV)
        nsplit = cdiv(T, split_t) if split_t else 1
        split_v = NV > 1
        dev = q.device
        f32 = dict(dtype=torch.float32, device=dev)
        do = do.contiguous()
        split = {}
        if nsplit > 1:
            # the split along the sequence (:func:`backward_segments`): every segment but the
            # first walked for its (gate product, gradient from zero) pair, then every segment's
            # backward from the gradient reaching its end. It runs before the gradients are
            # allocated, and the pairs' A half is freed once folded (fold.py): only one [BK, BV]
            # tile per segment but the last is alive at the backward kernel's peak
            carry_a, carry_l = (torch.empty(N * H * NV * (nsplit - 1) * cfg.BK * tile.BV, **f32) for _ in "al")
            mod.bwd_carry_kernel[(N * H, NV, nsplit - 1)](
                q, k, v, do, *coefs, carry_a, carry_l,
                cu_seqlens if cu_seqlens is not None else do,
                chunk_offsets if chunk_offsets is not None else do,
                scale, T, nsplit,
                H=H, K=K, V=V, BK=cfg.BK, BV=tile.BV, BT=carry_block(cfg), C=cfg.C,
                IS_VARLEN=cu_seqlens is not None, SPLIT_T=split_t, **tile.launch_options(),
            )
            # a [BK, BV] tile per program (64 elements at the paper's shapes): one warp, as compiled
            # in kernel_resources.py
            fold_carries_kernel[(N * H, NV)](carry_a, carry_l, dht.contiguous() if dht is not None else do,
                                             nsplit, K=K, V=V, BK=cfg.BK, BV=tile.BV, HAS_DHT=dht is not None,
                                             num_warps=1, num_stages=1)
            del carry_a
            split = dict(carry=carry_l, NSPLIT=nsplit, SPLIT_T=split_t)
            del carry_l
        # tokens outside every packed sequence are never visited, and sums over the value
        # slices start from zero
        alloc = torch.zeros if cu_seqlens is not None else torch.empty
        alloc_sum = torch.zeros if (split_v or cu_seqlens is not None) else torch.empty
        dq = alloc_sum(B, T, H, K, **f32)
        dk = alloc_sum(B, T, H, K, **f32)
        dv = alloc(B, T, H, V, dtype=v.dtype, device=dev)
        dh0 = torch.empty(N, H, K, V, **f32) if has_h0 else None
        # D's and the parameters' gradients: every program adds its sum over its tokens
        dD = torch.zeros(H, V, **f32) if D is not None else None
        nb_c = cfg.slots
        gbufs = []
        for spec, c in zip(plan.inputs, coefs):
            ax = tuple(spec.axes)
            tail = tuple({"K": K, "V": V}[a] for a in ax)
            if spec.per_token:
                # per-value gradients are one program's alone: written in the input's dtype
                gbufs.append(alloc(*c.shape, dtype=c.dtype, device=dev) if "V" in ax
                             else alloc_sum(*c.shape, **f32))
            else:
                gbufs.append(torch.zeros(H, *tail, **f32))
        halves, lo = grads_slab_cells(plan, v, coefs) if cfg.slab == "grads" else (0, None)
        if cfg.slab == "global":
            # C / BT block-entering states per program
            scratch = torch.empty(N * H * NV * nsplit * nb_c * cfg.BK * tile.BV if nb_c > 1 else 1, **f32)
        else:
            # none (registers), or this program's cells of dv and of the gradient holding the low halves
            scratch = gbufs[lo] if lo is not None else dv
        dummy = dv
        mod.bwd_kernel[(N * H, NV, nsplit)](
            q, k, v, do, *coefs,
            D if D is not None else dummy,
            h0 if h0 is not None else dummy,
            dht.contiguous() if dht is not None else dummy,
            dh0 if dh0 is not None else dummy,
            ckpt, scratch, dq, dk, dv,
            dD if dD is not None else dummy,
            *gbufs,
            cu_seqlens if cu_seqlens is not None else dummy,
            chunk_offsets if chunk_offsets is not None else dummy,
            scale, T, NV,
            H=H, K=K, V=V, BK=cfg.BK, BV=tile.BV, BT=tile.BT, C=cfg.C, NB_C=nb_c,
            HAS_H0=h0 is not None, HAS_DHT=dht is not None, STORE_DH0=dh0 is not None,
            HAS_D=D is not None, IS_VARLEN=cu_seqlens is not None, SPLIT_V=split_v,
            SLAB_IN_REGS=SLAB_MODES[cfg.slab], SLAB_HALVES=max(halves, 1), NSEG=cfg.segments, **split,
            **tile.launch_options(),
        )
        split = None  # the folded carries (a [BK, BV] tile per segment), before the casts below
        dcoefs = [_take_coef_grad(plan.input_factor[spec.name] is not None, gbufs, i, c, dt)
                  for i, (spec, c, dt) in enumerate(zip(plan.inputs, coefs, ctx.coef_dtypes))]
        dh0 = dh0.to(ctx.state_dtype) if dh0 is not None else None
        dD = dD.to(ctx.D_dtype) if dD is not None else None
        # the peak is the kernel's: every float32 buffer is dropped as soon as it is reduced or
        # cast, so no two casts' copies are alive beside the buffers they come from
        dq = dq.to(q.dtype)
        dk = dk.to(k.dtype)
        return (None, None, None, None, None, None, None, dq, dk, dv, dh0, dD, None, *dcoefs)


#: the backward's ``SLAB_IN_REGS`` constexpr of each slab
SLAB_MODES = {"global": 0, "registers": 1, "grads": 2}


def grads_slab_cells(plan: Plan, v: torch.Tensor, coefs) -> Tuple[int, Optional[int]]:
    """Where the gradient-buffer slab (``slab="grads"``) keeps a float32 state: in 4-byte dv
    cells whole (``(1, None)``), or split into 16-bit halves over 2-byte dv cells and the same
    cells of a per-token, per-value coefficient's 2-byte gradient (``(2, i)``, i its index in
    ``plan.inputs``); ``(0, None)`` if neither fits.

    A block of BT >= K tokens has BT · BV cells of each [B, T, H, V] buffer for this program
    alone, which it writes only when its reverse walk reaches that block: until then row k of
    the state entering the block lives in the block's token k.
    """
    if v.element_size() == 4:
        return 1, None
    if v.element_size() == 2:
        for i, (spec, c) in enumerate(zip(plan.inputs, coefs)):
            if spec.per_token and tuple(spec.axes) == ("V",) and c.shape == v.shape and c.element_size() == 2:
                return 2, i
    return 0, None


def _grads_backward_spills(plan: Plan, mod, cfg: Config, backward_split, q, v, coefs, D, initial_state,
                           cu_seqlens, H: int) -> int:
    """Spill bytes per thread of the gradient-slab backward this call would launch (its tiles,
    interval, dtypes and switches; no final-state gradient), compiled for the call's GPU."""
    halves, lo = grads_slab_cells(plan, v, coefs)
    K, V = q.shape[-1], v.shape[-1]
    split_t = backward_split(cfg)
    consts = dict(H=H, K=K, V=V, BK=cfg.BK, BV=cfg.bwd.BV, BT=cfg.bwd.BT, C=cfg.C, NB_C=cfg.slots,
                  HAS_DHT=False, STORE_DH0=initial_state is not None, HAS_D=D is not None,
                  IS_VARLEN=cu_seqlens is not None, SPLIT_V=-(-V // cfg.bwd.BV) > 1,
                  HAS_H0=initial_state is not None, SLAB_IN_REGS=SLAB_MODES["grads"], NSEG=1,
                  SPLIT_T=split_t, SLAB_HALVES=halves)
    types = dict(q=pointer_type(q.dtype), k=pointer_type(q.dtype), do=pointer_type(q.dtype),
                 v=pointer_type(v.dtype), dv=pointer_type(v.dtype),
                 scratch=pointer_type(coefs[lo].dtype if lo is not None else v.dtype),
                 cu_seqlens="*i32", chunk_offsets="*i32", scale="fp32", T="i32", NV="i32", NSPLIT="i32")
    for spec, c in zip(plan.inputs, coefs):
        types[f"x_{spec.name}"] = pointer_type(c.dtype)
        if spec.per_token and "V" in spec.axes:
            types[f"g_{spec.name}"] = pointer_type(c.dtype)
    if D is not None:
        types["d_skip"] = pointer_type(D.dtype)
    if initial_state is not None:
        types["h0"] = pointer_type(initial_state.dtype)
    return backward_spills(mod, consts, types, cfg.bwd.num_warps, q.device)


def _take_coef_grad(used: bool, gbufs: list, i: int, c: torch.Tensor, dtype) -> torch.Tensor:
    """The gradient of coefficient ``c`` from its kernel buffer ``gbufs[i]``, which is released.

    Args:
        used: whether the recurrence reads the coefficient (else its gradient is zero).
        gbufs: the backward kernel's gradient buffers; entry i is set to None.
        i: the coefficient's index.
        c: the coefficient, ``[B, T, H, ...]`` per token or ``[H, ...]``.
        dtype: the dtype the gradient is returned in.

    Returns:
        the buffer (per token, or a parameter's float32 sum) cast, in ``c``'s shape.
    """
    buf, gbufs[i] = gbufs[i], None
    if not used:
        return torch.zeros_like(c)
    return buf.reshape(c.shape).to(dtype)


def elementwise_scan(
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
    block_t: Knob = None,
    block_v: Knob = None,
    num_warps: Knob = None,
    prefetch: Optional[Tuple[int, int]] = None,
    max_registers: Knob = None,
    slab: Optional[str] = None,
    slab_slots: Optional[int] = None,
    slab_segments: Optional[int] = None,
    seq_split: Knob = None,
    lean: Optional[bool] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run an elementwise-gate recurrence with a generated block-parallel Triton scan.

    ``S_t = G_t ⊙ S_{t-1} + k̃_t ṽ_tᵀ``, ``o_t = scale · S_tᵀ q_t (+ D ⊙ v_t)``, with G, k̃,
    ṽ computed inside the kernel from the IR's expressions (G never materialised).

    Args:
        rec: elementwise-class :class:`olsm.ir.RecurrenceIR` (e.g. ``derive(longhorn_diag)``).
        q, k: ``[B, T, H, K]`` (float32, bfloat16 or float16; K <= 256).
        v: ``[B, T, H, V]``.
        coefs: coefficient tensors keyed by ``InputSpec.name`` (``beta [B, T, H, V]``,
            ``dt [B, T, H, V]``, ``A [H, V, K]``, ...).
        scale: readout scale.
        initial_state: ``[N, H, K, V]`` (N = B, or the number of packed sequences) or None.
        output_final_state: also return the final state.
        cu_seqlens: ``[N + 1]`` int32/int64 boundaries of packed sequences (then ``B == 1``).
        chunk_size: tokens between the checkpointed states the backward restarts from
            (rounded up to a multiple of the token block; with ``slab="registers"`` to the
            backward's block times a power of two, at least ``BT · REG_SLOTS``, see
            :func:`~.config.choose_config`).
        D: optional ``[H, V]`` skip connection, ``o += D[h, j] · v`` (the Mamba/Longhorn block).
        block_t, block_v, num_warps: tokens per block, value-slice width and warps per
            program (default: :func:`~.config.choose_config`); an int sets both kernels, a
            ``(forward, backward)`` pair each.
        prefetch: ``(forward, backward)`` blocks loaded ahead (default ``(1, 1)``).
        max_registers: per-thread register cap of the compiled kernels (CUDA), an int or a
            ``(forward, backward)`` pair; None leaves it to the compiler.
        slab: where the backward keeps a chunk's block-entering states: ``"global"`` (a
            scratch slab in global memory), ``"registers"`` (none off chip, fewer
            checkpoints) or ``"grads"`` (the gradient buffers' unwritten cells: a checkpoint
            every 2048 tokens, one replay; needs a 4-byte v, or a 2-byte v and a per-value
            coefficient); None: ``$OLSM_ELEMENTWISE_SLAB`` or :data:`~.config.DEFAULT_SLAB`.
        slab_slots: register slab only: backward blocks per segment (a power of two; None:
            :func:`~.config.choose_config`'s choice).
        slab_segments: register slab only: segments per checkpoint interval (a power of two,
            default 1): ``C = BT · slab_slots · slab_segments``; above 1 the backward replays
            each chunk twice (fewer checkpoints for one more forward pass).
        seq_split: segments each sequence is cut into, walked in parallel (an int for both
            kernels, a ``(forward, backward)`` pair each; None or 1: none). The forward walks
            them twice (:func:`sequence_segments`), the backward once plus a lighter first pass
            for the gradient each segment sends back (:func:`backward_segments`). None: the
            forward whole (its split did not speed up the H200 at the paper's shapes), the
            backward split by :func:`default_backward_split` (when few programs would walk
            long sequences: at B = 2, T = 8192, E = 1536 four segments, 0.92× / 0.89× the
            unsplit fwd+bwd of mamba1 / longhorn_diag on the H200); ``(None, 1)`` or 1: no split.
        lean: the lean kernel template (fewer instructions per block; :func:`lean_template`);
            None: ``$OLSM_ELEMENTWISE_LEAN`` (unset: the lean template; ``0``: the classic one).

    Returns:
        ``(o [B, T, H, V] in q's dtype, S [N, H, K, V] float32 or None)``. Differentiable with
        respect to q, k, v, every coefficient, ``initial_state`` and ``D``.
    """
    launch = launch_plan(rec, q, k, v, coefs, initial_state=initial_state, cu_seqlens=cu_seqlens,
                         chunk_size=chunk_size, D=D, block_t=block_t, block_v=block_v, num_warps=num_warps,
                         prefetch=prefetch, max_registers=max_registers, slab=slab, slab_slots=slab_slots,
                         slab_segments=slab_segments, seq_split=seq_split, lean=lean)
    plan, mod, cfg, need, seg_ts, cu_seqlens, coef_list = launch
    return _ElementwiseScan.apply(
        plan, mod, cfg, scale, output_final_state, need, seg_ts, q, k, v, initial_state, D, cu_seqlens,
        *coef_list,
    )


class LaunchPlan(NamedTuple):
    """What one :func:`elementwise_scan` call launches (:func:`launch_plan`)."""

    plan: Plan
    mod: object
    cfg: Config
    need: bool
    seg_ts: Tuple[int, int]
    cu_seqlens: Optional[torch.Tensor]
    coefs: list


def launch_plan(rec, q, k, v, coefs: dict, *, initial_state=None, cu_seqlens=None, chunk_size: int = 64,
                D=None, block_t: Knob = None, block_v: Knob = None, num_warps: Knob = None, prefetch=None,
                max_registers: Knob = None, slab: Optional[str] = None, slab_slots: Optional[int] = None,
                slab_segments: Optional[int] = None, seq_split: Knob = None, lean: Optional[bool] = None,
                need_grad: Optional[bool] = None) -> LaunchPlan:
    """The kernels, launch shape, slab and splits of an :func:`elementwise_scan` call with these
    arguments (the inputs are checked; nothing runs but, for ``slab="auto"`` on a GPU, the compile
    of the gradient-slab backward whose spills decide it). ``need_grad`` (None: whether autograd
    would record the call) says whether a backward is planned. Used by the benchmarks to report
    the configuration a call really takes."""
    lean = lean_template() if lean is None else bool(lean)
    plan, mod = compile_recurrence(rec, prefetch, lean)
    B, T, H, K, V, N = _check(rec, plan, q, k, v, coefs, initial_state, cu_seqlens, D)
    coef_list = [coefs[s.name] for s in rec.inputs]
    tensors = [q, k, v, initial_state, D, *coef_list]
    need = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    need = need if need_grad is None else bool(need_grad)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    split_fwd, split_bwd = _pair(seq_split, "seq_split")
    config = functools.partial(choose_config, T, K, V, chunk_size, q.device, block_t, block_v, num_warps,
                               max_registers, slab_slots=slab_slots, slab_segments=slab_segments,
                               # the few-programs forward block was measured on the lean template; the
                               # classic one spills there (H200 run 18: longhorn_diag B = 2 forward 0.64 -> 1.12 ms)
                               sequences_heads=N * H if lean else None)

    def backward_split(cfg):
        if split_bwd is None and need:
            return backward_segments(cfg, T, default_backward_split(cfg, N * H, T, V, q.device,
                                                                    packed=cu_seqlens is not None))
        return backward_segments(cfg, T, split_bwd)

    bt_bwd = _pair(block_t, "block_t")[1]
    cells = grads_slab_cells(plan, v, coef_list)[0]   # 0: no room for the gradient-buffer slab
    slab = choose_slab(
        slab if slab is not None else default_slab(), need_grad=need,
        compiled=q.device.type == "cuda" and not interpreting(),
        cells=bool(cells),
        pinned=(slab_slots is not None or slab_segments is not None or default_slab_segments() is not None
                or (bt_bwd is not None and bt_bwd < next_pow2(K))),
        spills=lambda: _grads_backward_spills(plan, mod, config(slab="grads"), backward_split, q, v, coef_list,
                                              D, initial_state, cu_seqlens, H),
    )
    cfg = config(slab=slab)
    if cfg.slab == "grads" and not cells:
        raise InputError("slab='grads' keeps float32 states in the gradient buffers' cells: it needs a "
                         "4-byte v, or a 2-byte v and a per-token, per-value coefficient of 2 bytes "
                         f"(v is {v.dtype}); use slab='registers'")
    seg_ts = (sequence_segments(cfg, T, split_fwd), backward_split(cfg))
    return LaunchPlan(plan, mod, cfg, need, seg_ts, cu_seqlens, coef_list)


def elementwise_step(
    rec,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    coefs: dict,
    state: Optional[torch.Tensor],
    *,
    scale: float = 1.0,
    D: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One decoding step: advance the state by a single token (no autograd).

    Args:
        rec: elementwise-class recurrence IR.
        q, k: ``[B, H, K]``; v: ``[B, H, V]``.
        coefs: per-token coefficients without the time axis (``beta [B, H, V]``); per-head
            parameters as usual (``A [H, V, K]``).
        state: ``[B, H, K, V]`` or None (zeros).
        scale, D: as in :func:`elementwise_scan`.

    Returns:
        ``(o [B, H, V] in q's dtype, new state [B, H, K, V] float32)``.
    """
    step_coefs = {}
    for spec in rec.inputs:
        c = coefs[spec.name]
        step_coefs[spec.name] = c.unsqueeze(1) if spec.per_token else c
    with torch.no_grad():
        o, S = elementwise_scan(
            rec, q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), step_coefs, scale=scale,
            initial_state=state, output_final_state=True, D=D,
        )
    return o[:, 0], S
