"""The declaration of an op family: which backends have its kernels and which inputs those kernels take.

One `OpFamily` per module of fastlm/ops drives everything that depends on it: dispatch (`select`), the
error a forced backend raises when it lacks a kernel (it names the backend and the real reason), the ops
per backend in `fastlm info`, the keys of `fastlm.backends.calls` ((public op name, backend)) and the
backends the tests run a family on (tests/conftest.py). The `reference` backend has every op, on any
dtype; it is not declared.
"""

import importlib
from dataclasses import dataclass

import torch

from .. import _ext, backends

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# backend -> the module holding a family's kernel entry points (the same names and signatures everywhere)
_MODULES = {
    "triton": lambda family: importlib.import_module(f"fastlm.kernels.{family}"),
    "cuda": lambda family: _ext.C,
    "cuda_emu": lambda family: _ext.C_EMU,
    "cpu": lambda family: _ext.C,
}


def _names(dtypes):
    return ", ".join(map(str, dtypes))


@dataclass(frozen=True)
class Kernels:
    """What one backend's kernels of a family take.

    dtypes: of the main input (x, logits, hidden, q); other_dtypes: of the other float tensors (weights,
    biases, residual, attention bias, relative-position table). head_dims: the only head dims taken, or
    None; max_head_dim: the largest head dim taken, or None (attention only).
    """

    dtypes: tuple = KERNEL_DTYPES
    other_dtypes: tuple = KERNEL_DTYPES
    head_dims: tuple | None = None
    max_head_dim: int | None = None

    def lacks(self, dtype, other_dtypes, head_dim):
        """None when these kernels take the inputs, else what they lack, worded to follow "no <op> "."""
        if dtype not in self.dtypes:
            return f"on {dtype} (its kernels take {_names(self.dtypes)})"
        for other in other_dtypes:
            if other not in self.other_dtypes:
                return f"on {other} (its kernels take {_names(self.other_dtypes)} beside the input)"
        if head_dim is None:
            return None
        if self.head_dims is not None and head_dim not in self.head_dims:
            return f"with head dim {head_dim} (its kernels take head dims {', '.join(map(str, self.head_dims))})"
        if self.max_head_dim is not None and head_dim > self.max_head_dim:
            return f"with head dim {head_dim} (its kernels take head dims up to {self.max_head_dim})"
        return None

    def describe(self):
        """The limits beyond the defaults, e.g. "torch.float16, torch.bfloat16; head dims 32, 64", or ""."""
        parts = [] if self.dtypes == KERNEL_DTYPES else [_names(self.dtypes)]
        if self.head_dims is not None:
            parts.append(f"head dims {', '.join(map(str, self.head_dims))}")
        if self.max_head_dim is not None:
            parts.append(f"head dims up to {self.max_head_dim}")
        return "; ".join(parts)


@dataclass(frozen=True)
class OpFamily:
    """One op family: `name` is its module name at every level (kernels/<name>.py, fastlm/ops/<name>.py,
    tests/ops/test_<name>.py); `ops` its public ops (the keys of fastlm/dispatch.json); `kernels` maps
    each backend that has its kernels to what they take."""

    name: str
    ops: tuple
    kernels: dict

    def module(self, backend):
        """The module holding this family's kernel entry points for `backend` (None when not built)."""
        return _MODULES[backend](self.name)

    def lacks(self, backend, op, dtype, other_dtypes=(), head_dim=None):
        """None when `backend` has kernels of `op` for these inputs, else the reason it has not."""
        if backend == "reference":
            return None
        kernels = self.kernels.get(backend)
        if kernels is None:
            return f"it has no {op} kernels (they exist for {', '.join(self.kernels)})"
        why = kernels.lacks(dtype, other_dtypes, head_dim)
        return None if why is None else f"it has no {op} {why}"

    def select(self, op, device, dtype, other_dtypes=(), head_dim=None, count=True):
        """The backend to run `op` on (fastlm.backends.select) for tensors on `device`: the main input's
        `dtype`, the dtypes of the other float tensors, and for attention the head dim. Under torch.compile
        the choice is made once, at trace time. `count`: whether this is a call (counted in backends.calls)."""
        refusals = tuple([(name, self.lacks(name, op, dtype, other_dtypes, head_dim)) for name in backends.BACKENDS])
        return _select(op, device, refusals, count)

    def available(self, device, dtypes=(), head_dim=None):
        """The backends that run on `device` and have this family's kernels for every dtype of `dtypes`
        (and for `head_dim`), fastest first; `reference` last. The tests run a family on these."""
        return [name for name in backends.available_backends(device) if self._takes(name, dtypes, head_dim)]

    def _takes(self, backend, dtypes, head_dim):
        if backend == "reference":
            return True
        kernels = self.kernels.get(backend)
        if kernels is None:
            return False
        return all(kernels.lacks(dtype, (), head_dim) is None for dtype in dtypes or kernels.dtypes[:1])


def every_backend(kernels=Kernels()):
    """`kernels` of an OpFamily whose kernels exist on every backend, all taking what `kernels` says."""
    return dict.fromkeys(_MODULES, kernels)


@torch.compiler.assume_constant_result
def _select(op, device, refusals, count):
    return backends.select(op, device, dict(refusals), count)


def kernel_table(families):
    """Lines of `fastlm info`: for each backend, the ops it has kernels for, with their limits."""
    lines = ["ops per backend:"]
    for name in backends.BACKENDS:
        if name == "reference":
            lines.append(f"  {name:<10} every op, any dtype")
            continue
        ops = []
        for family in families:
            kernels = family.kernels.get(name)
            if kernels is not None:
                limits = kernels.describe()
                ops += [f"{op} ({limits})" if limits else op for op in family.ops]
        lines.append(f"  {name:<10} {', '.join(ops) or 'none'}")
    return lines
