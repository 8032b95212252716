// Host emulation of the CUDA execution model: the entry header that csrc/cuda/common.cuh includes
// when a kernel source is compiled by a host compiler (g++) instead of nvcc. The half and bfloat16
// types, vector types (float4, uint4, dim3, ...) and runtime enums are CUDA's own headers, which
// compile for the host; everything that needs a GPU is emulated by the headers below.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>

#include "collectives.h"
#include "device_functions.h"
#include "runtime.h"
#include "runtime_api.h"

// __shared__ variables: one instance per block. Blocks run one after another on an OS thread and
// their threads are fibers of that OS thread, so a thread_local static is exactly one per block.
#undef __shared__
#define __shared__ static thread_local

// Register and occupancy hints mean nothing on the host.
#define __launch_bounds__(...)
