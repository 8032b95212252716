// CPU cross-entropy row kernel (at::parallel_for over rows, at::vec inside a row).
#pragma once

#include "cuda/cross_entropy.h"

namespace fastlm::cpu {

void cross_entropy_fwd(const CrossEntropyParams& p);

}  // namespace fastlm::cpu
