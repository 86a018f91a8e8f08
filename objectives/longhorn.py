"""Longhorn (Liu et al., arXiv 2407.14207, Thm 3.1), β per head.

The *implicit* (proximal) update of ½‖S − S_{t-1}‖² + (β/2)‖Sᵀk − v‖²; Sherman–Morrison gives
``S_t = (I − ε k kᵀ) S_{t-1} + ε k vᵀ`` with ``ε = β / (1 + β kᵀk)``.
"""
from olsm import Input, Objective, proximal, squared_loss

beta = Input("beta", "head", constraint="positive", doc="β_t, weight of the regression loss")
longhorn = Objective(proximal() + squared_loss(beta), update="implicit", name="longhorn", doc=__doc__)
