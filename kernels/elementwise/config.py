"""Launch shapes of the elementwise-gate kernels: tile sizes, warps, checkpoint interval.

A program owns one (sequence, head, BV-wide value slice) and the whole key axis, and works
on ``[BT, BK, BV]`` float32 tiles (tokens × keys × values) in registers. The defaults come
from the H200 sweeps (``benchmarks/sweep_elementwise.py``, results/elementwise_sweep_h200_*.md,
longhorn_diag at N = 16, E = 1536, bf16): small tiles win. Forward: ``[16, 16, 8]`` on one
warp (0.36 ms at B = 8, T = 2048, 0.62 ms at B = 2, T = 8192; the old ``[32, 16, 16]`` on 8
warps took 2.5 ms), i.e. 2048 tile elements, 64 per thread. Backward: ``[8, 16, 4]`` on one
warp, 512 elements, 16 per thread (2.47 ms at B = 8, T = 2048, forward+backward minus the no-grad
forward; it keeps many tiles alive and
larger tiles spill: ``[8, 16, 8]`` on 2 warps 3.06 ms, ``[16, 16, 8]`` on 2 warps 5.7 ms).
Run 17 re-swept both with the backward's flipped reverse scan (results/elementwise_sweep_h200_run17_*.md):
the backward default stayed best (1.99 ms at B = 8, 2.53 at B = 2), ``[32, 16, 4]`` forward tied
the default for longhorn_diag at B = 2 but lost at d_model 1024, and tiles spread over 2 or 4
warps were 1.4–8× slower in both kernels (Triton scans across warps through shared memory).
Run 18 re-swept both on the lean template, for mamba1 and longhorn_diag
(results/elementwise_sweep_h200_run18_*.md): the defaults stayed, prefetch depths 0–3 included,
except the forward at few programs per SM, whose token block doubles
(:data:`FEW_PROGRAMS_PER_SM`). Every knob can be overridden per call.

Where the backward keeps a chunk's block-entering states (``slab``): ``"global"``, a
per-program scratch slab in global memory (``C / BT`` states of ``[BK, BV]`` per program, all
programs at once), or ``"registers"``, a ``[C / BT, BK, BV]`` register tensor per program (no
memory, a few registers: compiled for sm_90 by Triton 3.9, the backward [8, 16, 4] on one warp
takes 241 registers instead of 232 (mamba1) and 255 instead of 249 (longhorn_diag) at 16
slots, no spills; 32 slots spill 48 bytes). Off-chip memory then no longer grows with ``C``,
so the register slab checkpoints less often by default: every ``BT · REG_SLOTS`` tokens (128)
unless ``chunk_size`` asks for more. ``slab_segments = S`` multiplies that by S with a
second register tensor of S segment-entering states and a second replay (16 slots × 8
segments, C = 1024: 248 / 255 registers, no spills; × 16 segments, C = 2048: 252 / 255, and
longhorn_diag spills 32 bytes). ``"grads"``: the states in the cells of the gradient buffers
the backward has not written yet (:mod:`.codegen`), on blocks of at least K tokens, one replay
of an interval of :data:`GRADS_C` tokens at no slab memory. ``OLSM_ELEMENTWISE_SLAB`` sets the
default slab.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple, Union

import torch

from olsm.errors import BackendError, InputError

from ..ints import cdiv, next_pow2, sm_count

#: register-tile elements per program: forward, backward (BT · BK · BV)
TILE_ELEMS = (2048, 512)

#: tile elements per thread the warp count aims at: forward, backward
ELEMS_PER_THREAD = (64, 16)

#: widest default value slice, forward and backward (narrow: more programs, smaller tiles)
MAX_BV = (8, 4)

#: token blocks stay within these bounds
MIN_BT, MAX_BT = 4, 64

#: forward programs per SM below which the forward's token block doubles (still one warp). With
#: few programs each warp's serial walk over its sequence sets the time, and a longer block
#: halves the walk's steps. H200 run 18, lean template, d_model 768 (E = 1536, N = 16), forward
#: ms of BT = 16 against 32 at BV = 8 (results/elementwise_sweep_h200_run18_*.md): B = 2,
#: T = 8192 (2.9 programs per SM) mamba1 0.551 -> 0.452, longhorn_diag 0.613 -> 0.539; B = 8,
#: T = 2048 (11.6 per SM) mamba1 0.237 -> 0.293, longhorn_diag 0.278 -> 0.332
FEW_PROGRAMS_PER_SM = 8

#: backward programs resident per SM (one warp each): the default backward tile takes 236-246
#: registers a thread on sm_90 with Triton 3.6 (results/kernel_resources_sm90_triton36.md), so 8
#: warps fill the 64 K register file. The automatic backward split (:func:`auto_backward_split`) counts waves of these.
BWD_PROGRAMS_PER_SM = 8

#: the automatic backward split's segments: powers of two up to this many, none shorter than
#: :data:`MIN_SPLIT_TOKENS`, and taken only when they cut the modelled time to
#: :data:`SPLIT_GAIN` or less of the unsplit walk's
MAX_AUTO_SPLIT, MIN_SPLIT_TOKENS, SPLIT_GAIN = 8, 1024, 0.8

#: tokens per block of the split's first pass (``bwd_carry_kernel``), which runs only at few
#: programs per SM; None: the backward's own block (``cfg.bwd.BT``). Compiled for sm_90 (Triton
#: 3.6, one warp, [BT, 16, 4]): BT 8 / 16 / 32 / 64 take 64 / 113 / 137 / 255 registers for
#: longhorn_diag (64 spills 152 B), 62 / 67 / 128 / 168 for mamba1 (64 spills 8 B). 32-token
#: blocks (4 times fewer dependent steps) were the default for H200 run 21's calls, where the one
#: row that splits (d_model 768, B = 2, T = 8192, four segments) took longhorn_diag's fwd+bwd from
#: 2.625 / 2.639 ms (runs 20 / 19, the backward's 8-token blocks) to 2.851 / 2.865, 1.07× its CUDA
#: peer, while mamba1's moved 2.141 -> 2.105 (the other rows, which do not split, got 0-3 %
#: faster): back to the backward's block until an A/B in one process; ``$OLSM_ELEMENTWISE_CARRY_BT``
#: sets it for that A/B.
CARRY_BT: Optional[int] = None

#: where the backward keeps the block-entering states of a chunk
SLABS = ("global", "registers", "grads")

#: the gradient-buffer slab (``slab="grads"``): the shortest checkpoint interval it takes. Its
#: slots cost no memory and no registers, so one interval can be long; a checkpoint every 2048
#: tokens costs 0.56 MiB at B = 2, T = 8192, E = 1536, N = 16 (mamba_ssm keeps one state per
#: 2048-token chunk too)
GRADS_C = 2048

#: default of ``slab`` (``$OLSM_ELEMENTWISE_SLAB`` overrides it): ``"auto"``, the gradient-buffer
#: slab where its backward compiles without heavy spills (decided per call by the launcher,
#: :mod:`.slab_choice`; H200 run 24: mamba1 yes, longhorn_diag no), else the register slab, which
#: is what :func:`choose_config` makes of it. The register slab (C = 128) took 0.99–1.01× the
#: global slab's fwd+bwd time for mamba1 and 1.02–1.04× for longhorn_diag on the H200 (run 10,
#: bf16, the paper shapes, ``benchmarks/results/elementwise_slab_h200.md``), with 8–10 % less
#: peak memory (mamba1 at D = 768, B = 8, T = 2048: 159.1 vs 177.1 MiB)
DEFAULT_SLAB = "auto"

#: register slab: default slots (backward blocks per checkpoint interval), and the most a
#: ``chunk_size`` can ask for without naming ``slab_slots`` (more spill registers)
REG_SLOTS, MAX_REG_SLOTS = 16, 32

Knob = Union[None, int, Sequence[Optional[int]]]


@dataclass(frozen=True)
class Tile:
    """Tile of one kernel.

    Attributes:
        BT: tokens per block (one scan).
        BV: value-slice width: one program per (sequence, head, slice).
        num_warps: warps per program.
        maxnreg: register cap per thread passed to the compiler (None: its own choice).
    """

    BT: int
    BV: int
    num_warps: int
    maxnreg: Optional[int] = None

    def launch_options(self) -> dict:
        """Keyword arguments of the kernel launch."""
        opts = {"num_warps": self.num_warps}
        if self.maxnreg:
            opts["maxnreg"] = self.maxnreg
        return opts


@dataclass(frozen=True)
class Config:
    """Launch shape of one call (all sizes powers of two).

    Attributes:
        BK: padded key dimension (the whole K sits in one tile).
        C: checkpoint interval in tokens, a multiple of both kernels' BT (with the register
            slab, ``bwd.BT`` times a power of two).
        fwd: forward kernel tile.
        bwd: backward kernel tile.
        slab: where the backward keeps a chunk's block-entering states, ``"global"`` or
            ``"registers"``.
        segments: register slab only: segments per checkpoint interval (a power of two);
            above 1 the backward first replays a chunk to keep each segment's entering state
            in registers, then does each segment as a chunk of ``C / segments`` tokens.
    """

    BK: int
    C: int
    fwd: Tile
    bwd: Tile
    slab: str = "global"
    segments: int = 1

    @property
    def slots(self) -> int:
        """Block-entering states the backward keeps per segment: ``C / (segments · bwd.BT)``."""
        return self.C // (self.segments * self.bwd.BT)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _pair(knob: Knob, name: str) -> Tuple[Optional[int], Optional[int]]:
    """An override given once for both kernels or as ``(forward, backward)``."""
    if knob is None or isinstance(knob, int):
        return knob, knob
    knob = tuple(knob)
    if len(knob) != 2:
        raise InputError(f"{name} must be an int or a (forward, backward) pair, got {knob!r}")
    return knob[0], knob[1]


def _is_pow2(x: int) -> bool:
    return x >= 1 and not x & (x - 1)


def _pow2(x: int, name: str) -> int:
    x = int(x)
    if not _is_pow2(x):
        raise BackendError(f"{name} must be a positive power of two, got {x}")
    return x


def _tile(T: int, BK: int, V: int, elems: int, per_thread: int, max_bv: int,
          BT: Optional[int], BV: Optional[int], warps: Optional[int], maxnreg: Optional[int] = None) -> Tile:
    """One kernel's tile: BV up to ``max_bv``, BT to fill ``elems``, warps to match."""
    if BV is None:
        BV = min(max_bv, next_pow2(V))
        # a wide key leaves room for few value columns (K = 256: BV = 1; BT = 8 forward, 4 backward)
        while BV > 1 and BK * BV * MIN_BT * 2 > elems:
            BV //= 2
    BV = _pow2(BV, "block_v")
    if BT is None:
        BT = max(MIN_BT, min(MAX_BT, elems // (BK * BV)))
        BT = min(BT, next_pow2(max(T, 1)))  # no longer than a sequence (decode: BT = 1)
    BT = _pow2(BT, "block_t")
    if warps is None:
        warps = max(1, min(16, BT * BK * BV // (32 * per_thread)))
    if maxnreg is not None and not (isinstance(maxnreg, int) and 0 < maxnreg <= 255):
        raise BackendError(f"max_registers must be an int in 1..255 (registers per thread), got {maxnreg!r}")
    return Tile(BT=BT, BV=BV, num_warps=_pow2(warps, "num_warps"), maxnreg=maxnreg)


def auto_backward_split(programs: int, T: int, sms: int) -> int:
    """Segments the backward's split along the sequence takes by default (1: none).

    The backward's programs (sequences × heads × value slices) each walk a whole sequence;
    with one warp and ~240 registers, :data:`BWD_PROGRAMS_PER_SM` of them fit an SM at once.
    Model the time as waves × walk length: ``ceil(P · S / slots) / S`` for S segments of P
    programs on ``slots = sms · BWD_PROGRAMS_PER_SM``. A split pays when it cuts that to
    :data:`SPLIT_GAIN` of the unsplit time (the carry pass and the fold cost the rest); the
    smallest S of the best cost wins. H200 run 19 (E = 1536 / 2048, N = 16,
    T = 8192, bf16; results/elementwise_h200_run19_split.md), backward segments 2 / 4 / 8 against
    none, fwd+bwd ms: at B = 2, d_model 768 (768 programs, cost 1 → 0.75 at S = 4) mamba1
    2.318 → 2.612 / 2.143 / 2.139 and longhorn_diag 2.953 → 3.166 / 2.624 / 2.619; at d_model
    1024 (1024 programs, cost 1 at every S) 2.432 → 2.822 / 2.645 / 2.664 and 3.068 → 3.300 /
    3.269 / 3.271; at B = 8, T = 2048 (3072+ programs) every split was slower.

    Args:
        programs: backward programs of the unsplit launch.
        T: tokens per sequence.
        sms: streaming multiprocessors.

    Returns:
        the number of segments, 1 for none.
    """
    slots = max(sms * BWD_PROGRAMS_PER_SM, 1)
    unsplit = cdiv(programs, slots)     # waves of whole walks
    best, best_cost = 1, float(unsplit)
    S = 2
    while S <= MAX_AUTO_SPLIT and T // S >= MIN_SPLIT_TOKENS:
        cost = cdiv(programs * S, slots) / S
        if cost < best_cost - 1e-9:
            best, best_cost = S, cost
        S *= 2
    return best if best_cost <= SPLIT_GAIN * unsplit else 1


def carry_block(cfg: Config) -> int:
    """Token block of ``bwd_carry_kernel``: ``$OLSM_ELEMENTWISE_CARRY_BT`` (a power of two) or
    :data:`CARRY_BT` (None: the backward's block), at most the largest power of two dividing the
    checkpoint interval C (so the blocks stay aligned with the segments, whole numbers of C).

    Raises:
        BackendError: an environment value that is not a positive power of two.
    """
    bt = _env_pow2("OLSM_ELEMENTWISE_CARRY_BT", "the backward's block") or CARRY_BT or cfg.bwd.BT
    return min(bt, cfg.C & -cfg.C)


def _env_pow2(name: str, default: str) -> Optional[int]:
    """The positive power of two in ``$name``, or None when it is unset or empty.

    Raises:
        BackendError: any other value; the message names ``default``, what unsetting it gives.
    """
    value = os.environ.get(name, "")
    if not value:
        return None
    if not value.isdigit() or not _is_pow2(int(value)):
        raise BackendError(f"{name}={value!r} is not a positive power of two; unset it for the default ({default})")
    return int(value)


def default_slab() -> str:
    """``$OLSM_ELEMENTWISE_SLAB`` if set, else :data:`DEFAULT_SLAB`."""
    return os.environ.get("OLSM_ELEMENTWISE_SLAB", "") or DEFAULT_SLAB


def default_slab_segments() -> Optional[int]:
    """``$OLSM_ELEMENTWISE_SLAB_SEGMENTS`` (a power of two) if set, else None (one segment).

    The way to the checkpoint-lean backward from code that does not call
    :func:`~.scan.elementwise_scan` itself (``Recurrence(..., backend="triton")``, the layers);
    register slab only (a call naming ``slab="global"`` ignores it; ``$OLSM_ELEMENTWISE_SLAB=global``
    beside it is an error):
    8 segments put one checkpoint every 1024 tokens instead of every 128, for a second forward
    replay in the backward. H200, run 20 (bf16, N = 16, ``results/elementwise_h200_run20_memory.md``),
    mamba1 fwd+bwd ms / peak MiB, default → 8 segments: d_model 768, B = 8, T = 2048 1.699 / 158.1
    → 1.958 / 147.6; d_model 768, B = 2, T = 8192 2.141 / 159.8 → 2.393 / 149.3 (mamba_ssm, run 19:
    2.113 / 148.6 and 2.226 / 148.6).

    Raises:
        BackendError: a value that is not a positive power of two.
    """
    return _env_pow2("OLSM_ELEMENTWISE_SLAB_SEGMENTS", "1: a checkpoint every 128 tokens")


def choose_config(T: int, K: int, V: int, chunk_size: int, device: torch.device,
                  block_t: Knob = None, block_v: Knob = None, num_warps: Knob = None,
                  max_registers: Knob = None, slab: Optional[str] = None,
                  slab_slots: Optional[int] = None, slab_segments: Optional[int] = None,
                  sequences_heads: Optional[int] = None, sms: Optional[int] = None) -> Config:
    """Pick the tile shapes and the checkpoint interval.

    Args:
        K, V: key and value dimensions.
        T: tokens per sequence (an upper bound: the packed length with cu_seqlens).
        chunk_size: requested tokens between checkpoints; rounded up to a multiple of the
            larger of the two BT (checkpoints cost ``T / C`` states of ``[K, V]`` float32
            per sequence and head).
        device: where the kernels run (CPU interpreter: small tiles).
        block_t, block_v, num_warps: overrides, each an int for both kernels or a
            ``(forward, backward)`` pair whose ``None`` entries keep the heuristic.
        max_registers: per-thread register cap (CUDA only), int or pair; None: no cap.
        slab: ``"global"``, ``"registers"``, ``"grads"`` or ``"auto"`` (the register slab here;
            None: :func:`default_slab`). The
            gradient slab takes backward blocks of at least ``BK`` tokens and checkpoints every
            ``max(chunk_size, GRADS_C)`` tokens (at most the sequence, a multiple of both
            blocks), or ``bwd.BT · slab_slots``.
        slab_slots: register slab only: the backward blocks per checkpoint interval, a power
            of two (``C = bwd.BT · slab_slots``); None: enough for ``chunk_size`` and at least
            :data:`REG_SLOTS`, at most :data:`MAX_REG_SLOTS`. Never more than the sequence
            needs, never a C shorter than the forward's block.
        slab_segments: register slab only: segments of ``bwd.BT · slots`` tokens per
            checkpoint interval, a power of two (None: :func:`default_slab_segments`, unset
            1): ``C = bwd.BT · slots · segments``,
            at the price of a second forward replay in the backward. Never more than the
            sequence needs.
        sequences_heads: sequences × heads of the call (None: unknown). When the forward
            would run fewer than :data:`FEW_PROGRAMS_PER_SM` programs per SM, its default
            token block doubles on the same one warp (the backward's tile does not change: on
            the H200 its default was the best at both B = 8 and B = 2).
        sms: the GPU's SM count (None: asked of ``device``).

    Returns:
        The :class:`Config`.

    Raises:
        BackendError: an override that is not a power of two, or a register cap outside 1..255.
        InputError: a non-positive chunk size, an unknown slab, segments with the global slab.
    """
    if int(chunk_size) < 1:
        raise InputError(f"chunk_size must be positive, got {chunk_size}")
    BK = next_pow2(K)
    bt, bv, nw = _pair(block_t, "block_t"), _pair(block_v, "block_v"), _pair(num_warps, "num_warps")
    mr = _pair(max_registers, "max_registers")
    if device.type != "cuda" or interpreting():
        # the interpreter's scan runs element by element in Python: small tiles; blocks of
        # 8 tokens forward, 4 backward, so the default chunk replays several blocks
        short = next_pow2(max(T, 1))
        bv_cpu = min(8, next_pow2(V))
        fwd = _tile(T, BK, V, 0, 32, 8, bt[0] or min(8, short), bv[0] or bv_cpu, nw[0] or 1)
        bwd = _tile(T, BK, V, 0, 16, 8, bt[1] or min(4, short), bv[1] or bv_cpu, nw[1] or 1)
    else:
        fwd = _tile(T, BK, V, TILE_ELEMS[0], ELEMS_PER_THREAD[0], MAX_BV[0], bt[0], bv[0], nw[0], mr[0])
        if bt[0] is None and sequences_heads is not None and fwd.BT < min(MAX_BT, next_pow2(max(T, 1))):
            sms = sm_count(device) if sms is None else sms
            if sequences_heads * cdiv(V, fwd.BV) < FEW_PROGRAMS_PER_SM * sms:
                fwd = replace(fwd, BT=fwd.BT * 2)
        bwd = _tile(T, BK, V, TILE_ELEMS[1], ELEMS_PER_THREAD[1], MAX_BV[1], bt[1], bv[1], nw[1], mr[1])
    step = max(fwd.BT, bwd.BT)
    C = -(-int(chunk_size) // step) * step
    slab_named = slab is not None
    slab = default_slab() if slab is None else slab
    if slab not in SLABS + ("auto",):
        raise InputError(f"slab must be one of {SLABS + ('auto',)}, got {slab!r}")
    if slab == "auto":
        slab = "registers"  # the launcher (scan.elementwise_scan) asks for "grads" where it pays
    segments = 1
    from_env = slab_segments is None
    if from_env and not (slab_named and slab != "registers"):
        # the environment's segments are a default for the register slab: a call that names
        # another slab keeps it; another slab from the environment too is a conflict (below)
        slab_segments = default_slab_segments()
    if slab != "registers" and slab_segments not in (None, 1):
        where = "$OLSM_ELEMENTWISE_SLAB_SEGMENTS" if from_env else "slab_segments"
        raise InputError(f"{where}={slab_segments} needs slab='registers', not slab={slab!r}")
    if slab == "grads":
        # row k of a block-entering state goes to token k of its block: blocks of at least BK tokens
        if bt[1] is not None and bt[1] < BK:
            raise BackendError(f"slab='grads' needs the backward's block_t >= {BK} (the padded key "
                               f"dimension), got {bt[1]}")
        bwd = replace(bwd, BT=max(bwd.BT, BK))
        step = max(fwd.BT, bwd.BT)
        if slab_slots is not None:
            C = bwd.BT * _pow2(slab_slots, "slab_slots")
        else:
            C = max(int(chunk_size), GRADS_C)
            C = min(C, next_pow2(max(T, 1)))  # one interval covers the sequence
        C = -(-C // step) * step
    if slab == "registers":
        if slab_slots is not None:
            slots = _pow2(slab_slots, "slab_slots")
        else:
            slots = min(MAX_REG_SLOTS, max(REG_SLOTS, next_pow2(-(-C // bwd.BT))))
        slots = min(slots, next_pow2(-(-max(T, 1) // bwd.BT)))  # one chunk covers the sequence
        slots = max(slots, step // bwd.BT)  # a multiple of the forward's block
        if slab_segments is not None:
            segments = _pow2(slab_segments, "slab_segments")
            segments = min(segments, next_pow2(-(-max(T, 1) // (bwd.BT * slots))))
        C = bwd.BT * slots * segments
    return Config(BK=BK, C=C, fwd=fwd, bwd=bwd, slab=slab, segments=segments)
