"""Helpers shared by the chunked torch backends: chunk-size checks and the chunk layout.

Both chunked backends cut time into chunks of ``C`` tokens and work on tensors laid out as
``[B, H, N, C, ...]`` (``N`` chunks). The last chunk is padded with tokens that leave the state
unchanged (zero write, identity transition), so the final state is exact and the padded
outputs are simply dropped.
"""
from __future__ import annotations

from typing import Optional

import torch
from einops import rearrange

from ..errors import InputError

#: Chunk length used when the caller passes ``chunk_size=None``.
DEFAULT_CHUNK_SIZE = 64


def check_chunk_size(chunk_size: Optional[int]) -> int:
    """Validate ``chunk_size`` and resolve ``None`` to :data:`DEFAULT_CHUNK_SIZE`.

    Args:
        chunk_size: a positive integer or ``None``.

    Returns:
        The chunk length as an ``int``.

    Raises:
        InputError (a ``ValueError``): ``chunk_size`` is not a positive integer.
    """
    if chunk_size is None:
        return DEFAULT_CHUNK_SIZE
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise InputError(
            f"chunk_size must be a positive integer (or None for {DEFAULT_CHUNK_SIZE}), "
            f"got {chunk_size!r}"
        )
    return chunk_size


def chunk_length(chunk_size: int, T: int) -> int:
    """The chunk length actually used: no longer than the sequence (a shorter chunk only
    saves work; the result does not depend on it)."""
    return max(1, min(chunk_size, T))


def to_chunks(x: torch.Tensor, C: int, fill: float) -> torch.Tensor:
    """Pad time to a multiple of ``C`` with ``fill`` and split it into chunks.

    Args:
        x: ``[B, T, H, ...]``.
        C: chunk length.
        fill: value of the padded tokens (chosen by the caller so that they are a no-op).

    Returns:
        ``[B, H, N, C, ...]`` with ``N = ceil(T / C)``.
    """
    T = x.shape[1]
    pad = -T % C
    if pad:
        x = torch.cat([x, x.new_full((x.shape[0], pad, *x.shape[2:]), fill)], dim=1)
    return rearrange(x, "b (n c) h ... -> b h n c ...", c=C)


def from_chunks(x: torch.Tensor, T: int) -> torch.Tensor:
    """Inverse of :func:`to_chunks`: ``[B, H, N, C, ...]`` -> ``[B, T, H, ...]`` (padding dropped)."""
    return rearrange(x, "b h n c ... -> b (n c) h ...")[:, :T]
