"""SwiGLU feed-forward (Shazeer 2020), as in LLaMA."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """``down(SiLU(gate(x)) ⊙ up(x))``.

    Args:
        d_model: ``D``.
        ratio: hidden size is ``2/3 · ratio · D`` rounded up to a multiple of 16 (same
            parameter count as a GELU MLP of width ``ratio · D``).
    """

    def __init__(self, d_model: int, ratio: float = 4.0):
        super().__init__()
        hidden = 16 * -(-int(2 * ratio * d_model / 3) // 16)
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``[..., D]``. Returns: ``[..., D]``."""
        return self.down(F.silu(self.gate(x)) * self.up(x))
