"""Public functional ops of fastlm (re-exported as fastlm.<op>), and FAMILIES: the declaration of each op
family (its backends and what their kernels take; fastlm/ops/_family.py), by family name."""

from .attention import ATTENTION, RelativePositionBias, attention
from .cross_entropy import CROSS_ENTROPY, cross_entropy, linear_cross_entropy
from .norms import NORMS, layer_norm, rms_norm
from .padding import pad, unpad
from .varlen_attention import VARLEN_ATTENTION, varlen_attention

FAMILIES = {family.name: family for family in (NORMS, CROSS_ENTROPY, ATTENTION, VARLEN_ATTENTION)}

__all__ = [
    "FAMILIES",
    "RelativePositionBias",
    "attention",
    "cross_entropy",
    "layer_norm",
    "linear_cross_entropy",
    "pad",
    "rms_norm",
    "unpad",
    "varlen_attention",
]
