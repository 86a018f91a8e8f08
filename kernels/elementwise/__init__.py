"""Elementwise-gate recurrences (Longhorn's diagonal form, Mamba-1) as a generated Triton scan.

    S_t = G_t ⊙ S_{t-1} + k̃_t ṽ_tᵀ,      o_t = scale · S_tᵀ q_t  (+ D ⊙ v_t)

The gate and write coefficients are printed from the recurrence's sympy expressions into a
kernel specialised to it (:mod:`.codegen`, :mod:`.printer`); their gradients are derived with
``sp.diff`` and printed too, so a new objective gets a forward and backward kernel with no
hand-written code. :func:`elementwise_scan_torch` is the same computation in plain torch with
the gate materialised, the truth the kernels are tested against.
"""
from .codegen import GENERATOR_VERSION, MAX_K, Plan, cache_dir, generate_source, load_kernels
from .printer import TritonPrinter, triton_code
from .scan import Config, choose_config, compile_recurrence, elementwise_scan, elementwise_step
from .torch_ref import elementwise_scan_torch

__all__ = [
    "elementwise_scan",
    "elementwise_step",
    "elementwise_scan_torch",
    "compile_recurrence",
    "choose_config",
    "Config",
    "Plan",
    "generate_source",
    "load_kernels",
    "cache_dir",
    "triton_code",
    "TritonPrinter",
    "GENERATOR_VERSION",
    "MAX_K",
]
