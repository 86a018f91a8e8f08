"""The ``torch`` backend: chunked forms of both IR classes in plain torch (DESIGN §4).

Same signature and semantics as :mod:`olsm.backends.reference`, which defines truth; this is
the readable second truth that runs on any device and is differentiable by autograd.

- :func:`matrix` (``chunked_matrix``): decayed pairwise ratios + a unit-triangular solve for the
  low-rank probes per chunk, an affine state carry between chunks.
- :func:`elementwise` (``chunked_elementwise``): a log-depth scan of elementwise affine maps
  per chunk, the same carry between chunks.
"""
from .chunked_common import DEFAULT_CHUNK_SIZE
from .chunked_elementwise import elementwise, scan_affine
from .chunked_matrix import matrix

__all__ = ["matrix", "elementwise", "scan_affine", "DEFAULT_CHUNK_SIZE"]
