"""Gated Longhorn: Longhorn's implicit update with a decayed proximal term.

argmin_S ½‖S − α S_{t-1}‖² + (β/2)‖Sᵀk − v‖² gives
``S_t = α (I − ε k kᵀ) S_{t-1} + ε k vᵀ``, ``ε = β / (1 + β kᵀk)``
(the implicit counterpart of Gated DeltaNet, arXiv 2412.06464).
"""
from olsm import Input, Objective, decayed_proximal, squared_loss

log_alpha = Input("log_alpha", "head", constraint="nonpositive", doc="log α_t per head")
beta = Input("beta", "head", constraint="positive", doc="β_t, weight of the regression loss")
gated_longhorn = Objective(decayed_proximal(log_alpha) + squared_loss(beta), update="implicit",
                           name="gated_longhorn", doc=__doc__)
