"""Build fastlm: the Python package, the Triton kernels (as fastlm.kernels), the benchmark suite
(as fastlm.bench) and the pybind11 extension fastlm._C.

Knobs (environment variables):
  FASTLM_CUDA=0/1        force the CUDA sources off/on (default: on when torch has CUDA and nvcc exists)
  FASTLM_CUDA_ARCHS      ";"-separated compute capabilities, default "80;90", one -gencode each
  FASTLM_EMU=0/1         also build fastlm._C_emu, the CUDA kernels compiled by the host compiler
                         against the CUDA emulation layer (csrc/emu) for CPU tensors (default 0;
                         `make` sets 1). Needs the CUDA headers (CUDA_HOME), not a GPU or nvcc.
  MAX_JOBS               parallel compile jobs (honoured by torch's ninja build)
  FASTLM_CPU_AVX2=0      build the CPU kernels without AVX2/FMA (default on x86-64: with them)
  FASTLM_ATTN_HDIMS      ";"-separated attention head dims to build CUDA kernels for, default: all of
                         csrc/cuda/generate_kernels.py's HEAD_DIMS (e.g. FASTLM_ATTN_HDIMS=64 for a quick
                         developer build; the others are refused)
  FASTLM_ATTN_EXTRAS=0   build the CUDA attention kernels without attn_bias / rel_pos / dropout and varlen (a
                         third of the kernels, for a quick developer build; such calls are refused)
  FASTLM_REQUIRE_EXTENSION=1   fail the install when the extension does not compile (default: warn,
                         and `import fastlm` runs on the reference and Triton backends; fastlm.info()
                         says why the extension is missing)
Sources are globbed: csrc/*.cpp (glue), csrc/cpu/*.cpp (CPU kernels), csrc/cuda/*.cu (CUDA kernels). The
per-head-dim attention sources (csrc/cuda/attention_{fwd,bwd}_hdim<D>.cu, attention_hdims.h) are generated
by csrc/cuda/generate_kernels.py and checked in; the build stops when they differ from its output.
Packages are found, not listed: fastlm and its subpackages, plus kernels/ and bench/ installed as
fastlm.kernels and fastlm.bench (so no top-level `kernels` or `bench` import name is claimed).
The version is fastlm/version.py's. `import fastlm` needs only torch and numpy; the extras add the
optional parts, and a missing one is reported by name (fastlm/_optional.py).
"""

import os
import platform
import re
import runpy
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent

# Folders installed as subpackages of fastlm: import name -> folder.
MAPPED_PACKAGES = {"fastlm.kernels": "kernels", "fastlm.bench": "bench"}

EXTRAS = {
    "triton": ["triton>=3.6"],  # the Triton kernels (fastlm.kernels); pulled in by CUDA builds of torch anyway
    "models": ["safetensors"],  # Hugging Face checkpoint I/O of fastlm.models
    "hf": ["transformers>=5.17"],  # fastlm.patch on Hugging Face models (their attention and mask interfaces)
    "train": ["tokenizers", "safetensors", "tqdm", "matplotlib"],  # fastlm.data tokenizers, pretrain / finetune
    "bench": ["matplotlib", "tqdm", "transformers>=5.17"],  # fastlm bench
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})


def _version():
    """__version__ of fastlm/version.py, read without importing fastlm (which needs torch)."""
    match = re.search(r'^__version__ = "([^"]+)"$', (ROOT / "fastlm" / "version.py").read_text(), re.MULTILINE)
    if match is None:
        raise SystemExit("fastlm/version.py must hold a line __version__ = \"X.Y.Z\"")
    return match.group(1)


def _packages():
    """fastlm and every package below it, and each mapped folder with the packages below it."""
    packages = find_packages(where=str(ROOT), include=["fastlm", "fastlm.*"])
    for name, folder in MAPPED_PACKAGES.items():
        packages += [name, *(f"{name}.{sub}" for sub in find_packages(where=str(ROOT / folder)))]
    return packages


def _flag(name):
    """The boolean value of environment variable `name`, or None when it is unset."""
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        raise SystemExit(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def _sources(folder, pattern):
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / folder).glob(pattern))


ATTN_GENERATOR = runpy.run_path(str(ROOT / "csrc" / "cuda" / "generate_kernels.py"))
ATTN_HDIMS = ATTN_GENERATOR["HEAD_DIMS"]


def _check_generated_sources():
    """Stop when the generated attention sources differ from csrc/cuda/generate_kernels.py's output."""
    changed = ATTN_GENERATOR["differences"]()
    if changed:
        raise SystemExit(
            f"csrc/cuda/{', '.join(changed)} differ from csrc/cuda/generate_kernels.py's output: "
            "run python csrc/cuda/generate_kernels.py"
        )


def _attn_dropped_hdims():
    """The attention head dims FASTLM_ATTN_HDIMS leaves out (their attention_*_hdim<D>.cu are not built)."""
    value = os.environ.get("FASTLM_ATTN_HDIMS")
    if not value:
        return ()
    kept = {d.strip() for d in value.split(";") if d.strip()}
    if not kept or not kept <= {str(d) for d in ATTN_HDIMS}:
        raise SystemExit(f"FASTLM_ATTN_HDIMS entries must be among {ATTN_HDIMS} (at least one), got {value!r}")
    return tuple(d for d in ATTN_HDIMS if str(d) not in kept)


def _cuda_sources():
    """csrc/cuda/*.cu less the attention instantiations of the head dims FASTLM_ATTN_HDIMS drops."""
    instance = ATTN_GENERATOR["instance_name"]
    dropped = {instance(part, d) for d in _attn_dropped_hdims() for part in ("fwd", "bwd")}
    return [s for s in _sources("csrc/cuda", "*.cu") if Path(s).name not in dropped]


def _cuda_defines():
    """The defines of the CUDA attention build switches (also given to a build without CUDA, so that its
    fastlm._C.attention_head_dims() reports the same list)."""
    defines = [(f"FASTLM_ATTN_NO_HDIM{d}", None) for d in _attn_dropped_hdims()]
    if _flag("FASTLM_ATTN_EXTRAS") is False:
        defines.append(("FASTLM_ATTN_NO_EXTRAS", None))
    return defines


def _gencode_flags():
    archs = os.environ.get("FASTLM_CUDA_ARCHS", "80;90")
    flags = []
    for arch in filter(None, (a.strip() for a in archs.split(";"))):
        if not arch.isdigit():
            raise SystemExit(f"FASTLM_CUDA_ARCHS entries must be like 80 or 90, got {arch!r}")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def _cpu_flags():
    """Vector ISA flags for the CPU kernels: AVX2 + FMA on x86-64 (at::vec then uses its AVX2 code)."""
    if platform.machine() not in ("x86_64", "AMD64") or _flag("FASTLM_CPU_AVX2") is False:
        return []
    return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]


def _openmp_flags():
    """-fopenmp when torch runs its CPU ops on OpenMP. ATen's at::parallel_for is a header template whose
    `#pragma omp parallel` only takes effect in code compiled with OpenMP: without the flag, every CPU
    kernel of the extension runs on one thread. The extension then shares torch's libgomp (same soname)."""
    import torch

    if platform.system() != "Linux" or not torch.backends.openmp.is_available():
        return []
    return ["-fopenmp"]


def _emu_extension(cpp_extension, cxx_flags, include_dirs, optional):
    """fastlm._C_emu: the glue (csrc/*.cpp) and every CUDA kernel source (csrc/cuda/*.cu) compiled by
    the host compiler with FASTLM_EMU defined, through one generated .cpp per source that includes
    it (so that g++ takes the .cu files, and the glue's objects do not collide with fastlm._C's)."""
    cuda_include = Path(cpp_extension.CUDA_HOME or "/usr/local/cuda") / "include"
    if not (cuda_include / "cuda_fp16.h").exists():
        raise SystemExit(f"FASTLM_EMU=1 needs the CUDA headers, not found in {cuda_include} (set CUDA_HOME)")
    generated = ROOT / "build" / "emu_sources"
    generated.mkdir(parents=True, exist_ok=True)
    sources = _sources("csrc/emu", "*.cpp")
    for prefix, paths in (("glue", _sources("csrc", "*.cpp")), ("cuda", _cuda_sources())):
        for path in map(ROOT.joinpath, paths):
            wrapper = generated / f"{prefix}_{path.stem}.cpp"
            text = f'#include "{path.relative_to(ROOT / "csrc")}"\n'
            if not wrapper.exists() or wrapper.read_text() != text:
                wrapper.write_text(text)
            sources.append(str(wrapper.relative_to(ROOT)))
    return cpp_extension.CppExtension(
        "fastlm._C_emu",
        sources,
        include_dirs=[*include_dirs, str(cuda_include)],
        define_macros=[("FASTLM_EMU", None), *_cuda_defines()],
        extra_compile_args={"cxx": cxx_flags},
        optional=optional,
    )


def _extensions():
    from torch.utils import cpp_extension

    optional = not _flag("FASTLM_REQUIRE_EXTENSION")
    _check_generated_sources()
    cxx_flags = ["-O3", "-std=c++20", "-ffp-contract=off", "-Wno-unknown-pragmas", *_cpu_flags()]
    openmp = _openmp_flags()
    include_dirs = [str(ROOT / "csrc")]
    sources = _sources("csrc", "*.cpp") + _sources("csrc/cpu", "*.cpp")
    emu = [_emu_extension(cpp_extension, cxx_flags, include_dirs, optional)] if _flag("FASTLM_EMU") else []

    has_cuda_toolchain = cpp_extension.CUDA_HOME is not None
    torch_has_cuda = __import__("torch").version.cuda is not None
    use_cuda = _flag("FASTLM_CUDA")
    if use_cuda is None:
        use_cuda = has_cuda_toolchain and torch_has_cuda
    elif use_cuda and not (has_cuda_toolchain and torch_has_cuda):
        raise SystemExit("FASTLM_CUDA=1 but torch has no CUDA or nvcc was not found (CUDA_HOME)")

    if use_cuda:
        nvcc_flags = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", *_gencode_flags()]
        return [
            cpp_extension.CUDAExtension(
                "fastlm._C",
                sources + _cuda_sources(),
                include_dirs=include_dirs,
                define_macros=[("FASTLM_WITH_CUDA", None), *_cuda_defines()],
                extra_compile_args={"cxx": [*cxx_flags, *openmp], "nvcc": nvcc_flags},
                extra_link_args=openmp,
                optional=optional,
            ),
            *emu,
        ]
    return [
        cpp_extension.CppExtension(
            "fastlm._C",
            sources,
            include_dirs=include_dirs,
            define_macros=_cuda_defines(),
            extra_compile_args={"cxx": [*cxx_flags, *openmp]},
            extra_link_args=openmp,
            optional=optional,
        ),
        *emu,
    ]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    name="fastlm",
    version=_version(),
    description="Fused attention, cross-entropy and norm kernels for BERT/GPT/T5 training",
    python_requires=">=3.10",
    packages=_packages(),
    package_dir={"fastlm": "fastlm", **MAPPED_PACKAGES},
    # JSON tables read at run time; a pattern that matches nothing (no GPU results committed yet) adds nothing:
    # fastlm/dispatch.json (triton or cuda per op), kernels/*.json (tuned launch configurations), bench results.
    package_data={"fastlm": ["*.json"], "fastlm.kernels": ["*.json"], "fastlm.bench": ["results/*.json"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
    install_requires=["torch>=2.11", "numpy"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["fastlm = fastlm.cli:main"]},
    zip_safe=False,
)
