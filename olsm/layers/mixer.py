"""``olsm.Mixer``: a multi-head sequence-mixing layer generated from an objective.

    x ─┬─ q_proj ─ conv ─ (L2) ─┐
       ├─ k_proj ─ conv ─ (L2) ─┼─ recurrence(objective) ─ RMSNorm(·) ⊙ SiLU(g) ─ o_proj ─ y
       ├─ v_proj ─ conv ────────┤
       ├─ coefficient heads ────┘   (one per input the objective declares; see coefficients.py)
       └─ g_proj (output gate)

The layout follows FLA's GatedDeltaNet / GLA layers; what differs between mixers is only the
objective, hence the recurrence and its coefficient heads.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..errors import InputError
from .coefficients import Coefficients
from .common import check_x, is_implicit, needs_key_norm, resolve
from .conv import ShortConvolution
from .norm import RMSNorm
from .padding import run_masked
from .run import run_recurrence, step_recurrence
from .state import MixerState


class Mixer(nn.Module):
    """A sequence mixer whose memory solves ``objective`` at every token.

    Args:
        objective: an :class:`olsm.Objective`, a catalogue name (``"longhorn"``), ``FILE.py:NAME``
            or an already derived :class:`olsm.Recurrence`.
        d_model: model width ``D``.
        num_heads: heads ``H``; ``D * expand_k`` and ``D * expand_v`` must divide by it.
        expand_k, expand_v: key and value widths relative to ``D`` (K = D·expand_k / H).
        conv_size: short-conv width on q, k, v (0 turns the convs off).
        qk_norm: L2-normalise q and k (None: on for delta/Longhorn-type objectives).
        output_gate: ``RMSNorm(o) ⊙ SiLU(g_proj(x))`` instead of ``RMSNorm(o)``.
        activation: per-input parameterisation overrides, e.g. ``{"beta": "softplus"}``.
        backend: recurrence backend (``auto``: Triton on CUDA with torch fallback, torch on CPU).
        chunk_size: chunk length of chunked backends.
        check_inputs: let the recurrence check coefficient values (costs a sync per call).
        layer_idx: position in a stack (for caches and logging).
    """

    def __init__(self, objective, d_model: int, num_heads: int = 4, *, expand_k: float = 1.0,
                 expand_v: float = 1.0, conv_size: int = 4, qk_norm: Optional[bool] = None,
                 output_gate: bool = True, activation: Optional[Dict[str, str]] = None,
                 backend: str = "auto", chunk_size: int = 64, check_inputs: bool = False,
                 layer_idx: Optional[int] = None):
        super().__init__()
        self.rec = resolve(objective)
        key_dim, value_dim = int(d_model * expand_k), int(d_model * expand_v)
        if num_heads <= 0 or key_dim % num_heads or value_dim % num_heads:
            raise InputError(f"d_model * expand_k = {key_dim} and d_model * expand_v = {value_dim} must be "
                             f"divisible by num_heads = {num_heads}")
        self.d_model, self.num_heads = d_model, num_heads
        self.head_k, self.head_v = key_dim // num_heads, value_dim // num_heads
        self.qk_norm = needs_key_norm(self.rec) if qk_norm is None else qk_norm
        self.backend, self.chunk_size, self.check_inputs = backend, chunk_size, check_inputs
        self.layer_idx = layer_idx

        self.q_proj = nn.Linear(d_model, key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, value_dim, bias=False)
        self.convs = nn.ModuleList([ShortConvolution(c, conv_size) for c in (key_dim, key_dim, value_dim)]
                                   if conv_size > 0 else [])
        self.coefs = Coefficients(self.rec.inputs, d_model, num_heads, {"K": self.head_k, "V": self.head_v},
                                  activation=activation, implicit=is_implicit(self.rec))
        self.g_proj = nn.Linear(d_model, value_dim, bias=False) if output_gate else None
        self.o_norm = RMSNorm(self.head_v)
        self.o_proj = nn.Linear(value_dim, d_model, bias=False)

    # ------------------------------------------------------------------ full sequences
    def forward(self, x: torch.Tensor, cache: Optional[MixerState] = None, cu_seqlens: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, use_cache: bool = False):
        """Mix a sequence, optionally continuing from ``cache``.

        Args:
            x: ``[B, T, D]`` (``[1, total, D]`` with cu_seqlens).
            cache: state after earlier tokens (``[B, ...]``; ``[N, ...]`` with cu_seqlens).
            cu_seqlens: ``[N + 1]`` boundaries of sequences packed into one row.
            attention_mask: ``[B, T]``, 1 for real tokens and 0 for padding (any position).
            use_cache: also return the state after the last (real) token.

        Returns:
            ``y [B, T, D]`` (zeros at padding), or ``(y, MixerState)`` when ``cache`` is given or
            ``use_cache`` is set.
        """
        check_x(x, self.d_model)
        want_state = use_cache or cache is not None
        y, state = run_masked(self._sequence, x, cache, cu_seqlens, attention_mask, want_state)
        return (y, state) if want_state else y

    def _sequence(self, x, cache, cu_seqlens, want_state):
        conv_in = cache.conv if cache is not None and cache.conv else (None,) * len(self.convs)
        feats, conv_out = [], []
        for proj, i in ((self.q_proj, 0), (self.k_proj, 1), (self.v_proj, 2)):
            h = proj(x)
            if self.convs:
                h, c = self.convs[i](h, conv_in[i], cu_seqlens)
                conv_out.append(c)
            feats.append(h)
        q, k = (rearrange(t, "b t (h d) -> b t h d", h=self.num_heads) for t in feats[:2])
        v = rearrange(feats[2], "b t (h d) -> b t h d", h=self.num_heads)
        if self.qk_norm:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        o, S = run_recurrence(self.rec, q, k, v, self.coefs(x), backend=self.backend,
                              initial_state=None if cache is None else cache.recurrent,
                              output_final_state=want_state, cu_seqlens=cu_seqlens,
                              chunk_size=self.chunk_size, check_inputs=self.check_inputs)
        y = self._output(o.to(x.dtype), x)
        return y, (MixerState(tuple(conv_out), S) if want_state else None)

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``o [..., H, V]`` -> ``[..., D]``: per-head RMSNorm, output gate, projection."""
        g = None if self.g_proj is None else self.g_proj(x).unflatten(-1, (self.num_heads, self.head_v))
        return self.o_proj(self.o_norm(o, gate=g).flatten(-2))

    # ------------------------------------------------------------------ decoding
    def step(self, x: torch.Tensor, cache: Optional[MixerState] = None):
        """Decode one token.

        Args:
            x: ``[B, D]``.
            cache: the state after the previous tokens (None: start of the sequence).

        Returns:
            ``(y [B, D], new MixerState)``; equal to the full forward's output at that token.
        """
        if not torch.is_tensor(x) or x.dim() != 2 or x.shape[-1] != self.d_model:
            raise InputError(f"step takes one token x [B, d_model={self.d_model}], got "
                             f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        conv_in = cache.conv if cache is not None and cache.conv else (None,) * len(self.convs)
        feats, conv_out = [], []
        for proj, i in ((self.q_proj, 0), (self.k_proj, 1), (self.v_proj, 2)):
            h = proj(x)
            if self.convs:
                h, c = self.convs[i].step(h, conv_in[i])
                conv_out.append(c)
            feats.append(h)
        q, k = (t.unflatten(-1, (self.num_heads, self.head_k)) for t in feats[:2])
        v = feats[2].unflatten(-1, (self.num_heads, self.head_v))
        if self.qk_norm:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        o, S = step_recurrence(self.rec, q, k, v, None if cache is None else cache.recurrent, self.coefs(x))
        return self._output(o.to(x.dtype), x), MixerState(tuple(conv_out), S)

    def extra_repr(self) -> str:
        return (f"objective={self.rec.name}, d_model={self.d_model}, heads={self.num_heads}, "
                f"K={self.head_k}, V={self.head_v}, qk_norm={self.qk_norm}, backend={self.backend}")
