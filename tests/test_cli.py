"""The `fastlm` command, the benchmark runner's smoke test, and import without the extension."""

import json
import subprocess
import sys

import pytest
import torch

import fastlm
from fastlm.cli import main


def test_info_lists_every_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in fastlm.backends.BACKENDS:
        assert name in out
    assert "torch" in out


@pytest.mark.gpu
def test_gpu_has_every_gpu_backend():
    """On a GPU both kernel families run: without this, a build that lost its CUDA kernels would only
    empty the tests' parametrisations over them (skipped, not failed)."""
    assert fastlm.available_backends("cuda") == ["triton", "cuda", "reference"], fastlm.info()


@pytest.mark.skipif(fastlm._ext.C is None, reason="fastlm._C not built")
def test_cpu_kernels_use_every_torch_thread():
    """The CPU kernels run at::parallel_for on torch's OpenMP threads (an extension compiled without
    -fopenmp silently runs them on one thread)."""
    if not torch.backends.openmp.is_available():
        pytest.skip("torch was built without OpenMP")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert fastlm._ext.C.cpu_threads() == 2
        assert "cpu kernels: 2 threads" in fastlm.info()
    finally:
        torch.set_num_threads(threads)


def test_import_without_the_extension():
    """fastlm imports and runs on the reference backend when fastlm._C cannot be loaded."""
    code = (
        "import sys; sys.modules['fastlm._C'] = None; sys.modules['fastlm._C_emu'] = None\n"
        "import torch, fastlm\n"
        "assert 'fastlm._C could not be imported' in fastlm.info()\n"
        "assert 'cpu' not in fastlm.available_backends('cpu')\n"
        "x = torch.randn(3, 8)\n"
        "assert torch.allclose(fastlm.layer_norm(x), torch.nn.functional.layer_norm(x, (8,)), atol=1e-6)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bench_quick_runs_every_op_and_writes_table_json_and_png(tmp_path, capsys):
    """The smoke test of the benchmark suite: every op once at tiny shapes."""
    from bench.__main__ import OPS
    from bench.__main__ import main as bench_main

    bench_main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--reps", "2"])
    out = capsys.readouterr().out
    assert "fastlm cpu" in out and "torch F.layer_norm" in out and "speedup" in out
    for op in OPS:
        data = json.loads((tmp_path / f"{op}-quick-cpu.json").read_text())
        assert data["meta"]["torch"] == torch.__version__ and data["ceilings"]["copy_gbps"] > 0
        timed = [r for r in data["rows"] if r["median_ms"] is not None]
        assert {r["mode"] for r in timed} == {"fwd", "bwd", "fwd+bwd"}, op
        assert all(r["median_ms"] > 0 and r["speedup"] > 0 for r in timed), op
        assert (tmp_path / f"{op}-quick-cpu.png").stat().st_size > 10_000, op
