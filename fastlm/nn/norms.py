"""LayerNorm and RMSNorm modules, drop-in for torch.nn.LayerNorm and Hugging Face's T5LayerNorm."""

import torch
from torch import nn

from ..ops.norms import layer_norm, rms_norm


def _normalized_size(normalized_shape):
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(shape) != 1:
        raise ValueError(f"fastlm norms normalise the last dimension only; normalized_shape={shape}")
    return shape


class LayerNorm(nn.Module):
    """Drop-in for torch.nn.LayerNorm over the last dimension (same parameters and state_dict).

    forward(x, residual=None, return_residual=False): x (..., N); with residual, normalises
    x + residual and, with return_residual, also returns that sum.
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None, dtype=None):
        super().__init__()
        self.normalized_shape = _normalized_size(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape, **factory))
            self.bias = nn.Parameter(torch.zeros(self.normalized_shape, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x, residual=None, return_residual=False):
        """x: (..., N) float32 / float16 / bfloat16 (float64 runs on the reference backend), N =
        normalized_shape; residual: None or (..., N) like x, then s = x + residual is normalised.
        Returns y (..., N) in x's dtype, or (y, s) with return_residual (s is x when residual is None).
        """
        return layer_norm(x, self.weight, self.bias, self.eps, residual, return_residual=return_residual)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class RMSNorm(nn.Module):
    """Drop-in for Hugging Face's T5LayerNorm / LlamaRMSNorm (parameter `weight`, epsilon attribute
    `variance_epsilon`) and for torch.nn.RMSNorm (`eps`, `elementwise_affine`).

    forward(x, residual=None, return_residual=False) as for LayerNorm.
    """

    def __init__(self, hidden_size, eps=1e-6, elementwise_affine=True, device=None, dtype=None):
        super().__init__()
        self.normalized_shape = _normalized_size(hidden_size)
        self.variance_epsilon = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    @property
    def eps(self):
        return self.variance_epsilon

    def forward(self, x, residual=None, return_residual=False):
        """x: (..., N) float32 / float16 / bfloat16 (float64 runs on the reference backend), N =
        hidden_size; residual: None or (..., N) like x, then s = x + residual is normalised.
        Returns y (..., N) in x's dtype, or (y, s) with return_residual (s is x when residual is None).
        """
        return rms_norm(x, self.weight, self.variance_epsilon, residual, return_residual=return_residual)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.variance_epsilon}, elementwise_affine={self.elementwise_affine}"
