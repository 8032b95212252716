"""Checked mode of the cuda_emu backend: the CUDA C++ kernels run by the host emulator (csrc/emu)
with every tensor they touch ending at a guard page.

By default (FASTLM_EMU_CHECK=0 turns it off; `checked(False)` / `checked()` set it for a block),
each call into fastlm._C_emu runs with torch's CPU allocator replaced by one whose buffers end
exactly at a PROT_NONE page: the input tensors are handed to the kernel as such copies and the
outputs the glue allocates are such buffers.
A kernel that reads or writes past the end of one then raises RuntimeError naming the kernel, the
block and the thread (shared-memory overruns are caught in every mode). Unchecked, the same bug
would silently read or corrupt the process's heap. The price is an mmap per tensor of the call.
"""

import contextlib
import contextvars
import os

import torch

__all__ = ["CheckedKernels", "checked", "checked_enabled"]

_checked = contextvars.ContextVar("fastlm_emu_checked", default=None)


def checked_enabled():
    """Whether emulated kernels run in checked mode: as set by `checked()`, else unless FASTLM_EMU_CHECK=0."""
    on = _checked.get()
    return os.environ.get("FASTLM_EMU_CHECK", "1") != "0" if on is None else on


@contextlib.contextmanager
def checked(on=True):
    """Run the emulated CUDA kernels called inside the `with` block in checked mode (or not)."""
    token = _checked.set(on)
    try:
        yield
    finally:
        _checked.reset(token)


def _guarded_copy(value):
    """A checked copy of every tensor in `value` (made while checked allocation is on)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_guarded_copy(v) for v in value)
    return value


def _bytes(t):
    """t's elements as bytes, so NaN counts as equal to NaN; a fresh compact copy, whatever t's strides (a
    one-element tensor with a stride other than 1 counts as contiguous but cannot be viewed as bytes)."""
    return t.clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8)  # (numel * itemsize,)


def _write_back(original, copy):
    """Copy what a kernel wrote into an input's checked copy back into the input."""
    if isinstance(original, torch.Tensor):
        if not torch.equal(_bytes(original), _bytes(copy)):
            original.copy_(copy)
    elif isinstance(original, (list, tuple)):
        for o, c in zip(original, copy, strict=True):
            _write_back(o, c)


class CheckedKernels:
    """fastlm._C_emu, with every function call run in checked mode when `checked_enabled()`."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        attr = getattr(self._module, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            if not checked_enabled():
                return attr(*args, **kwargs)
            was_on = torch.ops.fastlm_emu.set_checked(True)
            try:
                copies = _guarded_copy(args)
                kwarg_copies = {k: _guarded_copy(v) for k, v in kwargs.items()}
                result = attr(*copies, **kwarg_copies)
                _write_back(args, copies)
                for k, v in kwargs.items():
                    _write_back(v, kwarg_copies[k])
                return result
            finally:
                torch.ops.fastlm_emu.set_checked(was_on)

        return call
