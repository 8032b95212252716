"""fastlm.nn.CrossEntropyLoss / LinearCrossEntropyLoss as drop-ins, and torch.compile through the op."""

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm.testing import default_device, randn

# torch.compile through the registered ops: the CPU kernels on the CPU; every GPU kernel on a GPU
COMPILED = ["cpu"] if default_device() == "cpu" else ["triton", "cuda"]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_loss_is_drop_in_for_torch(backend, device, reduction):
    ref = torch.nn.CrossEntropyLoss(reduction=reduction, label_smoothing=0.1)
    mod = fastlm.nn.CrossEntropyLoss(reduction=reduction, label_smoothing=0.1)
    logits = randn(6, 50, device=device, scale=2.0)
    labels = torch.tensor([1, -100, 3, 49, 0, -100], device=device)
    with fastlm.use_backend(backend):
        torch.testing.assert_close(mod(logits, labels), ref(logits, labels))
    spatial = randn(2, 50, 3, device=device)  # torch's (N, V, d1) layout
    spatial_labels = torch.randint(0, 50, (2, 3), device=device)
    with fastlm.use_backend(backend):
        torch.testing.assert_close(mod(spatial, spatial_labels), ref(spatial, spatial_labels))


def test_linear_cross_entropy_loss_matches_head(backend, device):
    """BERT's MLM head: decoder tied to the word embedding, with a decoder bias."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(80, 24, device=device)
    bias = torch.nn.Parameter(torch.randn(80, device=device))
    ids = torch.randint(0, 80, (3, 10), device=device)
    labels = torch.where(torch.rand(3, 10, device=device) < 0.3, ids, -100)
    loss_fn = fastlm.nn.LinearCrossEntropyLoss(capacity=30)

    def grads(fn):
        emb.zero_grad()
        bias.grad = None
        hidden = torch.tanh(emb(ids))  # (3, 10, 24)
        loss = fn(hidden)
        loss.backward()
        return loss.detach(), emb.weight.grad.clone(), bias.grad.clone()

    with fastlm.use_backend(backend):
        ours = grads(lambda h: loss_fn(h, emb.weight, labels, bias))
    expected = grads(lambda h: F.cross_entropy(F.linear(h, emb.weight, bias).view(-1, 80), labels.view(-1)))
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert "capacity=30" in repr(loss_fn)


@pytest.mark.parametrize("kernel", COMPILED)
def test_torch_compile_fullgraph_cross_entropy(kernel, device):
    if kernel not in fastlm.available_backends(device):
        pytest.skip(f"{kernel} backend unavailable")
    proj = torch.nn.Linear(16, 40, device=device)
    loss_fn = fastlm.nn.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-4)
    x = randn(8, 16, device=device)
    labels = torch.tensor([0, 5, -100, 39, 7, -100, 2, 2], device=device)

    def step(x):
        return loss_fn(proj(x), labels)

    with fastlm.use_backend(kernel):
        expected = step(x)
        expected.backward()
        grads = [p.grad.clone() for p in proj.parameters()]
        proj.zero_grad()
        loss = torch.compile(step, fullgraph=True)(x)
        loss.backward()
    torch.testing.assert_close(loss, expected)
    for p, g in zip(proj.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g)
