"""Linear attention (Katharopoulos et al., arXiv 2006.16236).

The memory takes one unit gradient step on the Hebbian loss −⟨Sᵀk, v⟩ from S_{t-1}:
``S_t = S_{t-1} + k vᵀ``.
"""
from olsm import Objective, linear_loss, proximal

linear_attention = Objective(proximal() + linear_loss(), update="explicit", name="linear_attention",
                             doc=__doc__)
