"""pytest-benchmark view of the op benchmarks: `pytest bench --benchmark-only`.

Every implementation of every case is one test timing forward+backward, grouped by case so
pytest-benchmark's table compares them side by side. Quick shapes by default; FASTLM_BENCH_FULL=1
takes the full shapes of `python -m bench`.
"""

import importlib
import os

import pytest
import torch

from .__main__ import OPS

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("FASTLM_BENCH_FULL") != "1"


def _params():
    for op in OPS:
        module = importlib.import_module(f"{__package__}.bench_{op}")
        for case in module.cases(DEVICE, quick=QUICK):
            for name in case.impls:
                label = f"{case.op} {case.shape} {str(case.dtype).replace('torch.', '')}"
                yield pytest.param(case, name, id=f"{label} | {name}")


@pytest.mark.parametrize("case, impl", list(_params()))
def test_forward_backward(benchmark, case, impl):
    tensors = case.inputs()
    fn = case.impls[impl]
    out = fn(*tensors)
    grad = torch.randn_like(out[0] if isinstance(out, tuple) else out)

    def step():
        for t in tensors:
            if isinstance(t, torch.Tensor):
                t.grad = None
        y = fn(*tensors)
        (y[0] if isinstance(y, tuple) else y).backward(grad)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{case.op} {case.shape} {case.dtype}"
    benchmark.extra_info["reference"] = case.reference
    benchmark(step)
