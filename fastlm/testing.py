"""Helpers for checking kernels against the reference (docs/architecture.md, "Numerics and bad input").

The rule is FlashAttention's: compute the reference in fp64 (the oracle); run the same computation in
PyTorch at the input dtype (the baseline); the kernel passes when its error against the oracle is at
most `factor` times the baseline's error (2 for outputs, 3 for gradients) plus a tiny floor.
"""

import torch

from .backends import poisoned_outputs

__all__ = ["assert_close_to_reference", "poisoned_outputs", "randn"]

FLOOR = 1e-5  # relative to max(1, |oracle|): covers fp32 rounding where the baseline is exact


def randn(*shape, dtype=torch.float32, device="cpu", generator=None, scale=1.0, requires_grad=False):
    """Fresh normal samples in `dtype` (drawn in fp32), optionally requiring grad."""
    x = torch.randn(*shape, generator=generator, device=device) * scale
    return x.to(dtype).requires_grad_(requires_grad)


def assert_close_to_reference(actual, oracle, baseline, *, factor=2.0, name="output"):
    """Assert `actual` is within `factor` × the error of `baseline`, both measured against `oracle`.

    actual:   the kernel's result (any float dtype)
    oracle:   the fp64 reference, same shape
    baseline: the same computation in PyTorch at the input dtype, same shape
    NaN must appear exactly where the oracle has NaN.
    """
    if actual is None or oracle is None:
        assert actual is None and oracle is None, f"{name}: one of actual / oracle is None"
        return
    assert actual.shape == oracle.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    actual, oracle, baseline = (t.detach().double().cpu() for t in (actual, oracle, baseline))
    nan = torch.isnan(oracle)
    assert torch.equal(torch.isnan(actual), nan), (
        f"{name}: NaN pattern differs ({int(torch.isnan(actual).sum())} NaN in actual, {int(nan.sum())} in oracle)"
    )
    if actual.numel() == 0 or bool(nan.all()):
        return
    finite = ~nan
    actual, oracle, baseline = actual[finite], oracle[finite], baseline[finite]
    error = (actual - oracle).abs().max().item()
    baseline_error = (baseline - oracle).abs().max().item()
    floor = FLOOR * max(1.0, oracle.abs().max().item())
    bound = factor * baseline_error + floor
    assert error <= bound, (
        f"{name}: max error {error:.3e} exceeds {factor}× the same-dtype PyTorch error "
        f"{baseline_error:.3e} + floor {floor:.1e}"
    )
