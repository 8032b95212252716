// Compiled by nvcc only (tests/emu/test_emu.py): the PTX side of csrc/cuda/tensor_core.cuh must
// assemble for sm_80 and sm_90. A 16x8 tile D = A * B through cp.async, ldmatrix and mma.sync.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/tensor_core.cuh"

template <bool Bf16>
__global__ void tensor_core_probe(const uint4* a, const uint4* b, float* d) {
  __shared__ __align__(16) uint16_t sa[16 * 16];
  __shared__ __align__(16) uint16_t sb[16 * 8];
  const int lane = threadIdx.x;
  fastlm::cp_async_16(&sa[lane * 8], &a[lane]);
  if (lane < 16) fastlm::cp_async_16_zfill(&sb[lane * 8], &b[lane], 16);
  fastlm::cp_async_commit();
  fastlm::cp_async_wait<0>();
  __syncwarp();
  uint32_t ra[4], rb[2], r1[1], r1t[1], r4t[4], r2[2];
  fastlm::ldmatrix_x4(ra, &sa[(lane % 16) * 16 + (lane / 16) * 8]);
  fastlm::ldmatrix_x2_trans(rb, &sb[(lane % 16) * 8]);
  fastlm::ldmatrix_x1(r1, &sb[(lane % 8) * 8]);
  fastlm::ldmatrix_x1_trans(r1t, &sb[(lane % 8) * 8]);
  fastlm::ldmatrix_x2(r2, &sb[(lane % 16) * 8]);
  fastlm::ldmatrix_x4_trans(r4t, &sa[(lane % 16) * 16 + (lane / 16) * 8]);
  float c[4] = {0, 0, 0, 0}, out[4];
  if (Bf16) {
    fastlm::mma_m16n8k16_bf16(out, ra, rb, c);
  } else {
    fastlm::mma_m16n8k16_f16(out, ra, rb, c);
  }
  for (int i = 0; i < 4; ++i) d[lane * 4 + i] = out[i] + r1[0] + r1t[0] + r2[1] + r4t[3];
}

template __global__ void tensor_core_probe<false>(const uint4*, const uint4*, float*);
template __global__ void tensor_core_probe<true>(const uint4*, const uint4*, float*);
