"""Kimi Delta Attention (KDA, Kimi Linear: arXiv 2510.26692): the delta rule from a memory
decayed per key channel.

One explicit gradient step on (β/2)‖Sᵀk − v‖² from the anchor diag(α_t) S_{t-1}:
``S_t = (I − β k kᵀ) diag(α_t) S_{t-1} + β k vᵀ`` — Gated DeltaNet with GLA's fine-grained decay.
Not in DESIGN's table: it shows a new mixer is one more declaration.
"""
from olsm import Input, Objective, decayed_proximal, squared_loss

log_alpha = Input("log_alpha", "key", constraint="nonpositive", doc="log α_t per key channel")
beta = Input("beta", "head", constraint="positive", doc="learning rate β_t")
kda = Objective(decayed_proximal(log_alpha) + squared_loss(beta), update="explicit", name="kda", doc=__doc__)
