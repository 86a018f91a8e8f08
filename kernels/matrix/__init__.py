"""Generic chunked Triton kernel for the matrix-transition class (DESIGN §3, class 1).

``chunk_matrix`` has the signature and semantics of :func:`olsm.backends.reference.matrix`.
"""
from .chunk import chunk_matrix

__all__ = ["chunk_matrix"]
