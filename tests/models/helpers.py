"""Shared by the model tests: parity checks against Hugging Face's eager models (the rule of
docs/architecture.md, "Numerics and bad input", with HF in fp64 as the oracle and HF in fp32 as the
baseline), and running a model on a forced backend."""

import contextlib
import copy

import pytest

import fastlm
from fastlm.testing import assert_close_to_reference


def hf_pair(hf_model, device="cpu"):
    """(fp32, fp64) copies of an HF model on `device`, in eval mode."""
    hf_model = hf_model.to(device).eval()
    return hf_model, copy.deepcopy(hf_model).double()


def on_device(tensors, device):
    """The tensors of a test batch moved to `device`, as a tuple."""
    return tuple(t.to(device) for t in tensors)


@contextlib.contextmanager
def on_backend(backend):
    """Run the block on ``backend``; skip the test when an op the model uses has no kernel there."""
    try:
        with fastlm.use_backend(backend):
            yield
    except RuntimeError as e:
        if "was forced for" in str(e):
            pytest.skip(str(e))
        raise


def assert_matches_hf(actual, oracle, baseline, name, factor=2.0):
    """fastlm's fp32 error against HF fp64 within ``factor`` × HF fp32's error (docs/architecture.md,
    "Numerics and bad input")."""
    assert_close_to_reference(actual, oracle, baseline, factor=factor, name=name)


def assert_grads_match(model, hf32, hf64, *, rename=lambda name, g: [(name, g)]):
    """Every parameter gradient of the fastlm ``model`` against the HF parameter of the same name, and
    every HF parameter checked.

    rename(name, grad) -> [(hf_name, grad in HF's layout), ...], for layouts that differ (GPT-2's Conv1D,
    BERT's fused query/key/value)."""
    hf32_params, hf64_params = dict(hf32.named_parameters()), dict(hf64.named_parameters())
    checked = set()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        for hf_name, grad in rename(name, p.grad):
            assert_close_to_reference(
                grad, hf64_params[hf_name].grad, hf32_params[hf_name].grad, factor=3.0, name=f"grad {hf_name}"
            )
            checked.add(hf_name)
    tied = {n for n, p in hf32_params.items() if any(p is q for m, q in hf32_params.items() if m in checked)}
    assert checked | tied == set(hf32_params), f"not checked: {sorted(set(hf32_params) - checked - tied)}"
