// CPU cross-entropy row kernel: each worker thread takes a contiguous range of rows. A row is converted
// to fp32 once (16-bit rows through a thread-local buffer; fp32 rows are used in place), then read
// while it sits in L2: max and sum, then Σ exp(x - max) — with a gradient, writing exp(x - max) out, so
// that the gradient is that times scale / Σ: one exp per logit.
#include "cpu/cross_entropy.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace fastlm::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
constexpr int64_t kGrainElements = 1 << 15;  // rows per task ≈ this many elements
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// NaN-propagating max (std::max keeps the first argument when the comparison fails).
inline float nan_max(float a, float b) { return (std::isnan(a) || a > b) ? a : b; }

struct RowStats {
  float max, sum_x;
};

RowStats max_and_sum(const float* x, int64_t n) {
  Vec vmax(-std::numeric_limits<float>::infinity()), vsum(0.f);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const Vec v = Vec::loadu(x + i);
    vmax = at::vec::maximum(vmax, v);
    vsum += v;
  }
  float m = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, vmax);
  float s = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, vsum);
  for (; i < n; ++i) {
    m = nan_max(m, x[i]);
    s += x[i];
  }
  return {m, s};
}

// Σ exp(x - shift); with dst (not null) also dst = exp(x - shift).
float sum_exp(const float* x, int64_t n, float shift, float* dst) {
  const Vec vs(shift);
  Vec acc(0.f);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const Vec e = (Vec::loadu(x + i) - vs).exp_u20();
    if (dst != nullptr) e.store(dst + i);
    acc += e;
  }
  float s = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, acc);
  for (; i < n; ++i) {
    const float e = std::exp(x[i] - shift);
    if (dst != nullptr) dst[i] = e;
    s += e;
  }
  return s;
}

// ε (lse - mean x), left out at ε = 0 where a -inf logit would make it 0 · inf = NaN (as in torch).
inline float smoothing_term(float eps, float lse, float sum_x, int64_t n) {
  return eps > 0.f ? eps * (lse - sum_x / n) : 0.f;
}

// dst = dst * a - b in place: from dst = exp(x - max) and a = scale / Σ exp(x - max), the gradient before
// the label's own term.
void softmax_grad(float* dst, int64_t n, float a, float b) {
  const Vec va(a), vb(b);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) at::vec::fmsub(Vec::loadu(dst + i), va, vb).store(dst + i);
  for (; i < n; ++i) dst[i] = dst[i] * a - b;
}

template <typename T>
void forward(const CrossEntropyParams& p) {
  const int64_t n = p.cols;
  const float eps = p.label_smoothing, z = p.z_loss;
  at::parallel_for(0, p.rows, std::max<int64_t>(1, kGrainElements / n), [&](int64_t begin, int64_t end) {
    constexpr bool kFloat = std::is_same_v<T, float>;
    std::vector<float> buffer(kFloat ? 0 : n), out(kFloat || p.dlogits == nullptr ? 0 : n);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t label = p.labels[r];
      T* grad_row = p.dlogits ? static_cast<T*>(p.dlogits) + r * p.dlogits_stride : nullptr;
      if (label == p.ignore_index) {
        p.loss[r] = 0.f;
        p.lse[r] = 0.f;
        if (grad_row) std::fill(grad_row, grad_row + n, T(0.f));
        continue;
      }
      const T* src = static_cast<const T*>(p.logits) + r * p.logits_stride;
      const float* x;
      if constexpr (kFloat) {
        x = src;
      } else {
        for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<float>(src[i]);
        x = buffer.data();
      }
      const bool in_range = label >= 0 && label < n;
      const RowStats stats = max_and_sum(x, n);
      float* dst = grad_row == nullptr ? nullptr : kFloat ? reinterpret_cast<float*>(grad_row) : out.data();
      const float sum = sum_exp(x, n, stats.max, dst);
      const float lse = stats.max + std::log(sum);
      const float target = in_range ? x[label] : kNaN;
      p.lse[r] = lse;
      p.loss[r] = (1.f - eps) * (lse - target) + smoothing_term(eps, lse, stats.sum_x, n) + z * lse * lse;
      if (!grad_row) continue;
      if (!in_range) {
        std::fill(grad_row, grad_row + n, T(kNaN));
        continue;
      }
      const float scale = p.scale[r];
      softmax_grad(dst, n, scale * (1.f + 2.f * z * lse) / sum, scale * eps / n);
      dst[label] -= scale * (1.f - eps);
      if constexpr (!kFloat) {
        for (int64_t i = 0; i < n; ++i) grad_row[i] = static_cast<T>(dst[i]);
      }
    }
  });
}

}  // namespace

void cross_entropy_fwd(const CrossEntropyParams& p) {
  FASTLM_DTYPE_SWITCH(p.dtype, T, c10::Half, c10::BFloat16, [&] { forward<T>(p); });
}

}  // namespace fastlm::cpu
