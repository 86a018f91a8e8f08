"""DeltaNet (Schlag et al. 2021; Yang et al., arXiv 2406.06484).

One explicit gradient step of size 1 on the regression loss (β/2)‖Sᵀk − v‖²:
``S_t = (I − β k kᵀ) S_{t-1} + β k vᵀ`` (the delta rule).
"""
from olsm import Input, Objective, proximal, squared_loss

beta = Input("beta", "head", constraint="positive", doc="learning rate β_t")
deltanet = Objective(proximal() + squared_loss(beta), update="explicit", name="deltanet", doc=__doc__)
