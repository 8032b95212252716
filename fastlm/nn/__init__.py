"""Drop-in modules built on fastlm's fused ops, state_dict-compatible with the modules they replace."""

from .norms import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm"]
