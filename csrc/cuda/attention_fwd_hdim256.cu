// Forward attention kernels for head dim 256 (fp16 / bf16, causal or not).
#include "attention_fwd_kernel.cuh"

namespace fastlm {
template <>
cudaError_t launch_attention_fwd_hdim<256>(const AttentionParams& p, cudaStream_t stream) {
  return attn::launch_fwd_hdim<256>(p, stream);
}
}  // namespace fastlm
