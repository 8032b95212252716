"""What every op family shares: torch.library registration of the kernel entry points, and the (rows, n)
view the row kernels take.

Each kernel entry point is registered as a custom op `fastlm::<name>` with a fake (meta) implementation,
so torch.compile(fullgraph=True) traces through it. In eager mode the returned callable calls the
implementation directly, skipping the dispatcher's per-call overhead; while a profiler runs, that call is
recorded as `fastlm::<name>`, as the dispatcher would have done.
"""

import torch


def kernel_op(name, fake):
    """Decorator: register `fn` as custom op fastlm::`name` with fake implementation `fake`."""

    def register(fn):
        qualified = f"fastlm::{name}"
        op = torch.library.custom_op(qualified, fn, mutates_args=())
        op.register_fake(fake)

        def call(*args):
            if torch.compiler.is_compiling():
                return op(*args)
            if torch._C._autograd._profiler_enabled():  # a C flag read: no cost when no profiler runs
                with torch.profiler.record_function(qualified):
                    return fn(*args)
            return fn(*args)

        call.__name__ = fn.__name__
        call.__doc__ = fn.__doc__
        call.op = op
        return call

    return register


def rows(t, n):
    """View t (..., n) as (rows, n) with unit stride along n, copying only when no such view exists."""
    t2 = t.reshape(-1, n)  # (rows, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()
