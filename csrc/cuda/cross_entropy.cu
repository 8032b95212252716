// CUDA cross-entropy row kernel and its launcher.
//
// One block per row. Non-ignored rows are streamed once with an online softmax in fp32: each thread keeps
// a running (max, Σ exp(x - max)) and Σ x over its columns, the block merges them, and — when a gradient
// is requested — a second sweep writes scale · (softmax (1 + 2 z lse) - ε / V - (1 - ε) onehot). Ignored
// rows write zeros without reading their logits. Accesses are 16-byte vectors when the width, the row
// strides and the pointers allow, else scalars. The label's logit is read only when the label lies in
// [0, V); other labels give a NaN loss and gradient row.
#include "common.cuh"
#include "cross_entropy.h"

namespace fastlm {
namespace {

constexpr int kThreads = 256;

// A running softmax normaliser: sum = Σ exp(x - max) over the elements seen.
struct SoftmaxState {
  float max, sum;
};

// max that propagates NaN (fmaxf returns the other operand): a NaN logit must reach the lse even when it
// is all a thread saw, where fmaxf would leave that thread's max at -inf and the merge would drop its sum.
__device__ __forceinline__ float nan_max(float a, float b) { return (isnan(a) || a > b) ? a : b; }

__device__ __forceinline__ SoftmaxState merge(SoftmaxState a, SoftmaxState b) {
  const float m = nan_max(a.max, b.max);
  const float sa = a.max == -INFINITY ? 0.f : a.sum * __expf(a.max - m);
  const float sb = b.max == -INFINITY ? 0.f : b.sum * __expf(b.max - m);
  return {m, sa + sb};
}

__device__ __forceinline__ SoftmaxState warp_merge(SoftmaxState st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const SoftmaxState other{__shfl_xor_sync(0xffffffffu, st.max, offset),
                             __shfl_xor_sync(0xffffffffu, st.sum, offset)};
    st = merge(st, other);
  }
  return st;
}

// Merge over the block; every thread gets the result. smax / ssum hold 32 floats of shared memory each.
__device__ __forceinline__ SoftmaxState block_merge(SoftmaxState st, float* smax, float* ssum) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  st = warp_merge(st);
  __syncthreads();
  if (lane == 0) {
    smax[warp] = st.max;
    ssum[warp] = st.sum;
  }
  __syncthreads();
  st = lane < warps ? SoftmaxState{smax[lane], ssum[lane]} : SoftmaxState{-INFINITY, 0.f};
  return warp_merge(st);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) cross_entropy_fwd_kernel(const CrossEntropyParams p) {
  __shared__ float smax[32], ssum[32], scratch[32];
  const int64_t row = blockIdx.x, n = p.cols;
  const int64_t step = int64_t(blockDim.x) * VEC;
  const int64_t label = p.labels[row];
  T* grad = p.dlogits == nullptr ? nullptr : static_cast<T*>(p.dlogits) + row * p.dlogits_stride;
  if (label == p.ignore_index) {
    if (threadIdx.x == 0) {
      p.loss[row] = 0.f;
      p.lse[row] = 0.f;
    }
    if (grad != nullptr) {
      const float zero[VEC] = {};
      for (int64_t col = int64_t(threadIdx.x) * VEC; col < n; col += step) store_float<VEC>(grad + col, zero);
    }
    return;
  }
  const T* x = static_cast<const T*>(p.logits) + row * p.logits_stride;
  SoftmaxState st{-INFINITY, 0.f};
  float sum_x = 0.f;
  for (int64_t col = int64_t(threadIdx.x) * VEC; col < n; col += step) {
    float v[VEC];
    load_float<VEC>(x + col, v);
    float m = st.max;
#pragma unroll
    for (int k = 0; k < VEC; ++k) m = nan_max(m, v[k]);
    float s = st.max == -INFINITY ? 0.f : st.sum * __expf(st.max - m);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      s += __expf(v[k] - m);
      sum_x += v[k];
    }
    st = {m, s};
  }
  st = block_merge(st, smax, ssum);
  sum_x = block_sum(sum_x, scratch);
  const float lse = st.max + __logf(st.sum);
  const bool in_range = label >= 0 && label < n;
  const float eps = p.label_smoothing, z = p.z_loss;
  if (threadIdx.x == 0) {
    const float target = in_range ? to_float(x[label]) : nanf("");
    p.lse[row] = lse;
    // The ε term is left out at ε = 0, where a -inf logit would make it 0 · inf = NaN (as in torch).
    const float smooth = eps > 0.f ? eps * (lse - sum_x / n) : 0.f;
    p.loss[row] = (1.f - eps) * (lse - target) + smooth + z * lse * lse;
  }
  if (grad == nullptr) return;
  const float scale = p.scale[row];
  const float a = scale * (1.f + 2.f * z * lse), b = scale * eps / n, hit = scale * (1.f - eps);
  for (int64_t col = int64_t(threadIdx.x) * VEC; col < n; col += step) {
    float v[VEC];
    load_float<VEC>(x + col, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float g = __expf(v[k] - lse) * a - b - (col + k == label ? hit : 0.f);
      v[k] = in_range ? g : nanf("");
    }
    store_float<VEC>(grad + col, v);
  }
}

// 16-byte vectors when the width, both row strides and both pointers allow them.
template <typename T>
bool can_vectorize(const CrossEntropyParams& p) {
  constexpr int V = 16 / sizeof(T);
  return p.cols % V == 0 && p.logits_stride % V == 0 && p.dlogits_stride % V == 0 && aligned(p.logits, 16) &&
         aligned(p.dlogits, 16);
}

}  // namespace

cudaError_t launch_cross_entropy_fwd(const CrossEntropyParams& p, cudaStream_t stream) {
  FASTLM_DTYPE_SWITCH(p.dtype, T, __half, __nv_bfloat16, [&] {
    if (can_vectorize<T>(p)) {
      auto kernel = &cross_entropy_fwd_kernel<T, 16 / sizeof(T)>;
      FASTLM_LAUNCH(kernel, dim3(p.rows), kThreads, 0, stream)(p);
    } else {
      auto kernel = &cross_entropy_fwd_kernel<T, 1>;
      FASTLM_LAUNCH(kernel, dim3(p.rows), kThreads, 0, stream)(p);
    }
  });
  return cudaGetLastError();
}

}  // namespace fastlm
