"""The compiled extensions, loaded once, with the reason when one is missing.

`fastlm._C` holds the CPU kernels and, when built with CUDA, the CUDA kernels. `fastlm._C_emu`, when
built, holds the same CUDA kernel sources compiled by the host compiler against the CUDA emulation
layer (csrc/emu), so they run on CPU tensors.
"""

import importlib

from .emu import CheckedKernels


def _load(name):
    try:
        return importlib.import_module(name), None
    except ImportError as err:  # not built, or built against another torch
        return None, f"{name} could not be imported ({err})"


C, C_ERROR = _load("fastlm._C")
C_EMU, C_EMU_ERROR = _load("fastlm._C_emu")
if C_EMU is not None:  # checked mode (fastlm.emu) wraps every emulated kernel call
    C_EMU = CheckedKernels(C_EMU)


def has_cuda_kernels():
    """Whether fastlm._C was compiled with its CUDA sources."""
    return C is not None and C.built_with_cuda()
