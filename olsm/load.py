"""Find an objective by catalogue name or in a user's file (``path/to/file.py:NAME``)."""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from .errors import ObjectiveError
from .objective import Objective


def catalogue() -> dict:
    """Name -> Objective for every objective in :mod:`olsm.objectives`."""
    mod = importlib.import_module("olsm.objectives")
    return {name: getattr(mod, name) for name in mod.__all__}


def load_objective(spec) -> Objective:
    """Resolve an objective.

    Args:
        spec: an Objective, a catalogue name, ``"file.py:NAME"`` or ``"package.module:NAME"``.

    Returns:
        The Objective.

    Raises:
        ObjectiveError: unknown name, missing file, or the attribute is not an Objective.
    """
    if isinstance(spec, Objective):
        return spec
    if not isinstance(spec, str):
        raise ObjectiveError(f"expected an Objective or a name, got {type(spec).__name__}")
    if ":" not in spec:
        cat = catalogue()
        if spec not in cat:
            raise ObjectiveError(f"unknown objective {spec!r}; the catalogue has: {', '.join(cat)}. "
                                 "For your own, pass FILE.py:NAME or an Objective.")
        return cat[spec]
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ObjectiveError(f"no such file: {where}")
        modspec = importlib.util.spec_from_file_location(f"olsm_user_{path.stem}", path)
        module = importlib.util.module_from_spec(modspec)
        modspec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ObjectiveError(f"cannot import {where!r}: {e}") from e
    obj = getattr(module, name, None)
    if not isinstance(obj, Objective):
        raise ObjectiveError(f"{where} has no Objective named {name!r}")
    return obj
