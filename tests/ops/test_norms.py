"""LayerNorm / RMSNorm in every backend against the fp64 reference (docs/architecture.md, "Numerics and bad input")."""

import random

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm.ops.norms import norm_reference
from fastlm.testing import LAYOUTS, assert_close_to_reference, poisoned_outputs, randn, with_layout

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def baseline(x, weight, bias, eps, residual, rms):
    """The same computation in PyTorch at the input dtype: what the kernel's error is measured against."""
    s = x if residual is None else x + residual
    w = None if weight is None else weight.to(s.dtype)
    if rms:
        return F.rms_norm(s, (s.shape[-1],), w, eps).to(x.dtype), s
    b = None if bias is None else bias.to(s.dtype)
    return F.layer_norm(s, (s.shape[-1],), w, b, eps).to(x.dtype), s


def outputs_and_grads(fn, inputs, upstream, eps, rms):
    """Run `fn` on leaves made from `inputs` (x, weight, bias, residual; their layouts kept) and backward
    from `upstream` (dy, or dy and ds when fn returns s too), cast to the outputs' dtypes where they
    differ. Returns [y, s, dx, dweight, dbias, dresidual], None where absent."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
    out = fn(leaves[0], leaves[1], leaves[2], eps, leaves[3], rms)
    outs = out if isinstance(out, tuple) else (out,)
    grad_outputs = [g if g.dtype == o.dtype else g.to(o.dtype) for o, g in zip(outs, upstream, strict=True)]
    given = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(outs, given, grad_outputs))
    s = outs[1] if len(outs) == 2 else None
    return [outs[0], s] + [None if t is None else next(grads) for t in leaves]


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


def baseline_fn(return_residual):
    def fn(*args):
        y, s = baseline(*args)
        return (y, s) if return_residual else y

    return fn


def check_against_reference(backend, rms, inputs, upstream, eps=1e-5):
    """Outputs and gradients of `backend` within the rule of the fp64 reference, for inputs (x, weight,
    bias, residual) and upstream gradients (dy,) or (dy, ds) (then s is returned and checked too)."""
    return_residual = len(upstream) == 2
    actual = outputs_and_grads(fastlm_fn(backend, return_residual), inputs, upstream, eps, rms)
    upcast = [None if t is None else t.double() for t in inputs]
    oracle = outputs_and_grads(oracle_fn(return_residual), upcast, upstream, eps, rms)
    base = outputs_and_grads(baseline_fn(return_residual), inputs, upstream, eps, rms)
    names = ["y", "s", "dx", "dweight", "dbias", "dresidual"]
    for name, a, o, b in zip(names, actual, oracle, base, strict=True):
        if a is not None:
            assert a.dtype == (inputs[0].dtype if name == "y" else b.dtype), f"{backend} {name}: dtype {a.dtype}"
            assert a.shape == o.shape, f"{backend} {name}: shape {tuple(a.shape)} != {tuple(o.shape)}"
        factor = 2.0 if name in ("y", "s") else 3.0
        assert_close_to_reference(a, o, b, factor=factor, name=f"{backend} {name}")


def check(backend, rms, x, weight=None, bias=None, residual=None, eps=1e-5, return_residual=False):
    """check_against_reference with fresh fp64 upstream gradients."""
    upstream = [torch.randn(x.shape, dtype=torch.float64, device=x.device) for _ in range(1 + return_residual)]
    check_against_reference(backend, rms, [x, weight, bias, residual], upstream, eps)


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


def test_cpu_parameter_grads_sum_rows_accurately():
    """One cpu thread sums d weight / d bias over all 1536 rows: pairwise, their error stays within 3× that
    of the fp32 reference formula (PyTorch's cascaded sums), a bound the rule's floor would not enforce."""
    if "cpu" not in fastlm.available_backends("cpu"):
        pytest.skip("fastlm._C not built")
    inputs = [randn(3 * 512, 128), randn(128), randn(128), None]
    upstream = [randn(3 * 512, 128)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        actual = outputs_and_grads(fastlm_fn("cpu", False), inputs, upstream, 1e-5, False)
    finally:
        torch.set_num_threads(threads)
    fp32 = outputs_and_grads(oracle_fn(False), inputs, upstream, 1e-5, False)
    upcast = [None if t is None else t.double() for t in inputs]
    oracle = outputs_and_grads(oracle_fn(False), upcast, [upstream[0].double()], 1e-5, False)
    for name, i in (("dweight", 3), ("dbias", 4)):
        error = (actual[i].double() - oracle[i]).abs().max().item()
        bound = 3 * (fp32[i].double() - oracle[i]).abs().max().item()
        assert error <= bound, f"cpu {name}: max error {error:.2e} exceeds 3× the fp32 reference's ({bound:.2e})"


def test_strided_inputs(backend, device):
    base = randn(8, 200, device=device)
    sliced = base[:, 10:106]  # rows strided by 200: used as a view
    check(backend, False, sliced, randn(96, device=device), randn(96, device=device))
    transposed = randn(40, 6, device=device).t()  # unit stride along rows: copied
    check(backend, True, transposed, randn(40, device=device))
    x, weight, residual = randn(5, 48, device=device), randn(48, device=device), randn(10, 48, device=device)[::2]
    check(backend, False, x, weight, None, residual, return_residual=True)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arg", ["x", "residual", "weight", "bias", "dy", "ds"])
def test_layouts(backend, device, arg, layout):
    """Every tensor argument, and the upstream gradients, in every memory layout (stride 0 included:
    along the rows for (..., N) tensors, along N for weight and bias)."""
    shape = (3, 5, 40)
    tensors = {
        "x": randn(*shape, device=device),
        "weight": randn(40, device=device) * 0.5 + 1,
        "bias": randn(40, device=device),
        "residual": randn(*shape, device=device),
        "dy": randn(*shape, device=device),
        "ds": randn(*shape, device=device),
    }
    tensors[arg] = with_layout(tensors[arg], layout, 0 if layout == "expanded" else -1)
    inputs = [tensors[name] for name in ("x", "weight", "bias", "residual")]
    check_against_reference(backend, False, inputs, [tensors["dy"], tensors["ds"]])


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 2, 130])
def test_fused_residual_normalises_the_rounded_sum(backend, device, rms, dtype, n):
    """In 16 bits s = x + residual is rounded before its statistics are taken, so y, the returned s and
    the gradients all agree (narrow rows are where a mismatch shows: their variance is tiny). Narrow rows
    go without weight and bias: a d weight of 1-3 columns is too few samples for the rule."""
    x = randn(64, n, dtype=dtype, device=device)
    residual = randn(64, n, dtype=dtype, device=device, scale=30.0)
    weight = randn(n, dtype=dtype, device=device) if n > 3 else None
    bias = None if rms or n <= 3 else randn(n, dtype=dtype, device=device)
    check(backend, rms, x, weight, bias, residual, return_residual=True)


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 32), (0, 3, 8), (1, 0, 2, 5)], ids=str)
def test_zero_size_dims(backend, device, rms, shape):
    n = shape[-1]
    x, residual = randn(*shape, device=device), randn(*shape, device=device)
    weight, bias = randn(n, device=device), (None if rms else randn(n, device=device))
    check(backend, rms, x, weight, bias, residual, return_residual=True)
    check(backend, rms, x, weight, bias)


def penalty_grads(fn, inputs, upstream, rms):
    """Gradients of x, weight and residual of a gradient penalty: the sum of squares of the gradients
    of fn's (y, s) for `upstream`, taken with create_graph=True."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
    outs = fn(leaves[0], leaves[1], leaves[2], 1e-5, leaves[3], rms)
    given = [t for t in leaves if t is not None]
    first = torch.autograd.grad(
        outs, given, [g.to(o.dtype) for o, g in zip(outs, upstream, strict=True)], create_graph=True
    )
    penalty = sum(g.double().square().sum() for g in first)
    return torch.autograd.grad(penalty, [leaves[0], leaves[1], leaves[3]])


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_double_backward(backend, device, rms):
    """A gradient penalty through the norm (create_graph=True) gets its gradients, in every backend."""
    inputs = [
        randn(4, 24, device=device),
        randn(24, device=device) * 0.5 + 1,
        None if rms else randn(24, device=device),
        randn(4, 24, device=device),
    ]
    upstream = [torch.randn(4, 24, dtype=torch.float64, device=device) for _ in range(2)]
    actual = penalty_grads(fastlm_fn(backend, True), inputs, upstream, rms)
    oracle = penalty_grads(oracle_fn(True), [None if t is None else t.double() for t in inputs], upstream, rms)
    base = penalty_grads(baseline_fn(True), inputs, upstream, rms)
    for name, a, o, b in zip(["dx", "dweight", "dresidual"], actual, oracle, base, strict=True):
        assert_close_to_reference(a, o, b, factor=3.0, name=f"{backend} penalty {name}")


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_matches_reference_backend(backend, device, rms, dtype):
    """Under autocast the kernels give what the reference backend gives under the same autocast: same
    dtypes, values and gradients (fp32 parameters and residual stream, activations in either dtype)."""
    x32 = randn(6, 48, device=device)
    tensors = [x32, x32.to(dtype), randn(48, device=device), randn(48, device=device), randn(6, 48, device=device)]
    upstream = [randn(6, 48, device=device) for _ in range(2)]
    results = {}
    for name in (backend, "reference"):
        for x in tensors[:2]:
            leaves = [t.detach().requires_grad_() for t in [x, *tensors[2:]]]
            with torch.autocast(device, dtype=dtype), fastlm.use_backend(name):
                if rms:
                    y, s = fastlm.rms_norm(leaves[0], leaves[1], 1e-6, leaves[3], return_residual=True)
                else:
                    y, s = fastlm.layer_norm(leaves[0], leaves[1], leaves[2], 1e-5, leaves[3], return_residual=True)
            used = [t for t in leaves if not (rms and t is leaves[2])]
            grads = torch.autograd.grad((y, s), used, [g.to(o.dtype) for o, g in zip((y, s), upstream, strict=True)])
            results.setdefault(name, []).extend([y, s, *grads])
    for got, want in zip(results[backend], results["reference"], strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want)


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
        (lambda: fastlm.layer_norm(torch.randn(4, 8), eps=float("nan")), ValueError, "eps must be a finite"),
        (lambda: fastlm.rms_norm(torch.randn(4, 8), eps=float("inf")), ValueError, "eps must be a finite"),
        (lambda: fastlm.rms_norm(torch.randn(4, 8), eps=True), ValueError, "eps must be a finite"),
        (lambda: fastlm.layer_norm(torch.randn(4, 8), eps=torch.tensor(1e-5)), ValueError, "eps must be a finite"),
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


def random_case(rng, device):
    """A random norm call: (rms, inputs (x, weight, bias, residual), upstream (dy,) or (dy, ds), eps), with
    random leading shape (zero rows included), width, dtypes and the memory layout of every tensor. The
    rule needs many elements to compare errors: rows of 1-3 columns come 6 at a time, without weight
    and bias."""
    rms, dtype = rng.random() < 0.5, rng.choice(DTYPES)
    n = rng.choice([1, 2, 3, 7, 33, 64, 97, 130])
    leading = [(0,), (3, 2), (6, 0)] if n <= 3 else [(), (0,), (1,), (5,), (2, 3), (3, 0)]
    shape = (*rng.choice(leading), n)
    wide = rng.choice([dtype, torch.float32])  # weight / bias / residual in x's dtype or fp32

    def tensor(present, shape, dtype):
        if not present:
            return None
        t = randn(*shape, dtype=dtype, device=device)
        layout = rng.choice(LAYOUTS)
        if layout == "expanded" and len(shape) < 2:
            layout = "sliced" if len(shape) == 1 and shape[0] > 1 else "contiguous"  # a 1-D x would be constant
        return with_layout(t, layout, 0 if layout == "expanded" else -1)

    residual = rng.random() < 0.5
    x = tensor(True, shape, dtype)
    weight = tensor(n > 3 and rng.random() < 0.7, (n,), wide)
    bias = tensor(n > 3 and not rms and rng.random() < 0.7, (n,), wide)
    upstream = [tensor(True, shape, dtype)] + ([tensor(True, shape, wide)] if residual else [])
    eps = rng.choice([1e-5, 1e-6, 0.1])
    return rms, [x, weight, bias, tensor(residual, shape, wide)], upstream, eps


def test_random_cases(backend, device):
    """Seeded random calls (shapes, widths, dtypes, layouts, rms, residual, weight / bias) against the
    fp64 reference under the rule, outputs and gradients."""
    rng = random.Random(16)
    torch.manual_seed(16)
    for _ in range(24):
        rms, inputs, upstream, eps = random_case(rng, device)
        check_against_reference(backend, rms, inputs, upstream, eps)
