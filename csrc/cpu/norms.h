// CPU LayerNorm / RMSNorm kernels (at::parallel_for over rows, at::vec inside a row).
#pragma once
#include <cstdint>

#include "cuda/norms.h"

namespace fastlm::cpu {

void norm_fwd(const NormParams& p);
// Number of fp32 partial rows norm_bwd writes for d weight / d bias (one per worker thread).
int64_t norm_bwd_partials();
void norm_bwd(const NormParams& p);

}  // namespace fastlm::cpu
