// Backward attention kernels (dK/dV, dQ) for head dim 256 (fp16 / bf16, causal or not).
#include "attention_bwd_kernel.cuh"

namespace fastlm {
template <>
cudaError_t launch_attention_bwd_hdim<256>(const AttentionParams& p, cudaStream_t stream) {
  return attn::launch_bwd_hdim<256>(p, stream);
}
}  // namespace fastlm
