"""Layers generated from objectives: :class:`Mixer`, :class:`LonghornBlock` and :class:`MixerLM`."""
from .coefficients import Coefficients, FixedCoefficient, TokenCoefficient, default_activation
from .conv import ShortConvolution
from .lm import MixerLM
from .longhorn_block import LonghornBlock
from .mixer import Mixer
from .mlp import SwiGLU
from .norm import RMSNorm
from .state import LMCache, MixerState

__all__ = ["Mixer", "LonghornBlock", "MixerLM", "MixerState", "LMCache", "ShortConvolution", "RMSNorm",
           "SwiGLU", "Coefficients", "TokenCoefficient", "FixedCoefficient", "default_activation"]
