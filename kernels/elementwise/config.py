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
Every knob can be overridden per call.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

from olsm.errors import BackendError, InputError

#: register-tile elements per program: forward, backward (BT · BK · BV)
TILE_ELEMS = (2048, 512)

#: tile elements per thread the warp count aims at: forward, backward
ELEMS_PER_THREAD = (64, 16)

#: widest default value slice, forward and backward (narrow: more programs, smaller tiles)
MAX_BV = (8, 4)

#: token blocks stay within these bounds
MIN_BT, MAX_BT = 4, 64

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
        C: checkpoint interval in tokens, a multiple of both kernels' BT.
        fwd: forward kernel tile.
        bwd: backward kernel tile.
    """

    BK: int
    C: int
    fwd: Tile
    bwd: Tile


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


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


def _pow2(x: int, name: str) -> int:
    x = int(x)
    if x < 1 or x & (x - 1):
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


def choose_config(T: int, K: int, V: int, chunk_size: int, device: torch.device,
                  block_t: Knob = None, block_v: Knob = None, num_warps: Knob = None,
                  max_registers: Knob = None) -> Config:
    """Pick the tile shapes and the checkpoint interval.

    Args:
        K, V: key and value dimensions (the tiles do not depend on the number of sequences
            or heads: on the H200 one default was within 3 % of the best tiles at both B = 8
            and B = 2).
        T: tokens per sequence (an upper bound: the packed length with cu_seqlens).
        chunk_size: requested tokens between checkpoints; rounded up to a multiple of the
            larger of the two BT (checkpoints cost ``T / C`` states of ``[K, V]`` float32
            per sequence and head).
        device: where the kernels run (CPU interpreter: small tiles).
        block_t, block_v, num_warps: overrides, each an int for both kernels or a
            ``(forward, backward)`` pair whose ``None`` entries keep the heuristic.
        max_registers: per-thread register cap (CUDA only), int or pair; None: no cap.

    Returns:
        The :class:`Config`.

    Raises:
        BackendError: an override that is not a power of two, or a register cap outside 1..255.
        InputError: a non-positive chunk size.
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
        bwd = _tile(T, BK, V, TILE_ELEMS[1], ELEMS_PER_THREAD[1], MAX_BV[1], bt[1], bv[1], nw[1], mr[1])
    step = max(fwd.BT, bwd.BT)
    C = -(-int(chunk_size) // step) * step
    return Config(BK=BK, C=C, fwd=fwd, bwd=bwd)
