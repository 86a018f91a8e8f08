"""Short causal depthwise convolution with a decoding state (H3 / Mamba / FLA style).

The state holds the last ``W - 1`` inputs of each sequence, so a sequence can be processed in
pieces (prefill, then token by token) with exactly the outputs of one full pass.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class ShortConvolution(nn.Module):
    """Causal depthwise conv over time, width ``W``, optional SiLU.

    Args:
        channels: number of channels ``C``.
        width: kernel width ``W`` (4 in Mamba, Longhorn, FLA).
        activation: apply SiLU after the conv (as Mamba does on x).
        bias: learn a bias per channel.
    """

    def __init__(self, channels: int, width: int = 4, activation: bool = True, bias: bool = False):
        super().__init__()
        self.channels, self.width, self.activation = channels, width, activation
        self.weight = nn.Parameter(torch.empty(channels, 1, width))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        # PyTorch's Conv1d default (kaiming uniform, fan_in = width)
        bound = 1 / math.sqrt(width)
        nn.init.uniform_(self.weight, -bound, bound)

    def zero_state(self, n: int, device, dtype) -> torch.Tensor:
        """An empty state ``[n, W - 1, C]``."""
        return torch.zeros(n, self.width - 1, self.channels, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, state: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Convolve a sequence (or packed sequences), continuing from ``state``.

        Args:
            x: ``[B, T, C]`` (``[1, T, C]`` when packed).
            state: ``[B, W - 1, C]`` (``[N, W - 1, C]`` when packed) or None (zeros).
            cu_seqlens: ``[N + 1]`` boundaries of packed sequences; none mixes with another.

        Returns:
            ``(y [B, T, C], new state [B or N, W - 1, C])``.
        """
        if cu_seqlens is not None:
            return self._packed(x, state, cu_seqlens)
        if state is None:
            state = self.zero_state(x.shape[0], x.device, x.dtype)
        xp = torch.cat([state.to(x.dtype), x], dim=1)  # [B, W - 1 + T, C]
        y = self._conv(xp)
        return y, xp[:, xp.shape[1] - (self.width - 1):]

    def _conv(self, xp: torch.Tensor) -> torch.Tensor:
        """Valid (unpadded) conv of ``[B, L, C]``: ``L - W + 1`` outputs.

        A sum of ``W`` shifted products rather than ``F.conv1d``: as fast for W = 4, the same
        arithmetic for one token and for many (decoding matches exactly), and free of
        conv1d's slow float64 CPU path.
        """
        L = xp.shape[1] - self.width + 1
        w = self.weight[:, 0].to(xp.dtype)  # [C, W]
        y = xp[:, :L] * w[:, 0]
        for i in range(1, self.width):
            y = y + xp[:, i:i + L] * w[:, i]
        if self.bias is not None:
            y = y + self.bias.to(xp.dtype)
        return F.silu(y) if self.activation else y

    def _packed(self, x, state, cu_seqlens):
        # Lay the sequences out as [state_0, x_0, state_1, x_1, ...]: every real token's window
        # then lies inside its own block, so one valid conv over the whole row is exact.
        W1 = self.width - 1
        n = cu_seqlens.numel() - 1
        T = x.shape[1]
        if state is None:
            state = self.zero_state(n, x.device, x.dtype)
        seq = torch.repeat_interleave(torch.arange(n, device=x.device), cu_seqlens.diff().long(),
                                      output_size=T)
        pos_x = torch.arange(T, device=x.device) + (seq + 1) * W1            # where x_t goes
        starts = cu_seqlens[:-1].long() + torch.arange(n, device=x.device) * W1
        pos_s = (starts[:, None] + torch.arange(W1, device=x.device)).reshape(-1)  # where states go
        ext = x.new_zeros(1, T + n * W1, x.shape[2])
        ext[0, pos_x] = x[0]
        ext[0, pos_s] = state.to(x.dtype).reshape(n * W1, -1)
        y = self._conv(ext)                       # output i covers ext[i : i + W]
        y = y[:, pos_x - W1]
        ends = cu_seqlens[1:].long() + torch.arange(1, n + 1, device=x.device) * W1
        last = (ends[:, None] - W1 + torch.arange(W1, device=x.device)).reshape(-1)
        return y, ext[0, last].reshape(n, W1, -1)

    def step(self, x: torch.Tensor, state: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """One token.

        Args:
            x: ``[B, C]``; state: ``[B, W - 1, C]`` or None.

        Returns:
            ``(y [B, C], new state)``.
        """
        y, state = self.forward(x[:, None], state)
        return y[:, 0], state
