// The CUDA runtime types the launchers' declarations need (cudaStream_t, cudaError_t): from the CUDA
// toolkit, or from the host emulation layer when the kernels are built for emulation (FASTLM_EMU).
#pragma once
#if defined(FASTLM_EMU) && !defined(__CUDACC__)
#include "../emu/cuda_emu.h"
#else
#include <cuda_runtime_api.h>
#endif
