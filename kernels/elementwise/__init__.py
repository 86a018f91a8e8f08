"""Elementwise-gate recurrences (Longhorn's diagonal form, Mamba-1) as a generated Triton scan.

    S_t = G_t ⊙ S_{t-1} + k̃_t ṽ_tᵀ,      o_t = scale · S_tᵀ q_t  (+ D ⊙ v_t)

The gate and write coefficients are printed from the recurrence's sympy expressions into a
kernel specialised to it; their gradients are derived with ``sp.diff`` and printed too, so a
new objective gets a forward and backward kernel with no hand-written code. The kernels walk
each sequence in blocks of tokens and solve the recurrence inside a block with one
associative scan over ``[tokens, keys, values]`` tiles (the algorithm: :mod:`.codegen`).

Modules, one idea each: :mod:`.plan` (what to compute, from sympy), :mod:`.printer` (sympy
to Triton expressions), :mod:`.emit` (source of one block step), :mod:`.codegen` (the generated
kernels: forward, backward, the split's carry pass), :mod:`.cache` (disk cache and import), :mod:`.config` (tile shapes),
:mod:`.scan` (launchers, autograd, public API), :mod:`.fold` (the backward split's one
hand-written kernel, the same for every recurrence), :mod:`.torch_ref` (the materialised-G
reference the kernels are tested against).
"""
from .cache import cache_dir, load_kernels
from .codegen import GENERATOR_VERSION, generate_source
from .config import Config, Tile, choose_config
from .plan import Plan
from .printer import TritonPrinter, triton_code
from .scan import MAX_K, compile_recurrence, elementwise_scan, elementwise_step
from .torch_ref import elementwise_scan_torch

__all__ = [
    "elementwise_scan",
    "elementwise_step",
    "elementwise_scan_torch",
    "compile_recurrence",
    "choose_config",
    "Config",
    "Tile",
    "Plan",
    "generate_source",
    "load_kernels",
    "cache_dir",
    "triton_code",
    "TritonPrinter",
    "GENERATOR_VERSION",
    "MAX_K",
]
