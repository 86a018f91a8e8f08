"""The Longhorn paper's block (arXiv 2407.14207, from its code): Mamba-1's block, scan replaced.

    h ─ in_proj ─┬─ x ─ conv(4) ─ SiLU ─┬─ x_proj ─ [dt (R) | k (N) | q (N)]
                 │                      │              │
                 │                      │      β = sigmoid(dt_proj(dt) + bias)   (per channel, E)
                 │                      └─ v = x ─ recurrence(k, v, q, β) + D ⊙ x = y
                 └─ z ─────────────────────────────────────── y ⊙ SiLU(z) ─ out_proj ─ out

with E = 2D, N = 16, R = ceil(D / 16), one head with K = N and V = E. The recurrence is
``longhorn_diag`` by default but any objective fits: per-channel (V) inputs come from the
low-rank ``dt`` features (``mamba1``'s Δ = softplus(dt_proj(dt) + dt_bias) gives Mamba-1's
block, with its A from ``FixedCoefficient``), other per-token inputs from ``x``.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .coefficients import FixedCoefficient, TokenCoefficient
from .common import check_x, needs_key_norm, resolve
from .conv import ShortConvolution
from .padding import run_masked
from .run import run_recurrence, step_recurrence
from .state import MixerState
from ..errors import InputError


class LonghornBlock(nn.Module):
    """Longhorn's (Mamba-style) mixer block for any objective.

    Args:
        objective: default ``"longhorn_diag"`` (the paper); ``"mamba1"`` gives Mamba-1's block.
        d_model: ``D``.
        d_state: ``N`` (key size of the single head).
        expand: ``E = expand * D`` (value size).
        dt_rank: ``R`` (None: ``ceil(D / 16)``).
        conv_size: width of the causal conv on x.
        qk_norm: L2-normalise q, k (None: only for matrix-class objectives whose transition
            depends on k, e.g. DeltaNet; the diagonal Longhorn gate is stable for any k).
        activation: per-input parameterisation overrides.
        backend, chunk_size, check_inputs: as for :class:`olsm.Mixer`.
    """

    def __init__(self, objective="longhorn_diag", d_model: int = 256, *, d_state: int = 16, expand: int = 2,
                 dt_rank: Optional[int] = None, conv_size: int = 4, qk_norm: Optional[bool] = None,
                 activation: Optional[Dict[str, str]] = None, backend: str = "auto", chunk_size: int = 64,
                 check_inputs: bool = False, layer_idx: Optional[int] = None):
        super().__init__()
        if d_model <= 0 or d_state <= 0 or expand <= 0:
            raise InputError(f"d_model, d_state and expand must be positive, got {d_model}, {d_state}, {expand}")
        self.rec = resolve(objective)
        self.d_model, self.d_state = d_model, d_state
        self.d_inner = E = expand * d_model
        self.dt_rank = R = dt_rank or math.ceil(d_model / 16)
        self.qk_norm = (needs_key_norm(self.rec) and self.rec.kind == "matrix") if qk_norm is None else qk_norm
        self.backend, self.chunk_size, self.check_inputs = backend, chunk_size, check_inputs
        self.layer_idx = layer_idx

        self.in_proj = nn.Linear(d_model, 2 * E, bias=False)
        self.conv = ShortConvolution(E, conv_size, activation=True, bias=True)
        self.x_proj = nn.Linear(E, R + 2 * d_state, bias=False)
        dims = {"K": d_state, "V": E}
        activation = dict(activation or {})
        self.token = nn.ModuleDict()
        self.fixed = nn.ModuleDict()
        for s in self.rec.inputs:
            if not s.per_token:
                self.fixed[s.name] = FixedCoefficient(s, 1, dims)
            elif s.axes == ("V",):  # the paper's dt_proj: R -> E, bias with Mamba's Δ init
                self.token[s.name] = TokenCoefficient(s, R, 1, dims, activation.get(s.name), rank=0, bias_init="dt")
            else:
                self.token[s.name] = TokenCoefficient(s, E, 1, dims, activation.get(s.name))
        self.D = nn.Parameter(torch.ones(E))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(E, d_model, bias=False)

    def _coefs(self, x: torch.Tensor, dt: torch.Tensor) -> dict:
        out = {n: m(dt if m.spec.axes == ("V",) else x) for n, m in self.token.items()}
        out.update({n: m() for n, m in self.fixed.items()})
        return out

    def _split(self, x: torch.Tensor):
        dt, k, q = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        q, k = q.unsqueeze(-2), k.unsqueeze(-2)  # one head
        if self.qk_norm:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        return dt, k, q

    def forward(self, h: torch.Tensor, cache: Optional[MixerState] = None, cu_seqlens: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, use_cache: bool = False):
        """Same contract as :meth:`olsm.Mixer.forward`: ``h [B, T, D]`` -> ``y`` or ``(y, MixerState)``."""
        check_x(h, self.d_model, "h")
        want_state = use_cache or cache is not None
        y, state = run_masked(self._sequence, h, cache, cu_seqlens, attention_mask, want_state)
        return (y, state) if want_state else y

    def _sequence(self, h, cache, cu_seqlens, want_state):
        x, z = self.in_proj(h).chunk(2, dim=-1)
        x, conv_state = self.conv(x, cache.conv[0] if cache is not None and cache.conv else None, cu_seqlens)
        dt, k, q = self._split(x)
        # the paper's readout y = S q has no 1/sqrt(N) scale
        o, S = run_recurrence(self.rec, q, k, x.unsqueeze(-2), self._coefs(x, dt), backend=self.backend, scale=1.0,
                              initial_state=None if cache is None else cache.recurrent,
                              output_final_state=want_state, cu_seqlens=cu_seqlens, chunk_size=self.chunk_size,
                              check_inputs=self.check_inputs)
        y = self._output(o[..., 0, :].to(x.dtype), x, z)
        return y, (MixerState((conv_state,), S) if want_state else None)

    def _output(self, y, x, z):
        return self.out_proj((y + self.D.to(x.dtype) * x) * F.silu(z))

    def step(self, h: torch.Tensor, cache: Optional[MixerState] = None):
        """Decode one token: ``h [B, D]`` -> ``(y [B, D], MixerState)``."""
        if not torch.is_tensor(h) or h.dim() != 2 or h.shape[-1] != self.d_model:
            raise InputError(f"step takes one token h [B, d_model={self.d_model}]")
        x, z = self.in_proj(h).chunk(2, dim=-1)
        x, conv_state = self.conv.step(x, cache.conv[0] if cache is not None and cache.conv else None)
        dt, k, q = self._split(x)
        o, S = step_recurrence(self.rec, q, k, x.unsqueeze(-2), None if cache is None else cache.recurrent,
                               self._coefs(x, dt), scale=1.0)
        return self._output(o[..., 0, :].to(x.dtype), x, z), MixerState((conv_state,), S)

    def extra_repr(self) -> str:
        return (f"objective={self.rec.name}, d_model={self.d_model}, E={self.d_inner}, N={self.d_state}, "
                f"R={self.dt_rank}, backend={self.backend}")
