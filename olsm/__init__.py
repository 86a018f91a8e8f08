"""olsm: declare the objective a sequence mixer's memory solves; get a proven recurrence.

    from olsm import derive
    from olsm.objectives import longhorn
    rec = derive(longhorn)
    print(rec)                      # S_t = (I − ε k kᵀ) S_{t-1} + ε k vᵀ,  ε = β/(β·kᵀk + 1)
    o, S = rec(q, k, v, beta=beta, output_final_state=True)
"""
from .derivation import derive
from .errors import (BackendError, InputError, NonAffineObjectiveError, ObjectiveError, OlsmError,
                     ProofError, UnsupportedObjectiveError)
from .objective import Input, Objective, Param
from .recurrence import Recurrence
from .terms import (decayed_proximal, huber_loss, linear_loss, lp_loss, proximal, squared_loss,
                    weight_decay)

__version__ = "0.1.0"

__all__ = [
    "derive", "Recurrence", "Objective", "Input", "Param",
    "proximal", "decayed_proximal", "weight_decay", "linear_loss", "squared_loss", "lp_loss", "huber_loss",
    "OlsmError", "ObjectiveError", "NonAffineObjectiveError", "UnsupportedObjectiveError", "ProofError",
    "InputError", "BackendError",
]


def __getattr__(name):
    # the catalogue and the layers load on first use (the catalogue imports olsm itself)
    if name in ("objectives", "testing", "kernels", "layers", "train"):
        import importlib

        return importlib.import_module(f"olsm.{name}")
    if name in ("Mixer",):
        from . import layers

        return getattr(layers, name)
    raise AttributeError(f"module 'olsm' has no attribute {name!r}")
