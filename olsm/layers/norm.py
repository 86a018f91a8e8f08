"""RMSNorm and the gated RMSNorm used on a mixer's output (Mamba-2, FLA's FusedRMSNormGated)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last axis (Zhang & Sennrich 2019).

    Args:
        dim: size of the last axis.
        eps: added to the mean square.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.weight._no_weight_decay = True

    def forward(self, x: torch.Tensor, gate: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Normalise ``x [..., dim]``; with ``gate`` (same shape) return ``norm(x) * SiLU(gate)``."""
        dtype = x.dtype
        # accumulate in float32 at least (bf16 mean squares lose the small channels)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(xf.dtype)
        if gate is not None:
            y = y * F.silu(gate.to(y.dtype))
        return y.to(dtype)
