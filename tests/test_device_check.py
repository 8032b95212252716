"""bench/device_check.sh: its dry run on the CPU runs every step and leaves what one GPU call can bring back;
its GPU time limits fit one device command; and `pytest -m gpu` selects every test of a GPU backend."""

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from tests import conftest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "device_check.sh"
MAX_FILES = 8  # what comes back from the GPU machine
DEVICE_COMMAND_S = 540  # the steps' limits must add up to this at most (one device command runs <= 600 s)


def test_gpu_step_limits_fit_one_device_command():
    text = SCRIPT.read_text()
    gpu_branch = text[text.index("else\n  export FASTLM_CUDA=1") :]
    limits = re.search(r"limits=\(([^)]*)\)", gpu_branch).group(1)
    seconds = [int(pair.split("=")[1]) for pair in limits.split()]
    wheels = int(re.search(r"step wheels (\d+)", text).group(1))
    assert set(pair.split("=")[0] for pair in limits.split()) == {"build", "tune", "tests", "bench", "summary"}
    assert sum(seconds) + wheels <= DEVICE_COMMAND_S


def _item(**params):
    return types.SimpleNamespace(callspec=types.SimpleNamespace(params=params))


def test_gpu_marking_covers_every_gpu_backend_parameter():
    assert conftest._runs_a_gpu_backend(_item(backend="triton", dtype="float16"))
    assert conftest._runs_a_gpu_backend(_item(kernel="cuda"))
    assert not conftest._runs_a_gpu_backend(_item(kernel="cuda_emu"))
    assert not conftest._runs_a_gpu_backend(_item(backend="cpu"))
    assert not conftest._runs_a_gpu_backend(types.SimpleNamespace())  # not parametrised


@pytest.mark.slow
def test_dry_run_passes_and_leaves_at_most_eight_files(tmp_path):
    out = "relative-out"  # a relative OUT lands under the caller's directory, not the repository's
    env = {**os.environ, "PYTHON": sys.executable}
    committed = [ROOT / "kernels" / "tuning.json", ROOT / "fastlm" / "dispatch.json"]
    before = [p.read_bytes() if p.exists() else None for p in committed]
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run", out], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    files = sorted(p.name for p in (tmp_path / out).iterdir())
    assert files == ["device_check.tar.gz", "dispatch.json", "summary.md", "tuning.json"]
    assert len(files) <= MAX_FILES
    summary = (tmp_path / out / "summary.md").read_text()
    for section in ("## Environment", "## Steps", "## Tests", "## Tuning", "## Dispatch", "norms-quick-cpu"):
        assert section in summary, section
    assert "failures: 0, errors: 0" in summary
    steps = summary[summary.index("## Steps") : summary.index("## Tests")]
    assert "failed" not in steps and "timed out" not in steps
    assert [p.read_bytes() if p.exists() else None for p in committed] == before  # the dry run keeps out of them
    listing = subprocess.run(["tar", "-tzf", str(tmp_path / out / "device_check.tar.gz")], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
    for name in ("tests.log", "tune.log", "bench.log", "norms-quick-cpu.json", "attention-quick-cpu.png"):
        assert f"./{name}" in listing, name
