"""Drop-in modules built on fastlm's fused ops, state_dict-compatible with the modules they replace."""

from .attention import MultiHeadAttention
from .norms import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "MultiHeadAttention", "RMSNorm"]
