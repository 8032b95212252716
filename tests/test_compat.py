"""The C++ glue against the C++ headers of torch 2.11, the low end of the supported torch range.

Only torch 2.13 installs on the development machines, so a call that compiles against 2.13's headers but
is ambiguous or missing in 2.11's would otherwise be found only when a GPU machine's build fails. Every
source of fastlm._C that includes torch headers (csrc/*.cpp, csrc/cpu/*.cpp) is syntax-checked with
g++ -fsyntax-only against 2.11's headers, with setup.py's own include dirs, defines and compiler flags,
once as built without CUDA and once with FASTLM_WITH_CUDA (which adds c10/cuda and the CUDA headers).

The headers are a tarball of torch 2.11's include folder: FASTLM_COMPAT_HEADERS names it, by default
../shared/compat/torch-2.11.0-include.tar.xz beside the repository (where the project's machines keep
it); the test skips, saying so, where it or g++ is absent (as on a user's machine). `make compat` runs the same
check as a script: python tests/test_compat.py.
"""

import os
import runpy
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADERS = Path(os.environ.get("FASTLM_COMPAT_HEADERS") or ROOT.parent / "shared/compat/torch-2.11.0-include.tar.xz")
VARIANTS = ("cpu", "cuda")  # fastlm._C built without CUDA / with FASTLM_WITH_CUDA
SOURCES = [*sorted(ROOT.glob("csrc/*.cpp")), *sorted(ROOT.glob("csrc/cpu/*.cpp"))]  # the slow ones first


def missing_prerequisite():
    """Why the check cannot run here (None when it can)."""
    if not HEADERS.is_file():
        return f"torch 2.11's headers are not at {HEADERS}"
    if shutil.which("g++") is None:
        return "g++ is not installed"
    return None


def setup_extension():
    """fastlm._C's Extension as setup.py makes it on this machine, without CUDA and the emulator: its
    setup() is intercepted, so nothing is built."""
    import setuptools
    from torch.utils import cpp_extension

    captured = {}
    env = {"FASTLM_CUDA": "0", "FASTLM_EMU": "0"}
    with mock.patch.dict(os.environ, env), mock.patch.object(setuptools, "setup", lambda **kw: captured.update(kw)):
        runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    (ext,) = [e for e in captured["ext_modules"] if e.name == "fastlm._C"]
    # The installed torch's include dirs are replaced by 2.11's; setup.py's own ones stay.
    installed = {os.path.realpath(p) for p in cpp_extension.include_paths()}
    ext.include_dirs = [d for d in ext.include_dirs if os.path.realpath(d) not in installed]
    return ext, Path(cpp_extension.CUDA_HOME or "/usr/local/cuda") / "include"


def unpack_headers(dest):
    """Unpack the tarball into `dest`; returns the include dirs torch's extension build would use."""
    with tarfile.open(HEADERS) as tar:
        # the "data" filter where this Python has it (3.10.12+)
        tar.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    include = Path(dest) / "torch" / "include"
    return [include, include / "torch" / "csrc" / "api" / "include"]


def compile_commands(ext, torch_include, variant, cuda_include):
    """(source, g++ command) for every glue and CPU source, checked as built for `variant`."""
    cxx = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) else ext.extra_compile_args
    defines = [f"-D{name}" if value is None else f"-D{name}={value}" for name, value in ext.define_macros]
    defines += ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]  # what torch's build adds
    includes = [*torch_include, *ext.include_dirs, sysconfig.get_paths()["include"]]
    if variant == "cuda":
        defines.append("-DFASTLM_WITH_CUDA")
        includes.append(cuda_include)
    flags = [*cxx, *defines, *(f"-I{d}" for d in includes)]
    return [(s, ["g++", "-fsyntax-only", *flags, str(s)]) for s in SOURCES]


def check(ext, torch_include, variant, cuda_include):
    """Syntax-check every source with `ext`'s flags for `variant`, in parallel; returns {source: g++'s errors}
    of the sources that fail."""
    commands = compile_commands(ext, torch_include, variant, cuda_include)

    def run(command):
        return subprocess.run(command, capture_output=True, text=True, cwd=ROOT)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(run, [c for _, c in commands]))
    return {
        str(source.relative_to(ROOT)): result.stderr
        for (source, _), result in zip(commands, results, strict=True)
        if result.returncode != 0
    }


def cuda_headers_missing(cuda_include):
    if not (cuda_include / "cuda_runtime_api.h").is_file():
        return f"the CUDA headers are not in {cuda_include} (set CUDA_HOME)"
    return None


@pytest.fixture(scope="session")
def torch_211_include(tmp_path_factory):
    why = missing_prerequisite()
    if why is not None:
        pytest.skip(f"glue not checked against torch 2.11: {why}")
    return unpack_headers(tmp_path_factory.mktemp("torch-2.11"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_glue_compiles_against_torch_2_11(torch_211_include, variant):
    ext, cuda_include = setup_extension()
    why = cuda_headers_missing(cuda_include) if variant == "cuda" else None
    if why is not None:
        pytest.skip(f"FASTLM_WITH_CUDA glue not checked against torch 2.11: {why}")
    failures = check(ext, torch_211_include, variant, cuda_include)
    report = "\n\n".join(f"== {source} ({variant}):\n{errors[:3000]}" for source, errors in failures.items())
    assert not failures, f"the glue does not compile against torch 2.11's headers:\n{report}"


def main():
    why = missing_prerequisite()
    if why is not None:
        print(f"make compat: {why}", file=sys.stderr)
        return 2
    ext, cuda_include = setup_extension()
    failed = False
    with tempfile.TemporaryDirectory(prefix="torch-2.11-") as tmp:
        torch_include = unpack_headers(tmp)
        for variant in VARIANTS:
            why = cuda_headers_missing(cuda_include) if variant == "cuda" else None
            if why is not None:
                print(f"{variant}: not checked: {why}", file=sys.stderr)
                failed = True
                continue
            failures = check(ext, torch_include, variant, cuda_include)
            for source, errors in failures.items():
                print(f"== {source} ({variant}) does not compile against torch 2.11:\n{errors}", file=sys.stderr)
            print(f"{variant}: {len(SOURCES) - len(failures)}/{len(SOURCES)} sources compile against torch 2.11")
            failed |= bool(failures)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
