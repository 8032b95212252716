// Head-dim dispatch of the attention launchers; the kernels are instantiated per head dim in
// attention_fwd_hdim<D>.cu so that they compile in parallel.
#include "attention.h"

#include "common.cuh"

namespace fastlm {

cudaError_t launch_attention_fwd(const AttentionParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 32:
      return launch_attention_fwd_hdim<32>(p, stream);
    case 64:
      return launch_attention_fwd_hdim<64>(p, stream);
    case 128:
      return launch_attention_fwd_hdim<128>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace fastlm
