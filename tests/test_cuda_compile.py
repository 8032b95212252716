"""Compile every CUDA source with nvcc for sm_80 and sm_90 and fail on register spills or stack frames.

The ptxas resource report (registers, shared memory, spills per kernel) is printed to the test log.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCHS = ("80", "90")


def nvcc():
    found = shutil.which("nvcc") or (
        Path("/usr/local/cuda/bin/nvcc") if Path("/usr/local/cuda/bin/nvcc").exists() else None
    )
    if found is None:
        pytest.skip("nvcc not found")
    return str(found)


def ptxas_report(source, out_dir, archs=ARCHS, defines=()):
    """nvcc's stderr (the ptxas -v report) for one source compiled for `archs`; fails the test if nvcc does."""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    cmd = [
        nvcc(),
        "-std=c++20",
        "-O3",
        "--use_fast_math",
        "-I",
        str(ROOT / "csrc"),
        *[f"-D{d}" for d in defines],
        *gencode,
        "-Xptxas",
        "-v",
        "-c",
        str(source),
        "-o",
        str(out_dir / "out.o"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{result.stderr}"
    return result.stderr


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles_without_spills(source, tmp_path, capsys):
    report = ptxas_report(source, tmp_path)
    usage = re.findall(r"Used (\d+) registers", report)
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert usage and frames, f"no ptxas report for {source.name}:\n{report}"
    with capsys.disabled():
        print(
            f"\nptxas {source.name}: {len(usage)} kernels × archs {','.join(ARCHS)}, "
            f"registers {min(map(int, usage))}–{max(map(int, usage))}"
        )
    bad = [line for line in report.splitlines() if re.search(r"[1-9]\d* bytes (stack frame|spill)", line)]
    assert not bad, f"{source.name}: spills or stack frames:\n" + "\n".join(bad)


def test_attention_extras_build_switch(tmp_path):
    """FASTLM_ATTN_EXTRAS=0 (FASTLM_ATTN_NO_EXTRAS) builds only the plain attention kernels: half of them."""
    source = ROOT / "csrc" / "cuda" / "attention_fwd_hdim32.cu"
    kernels = [
        len(re.findall(r"Compiling entry function", ptxas_report(source, tmp_path, ("80",), defines)))
        for defines in ((), ("FASTLM_ATTN_NO_EXTRAS",))
    ]
    assert kernels[0] > 0 and kernels[1] * 2 == kernels[0], kernels
