"""Turn an objective's declared inputs into learned projections with a sensible parameterisation.

The rule is read off each :class:`~olsm.spec.InputSpec` (constraint, axes, per-token or fixed):

=====================================  ======================================================
input                                  parameterisation (and where it comes from)
=====================================  ======================================================
positive per-token, named ``dt*``      ``softplus(W h + dt_bias)``, dt_bias = softplus⁻¹(Δ),
                                       Δ log-uniform in [1e-3, 1e-1] (Mamba)
positive / nonnegative per-token,      ``sigmoid(W h + b)`` (DeltaNet's β: an explicit step
explicit update                        is stable only for β‖k‖² ≤ 2)
positive / nonnegative per-token,      ``softplus(W h + b)``: an implicit update is stable for
implicit update                        any β > 0 (ε = β/(1 + β‖k‖²) < 1/‖k‖²), and an
                                       unbounded β lets it overwrite a key fully (ε‖k‖² → 1)
nonpositive / negative, per head       ``−exp(A_log) · softplus(W h + dt_bias)``,
                                       A_log = log U(1, 16) (Mamba-2, Gated DeltaNet)
nonpositive / negative, per K or V     ``logsigmoid(W₂ W₁ h + b) / 16``, rank 16 (GLA)
unconstrained per-token                ``W h + b``
nonpositive param ``[H]``              fixed ``log(1 − 2^(−5−h))`` (RetNet's γ), a buffer
negative / nonpositive param           ``−exp(A_log)``, S4D-real init A_log[.., n] = log(n + 1)
                                       along K (Mamba-1), else log U(1, 16)
positive / nonnegative param           ``exp(log_p)``, init 1
unconstrained param                    zeros
=====================================  ======================================================

``activation={"beta": "softplus"}`` overrides the per-token rule of one input
(one of ``sigmoid``, ``softplus``, ``dt_softplus``, ``mamba2_decay``, ``logsigmoid``, ``linear``).
Per-channel (K or V) inputs go through a low-rank bottleneck, as Mamba's Δ and GLA's gates do.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..spec import InputSpec

ACTIVATIONS = ("sigmoid", "softplus", "dt_softplus", "mamba2_decay", "logsigmoid", "linear")


def default_activation(spec: InputSpec, implicit: bool = False) -> str:
    """The per-token parameterisation the table in this module's docstring picks for ``spec``.

    Args:
        spec: the input.
        implicit: the objective's update is implicit (proximal), e.g. Longhorn.
    """
    c = spec.constraint
    if c in ("positive", "nonnegative"):
        if spec.name.lower().startswith(("dt", "delta")):
            return "dt_softplus"
        return "softplus" if implicit else "sigmoid"
    if c in ("nonpositive", "negative"):
        return "mamba2_decay" if spec.axes == () else "logsigmoid"
    return "linear"


def _inv_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


def mamba_dt_bias(n: int, dt_min: float = 1e-3, dt_max: float = 1e-1, floor: float = 1e-4) -> torch.Tensor:
    """Mamba's Δ bias: softplus⁻¹ of Δ drawn log-uniformly in ``[dt_min, dt_max]``."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return _inv_softplus(dt.clamp(min=floor))


def _no_wd(p: nn.Parameter) -> nn.Parameter:
    p._no_weight_decay = True  # read by olsm.train's optimiser groups, as in mamba_ssm
    return p


class TokenCoefficient(nn.Module):
    """A per-token input ``[B, T, H(, K|V)]`` computed from features ``h [B, T, d_in]``.

    Args:
        spec: the input's declaration.
        d_in: feature size.
        num_heads: ``H``.
        dims: ``{"K": K, "V": V}``.
        activation: one of :data:`ACTIVATIONS` (default from :func:`default_activation`).
        rank: bottleneck rank for per-channel inputs (None: ``max(16, ceil(d_in / 16))``;
            0: one full linear map, for features that are low rank already).
        bias_init: ``"zero"`` or ``"dt"`` (Mamba's Δ bias; Longhorn's β uses it too).
    """

    def __init__(self, spec: InputSpec, d_in: int, num_heads: int, dims: Dict[str, int],
                 activation: Optional[str] = None, rank: Optional[int] = None, bias_init: Optional[str] = None):
        super().__init__()
        self.spec = spec
        self.activation = activation or default_activation(spec)
        if self.activation not in ACTIVATIONS:
            raise InputError(f"activation for {spec.name!r} must be one of {ACTIVATIONS}, got {self.activation!r}")
        self.num_heads = num_heads
        self.channels = dims[spec.axes[0]] if spec.axes else 1
        out = num_heads * self.channels
        if spec.axes and rank != 0:
            r = rank or max(16, math.ceil(d_in / 16))
            self.proj = nn.Sequential(nn.Linear(d_in, r, bias=False), nn.Linear(r, out, bias=False))
        else:
            self.proj = nn.Linear(d_in, out, bias=False)
        if bias_init is None:
            bias_init = "dt" if self.activation in ("dt_softplus", "mamba2_decay") else "zero"
        self.bias = _no_wd(nn.Parameter(mamba_dt_bias(out) if bias_init == "dt" else torch.zeros(out)))
        if self.activation == "mamba2_decay":
            self.A_log = _no_wd(nn.Parameter(torch.log(torch.empty(num_heads).uniform_(1, 16))))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Args: h ``[..., d_in]``. Returns: ``[..., H]`` or ``[..., H, K|V]``."""
        x = self.proj(h) + self.bias.to(h.dtype)
        if self.spec.axes:
            x = x.unflatten(-1, (self.num_heads, self.channels))
        a = self.activation
        if a == "sigmoid":
            return torch.sigmoid(x)
        if a in ("softplus", "dt_softplus"):
            return F.softplus(x)
        if a == "mamba2_decay":
            return -torch.exp(self.A_log.float()).to(x.dtype) * F.softplus(x)
        if a == "logsigmoid":
            return F.logsigmoid(x) / 16  # GLA's gate_logit_normalizer: keeps α close to 1 at init
        return x


class FixedCoefficient(nn.Module):
    """A per-head input ``[H(, K|V|V, K)]`` (RetNet's γ, Mamba-1's A).

    Args:
        spec: the input's declaration.
        num_heads: ``H``.
        dims: ``{"K": K, "V": V}``.
    """

    def __init__(self, spec: InputSpec, num_heads: int, dims: Dict[str, int]):
        super().__init__()
        self.spec = spec
        shape = (num_heads,) + tuple(dims[a] for a in spec.axes)
        c = spec.constraint
        self.mode = "param"
        if c == "nonpositive" and spec.axes == ():
            # RetNet: γ_h = 1 − 2^(−5−h), not learned
            gamma = 1 - 2.0 ** (-5 - torch.arange(num_heads, dtype=torch.float64))
            self.register_buffer("value", torch.log(gamma).float())
            self.mode = "fixed"
        elif c in ("negative", "nonpositive"):
            if "K" in spec.axes:  # S4D-real: A[.., n] = −(n + 1)
                a = torch.arange(1, dims["K"] + 1, dtype=torch.float32).expand(shape).clone()
            else:
                a = torch.empty(shape).uniform_(1, 16)
            self.A_log = _no_wd(nn.Parameter(torch.log(a)))
            self.mode = "neg_exp"
        elif c in ("positive", "nonnegative"):
            self.log_p = _no_wd(nn.Parameter(torch.zeros(shape)))
            self.mode = "exp"
        else:
            self.p = _no_wd(nn.Parameter(torch.zeros(shape)))

    def forward(self) -> torch.Tensor:
        """Returns: the ``[H, ...]`` tensor (float32; the recurrence casts)."""
        if self.mode == "fixed":
            return self.value
        if self.mode == "neg_exp":
            return -torch.exp(self.A_log)
        if self.mode == "exp":
            return torch.exp(self.log_p)
        return self.p


class Coefficients(nn.Module):
    """All the inputs a recurrence declares, computed from features.

    Args:
        inputs: ``rec.inputs``.
        d_in: feature size of ``h``.
        num_heads, dims: as for :class:`TokenCoefficient`.
        activation: per-input overrides ``{name: activation}``.
        rank: bottleneck rank for per-channel inputs.
        bias_init: per-input overrides ``{name: "zero" | "dt"}``.
        implicit: the objective's update is implicit (picks softplus over sigmoid for β).
    """

    def __init__(self, inputs, d_in: int, num_heads: int, dims: Dict[str, int],
                 activation: Optional[Dict[str, str]] = None, rank: Optional[int] = None,
                 bias_init: Optional[Dict[str, str]] = None, implicit: bool = False):
        super().__init__()
        activation, bias_init = dict(activation or {}), dict(bias_init or {})
        unknown = set(activation) - {s.name for s in inputs}
        if unknown:
            raise InputError(f"activation overrides for unknown inputs {sorted(unknown)}; "
                             f"the objective declares {[s.name for s in inputs]}")
        self.token = nn.ModuleDict()
        self.fixed = nn.ModuleDict()
        for s in inputs:
            if s.per_token:
                act = activation.get(s.name) or default_activation(s, implicit)
                self.token[s.name] = TokenCoefficient(s, d_in, num_heads, dims, act, rank, bias_init.get(s.name))
            else:
                self.fixed[s.name] = FixedCoefficient(s, num_heads, dims)

    def forward(self, h: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Args: h ``[..., d_in]``. Returns: ``{name: tensor}`` ready for the recurrence."""
        out = {n: m(h) for n, m in self.token.items()}
        out.update({n: m() for n, m in self.fixed.items()})
        return out
