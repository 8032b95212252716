// CPU fused attention kernels (flash-style, fp32 inside, at::parallel_for over independent tasks).
#pragma once
#include "cuda/attention.h"

namespace fastlm::cpu {

constexpr int kAttentionMaxHeadDim = 256;

// Forward: fills p.o and p.lse. Any strides for q, k, v, bias and table; f32, f16 or bf16.
void attention_fwd(const AttentionParams& p);
// Backward: fills p.dq, p.dk, p.dv, and when set p.dbias and p.dtable, the latter as one partial per
// (b, h): (B, Hq, 1, num_buckets), zero-filled by the caller, summed by it. p.delta is scratch.
void attention_bwd(const AttentionParams& p);

}  // namespace fastlm::cpu
