"""Public functional ops of fastlm (re-exported as fastlm.<op>)."""

from .attention import RelativePositionBias, attention
from .norms import layer_norm, rms_norm

__all__ = ["RelativePositionBias", "attention", "layer_norm", "rms_norm"]
