"""Mamba-1's selective SSM (Gu & Dao, arXiv 2312.00752) as an online-learning objective.

Proximal term towards ``exp(Δ_j A_{j,n}) ⊙ S_{t-1}`` plus a Hebbian loss weighted by Δ_j:
``S_t[n, j] = exp(Δ_j A_{j,n}) S_{t-1}[n, j] + Δ_j k_n v_j`` (B = k, C = q, x = v).
"""
from olsm import Input, Objective, Param, linear_loss, proximal

dt = Input("dt", "value", constraint="positive", doc="Δ_t per channel (softplus of a projection)")
A = Param("A", "value_key", constraint="negative", doc="A per channel and state (−exp(A_log))")
mamba1 = Objective(proximal(log_decay=dt * A) + linear_loss(dt), update="implicit", name="mamba1", doc=__doc__)
