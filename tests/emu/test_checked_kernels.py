"""The emulated CUDA kernels (backend cuda_emu) in checked mode, fastlm.emu: every tensor a kernel
is given ends at a guard page, and the kernels compute exactly what they compute unchecked."""

import mmap

import pytest
import torch

import fastlm
from fastlm import _ext, emu

pytestmark = pytest.mark.skipif(_ext.C_EMU is None, reason=f"no emulated kernels: {_ext.C_EMU_ERROR}")


def test_checked_tensors_end_at_a_page():
    was_on = torch.ops.fastlm_emu.set_checked(True)
    try:
        t = torch.empty(7, dtype=torch.float32)
    finally:
        torch.ops.fastlm_emu.set_checked(was_on)
    assert (t.data_ptr() + 28) % mmap.PAGESIZE == 0


def _norm_and_grads(rms, x, weight, bias, residual, dy, ds):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias, residual)]
    x, weight, bias, residual = leaves
    if rms:
        y, s = fastlm.rms_norm(x, weight, 1e-6, residual, return_residual=True)
    else:
        y, s = fastlm.layer_norm(x, weight, bias, 1e-5, residual, return_residual=True)
    ((y.float() * dy).sum() + (s.float() * ds).sum()).backward()
    return [y, s] + [t.grad for t in leaves if t.grad is not None]


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (7, 97), (5, 768), (3, 1025)], ids=str)
def test_norm_kernels_in_checked_mode(rms, dtype, shape):
    x = torch.randn(shape).to(dtype)
    weight, bias = torch.randn(shape[-1]).to(dtype), torch.randn(shape[-1]).to(dtype)
    residual = torch.randn(shape).to(dtype)
    dy, ds = torch.randn(shape), torch.randn(shape)
    with fastlm.use_backend("cuda_emu"):
        with emu.checked(False):
            expected = _norm_and_grads(rms, x, weight, bias, residual, dy, ds)
        with emu.checked():
            actual = _norm_and_grads(rms, x, weight, bias, residual, dy, ds)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert torch.equal(a, e)


@pytest.mark.parametrize(
    "original",
    [torch.zeros(8)[::3], torch.zeros(4)[1:2].as_strided((1,), (3,)), torch.zeros(1, 5).expand(3, 5)[:1]],
    ids=["strided", "one-element-stride-3", "expanded-row"],
)
def test_write_back_takes_any_layout(original):
    """What a kernel wrote into a checked copy reaches the input, whatever the input's strides (a one-element
    tensor whose stride is not 1 counts as contiguous yet cannot be viewed as bytes in place)."""
    copy = torch.full(original.shape, 2.0)
    emu._write_back(original, copy)
    assert torch.equal(original, copy)
