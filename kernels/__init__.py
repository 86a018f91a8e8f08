"""Triton sources (importable as olsm.kernels)."""
