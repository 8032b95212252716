"""Public functional ops of fastlm (re-exported as fastlm.<op>)."""

from .attention import RelativePositionBias, attention
from .cross_entropy import cross_entropy, linear_cross_entropy
from .norms import layer_norm, rms_norm

__all__ = [
    "RelativePositionBias",
    "attention",
    "cross_entropy",
    "layer_norm",
    "linear_cross_entropy",
    "rms_norm",
]
