"""Write the generated kernel source to disk once and import it.

``@triton.jit`` reads the decorated function's source file, so a generated kernel must live
in a real file. The file is named by a hash of the expressions, the inputs, the prefetch
depths and :data:`~.codegen.GENERATOR_VERSION`, under ``$OLSM_CACHE/kernels`` (default
``~/.cache/olsm/kernels``): a second process reuses it, a changed generator never does.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType
from typing import Dict, Tuple

from olsm.errors import BackendError

from .codegen import GENERATOR_VERSION, generate_source
from .plan import Plan

_LOADED: Dict[str, ModuleType] = {}
_LOCK = threading.Lock()


def cache_dir() -> Path:
    """Where generated kernels live: ``$OLSM_CACHE/kernels`` or ``~/.cache/olsm/kernels``."""
    root = os.environ.get("OLSM_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "olsm"
    return base / "kernels"


def load_kernels(plan: Plan, prefetch: Tuple[int, int] = (1, 1), lean: bool = True) -> ModuleType:
    """Generate (once), write (once per machine) and import the kernel module of ``plan``.

    Args:
        plan: the recurrence's :class:`~.plan.Plan`.
        prefetch: ``(forward, backward)`` blocks loaded ahead, each >= 0.
        lean: the lean template (:func:`~.codegen.generate_source`; False: the classic one).

    Returns:
        The imported module; ``module.fwd_kernel`` and ``module.bwd_kernel`` are
        ``@triton.jit`` functions, ``module.__file__`` the generated source.

    Raises:
        BackendError: a negative prefetch depth.
    """
    prefetch = (int(prefetch[0]), int(prefetch[1]))
    if min(prefetch) < 0:
        raise BackendError(f"prefetch depths must be >= 0, got {prefetch}")
    key = plan.key(GENERATOR_VERSION + ("+lean" if lean else ""), prefetch)
    with _LOCK:
        mod = _LOADED.get(key)
        if mod is not None:
            return mod
        text = generate_source(plan, prefetch, lean)
        path = cache_dir() / f"elementwise_{key}.py"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:  # read-only home (some CI runners): fall back to the temp dir
            path = Path(tempfile.gettempdir()) / "olsm-kernels" / path.name
            path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            # write-then-rename: concurrent test workers never import a half-written file
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        name = f"olsm_generated_elementwise_{key}"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        _LOADED[key] = mod
        return mod
