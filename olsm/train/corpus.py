"""Byte-level text corpus: a user's file or the Python standard library's sources.

The default corpus exists on every machine that runs olsm: the ``.py`` files under
``sysconfig.get_paths()["stdlib"]`` (site-packages left out), read in sorted order so two
machines with one Python version read the same bytes.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..errors import InputError


def stdlib_files():
    """Sorted ``.py`` files of the standard library (without site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def load_corpus(path: Optional[str] = None, max_bytes: Optional[int] = None) -> torch.Tensor:
    """Bytes of ``path`` (a file, or every ``.py``/``.txt``/``.md`` file under a folder), default the stdlib.

    Args:
        path: file or folder; None for the standard library's sources.
        max_bytes: keep only the first ``max_bytes`` (tests, quick runs).

    Returns:
        ``uint8 [N]``.

    Raises:
        InputError: missing path, or no bytes.
    """
    if path is None:
        files = stdlib_files()
        where = "the Python standard library"
    else:
        p = Path(path)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".py", ".txt", ".md"))
        elif p.is_file():
            files = [p]
        else:
            raise InputError(f"corpus {path!r} does not exist; pass a text file or a folder")
        where = str(p)
    chunks, total = [], 0
    for f in files:
        try:
            b = f.read_bytes()
        except OSError:
            continue
        chunks.append(b)
        total += len(b)
        if max_bytes is not None and total >= max_bytes:
            break
    data = b"\n".join(chunks)[:max_bytes]
    if not data:
        raise InputError(f"the corpus from {where} is empty ({len(files)} files, 0 bytes); name a text file "
                         "with --corpus")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def split_corpus(data: torch.Tensor, seq_len: int, val_fraction: float = 0.01) -> Tuple[torch.Tensor, torch.Tensor]:
    """Train on the head, validate on the tail (at least two windows of ``seq_len + 1``)."""
    need = 3 * (seq_len + 1)
    if data.numel() < need:
        raise InputError(f"the corpus has {data.numel()} bytes; training with seq_len {seq_len} needs at least "
                         f"{need}. Use a longer text or a smaller --seq-len.")
    n_val = max(int(data.numel() * val_fraction), 2 * (seq_len + 1))
    return data[:-n_val], data[-n_val:]


def byte_batch(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
    """Random windows: ``(inputs [B, T], targets [B, T])`` int64, targets shifted by one byte."""
    start = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=generator)
    idx = start[:, None] + torch.arange(seq_len + 1)
    w = data[idx].long()
    return w[:, :-1], w[:, 1:]


def eval_windows(data: torch.Tensor, seq_len: int, max_windows: int) -> torch.Tensor:
    """Disjoint consecutive windows ``[n, seq_len + 1]`` from the start of ``data`` (fixed eval set)."""
    n = min(max_windows, (data.numel() - 1) // (seq_len + 1))
    return data[: n * (seq_len + 1)].long().reshape(n, seq_len + 1)
