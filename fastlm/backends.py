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
backend that cannot run raises an error that says why, it never silently runs something else. Which
backends have an op's kernels, and for which inputs, each op family declares (fastlm/ops/_family.py).
"""

import collections
import contextlib
import contextvars
import functools
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import _ext

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


def _triton_missing():
    return None if importlib.util.find_spec("triton") is not None else "triton is not installed"


def _c_missing():
    return _ext.C_ERROR if _ext.C is None else None


def _cuda_kernels_missing():
    if _ext.C is not None and not _ext.has_cuda_kernels():
        return "fastlm._C was built without CUDA (no CUDA-enabled torch or nvcc at build time)"
    return _c_missing()


def _emu_missing():
    return _ext.C_EMU_ERROR if _ext.C_EMU is None else None


def _triton_devices():
    return ("cuda", "cpu") if triton_interpreted() else ("cuda",)


@dataclass(frozen=True)
class Backend:
    """What a backend needs to run: `devices()` the device types of the tensors it takes (None: any),
    `missing()` None when its code is installed, else why not; `note` completes a wrong-device refusal."""

    devices: Callable[[], tuple[str, ...] | None]
    missing: Callable[[], str | None]
    note: str = ""


REGISTRY = {
    "triton": Backend(_triton_devices, _triton_missing, " (CPU tensors only under TRITON_INTERPRET=1)"),
    "cuda": Backend(lambda: ("cuda",), _cuda_kernels_missing),
    "cuda_emu": Backend(lambda: ("cpu",), _emu_missing),
    "cpu": Backend(lambda: ("cpu",), _c_missing),
    "reference": Backend(lambda: None, lambda: None),
}
BACKENDS = tuple(REGISTRY)  # fastest first


def _why_unavailable(name, device):
    """None when backend `name` can run on `device`, else the reason it cannot."""
    device = torch.device(device)
    backend = REGISTRY[_check_name(name)]
    devices = backend.devices()
    if devices is None:
        return None
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    missing = backend.missing()
    if missing is not None:
        return missing
    if device.type not in devices:
        takes = " or ".join(d.upper() for d in devices)
        return f"the {name} backend takes {takes} tensors, not {device.type}{backend.note}"
    return None


def available_backends(device=None):
    """The backends that can run on `device` (default: CUDA when available, else CPU), fastest first."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return [name for name in BACKENDS if _why_unavailable(name, device) is None]


@functools.cache
def dispatch_defaults():
    """{op: backend} for CUDA tensors from fastlm/dispatch.json, read once ({} without the file);
    `reload_dispatch()` reads it again."""
    try:
        return json.loads(DISPATCH_FILE.read_text())
    except FileNotFoundError:
        return {}


def reload_dispatch():
    """Forget the dispatch defaults read so far, so the next call reads DISPATCH_FILE again (after the
    benchmark runner rewrote it, or in tests)."""
    dispatch_defaults.cache_clear()


def _count(op, name):
    calls[(op, name)] += 1
    return name


def select(op, device, refusals, count=True):
    """The backend to run `op` (a public op name: "layer_norm", "attention", ...) on for tensors on `device`.

    `refusals` maps each backend name to None when it has kernels of `op` for these inputs, else to the
    reason it has not (the op family's declaration words it). Raises RuntimeError when a forced backend
    cannot run the call, naming the backend and the reason. The choice is counted in `calls` unless `count`
    is False (a question about a call, not a call).
    """
    tally = _count if count else (lambda op, name: name)
    device = torch.device(device)
    forced = forced_backend()
    if forced is not None:
        why = _why_unavailable(forced, device) or refusals[forced]
        if why is not None:
            raise RuntimeError(f"fastlm backend {forced!r} was forced for {op} on {device}, but {why}")
        return tally(op, forced)
    if device.type == "cuda":
        candidates = (dispatch_defaults().get(op, "triton"), "triton", "cuda", "reference")
    else:
        candidates = ("cpu", "reference")
    for name in candidates:
        if refusals[name] is None and _why_unavailable(name, device) is None:
            return tally(op, name)
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
