"""Backend registry and dispatch (docs/architecture.md, "Backends and dispatch").

Every op has up to five implementations, named:
  reference  plain PyTorch, always available (the oracle)
  triton     Triton kernels: CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before
             triton was imported
  cuda       the CUDA C++ kernels of fastlm._C (CUDA tensors)
  cuda_emu   the same CUDA C++ sources run by the host emulator of fastlm._C_emu (CPU tensors)
  cpu        the CPU C++ kernels of fastlm._C (CPU tensors)

Without a forced backend, a CUDA tensor takes the fastest of triton / cuda for that op according to the
committed benchmark results (fastlm/dispatch.json), falling back to triton; a CPU tensor takes `cpu`
when the extension has it, else `reference`. `use_backend(name)` or FASTLM_BACKEND force one; a forced
backend that cannot run raises an error that says why, it never silently runs something else.
"""

import collections
import contextlib
import contextvars
import importlib.util
import json
import os
from pathlib import Path

import torch

from . import _ext

BACKENDS = ("triton", "cuda", "cuda_emu", "cpu", "reference")

_forced = contextvars.ContextVar("fastlm_backend", default=None)
DISPATCH_FILE = Path(__file__).with_name("dispatch.json")

# (op, backend) -> how many eager calls dispatched there; lets tests and users check which kernels ran.
calls = collections.Counter()


def _check_name(name):
    if name not in BACKENDS:
        raise ValueError(f"unknown fastlm backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name):
    """Force every fastlm op inside the `with` block to run on backend `name`.

    `name` is one of "triton", "cuda", "cuda_emu", "cpu", "reference". An op whose inputs the
    backend cannot handle raises RuntimeError naming the backend and the reason.
    """
    token = _forced.set(_check_name(name))
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend():
    """The backend forced by `use_backend` or, failing that, FASTLM_BACKEND; None when neither is set."""
    name = _forced.get()
    if name is None:
        name = os.environ.get("FASTLM_BACKEND") or None
        if name is not None:
            _check_name(name)
    return name


def triton_interpreted():
    """Whether Triton runs kernels through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _why_unavailable(name, device):
    """None when backend `name` can run on `device`, else the reason it cannot."""
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    if name == "reference":
        return None
    if on_cuda and not torch.cuda.is_available():
        return "no CUDA device is available"
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if on_cuda:
            return None
        if device.type == "cpu" and triton_interpreted():
            return None
        return f"triton runs {device.type} tensors only under TRITON_INTERPRET=1"
    if name == "cpu":
        if _ext.C is None:
            return _ext.C_ERROR
        return None if device.type == "cpu" else f"the cpu backend takes CPU tensors, not {device.type}"
    if name == "cuda":
        if _ext.C is None:
            return _ext.C_ERROR
        if not _ext.has_cuda_kernels():
            return "fastlm._C was built without CUDA (no CUDA-enabled torch or nvcc at build time)"
        return None if on_cuda else f"the cuda backend takes CUDA tensors, not {device.type}"
    if name == "cuda_emu":
        if _ext.C_EMU is None:
            return _ext.C_EMU_ERROR
        return None if device.type == "cpu" else f"the cuda_emu backend takes CPU tensors, not {device.type}"
    raise ValueError(f"unknown fastlm backend {name!r}")


def available_backends(device=None):
    """The backends that can run on `device` (default: CUDA when available, else CPU), fastest first."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return [name for name in BACKENDS if _why_unavailable(name, device) is None]


def _dispatch_defaults():
    try:
        return json.loads(DISPATCH_FILE.read_text())
    except FileNotFoundError:
        return {}


def select(op, device, implemented):
    """The backend to run `op` on for tensors on `device`.

    `implemented` lists the backends that have `op`. Raises RuntimeError when a forced backend
    cannot run it.
    """
    device = torch.device(device)
    forced = forced_backend()
    if forced is not None:
        why = _why_unavailable(forced, device)
        if why is None and forced not in implemented:
            why = f"it has no {op} kernel"
        if why is not None:
            raise RuntimeError(f"fastlm backend {forced!r} was forced for {op} on {device}, but {why}")
        calls[(op, forced)] += 1
        return forced
    if device.type == "cuda":
        preferred = _dispatch_defaults().get(op, "triton")
        candidates = (preferred, "triton", "cuda", "reference")
    else:
        candidates = ("cpu", "reference")
    for name in candidates:
        if name in implemented and _why_unavailable(name, device) is None:
            calls[(op, name)] += 1
            return name
    raise RuntimeError(f"no fastlm backend can run {op} on {device}")


def info():
    """A human-readable report of the backends, the extension and the versions."""
    lines = [f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"]
    spec = importlib.util.find_spec("triton")
    if spec is not None:
        import triton

        mode = "interpreter" if triton_interpreted() else "compiled"
        lines.append(f"triton {triton.__version__} ({mode})")
    else:
        lines.append("triton: not installed")
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name()}")
    else:
        lines.append("GPU: none (torch.cuda.is_available() is False)")
    lines.append(f"forced backend: {forced_backend() or 'none'}")
    if _ext.C is not None:
        threads = _ext.C.cpu_threads()
        note = "" if threads > 1 or torch.get_num_threads() == 1 else " (extension built without OpenMP)"
        lines.append(f"cpu kernels: {threads} thread{'s' if threads > 1 else ''}{note}")
    for device in ("cpu", "cuda"):
        lines.append(f"backends for {device} tensors:")
        for name in BACKENDS:
            why = _why_unavailable(name, device)
            lines.append(f"  {name:<10} {'available' if why is None else 'unavailable: ' + why}")
    return "\n".join(lines)


_poison = contextvars.ContextVar("fastlm_poison", default=False)


def empty(shape, *, dtype, device):
    """Allocate a kernel output; filled with NaN (or -1 for integers) inside `poisoned_outputs()`,
    so elements a kernel forgot to write show up in tests."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison.get():
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


@contextlib.contextmanager
def poisoned_outputs():
    """Inside this block every kernel output of every backend is NaN-filled before the kernel runs."""
    token = _poison.set(True)
    extensions = [ext for ext in (_ext.C, _ext.C_EMU) if ext is not None]
    for ext in extensions:
        ext.set_poison_outputs(True)
    try:
        yield
    finally:
        for ext in extensions:
            ext.set_poison_outputs(False)
        _poison.reset(token)
