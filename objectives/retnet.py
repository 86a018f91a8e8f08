"""RetNet (Sun et al., arXiv 2307.08621): linear attention with a fixed decay γ per head.

``S_t = γ S_{t-1} + k vᵀ`` — the proximal term pulls S towards the decayed old memory.
"""
from olsm import Objective, Param, decayed_proximal, linear_loss

log_alpha = Param("log_alpha", "head", constraint="nonpositive", doc="log γ, fixed per head")
retnet = Objective(decayed_proximal(log_alpha) + linear_loss(), update="explicit", name="retnet", doc=__doc__)
