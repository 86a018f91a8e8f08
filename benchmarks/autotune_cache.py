"""Carry Triton's autotuning results from one GPU session to the next.

FLA's kernels autotune on their first call: 94 s (forward) + 129 s (backward) for
``chunk_dplr_delta_rule`` and 76 + 160 s for ``chunk_gla`` on the H200 in run 11's first call,
a quarter of a 30-minute device session spent choosing the same configurations again. Triton can keep each autotuner's timings on disk
(``TRITON_CACHE_AUTOTUNING=1``: ``<TRITON_CACHE_DIR>/<hash>/<kernel>.autotune.json``, the hash
covering Triton's version, the GPU target, the kernel's source and its tuning key); this module
points Triton at a fresh cache directory, seeds it from a tar of earlier results and writes the
results back, only the small JSON files (the compiled kernels stay behind: the copy to the GPU
machine is limited to 64 MiB). A result whose hash no longer matches (another Triton, another
GPU, a changed kernel) is simply not found, and that kernel autotunes as before.

    from autotune_cache import enable, save
    enable(".carry/autotune.tar")          # before the first kernel launch
    ...
    save(".carry/autotune.tar" or "$OUT/autotune.tar")
"""
from __future__ import annotations

import os
import pathlib
import tarfile
import tempfile

SUFFIX = ".autotune.json"


def enable(seed: str | None = None) -> pathlib.Path:
    """Turn on Triton's on-disk autotuning cache in a new directory, filled from the tar ``seed``
    if it exists. Returns the directory (``TRITON_CACHE_DIR``)."""
    cache = pathlib.Path(tempfile.mkdtemp(prefix="triton-cache-"))
    if seed and pathlib.Path(seed).is_file():
        with tarfile.open(seed) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(SUFFIX)]
            tar.extractall(cache, members=members, filter="data")
    os.environ["TRITON_CACHE_DIR"] = str(cache)
    os.environ["TRITON_CACHE_AUTOTUNING"] = "1"
    return cache


def save(path: str) -> int:
    """Write every autotuning result of the current cache directory into the tar ``path``.
    Returns how many there are."""
    cache = pathlib.Path(os.environ["TRITON_CACHE_DIR"])
    found = sorted(cache.rglob("*" + SUFFIX))
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for f in found:
            tar.add(f, arcname=str(f.relative_to(cache)))
    return len(found)
