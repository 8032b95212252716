// Philox4x32-10 (Salmon et al., SC'11) exactly as triton.language.rand computes it, so that a CUDA
// kernel, the CPU kernel (csrc/cpu/attention.cpp, whose 8-lane AVX2 version must agree with this one)
// and a Triton kernel draw the same uniform for the same (seed, offset): counter (lo32(offset),
// hi32(offset), 0, 0), key (lo32(seed), hi32(seed)); the first output word x, read as int32, becomes
// float32(x < 0 ? ~x : x) * 4.6566127342e-10 in [0, 1). fastlm.ops.attention's dropout_keep_mask is the
// PyTorch statement of the same stream. Plain C++: it compiles for the device under nvcc (the 64-bit
// product's high word is one mul.hi.u32) and for the host everywhere else.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTLM_PHILOX_INLINE __host__ __device__ __forceinline__
#else
#define FASTLM_PHILOX_INLINE inline
#endif

namespace fastlm {

constexpr uint32_t kPhiloxMulA = 0xD2511F53u, kPhiloxMulB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u, kPhiloxKeyB = 0xBB67AE85u;
constexpr float kPhiloxToUnit = 4.6566127342e-10f;  // 2^-31: a non-negative int32 to [0, 1)

FASTLM_PHILOX_INLINE float philox_uniform(uint64_t seed, uint64_t offset) {
  uint32_t c0 = uint32_t(offset), c1 = uint32_t(offset >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint64_t b = uint64_t(kPhiloxMulB) * c2, a = uint64_t(kPhiloxMulA) * c0;
    c0 = uint32_t(b >> 32) ^ c1 ^ k0;
    c1 = uint32_t(b);
    c2 = uint32_t(a >> 32) ^ c3 ^ k1;
    c3 = uint32_t(a);
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  const int32_t x = int32_t(c0);
  return float(x < 0 ? ~x : x) * kPhiloxToUnit;
}

}  // namespace fastlm
