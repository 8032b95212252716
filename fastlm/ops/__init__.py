"""Public functional ops of fastlm (re-exported as fastlm.<op>)."""

from .norms import layer_norm, rms_norm

__all__ = ["layer_norm", "rms_norm"]
