"""Every GPU kernel runs on its tensors' device and on that device's current stream: each op, forward and
backward, on cuda:1 while cuda:0 is the current device (plainly, and under a side stream of cuda:1) gives what
it gives on cuda:0; those need two GPUs. The side-stream test also runs on cuda:0 alone (one GPU)."""

import pytest
import torch

import fastlm
from fastlm.testing import poisoned_outputs

pytestmark = pytest.mark.gpu

GPU_BACKENDS = ("triton", "cuda")
IGNORE = -100
SLEEP_CYCLES = 200_000_000  # ~0.1 s of a GPU's clock: the side stream is busy that long before the inputs land


def _layer_norm(t):
    return fastlm.layer_norm(t["x"], t["weight"], t["bias"], residual=t["residual"], return_residual=True)


def _rms_norm(t):
    return fastlm.rms_norm(t["x"], t["weight"])


def _cross_entropy(t):
    return fastlm.cross_entropy(t["logits"], t["labels"], label_smoothing=0.1)


def _linear_cross_entropy(t):
    rows = t["labels"].numel()  # capacity: the labelled rows are gathered without a host sync
    return fastlm.linear_cross_entropy(t["hidden"], t["weight"], t["labels"], t["bias"], capacity=rows)


def _attention(t):
    return fastlm.attention(t["q"], t["k"], t["v"], causal=True, key_padding_mask=t["mask"])


def _labels(g, rows, v):
    labels = torch.randint(0, v, (rows,), generator=g)
    labels[torch.rand(rows, generator=g) < 0.5] = IGNORE
    return labels


def _inputs(op, g):
    """CPU inputs of `op` drawn from `g`: (name -> tensor); the floating ones get gradients."""
    bf16 = torch.bfloat16

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(bf16)

    if op == "layer_norm":
        return {"x": randn(257, 1024), "weight": randn(1024), "bias": randn(1024), "residual": randn(257, 1024)}
    if op == "rms_norm":
        return {"x": randn(257, 1024), "weight": randn(1024)}
    if op == "cross_entropy":
        return {"logits": randn(300, 5000) * 3, "labels": _labels(g, 300, 5000)}
    if op == "linear_cross_entropy":
        return {
            "hidden": randn(300, 256),
            "weight": randn(5000, 256) * 0.05,
            "bias": randn(5000),
            "labels": _labels(g, 300, 5000),
        }
    mask = torch.ones(2, 200, dtype=torch.bool)
    mask[1, 150:] = False
    return {"q": randn(2, 4, 200, 64), "k": randn(2, 4, 200, 64), "v": randn(2, 4, 200, 64), "mask": mask}


OPS = {
    "layer_norm": _layer_norm,
    "rms_norm": _rms_norm,
    "cross_entropy": _cross_entropy,
    "linear_cross_entropy": _linear_cross_entropy,
    "attention": _attention,
}


def _forward_backward(op, inputs, cotangents):
    """`op`'s outputs and the gradients of sum(output * cotangent) with respect to its floating inputs."""
    leaves = {k: v.requires_grad_() if v.is_floating_point() else v for k, v in inputs.items()}
    wrt = [v for v in leaves.values() if v.requires_grad]
    with poisoned_outputs():  # outputs a kernel leaves unwritten show as NaN
        out = OPS[op](leaves)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum((o.float() * c).sum() for o, c in zip(outs, cotangents, strict=True))
        return [o.detach() for o in outs] + list(torch.autograd.grad(loss, wrt))


def _cotangents(op, g):
    """One cotangent per output of `op`, in float32 (shapes from a CPU reference run)."""
    with fastlm.use_backend("reference"):
        outs = OPS[op](_inputs(op, torch.Generator().manual_seed(0)))
    return [torch.randn(o.shape, generator=g) for o in (outs if isinstance(outs, tuple) else (outs,))]


def _case(op):
    g = torch.Generator().manual_seed(1234)
    return _inputs(op, g), _cotangents(op, g)


def _skip_unless_runnable(device, backend):
    count = torch.cuda.device_count()
    if device.index >= count:
        pytest.skip(f"needs {device.index + 1} GPUs to run kernels on {device} while cuda:0 is current; found {count}")
    if backend not in fastlm.available_backends("cuda"):
        pytest.skip(f"backend {backend} is not available for CUDA tensors")


def _on(device, tensors):
    return [t.to(device) for t in tensors]


def _expected(op, backend):
    """The op's outputs and gradients on cuda:0, the current device, on its default stream."""
    inputs, cotangents = _case(op)
    with torch.cuda.device(0), fastlm.use_backend(backend):
        on0 = dict(zip(inputs, _on("cuda:0", inputs.values()), strict=True))
        return _forward_backward(op, on0, _on("cuda:0", cotangents))


def _assert_same(actual, expected, device, what):
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.device == device, f"{what}: result {i} is on {a.device}"
        torch.testing.assert_close(a.cpu(), e.cpu(), msg=lambda m, i=i: f"{what}: result {i}: {m}")


@pytest.mark.parametrize("kernel", GPU_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_runs_on_the_tensors_device(op, kernel):
    """Inputs on cuda:1, current device cuda:0: the kernels run on cuda:1 and give cuda:0's results."""
    _skip_unless_runnable(torch.device("cuda", 1), kernel)
    expected = _expected(op, kernel)
    inputs, cotangents = _case(op)
    with torch.cuda.device(0), fastlm.use_backend(kernel):
        on1 = dict(zip(inputs, _on("cuda:1", inputs.values()), strict=True))
        actual = _forward_backward(op, on1, _on("cuda:1", cotangents))
        assert torch.cuda.current_device() == 0
    _assert_same(actual, expected, torch.device("cuda", 1), f"{op} on cuda:1 ({kernel})")


@pytest.mark.parametrize("kernel", GPU_BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("device", ["cuda:0", "cuda:1"])
def test_runs_on_the_devices_current_stream(device, op, kernel):
    """The device's current stream is a side stream that holds the inputs back (a sleep, then the copies
    that write them); the op is called with cuda:0 current and no synchronisation. Kernels launched on any
    other stream would read the NaN placeholders (or race the copies) instead of the inputs."""
    device = torch.device(device)
    _skip_unless_runnable(device, kernel)
    expected = _expected(op, kernel)
    inputs, cotangents = _case(op)
    staged = _on(device, [*inputs.values(), *cotangents])
    targets = [torch.full_like(t, float("nan")) if t.is_floating_point() else torch.zeros_like(t) for t in staged]
    torch.cuda.synchronize(device)
    side = torch.cuda.Stream(device=device)
    with torch.cuda.device(device), torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        for target, value in zip(targets, staged, strict=True):
            target.copy_(value)
        with torch.cuda.device(0), fastlm.use_backend(kernel):  # the device's current stream stays `side`
            on_device = dict(zip(inputs, targets[: len(inputs)], strict=True))
            actual = _forward_backward(op, on_device, targets[len(inputs) :])
    side.synchronize()
    _assert_same(actual, expected, device, f"{op} on {device} under a side stream ({kernel})")
