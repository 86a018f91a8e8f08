"""Longhorn as published (Liu et al., arXiv 2407.14207): β per value channel, diagonal form.

Per value column j the implicit update is ``(I − ε_j k kᵀ) s_{j,t-1} + ε_j v_j k`` with
``ε_j = β_j / (1 + β_j kᵀk)``; the paper keeps the diagonal of each column's transition:
``S_t[n, j] = (1 − ε_j k_n²) S_{t-1}[n, j] + ε_j k_n v_j`` (an elementwise K×V gate).
"""
from olsm import Input, Objective, proximal, squared_loss

beta = Input("beta", "value", constraint="positive", doc="β_t per value channel")
longhorn_diag = Objective(proximal() + squared_loss(beta), update="implicit", approximation="diagonal",
                          name="longhorn_diag", doc=__doc__)
