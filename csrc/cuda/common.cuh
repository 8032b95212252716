// Included first by every kernel source in csrc/cuda. Under nvcc: the CUDA runtime and the 16-bit
// float types, plus the launch / shared-memory macros the kernels use. Under a host compiler: the
// emulation layer (csrc/emu), which defines the same names so the same source runs on the CPU.
#pragma once

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// FASTLM_LAUNCH(kernel, grid, block, smem_bytes, stream)(args...): `kernel` is an identifier or a
// function-pointer variable.
#define FASTLM_LAUNCH(KERNEL, GRID, BLOCK, SMEM, STREAM) KERNEL<<<GRID, BLOCK, SMEM, STREAM>>>
// Declares `T* NAME`, the block's dynamic shared memory.
#define FASTLM_DYNAMIC_SHARED(T, NAME)                                   \
  extern __shared__ __align__(16) unsigned char fastlm_dynamic_smem_[]; \
  T* NAME = reinterpret_cast<T*>(fastlm_dynamic_smem_)
#else
#include "../emu/cuda_emu.h"
#endif

#include <cstdint>

namespace fastlm {

// Conversions between the storage types and the fp32 the kernels compute in.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Up to 16 bytes of consecutive elements, moved as one aligned access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// VEC consecutive elements as fp32, loaded in 16-byte (or smaller) aligned pieces.
template <int VEC, typename T>
__device__ __forceinline__ void load_float(const T* ptr, float (&out)[VEC]) {
  constexpr int kPiece = (16 / int(sizeof(T))) < VEC ? 16 / int(sizeof(T)) : VEC;
#pragma unroll
  for (int piece = 0; piece < VEC; piece += kPiece) {
    const Pack<T, kPiece> pack = *reinterpret_cast<const Pack<T, kPiece>*>(ptr + piece);
#pragma unroll
    for (int i = 0; i < kPiece; ++i) out[piece + i] = to_float(pack.v[i]);
  }
}

template <int VEC, typename T>
__device__ __forceinline__ void store_float(T* ptr, const float (&in)[VEC]) {
  constexpr int kPiece = (16 / int(sizeof(T))) < VEC ? 16 / int(sizeof(T)) : VEC;
#pragma unroll
  for (int piece = 0; piece < VEC; piece += kPiece) {
    Pack<T, kPiece> pack;
#pragma unroll
    for (int i = 0; i < kPiece; ++i) pack.v[i] = from_float<T>(in[piece + i]);
    *reinterpret_cast<Pack<T, kPiece>*>(ptr + piece) = pack;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block; every thread gets the result. `scratch` holds 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.f;
  return warp_sum(v);
}

inline bool aligned(const void* ptr, int bytes) {
  return ptr == nullptr || reinterpret_cast<std::uintptr_t>(ptr) % bytes == 0;
}

}  // namespace fastlm
