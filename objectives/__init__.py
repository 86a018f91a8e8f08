"""The catalogue: every mixer here is declared as an objective, never as a recurrence.

==================  ===================================================  =========================
name                update                                               inputs
==================  ===================================================  =========================
linear_attention    S + k vᵀ                                             —
retnet              γ S + k vᵀ                                           log_alpha [H]
mamba2              α_t S + k vᵀ                                         log_alpha [B,T,H]
gla                 diag(α_t) S + k vᵀ                                   log_alpha [B,T,H,K]
deltanet            (I − βkkᵀ) S + βkvᵀ                                  beta [B,T,H]
gated_deltanet      α(I − βkkᵀ) S + βkvᵀ                                 log_alpha, beta [B,T,H]
longhorn            (I − εkkᵀ) S + εkvᵀ, ε = β/(1+βkᵀk)                  beta [B,T,H]
longhorn_diag       (1 − ε_j k_n²) ⊙ S + ε_j k_n v_j                     beta [B,T,H,V]
gated_longhorn      α(I − εkkᵀ) S + εkvᵀ                                 log_alpha, beta [B,T,H]
mamba1              exp(Δ_j A_{j,n}) ⊙ S + Δ_j k_n v_j                   dt [B,T,H,V], A [H,V,K]
kda                 (I − βkkᵀ) diag(α_t) S + βkvᵀ                        log_alpha [B,T,H,K], beta
==================  ===================================================  =========================
"""
from .deltanet import deltanet
from .gated_deltanet import gated_deltanet
from .gated_longhorn import gated_longhorn
from .gla import gla
from .kda import kda
from .linear_attention import linear_attention
from .longhorn import longhorn
from .longhorn_diag import longhorn_diag
from .mamba1 import mamba1
from .mamba2 import mamba2
from .retnet import retnet

__all__ = ["linear_attention", "retnet", "mamba2", "gla", "deltanet", "gated_deltanet", "longhorn",
           "longhorn_diag", "gated_longhorn", "mamba1", "kda"]
