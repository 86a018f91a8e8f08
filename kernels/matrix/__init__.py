"""Generic chunked Triton kernel for the matrix-transition class (DESIGN §3, class 1).

``chunk_matrix`` has the signature and semantics of :func:`olsm.backends.reference.matrix`;
``chunk_delta`` runs its delta form (one pair ``(−c k, k)`` sharing the written key) faster.
"""
from .chunk import chunk_matrix
from .delta import chunk_delta

__all__ = ["chunk_matrix", "chunk_delta"]
