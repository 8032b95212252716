"""fastlm: fused attention, cross-entropy and norm kernels for BERT-, GPT- and T5-style training.

Functional ops: fastlm.attention (with fastlm.RelativePositionBias), fastlm.layer_norm, fastlm.rms_norm,
fastlm.cross_entropy, fastlm.linear_cross_entropy; packing a padded batch's real tokens: fastlm.unpad and
fastlm.pad, and attention over packed sequences: fastlm.varlen_attention; BERT's masking: fastlm.mlm_mask (fastlm.data).
Models: fastlm.models. Modules: fastlm.nn. Existing models: fastlm.patch / fastlm.unpatch.
Backends: fastlm.use_backend, fastlm.available_backends, fastlm.info (docs/architecture.md, "Backends and dispatch").
"""

from . import models, nn, ops
from .backends import available_backends, use_backend
from .backends import info as _info
from .data import mlm_mask
from .ops import (
    RelativePositionBias,
    attention,
    cross_entropy,
    layer_norm,
    linear_cross_entropy,
    pad,
    rms_norm,
    unpad,
    varlen_attention,
)
from .ops._family import kernel_table
from .patch import patch, unpatch
from .version import __version__

__all__ = [
    "RelativePositionBias",
    "__version__",
    "attention",
    "available_backends",
    "cross_entropy",
    "info",
    "layer_norm",
    "linear_cross_entropy",
    "mlm_mask",
    "models",
    "nn",
    "ops",
    "pad",
    "patch",
    "rms_norm",
    "unpad",
    "unpatch",
    "varlen_attention",
    "use_backend",
]


def info():
    """A human-readable report of the versions, the GPU, the extension, every backend's status and the ops
    each backend has kernels for."""
    return "\n".join([f"fastlm {__version__}", _info(), *kernel_table(ops.FAMILIES.values())])
