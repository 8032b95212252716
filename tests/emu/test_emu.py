"""The CUDA host emulator's own tests.

Each tests/emu/test_*.cpp is a C++ program of test cases compiled by g++ against csrc/emu (the
emulation) and run; it prints PASS/FAIL per case. tensor_core_probe.cu is compiled by nvcc for
sm_80 and sm_90 so that the inline-PTX side of csrc/cuda/tensor_core.cuh is checked too; the ptxas
resource report is printed into the test log.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CUDA_HOME = Path(os.environ.get("CUDA_HOME") or "/usr/local/cuda")
PROGRAMS = sorted(p.stem for p in HERE.glob("test_*.cpp"))


def _compiler():
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not installed")
    if not (CUDA_HOME / "include" / "cuda_fp16.h").exists():
        pytest.skip(f"CUDA headers not found under {CUDA_HOME} (set CUDA_HOME)")
    return gxx


@pytest.mark.parametrize("program", PROGRAMS)
def test_emulator(program, tmp_path):
    exe = tmp_path / program
    build = subprocess.run(
        [
            _compiler(),
            "-O1",
            "-std=c++17",
            "-Wall",
            "-Wno-unknown-pragmas",
            f"-I{ROOT / 'csrc'}",
            f"-I{HERE}",
            f"-I{CUDA_HOME / 'include'}",
            str(HERE / f"{program}.cpp"),
            "-o",
            str(exe),
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], check=False, capture_output=True, text=True, timeout=120)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "FAIL" not in run.stdout


@pytest.mark.parametrize("arch", ["80", "90"])
def test_tensor_core_ptx_compiles(arch, tmp_path):
    nvcc = CUDA_HOME / "bin" / "nvcc"
    if not nvcc.exists():
        pytest.skip(f"nvcc not found under {CUDA_HOME}")
    build = subprocess.run(
        [
            str(nvcc),
            "-std=c++17",
            f"-arch=sm_{arch}",
            "-Xptxas",
            "-v",
            f"-I{ROOT / 'csrc'}",
            "-c",
            str(HERE / "tensor_core_probe.cu"),
            "-o",
            str(tmp_path / "probe.o"),
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    print(build.stdout + build.stderr)
    assert build.returncode == 0, build.stderr
    assert f"for 'sm_{arch}'" in build.stderr
