"""cross_entropy and linear_cross_entropy in every backend against the fp64 reference
(docs/architecture.md, "Numerics and bad input")."""

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm.ops.cross_entropy import (
    CHUNK_BYTES,
    _ce_fwd,
    cross_entropy_reference,
    linear_cross_entropy_reference,
)
from fastlm.testing import assert_close_to_reference, poisoned_outputs, randn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IGNORE = -100
# (label_smoothing, z_loss)
OPTIONS = [(0.0, 0.0), (0.1, 1e-3)]


def make_labels(rows, v, ignored, device="cpu"):
    """(rows,) int64 labels in [0, v) on `device` with a fraction `ignored` of them set to IGNORE."""
    labels = torch.randint(0, v, (rows,), device=device)
    drop = torch.rand(rows, device=device) < ignored
    if ignored >= 1.0:
        drop[:] = True
    return torch.where(drop, IGNORE, labels)


def baseline_ce(logits, labels, label_smoothing, reduction, z_loss):
    """The same loss computed by PyTorch at the input dtype (what the kernel's error is measured against)."""
    v = logits.shape[-1]
    x, y = logits.reshape(-1, v), labels.reshape(-1)
    loss = F.cross_entropy(x, y, ignore_index=IGNORE, label_smoothing=label_smoothing, reduction="none")
    valid = y != IGNORE
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(x, -1).square() * valid
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp_min(1)
    return loss.sum() if reduction == "sum" else loss.view(labels.shape)


def run(fn, tensors, g):
    """Loss and input gradients of fn on leaf copies of `tensors` (None entries stay None)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*leaves)
    (loss.double() * g).sum().backward()
    return [loss] + [None if t is None else t.grad for t in leaves]


def max_error(t, oracle):
    return (t.detach().double() - oracle.detach().double()).abs().nan_to_num().max().item() if t.numel() else 0.0


def compare(backend, actual, oracle, baselines, names):
    """Check each result against the oracle, measured against the worst of the same-dtype PyTorch
    baselines; for 16-bit results, the oracle's own rounding to that dtype counts as a baseline too (with a
    handful of elements PyTorch's rounding can be luckily exact)."""
    for i, (name, a, o) in enumerate(zip(names, actual, oracle, strict=True)):
        candidates = [base[i] for base in baselines]
        if a is not None and a.dtype in (torch.float16, torch.bfloat16):
            candidates.append(o.detach().to(a.dtype))
        b = None if a is None else max(candidates, key=lambda t: max_error(t, o))
        assert_close_to_reference(a, o, b, factor=2.0 if name == "loss" else 3.0, name=f"{backend} {name}")


def check_ce(backend, logits, labels, label_smoothing=0.0, z_loss=0.0, reduction="mean"):
    options = {"label_smoothing": label_smoothing, "z_loss": z_loss, "reduction": reduction}
    rows_shape = labels.shape if reduction == "none" else ()
    g = torch.randn(rows_shape, dtype=torch.float64, device=logits.device)  # upstream gradient of the loss
    if reduction == "mean":
        g = torch.ones_like(g)

    def ours(x):
        with fastlm.use_backend(backend), poisoned_outputs():
            return fastlm.cross_entropy(x, labels, ignore_index=IGNORE, **options)

    actual = run(ours, [logits], g)
    assert actual[0].dtype == torch.float32 and actual[1].dtype == logits.dtype
    oracle = run(lambda x: cross_entropy_reference(x, labels, ignore_index=IGNORE, **options), [logits.double()], g)
    base = run(lambda x: baseline_ce(x, labels, label_smoothing, reduction, z_loss), [logits], g)
    compare(backend, actual, oracle, [base], ["loss", "dlogits"])
    return actual


@pytest.mark.parametrize("label_smoothing, z_loss", OPTIONS, ids=["plain", "smooth+z"])
@pytest.mark.parametrize("ignored", [0.0, 0.85, 1.0], ids=["all", "15%", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 97), (7, 1000), (33, 1025)], ids=str)
def test_cross_entropy_matches_reference(backend, device, shape, dtype, ignored, label_smoothing, z_loss):
    rows, v = shape
    logits = randn(rows, v, dtype=dtype, device=device, scale=3.0)
    labels = make_labels(rows, v, ignored, device)
    loss, dlogits = check_ce(backend, logits, labels, label_smoothing, z_loss)
    if ignored == 1.0:  # every label ignored: exactly 0 with zero gradient, not NaN
        assert loss.item() == 0.0 and torch.count_nonzero(dlogits) == 0


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_cross_entropy_reductions_and_shapes(backend, device, reduction):
    logits = randn(2, 5, 130, device=device, scale=2.0)  # (..., V)
    labels = make_labels(10, 130, 0.3, device).view(2, 5)
    loss, _ = check_ce(backend, logits, labels, 0.05, 1e-4, reduction)
    assert loss.shape == (labels.shape if reduction == "none" else ())
    with fastlm.use_backend(backend):
        loss32 = fastlm.cross_entropy(logits, labels.int(), reduction=reduction)
    torch.testing.assert_close(loss32, cross_entropy_reference(logits, labels, reduction=reduction))


def test_cross_entropy_wide_vocab(backend, device):
    """A vocabulary wider than one Triton block and not a multiple of it (BERT's 30522)."""
    logits, labels = randn(3, 30522, device=device, scale=4.0), torch.tensor([5, IGNORE, 30521], device=device)
    check_ce(backend, logits, labels, 0.1, 1e-4)


def test_strided_logits(backend, device):
    base = randn(6, 200, device=device, scale=2.0)
    check_ce(backend, base[:, 10:150], make_labels(6, 140, 0.2, device))  # rows strided by 200: used as a view
    check_ce(backend, randn(90, 4, device=device).t(), make_labels(4, 90, 0.0, device))  # unit stride: copied


def test_empty_and_nan(backend, device):
    with fastlm.use_backend(backend):
        empty = torch.empty(0, 11, device=device, requires_grad=True)
        loss = fastlm.cross_entropy(empty, torch.empty(0, dtype=torch.long, device=device))
        loss.backward()
        assert loss.item() == 0.0 and empty.grad.shape == (0, 11)
        x = randn(3, 40, device=device)
        x[1, 7] = float("nan")
        rows = fastlm.cross_entropy(x, torch.tensor([1, 2, 3], device=device), reduction="none")
    assert torch.isnan(rows[1]) and not torch.isnan(rows[[0, 2]]).any()


def test_kernel_masks_labels_out_of_range(backend, device):
    """Labels outside [0, V) reach a kernel only on a GPU (the CPU raises first): they never read out of
    bounds and give that row a NaN loss and gradient."""
    if backend == "reference":
        pytest.skip("no kernel")
    logits = randn(4, 37, device=device)
    labels = torch.tensor([3, 37, -5, IGNORE], device=device)
    scale = torch.ones(4, device=device)
    with poisoned_outputs():
        loss, _, dlogits = _ce_fwd(logits, labels, scale, IGNORE, 0.0, 0.0, True, backend)
    assert torch.isnan(loss[1:3]).all() and torch.isnan(dlogits[1:3]).all()
    assert loss[3] == 0 and torch.count_nonzero(dlogits[3]) == 0
    torch.testing.assert_close(loss[0], cross_entropy_reference(logits[:1], labels[:1]))


# --------------------------------------------------------------------------- linear_cross_entropy
def baseline_linear(hidden, weight, bias, labels, label_smoothing, reduction, z_loss):
    """The head as Hugging Face computes it at the input dtype: F.linear (one addmm), then the loss."""
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight, bias)
    return baseline_ce(logits, labels.reshape(-1), label_smoothing, reduction, z_loss).view(
        labels.shape if reduction == "none" else ()
    )


def check_linear(backend, hidden, weight, bias, labels, label_smoothing=0.0, z_loss=0.0, reduction="mean", **kw):
    options = {"label_smoothing": label_smoothing, "z_loss": z_loss, "reduction": reduction}
    g = torch.randn(labels.shape if reduction == "none" else (), dtype=torch.float64, device=hidden.device)
    if reduction != "none" and hidden.dtype != torch.float32:
        # Backward scales the 16-bit d hidden by grad_output: one rounding more than PyTorch unless it is a
        # power of two (1 in bf16 training, the loss scale of fp16 AMP).
        g = torch.full_like(g, 2.0)

    def ours(h, w, b):
        with fastlm.use_backend(backend), poisoned_outputs():
            return fastlm.linear_cross_entropy(h, w, labels, b, ignore_index=IGNORE, **options, **kw)

    tensors = [hidden, weight, bias]
    actual = run(ours, tensors, g)
    upcast = [None if t is None else t.double() for t in tensors]
    oracle = run(lambda h, w, b: linear_cross_entropy_reference(h, w, labels, b, **options), upcast, g)
    base = run(lambda h, w, b: baseline_linear(h, w, b, labels, label_smoothing, reduction, z_loss), tensors, g)
    # The head's matmuls at the input dtype followed by an exact loss: in 16 bits, rounding the logits is
    # most of the error, and which of the two baselines it hits harder is luck.
    exact_loss = run(lambda h, w, b: linear_cross_entropy_reference(h, w, labels, b, **options), tensors, g)
    for t, grad in zip(tensors, actual[1:], strict=True):
        assert t is None or grad.dtype == t.dtype
    compare(backend, actual, oracle, [base, exact_loss], ["loss", "dhidden", "dweight", "dbias"])
    return actual


@pytest.mark.parametrize("label_smoothing, z_loss", OPTIONS, ids=["plain", "smooth+z"])
@pytest.mark.parametrize("ignored", [0.0, 0.85, 1.0], ids=["all", "15%", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 16, 97), (7, 24, 1000), (33, 16, 1025)], ids=str)
def test_linear_cross_entropy_matches_reference(backend, device, shape, dtype, ignored, label_smoothing, z_loss):
    rows, d, v = shape
    hidden = randn(rows, d, dtype=dtype, device=device)
    weight = randn(v, d, dtype=dtype, device=device, scale=0.5)
    bias = randn(v, dtype=dtype, device=device) if rows != 7 else None
    labels = make_labels(rows, v, ignored, device)
    loss, dh, dw, db = check_linear(backend, hidden, weight, bias, labels, label_smoothing, z_loss)
    if ignored == 1.0:
        assert loss.item() == 0.0
        assert all(t is None or torch.count_nonzero(t) == 0 for t in (dh, dw, db))


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_linear_cross_entropy_reductions(backend, device, reduction):
    hidden = randn(3, 4, 20, device=device)  # (..., D)
    labels = make_labels(12, 50, 0.5, device).view(3, 4)
    check_linear(backend, hidden, randn(50, 20, device=device), randn(50, device=device), labels, 0.1, 1e-3, reduction)


def test_linear_cross_entropy_chunks(backend, device, monkeypatch):
    """Several chunks of compacted rows, with d weight accumulated across them."""
    for device_type in CHUNK_BYTES:  # "cpu" and "cuda"
        monkeypatch.setitem(CHUNK_BYTES, device_type, 4 * 300 * 5)  # 5 rows per chunk
    hidden, weight, bias = randn(40, 12, device=device), randn(300, 12, device=device), randn(300, device=device)
    check_linear(backend, hidden, weight, bias, make_labels(40, 300, 0.5, device), 0.1, 1e-4)


def test_linear_cross_entropy_capacity(backend, device):
    hidden, weight = randn(30, 16, device=device), randn(70, 16, device=device)
    labels = make_labels(30, 70, 0.8, device)
    labels[:6] = torch.arange(6, device=device)  # at least 6 labelled rows
    count = int((labels != IGNORE).sum())
    check_linear(backend, hidden, weight, None, labels, capacity=count)
    check_linear(backend, hidden, weight, None, labels, capacity=count + 5, reduction="none")
    if backend != "reference":  # the reference has no capacity: it runs every row
        with fastlm.use_backend(backend):
            loss = fastlm.linear_cross_entropy(hidden, weight, labels, capacity=count - 1)
        assert torch.isnan(loss)


def test_tied_weights(backend, device):
    """LM head tied to the input embedding: both gradients add into the one parameter."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(60, 16, device=device)
    ids = torch.randint(0, 60, (2, 9), device=device)
    labels = make_labels(18, 60, 0.5, device).view(2, 9)

    def grad(fn):
        emb.zero_grad()
        hidden = torch.tanh(emb(ids))  # (2, 9, 16)
        fn(hidden, emb.weight, labels).backward()
        return emb.weight.grad.clone()

    with fastlm.use_backend(backend):
        ours = grad(lambda h, w, y: fastlm.linear_cross_entropy(h, w, y))
    expected = grad(lambda h, w, y: F.cross_entropy((h @ w.t()).view(-1, 60), y.view(-1)))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: fastlm.cross_entropy(torch.randn(4, 8), torch.tensor([0, 1, 8, 2])), ValueError, r"\[0, 8\)"),
        (lambda: fastlm.cross_entropy(torch.randn(4, 8), torch.tensor([0, -1, 2, 2])), ValueError, "got -1"),
        (lambda: fastlm.cross_entropy(torch.randn(4, 8), torch.zeros(3, dtype=torch.long)), ValueError, r"\(4,\)"),
        (lambda: fastlm.cross_entropy(torch.randn(4, 8), torch.zeros(4)), TypeError, "int64 or int32"),
        (lambda: fastlm.cross_entropy(torch.ones(4, 8, dtype=torch.long), torch.zeros(4)), TypeError, "logits"),
        (lambda: fastlm.cross_entropy(torch.randn(4, 8), torch.zeros(4).long(), reduction="avg"), ValueError, "avg"),
        (lambda: fastlm.cross_entropy(torch.randn(4, 8), torch.zeros(4).long(), label_smoothing=2), ValueError, "1]"),
        (lambda: fastlm.cross_entropy(torch.randn(4, 8), torch.zeros(4).long(), z_loss=-1), ValueError, "z_loss"),
        (
            lambda: fastlm.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 9), torch.zeros(4).long()),
            ValueError,
            r"weight must have shape \(V, 8\)",
        ),
        (
            lambda: fastlm.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5).long()),
            ValueError,
            r"labels must have shape \(4,\)",
        ),
        (
            lambda: fastlm.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 1, 2, 10])),
            ValueError,
            r"\[0, 10\)",
        ),
        (
            lambda: fastlm.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4)),
            TypeError,
            "labels",
        ),
        (
            lambda: fastlm.linear_cross_entropy(
                torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4).long(), torch.randn(9)
            ),
            ValueError,
            r"bias must have shape \(10,\)",
        ),
        (
            lambda: fastlm.linear_cross_entropy(
                torch.randn(4, 8), torch.randn(10, 8, dtype=torch.float16), torch.zeros(4).long()
            ),
            TypeError,
            "hidden's dtype",
        ),
        (
            lambda: fastlm.linear_cross_entropy(
                torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4).long(), capacity=-1
            ),
            ValueError,
            "capacity",
        ),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_float64_runs_on_reference_and_refuses_kernels(device):
    x = torch.randn(5, 9, dtype=torch.float64, device=device)
    y = torch.tensor([0, 1, 2, IGNORE, 8], device=device)
    torch.testing.assert_close(
        fastlm.cross_entropy(x, y, label_smoothing=0.1), F.cross_entropy(x, y, label_smoothing=0.1)
    )
    kernels = [name for name in fastlm.available_backends(device) if name != "reference"]
    for kernel in kernels:
        with fastlm.use_backend(kernel), pytest.raises(RuntimeError, match="no cross_entropy on torch.float64"):
            fastlm.cross_entropy(x, y)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("v", [30522, 32128, 50257])
def test_on_gpu(backend, dtype, v):
    rows, d = 4096, 768
    hidden = randn(rows, d, dtype=dtype, device="cuda")
    weight = randn(v, d, dtype=dtype, device="cuda", scale=0.05)
    labels = make_labels(rows, v, 0.85, "cuda")
    check_linear(backend, hidden, weight, randn(v, dtype=dtype, device="cuda"), labels, 0.1, 1e-4, capacity=1024)
    check_ce(backend, randn(512, v, dtype=dtype, device="cuda", scale=3.0), labels[:512], 0.1, 1e-4)
