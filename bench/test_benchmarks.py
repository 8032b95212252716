"""pytest-benchmark view of the op benchmarks: `pytest bench --benchmark-only`.

Every implementation of every case is one test timing forward+backward, grouped by case so
pytest-benchmark's table compares them side by side. Quick shapes by default; FASTLM_BENCH_FULL=1
takes the full shapes of `python -m bench`. The command line's shape selection is tested here too.
"""

import importlib
import os

import pytest
import torch

from .__main__ import OPS, _op_cases, main, parse_args

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


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ops", "norms", "--shapes", "nonsense"], r"no case of norms has shape 'nonsense'; their shapes on cpu "),
        (["--ops", "norms", "--shapes", "256x768,8192x768"], r"no case of norms has shape '8192x768'.*: 256x768$"),
        (["--ops", "models", "--shapes", "256x768"], r"no case of no op suite \(--shapes selects op shapes"),
        (["--ops", "norms", "--shapes", " , "], r"--shapes: no shape label in ' , '"),
    ],
)
def test_unknown_shapes_are_an_error(argv, message, tmp_path):
    """--shapes labels that no case of the chosen suites has stop the run with the labels it does have."""
    with pytest.raises(SystemExit, match=message):
        main([*argv, "--quick", "--device", "cpu", "--out", str(tmp_path)])


def test_shapes_select_cases():
    args = parse_args(["--ops", "norms,cross_entropy", "--shapes", "256x768", "--quick", "--device", "cpu"])
    cases = _op_cases(["norms", "cross_entropy"], torch.device("cpu"), args)
    assert [(c.op, c.shape) for c in cases["norms"]] == [("layer_norm", "256x768"), ("rms_norm", "256x768")]
    assert cases["cross_entropy"] == []


def test_cpu_attention_has_the_long_causal_case_with_its_peers():
    """The long causal row on the CPU, selected by its label, with the peers its summary compares."""
    args = parse_args(["--ops", "attention", "--shapes", "long-causal 1x8x2048x2048x64", "--device", "cpu"])
    (case,) = _op_cases(["attention"], torch.device("cpu"), args)["attention"]
    assert {"torch eager", "torch.compile eager", "sdpa flash"} <= set(case.impls)
    assert ("fastlm cpu" in case.impls) != ("fastlm cpu" in case.absent)
