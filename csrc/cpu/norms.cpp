// CPU LayerNorm / RMSNorm: each worker thread takes a contiguous range of rows. A row is read from
// memory once into fp32 (16-bit inputs and the residual add go through a thread-local buffer; fp32
// rows are used in place), reduced while it sits in L1, and written once; backward likewise.
#include "cpu/norms.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <type_traits>
#include <vector>

namespace fastlm::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
constexpr int64_t kGrainElements = 1 << 15;  // rows per task ≈ this many elements

int64_t grain(int64_t cols) { return std::max<int64_t>(1, kGrainElements / cols); }

template <typename T>
void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
void from_float(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// `src` as fp32: itself when it already is, else converted into `buffer`.
template <typename T>
const float* as_float(const T* src, float* buffer, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    to_float(src, buffer, n);
    return buffer;
  }
}

// A row as fp32: the source itself when it is fp32 and there is nothing to add, else `buffer`.
template <typename T, typename TS>
const float* input_row(const NormParams& p, int64_t r, float* buffer) {
  const T* x = static_cast<const T*>(p.x) + r * p.x_stride;
  const int64_t n = p.cols;
  if (p.residual == nullptr) return as_float(x, buffer, n);
  const TS* res = static_cast<const TS*>(p.residual) + r * p.residual_stride;
  for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<float>(x[i]) + static_cast<float>(res[i]);
  if (p.s != nullptr) from_float(buffer, static_cast<TS*>(p.s) + r * p.s_stride, n);
  return buffer;
}

// (mean, 1/std) of a row; mean is 0 for RMSNorm.
std::pair<float, float> moments(const float* v, int64_t n, bool rms, float eps) {
  float mean = 0.f;
  if (!rms) {
    Vec acc(0.f);
    int64_t i = 0;
    for (; i + kW <= n; i += kW) acc += Vec::loadu(v + i);
    mean = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, acc);
    for (; i < n; ++i) mean += v[i];
    mean /= n;
  }
  Vec acc(0.f);
  const Vec m(mean);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const Vec d = Vec::loadu(v + i) - m;
    acc = at::vec::fmadd(d, d, acc);
  }
  float sq = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, acc);
  for (; i < n; ++i) sq += (v[i] - mean) * (v[i] - mean);
  return {mean, 1.f / std::sqrt(sq / n + eps)};
}

template <typename T, typename TS, typename TW>
void forward(const NormParams& p) {
  const int64_t n = p.cols;
  std::vector<float> weight(n, 1.f), bias(n, 0.f);
  if (p.weight) to_float(static_cast<const TW*>(p.weight), weight.data(), n);
  if (p.bias) to_float(static_cast<const TW*>(p.bias), bias.data(), n);
  at::parallel_for(0, p.rows, grain(n), [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(n), out(std::is_same_v<T, float> ? 0 : n);
    for (int64_t r = begin; r < end; ++r) {
      const float* v = input_row<T, TS>(p, r, buffer.data());
      const auto [mean, rstd] = moments(v, n, p.rms, p.eps);
      if (p.mean) p.mean[r] = mean;
      p.rstd[r] = rstd;
      T* y = static_cast<T*>(p.y) + r * p.y_stride;
      float* dst = std::is_same_v<T, float> ? reinterpret_cast<float*>(y) : out.data();
      const Vec m(mean), s(rstd);
      int64_t i = 0;
      for (; i + kW <= n; i += kW) {
        const Vec h = (Vec::loadu(v + i) - m) * s;
        at::vec::fmadd(h, Vec::loadu(weight.data() + i), Vec::loadu(bias.data() + i)).store(dst + i);
      }
      for (; i < n; ++i) dst[i] = (v[i] - mean) * rstd * weight[i] + bias[i];
      if constexpr (!std::is_same_v<T, float>) from_float(out.data(), y, n);
    }
  });
}

template <typename T, typename TS, typename TW>
void backward(const NormParams& p) {
  const int64_t n = p.cols;
  std::vector<float> weight(n, 1.f);
  if (p.weight) to_float(static_cast<const TW*>(p.weight), weight.data(), n);
  const int64_t threads = p.partials;
  if (p.dweight_partial) std::fill(p.dweight_partial, p.dweight_partial + threads * n, 0.f);
  if (p.dbias_partial) std::fill(p.dbias_partial, p.dbias_partial + threads * n, 0.f);
  at::parallel_for(0, p.rows, grain(n), [&](int64_t begin, int64_t end) {
    const int64_t t = at::get_thread_num();
    float* dw = p.dweight_partial ? p.dweight_partial + t * n : nullptr;
    float* db = p.dbias_partial ? p.dbias_partial + t * n : nullptr;
    std::vector<float> s_buf(n), dy_buf(n), ds_buf(n), dx_buf(n);
    for (int64_t r = begin; r < end; ++r) {
      const float* s = as_float(static_cast<const TS*>(p.s) + r * p.s_stride, s_buf.data(), n);
      const float* dy = as_float(static_cast<const T*>(p.dy) + r * p.dy_stride, dy_buf.data(), n);
      const float mean = p.rms ? 0.f : p.mean[r];
      const float rstd = p.rstd[r];
      const Vec m(mean), rs(rstd);
      // Pass 1: c1 = mean(x̂ · w dy), c2 = mean(w dy); d weight += dy x̂; d bias += dy.
      Vec c1v(0.f), c2v(0.f);
      int64_t i = 0;
      for (; i + kW <= n; i += kW) {
        const Vec xhat = (Vec::loadu(s + i) - m) * rs;
        const Vec g = Vec::loadu(dy + i);
        const Vec wg = g * Vec::loadu(weight.data() + i);
        c1v = at::vec::fmadd(xhat, wg, c1v);
        c2v += wg;
        if (dw) at::vec::fmadd(g, xhat, Vec::loadu(dw + i)).store(dw + i);
        if (db) (Vec::loadu(db + i) + g).store(db + i);
      }
      float c1 = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, c1v);
      float c2 = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, c2v);
      for (; i < n; ++i) {
        const float xhat = (s[i] - mean) * rstd, wg = dy[i] * weight[i];
        c1 += xhat * wg;
        c2 += wg;
        if (dw) dw[i] += dy[i] * xhat;
        if (db) db[i] += dy[i];
      }
      c1 /= n;
      c2 = p.rms ? 0.f : c2 / n;
      // Pass 2: d s = (w dy - x̂ c1 - c2) rstd (+ ds).
      const float* ds = p.ds ? as_float(static_cast<const TS*>(p.ds) + r * p.ds_stride, ds_buf.data(), n) : nullptr;
      TS* dx_row = static_cast<TS*>(p.dx) + r * p.dx_stride;
      float* dx = std::is_same_v<TS, float> ? reinterpret_cast<float*>(dx_row) : dx_buf.data();
      const Vec c1s(c1), c2s(c2);
      i = 0;
      for (; i + kW <= n; i += kW) {
        const Vec xhat = (Vec::loadu(s + i) - m) * rs;
        const Vec wg = Vec::loadu(dy + i) * Vec::loadu(weight.data() + i);
        Vec d = (wg - at::vec::fmadd(xhat, c1s, c2s)) * rs;
        if (ds) d += Vec::loadu(ds + i);
        d.store(dx + i);
      }
      for (; i < n; ++i) {
        const float xhat = (s[i] - mean) * rstd;
        dx[i] = (dy[i] * weight[i] - (xhat * c1 + c2)) * rstd + (ds ? ds[i] : 0.f);
      }
      if constexpr (!std::is_same_v<TS, float>) from_float(dx_buf.data(), dx_row, n);
    }
  });
}

template <template <typename, typename, typename> class Kernel>
void dispatch(const NormParams& p) {
  FASTLM_DTYPE_SWITCH(p.dtype, T, c10::Half, c10::BFloat16, [&] {
    FASTLM_SAME_OR_FLOAT_SWITCH(p.s_dtype == DType::f32, TS, T, [&] {
      FASTLM_SAME_OR_FLOAT_SWITCH(p.weight_dtype == DType::f32, TW, T, [&] { Kernel<T, TS, TW>::run(p); });
    });
  });
}

template <typename T, typename TS, typename TW>
struct Forward {
  static void run(const NormParams& p) { forward<T, TS, TW>(p); }
};

template <typename T, typename TS, typename TW>
struct Backward {
  static void run(const NormParams& p) { backward<T, TS, TW>(p); }
};

}  // namespace

void norm_fwd(const NormParams& p) { dispatch<Forward>(p); }

int64_t norm_bwd_partials() { return at::get_num_threads(); }

void norm_bwd(const NormParams& p) { dispatch<Backward>(p); }

}  // namespace fastlm::cpu
