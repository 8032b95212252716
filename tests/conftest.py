"""Test harness: Triton on CPU tensors through its interpreter, and a `backend` fixture that runs a test
once per backend available for the test device that has the kernels of the module's op family."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported: Triton kernels then run on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _fix_interpreter_bf16():
    """Two bf16 faults of triton's interpreter (3.6 through 3.9 at least), patched here so that kernels
    run as on a GPU:
    - tl.dot: bf16 is held as uint16 and those integers are multiplied, so a bf16 dot returns garbage
      (fp16 and fp32 are right). Convert bf16 operands to fp32 first; a bf16 product is exact in
      fp32, which is what the GPU's fp32-accumulating tensor cores compute.
    - casts fp32 -> bf16 truncate the mantissa, where the GPU rounds to nearest even; a kernel whose
      bf16 output is then checked against fp64 fails by one ulp. Round as the GPU does.
    Both hooks (InterpreterBuilder.create_dot and .cast_impl) are looked up rather than assumed, and
    their other arguments are passed through untouched, so one patch fits every triton that has them;
    where one is missing it is left alone. Both fixes stay right once triton fixes the faults itself.
    The kernels themselves are left as they run on a GPU."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    handle = getattr(interpreter, "TensorHandle", None)
    if builder is None or handle is None:
        return

    def as_fp32(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        bits = h.data.astype(np.uint32) << np.uint32(16)
        return handle(bits.view(np.float32), tl.float32)

    original_dot = getattr(builder, "create_dot", None)
    if original_dot is not None:

        def create_dot(self, a, b, *args, **kwargs):
            return original_dot(self, as_fp32(a), as_fp32(b), *args, **kwargs)

        builder.create_dot = create_dot

    original_cast = getattr(builder, "cast_impl", None)
    if original_cast is not None:

        def cast_impl(self, src, dst_type, *args, **kwargs):
            if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
                rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
                return handle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
            return original_cast(self, src, dst_type, *args, **kwargs)

        builder.cast_impl = cast_impl


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_bf16()


def device_under_test():
    return "cuda" if torch.cuda.is_available() else "cpu"


def backends_under_test(module_name):
    """The backends a test module runs its `backend` tests on: those available on the test device that
    have the kernels of the op family the module is named after (test_<family>.py, as declared in
    fastlm.ops.FAMILIES), reference included; every available backend for other modules."""
    import fastlm

    family = fastlm.ops.FAMILIES.get(module_name.rpartition(".")[2].removeprefix("test_"))
    if family is None:
        return fastlm.available_backends(device_under_test())
    return family.available(device_under_test())


def pytest_generate_tests(metafunc):
    """Parametrise a test's `backend` argument over the backends under test of its module."""
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", backends_under_test(metafunc.module.__name__))


GPU_BACKENDS = ("triton", "cuda")


def _runs_a_gpu_backend(item):
    """Whether a parametrised test runs one of the backends that execute on a GPU (a parameter value
    "triton" or "cuda", whatever the parameter's name: backend, kernel, ...)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(isinstance(value, str) and value in GPU_BACKENDS for value in params.values())


@pytest.hookimpl(tryfirst=True)  # before `-m` selects: the markers added here take part in the selection
def pytest_collection_modifyitems(config, items):
    """On a CUDA machine, every test of a GPU backend is marked `gpu`, so that `pytest -m gpu` runs every
    kernel of every backend that runs on a GPU; elsewhere `gpu` tests are skipped."""
    if torch.cuda.is_available():
        for item in items:
            if _runs_a_gpu_backend(item):
                item.add_marker(pytest.mark.gpu)
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return device_under_test()
