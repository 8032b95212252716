"""Compile every CUDA source with nvcc for sm_80 and sm_90 and fail on register spills or stack frames.

The ptxas resource report (registers, shared memory, spills per kernel) is printed to the test log. The
per-head-dim attention sources are generated from one list (csrc/cuda/generate_kernels.py): the checked-in
files must match it, the build switch must drop dims from it, and the build reports it.
"""

import re
import runpy
import shutil
import subprocess
from pathlib import Path

import pytest

import fastlm

ROOT = Path(__file__).resolve().parents[1]
GENERATOR = runpy.run_path(str(ROOT / "csrc" / "cuda" / "generate_kernels.py"))
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
    """FASTLM_ATTN_EXTRAS=0 (FASTLM_ATTN_NO_EXTRAS) builds only the plain attention kernels: a third of them
    (each dtype and causal flag has a plain, an EXTRAS and an EXTRAS + VARLEN kernel)."""
    source = ROOT / "csrc" / "cuda" / "attention_fwd_hdim32.cu"
    kernels = [
        len(re.findall(r"Compiling entry function", ptxas_report(source, tmp_path, ("80",), defines)))
        for defines in ((), ("FASTLM_ATTN_NO_EXTRAS",))
    ]
    assert kernels[0] > 0 and kernels[1] * 3 == kernels[0], kernels


def test_generated_attention_sources_are_checked_in():
    """csrc/cuda holds exactly what generate_kernels.py writes (rerun it after editing HEAD_DIMS)."""
    assert GENERATOR["differences"]() == [], "run python csrc/cuda/generate_kernels.py"


def test_generator_adds_and_removes_head_dims(tmp_path):
    """A new head dim is one list entry: its two instantiation files and its header entry appear, and the
    files of a dim taken out of the list are deleted."""
    GENERATOR["write"](tmp_path, (32, 64))
    assert GENERATOR["write"](tmp_path, (32, 80)) == [
        "attention_bwd_hdim64.cu",
        "attention_bwd_hdim80.cu",
        "attention_fwd_hdim64.cu",
        "attention_fwd_hdim80.cu",
        "attention_hdims.h",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "attention_bwd_hdim32.cu",
        "attention_bwd_hdim80.cu",
        "attention_fwd_hdim32.cu",
        "attention_fwd_hdim80.cu",
        "attention_hdims.h",
    ]
    assert "launch_attention_fwd_hdim<80>" in (tmp_path / "attention_fwd_hdim80.cu").read_text()
    assert "X(80)" in (tmp_path / "attention_hdims.h").read_text()
    assert GENERATOR["differences"](tmp_path, (32, 80)) == []


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
@pytest.mark.parametrize("dropped", [(), (64,), (32, 256)], ids=str)
def test_head_dim_build_switch(dropped, tmp_path):
    """FASTLM_ATTN_NO_HDIM<D> (what setup.py's FASTLM_ATTN_HDIMS defines for the dims it leaves out) takes D
    out of attention_head_dim_built and nothing else."""
    built = [d for d in GENERATOR["HEAD_DIMS"] if d not in dropped]
    checks = "\n".join(
        f"static_assert(fastlm::attention_head_dim_built({d}) == {str(d in built).lower()});"
        for d in (*GENERATOR["HEAD_DIMS"], 16, 80)
    )
    source = tmp_path / "check.cpp"
    source.write_text(f'#include "cuda/attention.h"\n{checks}\n')
    defines = [f"-DFASTLM_ATTN_NO_HDIM{d}" for d in dropped]
    result = subprocess.run(
        ["g++", "-std=c++20", "-fsyntax-only", "-I", str(ROOT / "csrc"), *defines, str(source)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(fastlm._ext.C is None, reason="fastlm._C not built")
def test_build_reports_its_head_dims():
    """fastlm._C.attention_head_dims() is the generator's list (the tested build keeps every head dim), and
    fastlm.attention routes by it."""
    from fastlm.ops.attention import CUDA_HEAD_DIMS

    assert list(fastlm._ext.C.attention_head_dims()) == list(GENERATOR["HEAD_DIMS"])
    assert tuple(GENERATOR["HEAD_DIMS"]) == CUDA_HEAD_DIMS
