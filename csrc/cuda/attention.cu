// The attention launchers: head-dim dispatch (the kernels are instantiated per head dim in
// attention_{fwd,bwd}_hdim<D>.cu so that they compile in parallel) and the backward preprocess: per
// query row, delta = sum_d dO * O (fp32) and lse_log2 = lse * log2(e), with +inf for rows that saw no
// key (lse = -inf), so that exp2(s - lse_log2) = 0 there.
#include "attention_tile.cuh"

namespace fastlm {
namespace {

template <typename T>
__global__ void __launch_bounds__(attn::kThreads) attention_bwd_preprocess_kernel(const AttentionParams p) {
  const int64_t rows = p.B * p.Hq * p.Lq;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < rows; r += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = r % p.Lq, bh = r / p.Lq, b = bh / p.Hq, h = bh % p.Hq;
    const T* o = static_cast<const T*>(p.o) + b * p.o_stride[0] + h * p.o_stride[1] + i * p.o_stride[2];
    const T* dout = static_cast<const T*>(p.dout) + b * p.do_stride[0] + h * p.do_stride[1] + i * p.do_stride[2];
    float sum = 0.f;
    for (int d = 0; d < p.head_dim; ++d) sum += to_float(dout[d]) * to_float(o[d]);
    p.delta[r] = sum;
    const float lse = p.lse[r];
    p.lse_log2[r] = lse == -INFINITY ? INFINITY : lse * attn::kLog2e;
  }
}

// launch.template operator()<D>() for D = head_dim, when this build has kernels for it.
template <typename Launch>
cudaError_t head_dim_switch(int head_dim, Launch&& launch) {
  auto built = [&]<int D>() {
    if constexpr (attention_head_dim_built(D)) return launch.template operator()<D>();
    return cudaErrorInvalidValue;
  };
  switch (head_dim) {
    case 32:
      return built.template operator()<32>();
    case 64:
      return built.template operator()<64>();
    case 96:
      return built.template operator()<96>();
    case 128:
      return built.template operator()<128>();
    case 256:
      return built.template operator()<256>();
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_attention_bwd_preprocess(const AttentionParams& p, cudaStream_t stream) {
  const int64_t rows = p.B * p.Hq * p.Lq;
  const unsigned blocks = unsigned(std::min<int64_t>((rows + attn::kThreads - 1) / attn::kThreads, 65535));
  auto launch = [&]<typename T>() {
    FASTLM_LAUNCH(attention_bwd_preprocess_kernel<T>, dim3(blocks), attn::kThreads, 0, stream)(p);
    return cudaGetLastError();
  };
  if (p.dtype == DType::f16) return launch.template operator()<__half>();
  if (p.dtype == DType::bf16) return launch.template operator()<__nv_bfloat16>();
  return cudaErrorInvalidValue;
}

cudaError_t launch_attention_fwd(const AttentionParams& p, cudaStream_t stream) {
  return head_dim_switch(p.head_dim, [&]<int D>() { return launch_attention_fwd_hdim<D>(p, stream); });
}

cudaError_t launch_attention_bwd(const AttentionParams& p, cudaStream_t stream) {
  if (const cudaError_t err = launch_attention_bwd_preprocess(p, stream); err != cudaSuccess) return err;
  return head_dim_switch(p.head_dim, [&]<int D>() { return launch_attention_bwd_hdim<D>(p, stream); });
}

}  // namespace fastlm
