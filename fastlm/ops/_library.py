"""torch.library registration shared by every op family.

Each kernel entry point is registered as a custom op `fastlm::<name>` with a fake (meta) implementation,
so torch.compile(fullgraph=True) traces through it. In eager mode the returned callable calls the
implementation directly, skipping the dispatcher's per-call overhead.
"""

import torch

from .. import backends


def kernel_op(name, fake):
    """Decorator: register `fn` as custom op fastlm::`name` with fake implementation `fake`."""

    def register(fn):
        op = torch.library.custom_op(f"fastlm::{name}", fn, mutates_args=())
        op.register_fake(fake)

        def call(*args):
            if torch.compiler.is_compiling():
                return op(*args)
            return fn(*args)

        call.__name__ = fn.__name__
        call.__doc__ = fn.__doc__
        call.op = op
        return call

    return register


@torch.compiler.assume_constant_result
def _select(op, device, implemented):
    return backends.select(op, device, implemented)


def select_backend(op, device, implemented):
    """backends.select, evaluated once at trace time under torch.compile (the choice is a constant)."""
    return _select(op, device, tuple(implemented))
