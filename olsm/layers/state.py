"""What a layer carries between calls when decoding: conv windows and the recurrent state."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch


@dataclass
class MixerState:
    """One layer's decoding state.

    Attributes:
        conv: the short convolutions' last inputs, one ``[B, W - 1, C]`` per conv (q, k, v or x).
        recurrent: the memory ``S`` ``[B, H, K, V]`` (None before the first token).
    """

    conv: Tuple[Optional[torch.Tensor], ...] = ()
    recurrent: Optional[torch.Tensor] = None

    def select(self, index: torch.Tensor) -> "MixerState":
        """Keep (or reorder) batch rows, e.g. for beam search."""
        conv = tuple(None if c is None else c.index_select(0, index) for c in self.conv)
        rec = None if self.recurrent is None else self.recurrent.index_select(0, index)
        return MixerState(conv, rec)


@dataclass
class LMCache:
    """A language model's decoding state: one :class:`MixerState` per layer.

    Attributes:
        layers: per-layer states (empty before the first forward).
        seen_tokens: tokens consumed so far (per row when the rows are aligned).
    """

    layers: List[Optional[MixerState]] = field(default_factory=list)
    seen_tokens: int = 0

    def select(self, index: torch.Tensor) -> "LMCache":
        """Keep (or reorder) batch rows."""
        return LMCache([None if s is None else s.select(index) for s in self.layers], self.seen_tokens)
