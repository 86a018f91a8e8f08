"""Gated linear attention (Yang et al., arXiv 2312.06635): a decay per key channel.

``S_t = diag(α_t) S_{t-1} + k vᵀ``.
"""
from olsm import Input, Objective, decayed_proximal, linear_loss

log_alpha = Input("log_alpha", "key", constraint="nonpositive", doc="log α_t per key channel")
gla = Objective(decayed_proximal(log_alpha) + linear_loss(), update="explicit", name="gla", doc=__doc__)
