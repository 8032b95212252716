// Philox4x32-10 (Salmon et al., SC'11) exactly as triton.language.rand computes it, so that a CUDA
// kernel and a Triton kernel draw the same uniform for the same (seed, offset): counter
// (lo32(offset), hi32(offset), 0, 0), key (lo32(seed), hi32(seed)); the first output word x, read as
// int32, becomes float32(x < 0 ? ~x : x) * 4.6566127342e-10 in [0, 1). fastlm.ops.attention's
// dropout_keep_mask is the PyTorch statement of the same stream.
#pragma once

#include "common.cuh"

namespace fastlm {

__device__ __forceinline__ float philox_uniform(uint64_t seed, uint64_t offset) {
  uint32_t c0 = uint32_t(offset), c1 = uint32_t(offset >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi_b = __umulhi(0xCD9E8D57u, c2), lo_b = 0xCD9E8D57u * c2;
    const uint32_t hi_a = __umulhi(0xD2511F53u, c0), lo_a = 0xD2511F53u * c0;
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const int32_t x = int32_t(c0);
  return float(x < 0 ? ~x : x) * 4.6566127342e-10f;
}

}  // namespace fastlm
