// Forward attention kernels for head dim 96 (fp16 / bf16, causal or not).
#include "attention_fwd_kernel.cuh"

namespace fastlm {
template <>
cudaError_t launch_attention_fwd_hdim<96>(const AttentionParams& p, cudaStream_t stream) {
  return attn::launch_fwd_hdim<96>(p, stream);
}
}  // namespace fastlm
