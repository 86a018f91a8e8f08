"""Backends: one signature, several ways to run a recurrence.

==============  =======================================================  ==========
name            what                                                     classes
==============  =======================================================  ==========
``reference``   step-by-step loop (:mod:`.reference`), defines truth     both
``recurrent``   the same loop; the name decoding code asks for           both
``torch``       chunked plain torch (:mod:`.chunked`)                    both
``triton``      generic chunked Triton kernels (:mod:`olsm.kernels`)     both
``auto``        ``triton`` on CUDA, ``torch`` elsewhere
==============  =======================================================  ==========
"""
from __future__ import annotations

import importlib

from ..errors import BackendError

NAMES = ("auto", "reference", "recurrent", "torch", "triton")


def resolve(name: str, device) -> str:
    """Pick the concrete backend name for ``name`` on ``device``."""
    if name not in NAMES:
        raise BackendError(f"unknown backend {name!r}; choose one of {NAMES}")
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return name


def numeric(name: str, kind: str):
    """The function ``(q, w, u, ...) -> (o, S)`` of a numeric backend for an IR class."""
    module = {"reference": ".reference", "recurrent": ".reference", "torch": ".chunked"}[name]
    return getattr(importlib.import_module(module, __name__), kind)
