"""Which slab the backward takes by default (``slab="auto"``): the gradient-buffer slab where its
kernel compiles without heavy spills, else the register slab.

The gradient-buffer slab (``"grads"``, :mod:`.codegen`) replays each checkpoint interval once
and costs no memory, so it checkpoints every 2048 tokens instead of every 128; but its backward
block is K tokens (16 at d_state 16) instead of 8, twice the tile per thread. Whether that tile
fits the register file depends on the recurrence's printed derivatives, which only the compiler
knows. So the first call that needs a backward compiles the gradient-slab kernel it would launch
(:func:`olsm.kernels.aot.compile_for`, for this GPU's architecture; Triton's disk cache keeps it)
and reads how many bytes a thread spills.

H200, Triton 3.6, bf16, N = 16 (run 24, ``benchmarks/results/elementwise_h200_run24_grads_slab.log``):
mamba1's gradient-slab backward spills 192 bytes and its fwd+bwd takes 1.00–1.07× the register
slab's time at 0.93× its peak memory (0.95× / 0.99× mamba_ssm's at d_model 768, B = 2,
T = 8192, where the register slab is 0.95× / 1.07×); longhorn_diag's spills 624 bytes and takes
1.31–1.37×, so it keeps the register slab.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Dict, Tuple

import torch

#: most spilled bytes per thread at which ``slab="auto"`` takes the gradient-buffer slab
GRADS_MAX_SPILL = 256

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def choose_slab(requested: str, *, need_grad: bool, compiled: bool, cells: bool, pinned: bool,
                spills: Callable[[], int]) -> str:
    """The slab a call takes.

    Args:
        requested: a slab (``"global"``, ``"registers"``, ``"grads"``: taken as it is) or ``"auto"``.
        need_grad: whether the call records a backward (no backward: no slab to choose).
        compiled: kernels compiled for a GPU (the interpreter reports no spills: registers).
        cells: whether the gradient buffers have room for a float32 state
            (:func:`~.scan.grads_slab_cells`).
        pinned: the call or the environment pinned something only the register slab takes
            (slots, segments, a backward block shorter than the key).
        spills: bytes a thread of the gradient-slab backward spills (compiles it; called last).

    Returns:
        the slab.
    """
    if requested != "auto":
        return requested
    if not (need_grad and compiled and cells) or pinned:
        return "registers"
    try:
        spilled = spills()
    except Exception as e:  # noqa: BLE001 - any compiler or tool failure: the slab that needs no probe
        warnings.warn(f"slab='auto' could not compile the gradient-slab backward to read its spills "
                      f"({type(e).__name__}: {e}); using the register slab. Pass slab='grads' or "
                      "slab='registers' to choose without the probe.", RuntimeWarning, stacklevel=3)
        return "registers"
    return "grads" if spilled <= GRADS_MAX_SPILL else "registers"


def backward_spills(mod, constexprs: Dict[str, object], types: Dict[str, str], num_warps: int,
                    device: torch.device) -> int:
    """Spill bytes per thread of ``mod.bwd_kernel`` compiled with ``constexprs`` and ``types``
    (parameter name -> Triton type; unnamed ones are float32 pointers) for ``device``'s
    architecture; memoised per process."""
    major, minor = torch.cuda.get_device_capability(device)
    return _spills(mod, tuple(sorted(constexprs.items())), tuple(sorted(types.items())), num_warps,
                   10 * major + minor)


@functools.lru_cache(maxsize=64)
def _spills(mod, constexprs: Tuple, types: Tuple, num_warps: int, arch: int) -> int:
    from olsm.kernels.aot import compile_for

    return compile_for(mod.bwd_kernel, dict(constexprs), dict(types), arch=arch, num_warps=num_warps,
                       num_stages=1)["stack"]


def pointer_type(dtype: torch.dtype) -> str:
    """Triton's pointer type for a tensor of ``dtype``."""
    return _PTR[dtype]
