"""Gated DeltaNet (Yang et al., arXiv 2412.06464): the delta rule from a decayed memory.

``S_t = α_t (I − β k kᵀ) S_{t-1} + β k vᵀ``.
"""
from olsm import Input, Objective, decayed_proximal, squared_loss

log_alpha = Input("log_alpha", "head", constraint="nonpositive", doc="log α_t per head")
beta = Input("beta", "head", constraint="positive", doc="learning rate β_t")
gated_deltanet = Objective(decayed_proximal(log_alpha) + squared_loss(beta), update="explicit",
                           name="gated_deltanet", doc=__doc__)
