"""Helpers for checking kernels against the reference (docs/architecture.md, "Numerics and bad input").

The rule is FlashAttention's: compute the reference in fp64 (the oracle); run the same computation in
PyTorch at the input dtype (the baseline); the kernel passes when its error against the oracle is at
most `factor` times the baseline's error (2 for outputs, 3 for gradients) plus a tiny floor.
"""

import os

import torch

from .backends import poisoned_outputs

__all__ = ["LAYOUTS", "assert_close_to_reference", "default_device", "poisoned_outputs", "randn", "with_layout"]

FLOOR = 1e-5  # relative to max(1, |oracle|): covers fp32 rounding where the baseline is exact


def default_device():
    """The device tests run their kernels on: "cuda" when a GPU is present, else "cpu" (where Triton runs
    under its interpreter and the CUDA C++ kernels under the host emulator)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def randn(*shape, dtype=torch.float32, device="cpu", generator=None, scale=1.0, requires_grad=False):
    """Fresh normal samples in `dtype` (drawn in fp32) on `device`, optionally requiring grad. A
    `generator` draws on its own device (a plain torch.Generator() is a CPU one); the samples then move."""
    where = device if generator is None else generator.device
    x = torch.randn(*shape, generator=generator, device=where).to(device) * scale
    return x.to(dtype).requires_grad_(requires_grad)


LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")


def with_layout(t, layout, dim=-1):
    """`t` laid out in memory as `layout` says, a leaf with t's requires_grad; kernels must read it right.

    contiguous  a contiguous copy
    transposed  the same values stored with the last two dimensions swapped (t.mT of a contiguous
                tensor); 1-D tensors are returned contiguous
    sliced      every other element of a buffer twice as long along `dim` (stride 2 there)
    expanded    the values at index 0 of `dim` repeated along it with stride 0; this changes the values,
                so compare against the reference run on the returned tensor
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    requires_grad, t = t.requires_grad, t.detach()
    if layout == "contiguous" or (layout == "transposed" and t.dim() < 2):
        view = t.contiguous()
    elif layout == "transposed":
        view = t.mT.contiguous().mT
    elif layout == "sliced":
        dim %= t.dim()
        shape = list(t.shape)
        shape[dim] *= 2
        view = t.new_zeros(shape)[(slice(None),) * dim + (slice(None, None, 2),)]  # t's shape, stride 2 along dim
        view.copy_(t)
    else:
        view = t.narrow(dim, 0, min(1, t.shape[dim])).expand(t.shape)
    return view.detach().requires_grad_(requires_grad)


def _tf32_matmuls():
    """Whether CUDA fp32 matmuls may use TF32. torch's new precision setting also reflects the legacy ones
    (allow_tf32, set_float32_matmul_precision) and, unlike their getters, reads fine when both were used."""
    if os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE") == "1":
        return True
    return getattr(torch.backends.cuda.matmul, "fp32_precision", "none") == "tf32"


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
    # With TF32 matmuls an fp32 baseline errs ~1e-3 and the bound would pass almost anything.
    assert not (baseline.is_cuda and _tf32_matmuls()), (
        f"{name}: CUDA fp32 matmuls run in TF32 (torch.backends.cuda.matmul.fp32_precision); "
        "the fp32 baseline must be computed in IEEE fp32"
    )
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
