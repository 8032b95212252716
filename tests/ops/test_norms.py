"""LayerNorm / RMSNorm in every backend against the fp64 reference (docs/architecture.md, "Numerics and bad input")."""

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm.ops.norms import norm_reference
from fastlm.testing import assert_close_to_reference, poisoned_outputs, randn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def baseline(x, weight, bias, eps, residual, rms):
    """The same computation in PyTorch at the input dtype: what the kernel's error is measured against."""
    s = x if residual is None else x + residual
    w = None if weight is None else weight.to(s.dtype)
    if rms:
        return F.rms_norm(s, (s.shape[-1],), w, eps).to(x.dtype), s
    b = None if bias is None else bias.to(s.dtype)
    return F.layer_norm(s, (s.shape[-1],), w, b, eps).to(x.dtype), s


def run(fn, inputs, eps, rms, return_residual, grads):
    """Forward + backward of `fn` on leaf copies of `inputs`; returns outputs and input gradients."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    x, weight, bias, residual = leaves
    out = fn(x, weight, bias, eps, residual, rms)
    y, s = out if isinstance(out, tuple) else (out, None)
    loss = (y.double() * grads[0]).sum()
    if s is not None and return_residual:
        loss = loss + (s.double() * grads[1]).sum()
    loss.backward()
    return [y, s if return_residual else None] + [None if t is None else t.grad for t in leaves]


def fastlm_fn(backend, return_residual):
    def fn(x, weight, bias, eps, residual, rms):
        with fastlm.use_backend(backend), poisoned_outputs():
            if rms:
                return fastlm.rms_norm(x, weight, eps, residual, return_residual=return_residual)
            return fastlm.layer_norm(x, weight, bias, eps, residual, return_residual=return_residual)

    return fn


def oracle_fn(return_residual):
    def fn(x, weight, bias, eps, residual, rms):
        return norm_reference(x, weight, bias, eps, residual, rms=rms, return_residual=return_residual)

    return fn


def check(backend, rms, x, weight=None, bias=None, residual=None, eps=1e-5, return_residual=False):
    inputs = [x, weight, bias, residual]
    grads = [torch.randn(x.shape, dtype=torch.float64, device=x.device) for _ in range(2)]  # upstream dy, ds
    actual = run(fastlm_fn(backend, return_residual), inputs, eps, rms, return_residual, grads)
    upcast = [None if t is None else t.double() for t in inputs]
    oracle = run(oracle_fn(return_residual), upcast, eps, rms, return_residual, grads)

    def base_fn(*args):
        y, s = baseline(*args)
        return (y, s) if return_residual else y

    base = run(base_fn, inputs, eps, rms, return_residual, grads)
    names = ["y", "s", "dx", "dweight", "dbias", "dresidual"]
    for name, a, o, b in zip(names, actual, oracle, base, strict=True):
        if name == "s" and a is not None and residual is None:
            assert a is x or torch.equal(a, x)
            continue
        factor = 2.0 if name in ("y", "s") else 3.0
        if a is not None:
            assert a.dtype == (b.dtype if name not in ("y",) else x.dtype), f"{name}: dtype {a.dtype}"
        assert_close_to_reference(a, o, b, factor=factor, name=f"{backend} {name}")


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (7, 97), (3, 5, 768), (2, 1025)], ids=str)
def test_norm_matches_reference(backend, device, rms, dtype, shape):
    n = shape[-1]
    x = randn(*shape, dtype=dtype, device=device, scale=2.0) + 0.5
    weight = randn(n, dtype=dtype, device=device) * 0.5 + 1
    bias = None if rms else randn(n, dtype=dtype, device=device)
    check(backend, rms, x, weight, bias)


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("return_residual", [False, True])
def test_fused_residual(backend, device, rms, dtype, return_residual):
    x = randn(13, 130, dtype=dtype, device=device)
    residual = randn(13, 130, dtype=dtype, device=device)
    weight = randn(130, dtype=dtype, device=device)
    bias = None if rms else randn(130, dtype=dtype, device=device)
    check(backend, rms, x, weight, bias, residual, return_residual=return_residual)


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_mixed_precision(backend, device, rms):
    """bf16 activations with an fp32 residual stream and fp32 parameters."""
    x = randn(9, 64, dtype=torch.bfloat16, device=device)
    residual = randn(9, 64, device=device)
    weight, bias = randn(64, device=device), (None if rms else randn(64, device=device))
    check(backend, rms, x, weight, bias, residual, return_residual=True)


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_without_affine(backend, device, rms):
    check(backend, rms, randn(6, 33, device=device))


@pytest.mark.parametrize("n", [4097, 65536])
def test_wide_rows(backend, device, n):
    x = randn(2, n, device=device, scale=3.0)
    check(backend, False, x, randn(n, device=device), randn(n, device=device))
    check(backend, True, x, randn(n, device=device))


@pytest.mark.parametrize("n", [768, 1025])
def test_cpu_outputs_past_the_cache(n):
    """fp32 outputs of 8 MiB and more leave the CPU kernels through non-temporal stores (every row when
    rows are 32-byte aligned, the aligned ones among 1025-wide rows), from every torch thread."""
    if "cpu" not in fastlm.available_backends("cpu"):
        pytest.skip("fastlm._C not built")
    rows = (8 << 20) // (4 * n) + 3
    x = randn(rows, n, scale=2.0)
    check("cpu", False, x, randn(n), randn(n))
    check("cpu", True, x, randn(n))


def test_strided_inputs(backend, device):
    base = randn(8, 200, device=device)
    sliced = base[:, 10:106]  # rows strided by 200: used as a view
    check(backend, False, sliced, randn(96, device=device), randn(96, device=device))
    transposed = randn(40, 6, device=device).t()  # unit stride along rows: copied
    check(backend, True, transposed, randn(40, device=device))
    x, weight, residual = randn(5, 48, device=device), randn(48, device=device), randn(10, 48, device=device)[::2]
    check(backend, False, x, weight, None, residual, return_residual=True)


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_empty_rows(backend, device, rms):
    x = torch.empty(0, 16, device=device, requires_grad=True)
    weight = torch.ones(16, device=device, requires_grad=True)
    with fastlm.use_backend(backend):
        y = fastlm.rms_norm(x, weight) if rms else fastlm.layer_norm(x, weight)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert torch.equal(weight.grad, torch.zeros(16, device=device))


def test_nan_propagates(backend, device):
    x = randn(3, 40, device=device)
    x[1, 7] = float("nan")
    with fastlm.use_backend(backend):
        y = fastlm.layer_norm(x, torch.ones(40, device=device))
    assert torch.isnan(y[1]).all() and not torch.isnan(y[[0, 2]]).any()


def test_default_backend_on_cpu():
    x = randn(4, 32)
    expected = "cpu" if "cpu" in fastlm.available_backends("cpu") else "reference"
    from fastlm.ops.norms import NORMS

    assert NORMS.select("layer_norm", x.device, x.dtype) == expected


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda: fastlm.layer_norm(torch.randn(4, 8), torch.ones(7)),
            ValueError,
            r"weight must have shape \(8,\)",
        ),
        (lambda: fastlm.layer_norm(torch.tensor(1.0)), ValueError, "0-d"),
        (lambda: fastlm.rms_norm(torch.ones(4, 8, dtype=torch.int32)), TypeError, "floating-point"),
        (
            lambda: fastlm.layer_norm(torch.randn(4, 8), torch.ones(8, device="meta")),
            ValueError,
            "weight is on meta",
        ),
        (
            lambda: fastlm.layer_norm(torch.randn(4, 8), residual=torch.randn(4, 9)),
            ValueError,
            "residual must have",
        ),
        (lambda: fastlm.layer_norm(torch.randn(4, 8), eps=-1.0), ValueError, "eps"),
        (
            lambda: fastlm.layer_norm(torch.randn(4, 8), bias=torch.ones(8, dtype=torch.int64)),
            TypeError,
            "bias",
        ),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_forced_backend_that_cannot_run():
    with fastlm.use_backend("cuda"), pytest.raises(RuntimeError, match="'cuda' was forced"):
        fastlm.layer_norm(torch.randn(4, 8))
    with pytest.raises(ValueError, match="unknown fastlm backend"), fastlm.use_backend("tpu"):
        pass


def test_float64_runs_on_reference_and_refuses_kernels(device):
    x = torch.randn(4, 8, dtype=torch.float64, device=device)  # triton runs CPU tensors only interpreted
    assert torch.allclose(fastlm.layer_norm(x), F.layer_norm(x, (8,)))
    with fastlm.use_backend("triton"), pytest.raises(RuntimeError, match="no layer_norm on torch.float64"):
        fastlm.layer_norm(x)


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("FASTLM_BACKEND", "reference")
    assert fastlm.backends.forced_backend() == "reference"
    monkeypatch.setenv("FASTLM_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown fastlm backend"):
        fastlm.backends.forced_backend()


@pytest.mark.gpu
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [768, 1024, 4096, 8192, 65536])
def test_norm_on_gpu(backend, rms, dtype, n):
    x = randn(4096 if n <= 8192 else 64, n, dtype=dtype, device="cuda")
    residual = randn(*x.shape, dtype=dtype, device="cuda")
    weight = randn(n, dtype=dtype, device="cuda")
    bias = None if rms else randn(n, dtype=dtype, device="cuda")
    check(backend, rms, x, weight, bias, residual, return_residual=True)
