"""fastlm.nn.LayerNorm / RMSNorm as drop-ins, and torch.compile through the registered ops."""

import pytest
import torch

import fastlm
from fastlm.testing import default_device, randn

# torch.compile through the registered ops: the CPU kernels on the CPU; every GPU kernel on a GPU
COMPILED = ["cpu"] if default_device() == "cpu" else ["triton", "cuda"]


def test_layer_norm_is_drop_in_for_torch(backend, device):
    ref = torch.nn.LayerNorm(48, eps=1e-6, device=device)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    mod = fastlm.nn.LayerNorm(48, eps=1e-6).to(device)
    mod.load_state_dict(ref.state_dict())
    assert mod.state_dict().keys() == ref.state_dict().keys()
    x = randn(3, 5, 48, device=device)
    with fastlm.use_backend(backend):
        torch.testing.assert_close(mod(x), ref(x), atol=1e-5, rtol=1e-5)


def test_layer_norm_without_affine_has_no_parameters():
    mod = fastlm.nn.LayerNorm(16, elementwise_affine=False)
    assert list(mod.parameters()) == [] and mod.state_dict() == {}
    x = randn(2, 16)
    torch.testing.assert_close(mod(x), torch.nn.functional.layer_norm(x, (16,)))


def test_rms_norm_is_drop_in_for_t5_layer_norm(backend, device):
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    ref = t5.T5LayerNorm(40, eps=1e-6).to(device)
    with torch.no_grad():
        ref.weight.normal_()
    mod = fastlm.nn.RMSNorm(40, eps=1e-6).to(device)
    mod.load_state_dict(ref.state_dict())
    assert mod.state_dict().keys() == ref.state_dict().keys()
    assert mod.variance_epsilon == ref.variance_epsilon
    x = randn(2, 7, 40, device=device)
    with fastlm.use_backend(backend):
        torch.testing.assert_close(mod(x), ref(x), atol=1e-5, rtol=1e-5)


def test_modules_fuse_the_residual(backend, device):
    mod = fastlm.nn.RMSNorm(32).to(device)
    x, residual = randn(4, 32, device=device), randn(4, 32, device=device)
    with fastlm.use_backend(backend):
        y, s = mod(x, residual, return_residual=True)
    torch.testing.assert_close(s, x + residual)
    torch.testing.assert_close(y, mod(x + residual), atol=1e-6, rtol=1e-5)


class Block(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.proj = torch.nn.Linear(n, n)
        self.ln = fastlm.nn.LayerNorm(n)
        self.rms = fastlm.nn.RMSNorm(n)

    def forward(self, x):
        y, s = self.ln(self.proj(x), x, return_residual=True)
        return self.rms(y) + s


@pytest.mark.parametrize("kernel", COMPILED)
def test_torch_compile_fullgraph(kernel, device):
    if kernel not in fastlm.available_backends(device):
        pytest.skip(f"{kernel} backend unavailable")
    torch.manual_seed(0)
    block = Block(64).to(device)
    x = randn(6, 64, device=device, requires_grad=True)
    with fastlm.use_backend(kernel):
        expected = block(x)
        expected.square().sum().backward()
        grads = [p.grad.clone() for p in block.parameters()]
        block.zero_grad()
        compiled = torch.compile(block, fullgraph=True)
        out = compiled(x)
        out.square().sum().backward()
    torch.testing.assert_close(out, expected)
    for p, g in zip(block.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g)
