"""Mamba-2 / SSD (Dao & Gu, arXiv 2405.21060): a data-dependent scalar decay per head.

``S_t = α_t S_{t-1} + k vᵀ`` with ``α_t = exp(log_alpha_t)``.
"""
from olsm import Input, Objective, decayed_proximal, linear_loss

log_alpha = Input("log_alpha", "head", constraint="nonpositive", doc="log α_t per token and head")
mamba2 = Objective(decayed_proximal(log_alpha) + linear_loss(), update="explicit", name="mamba2", doc=__doc__)
