// CPU LayerNorm / RMSNorm: each worker thread takes a contiguous range of rows. A row is read from
// memory once into fp32 (16-bit inputs and the residual add go through a thread-local buffer; fp32
// rows are used in place), reduced while it sits in L1, and written once; backward likewise.
//
// The kernels are memory-bound, so two things matter beyond vectorising: the reductions keep kChains
// independent partial sums (one chain of dependent vector adds would leave the row waiting on add
// latency), and outputs too large to stay in the last-level cache are written with non-temporal
// stores (no read-for-ownership of lines that are about to be overwritten, no eviction of the inputs).
#include "cpu/norms.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

namespace fastlm::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
constexpr int kChains = 4;                   // independent partial sums per reduced quantity
constexpr int64_t kGrainElements = 1 << 15;  // rows per task ≈ this many elements
// Outputs of at least this many bytes bypass the cache: larger ones would evict much of a typical L3
// share, and the next op's read of them would mostly miss anyway; smaller ones are kept for it.
constexpr int64_t kStreamBytes = int64_t(8) << 20;

int64_t grain(int64_t cols) { return std::max<int64_t>(1, kGrainElements / cols); }

// `src` as fp32: itself when it already is, else converted into `buffer`.
template <typename T>
const float* as_float(const T* src, float* buffer, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    at::vec::convert(src, buffer, n);
    return buffer;
  }
}

// A row as fp32: the source itself when it is fp32 and there is nothing to add, else `buffer`. The sum
// x + residual is rounded to TS, the dtype s is stored in, so the statistics, y and backward all see
// the same s.
template <typename T, typename TS>
const float* input_row(const NormParams& p, int64_t r, float* buffer) {
  const T* x = static_cast<const T*>(p.x) + r * p.x_stride;
  const int64_t n = p.cols;
  if (p.residual == nullptr) return as_float(x, buffer, n);
  const TS* res = static_cast<const TS*>(p.residual) + r * p.residual_stride;
  for (int64_t i = 0; i < n; ++i) {
    buffer[i] = static_cast<float>(static_cast<TS>(static_cast<float>(x[i]) + static_cast<float>(res[i])));
  }
  if (p.s != nullptr) at::vec::convert(buffer, static_cast<TS*>(p.s) + r * p.s_stride, n);
  return buffer;
}

// K sums over a row of n elements: vec_terms(i, sums) adds the terms of elements [i, i + kW) to
// sums[0..K), scalar_terms(i, sums) those of element i (the tail). kChains interleaved partial sums
// per quantity let the vector adds pipeline.
template <int K, typename VecTerms, typename ScalarTerms>
std::array<float, K> row_sums(int64_t n, VecTerms vec_terms, ScalarTerms scalar_terms) {
  std::array<std::array<Vec, K>, kChains> acc;
  for (auto& chain : acc) chain.fill(Vec(0.f));
  int64_t i = 0;
  for (; i + kChains * kW <= n; i += kChains * kW) {
    for (int c = 0; c < kChains; ++c) vec_terms(i + c * kW, acc[c]);
  }
  for (; i + kW <= n; i += kW) vec_terms(i, acc[0]);
  std::array<float, K> sums;
  for (int k = 0; k < K; ++k) {
    const Vec total = (acc[0][k] + acc[1][k]) + (acc[2][k] + acc[3][k]);
    sums[k] = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, total);
  }
  std::array<float, K> tail{};
  for (; i < n; ++i) scalar_terms(i, tail);
  for (int k = 0; k < K; ++k) sums[k] += tail[k];
  return sums;
}

// Writes vectors to one fp32 row, streaming past the cache when asked to and the row is 32-byte
// aligned (then every store at a multiple of kW is); call fence() once a thread's rows are written.
struct RowWriter {
  float* row;
  bool stream;

  RowWriter(float* dst, bool streaming) : row(dst), stream(streaming && reinterpret_cast<uintptr_t>(dst) % 32 == 0) {}

  void store(int64_t i, const Vec& v) const {
#if defined(CPU_CAPABILITY_AVX2)
    if (stream) {
      _mm256_stream_ps(row + i, v);
      return;
    }
#endif
    v.store(row + i);
  }

  static void fence() {
#if defined(CPU_CAPABILITY_AVX2)
    _mm_sfence();
#endif
  }
};

// Column sums of a stream of (n,) rows, added pairwise so that the rounding error grows with log(rows),
// not rows: the terms of kBlockRows rows are added into one block row, and full blocks merge like a
// binary counter (level k holds the sum of 2^k blocks).
class PairwiseRows {
 public:
  static constexpr int64_t kBlockRows = 8;

  explicit PairwiseRows(int64_t n) : n_(n), block_(n, 0.f) {}

  // The row the current row's terms are added into.
  float* row() { return block_.data(); }

  // Call after each row.
  void next() {
    if (++rows_ == kBlockRows) carry();
  }

  // out[0..n) += the sum of every row.
  void add_to(float* out) {
    for (int k = 0; k < kLevels; ++k) {
      if (used_[k]) add(levels_[k].data(), block_.data());
    }
    add(block_.data(), out);
  }

 private:
  static constexpr int kLevels = 64;

  void add(const float* src, float* dst) const {
    int64_t i = 0;
    for (; i + kW <= n_; i += kW) (Vec::loadu(dst + i) + Vec::loadu(src + i)).store(dst + i);
    for (; i < n_; ++i) dst[i] += src[i];
  }

  // Moves the block into the counter, merging equal levels, and clears it.
  void carry() {
    rows_ = 0;
    int k = 0;
    for (; used_[k]; ++k) {
      add(levels_[k].data(), block_.data());
      used_[k] = false;
    }
    levels_[k].assign(block_.begin(), block_.end());  // block_ keeps its storage: row() stays valid
    used_[k] = true;
    std::fill(block_.begin(), block_.end(), 0.f);
  }

  int64_t n_;
  int64_t rows_ = 0;
  std::vector<float> block_;
  std::array<std::vector<float>, kLevels> levels_;
  std::array<bool, kLevels> used_{};
};

// (mean, 1/std) of a row; mean is 0 for RMSNorm. Two passes over the row (it is in L1 by then).
std::pair<float, float> moments(const float* v, int64_t n, bool rms, float eps) {
  float mean = 0.f;
  if (!rms) {
    mean = row_sums<1>(
               n, [&](int64_t i, std::array<Vec, 1>& s) { s[0] += Vec::loadu(v + i); },
               [&](int64_t i, std::array<float, 1>& s) { s[0] += v[i]; })[0] /
           n;
  }
  const Vec m(mean);
  const float sq = row_sums<1>(
      n,
      [&](int64_t i, std::array<Vec, 1>& s) {
        const Vec d = Vec::loadu(v + i) - m;
        s[0] += d * d;
      },
      [&](int64_t i, std::array<float, 1>& s) { s[0] += (v[i] - mean) * (v[i] - mean); })[0];
  return {mean, 1.f / std::sqrt(sq / n + eps)};
}

// (cols,) weight or bias as fp32, `fill` when absent.
template <typename TW>
std::vector<float> param_row(const void* param, int64_t n, float fill) {
  std::vector<float> out(n, fill);
  if (param) at::vec::convert(static_cast<const TW*>(param), out.data(), n);
  return out;
}

template <typename T, typename TS, typename TW>
void forward(const NormParams& p) {
  const int64_t n = p.cols;
  const std::vector<float> weight = param_row<TW>(p.weight, n, 1.f), bias = param_row<TW>(p.bias, n, 0.f);
  const bool stream = p.rows * n * int64_t(sizeof(T)) >= kStreamBytes;
  at::parallel_for(0, p.rows, grain(n), [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(n), out(std::is_same_v<T, float> ? 0 : n);
    for (int64_t r = begin; r < end; ++r) {
      const float* v = input_row<T, TS>(p, r, buffer.data());
      const auto [mean, rstd] = moments(v, n, p.rms, p.eps);
      if (p.mean) p.mean[r] = mean;
      p.rstd[r] = rstd;
      T* y = static_cast<T*>(p.y) + r * p.y_stride;
      float* dst = std::is_same_v<T, float> ? reinterpret_cast<float*>(y) : out.data();
      const RowWriter writer(dst, stream && std::is_same_v<T, float>);
      const Vec m(mean), s(rstd);
      int64_t i = 0;
      for (; i + kW <= n; i += kW) {
        const Vec h = (Vec::loadu(v + i) - m) * s;
        writer.store(i, at::vec::fmadd(h, Vec::loadu(weight.data() + i), Vec::loadu(bias.data() + i)));
      }
      for (; i < n; ++i) dst[i] = (v[i] - mean) * rstd * weight[i] + bias[i];
      if constexpr (!std::is_same_v<T, float>) at::vec::convert(out.data(), y, n);
    }
    RowWriter::fence();
  });
}

template <typename T, typename TS, typename TW>
void backward(const NormParams& p) {
  const int64_t n = p.cols;
  const std::vector<float> weight = param_row<TW>(p.weight, n, 1.f);
  const bool stream = p.rows * n * int64_t(sizeof(TS)) >= kStreamBytes;
  // Each task sums its rows' d weight / d bias pairwise and adds the sums into the partial row of the
  // thread running it; threads that run no task leave theirs as the glue allocated them (zeros).
  at::parallel_for(0, p.rows, grain(n), [&](int64_t begin, int64_t end) {
    const int64_t t = at::get_thread_num();
    std::optional<PairwiseRows> dw_sum, db_sum;
    if (p.dweight_partial) dw_sum.emplace(n);
    if (p.dbias_partial) db_sum.emplace(n);
    float* dw = dw_sum ? dw_sum->row() : nullptr;
    float* db = db_sum ? db_sum->row() : nullptr;
    std::vector<float> s_buf(n), dy_buf(n), ds_buf(n), dx_buf(n);
    for (int64_t r = begin; r < end; ++r) {
      const float* s = as_float(static_cast<const TS*>(p.s) + r * p.s_stride, s_buf.data(), n);
      const float* dy = as_float(static_cast<const T*>(p.dy) + r * p.dy_stride, dy_buf.data(), n);
      const float mean = p.rms ? 0.f : p.mean[r];
      const float rstd = p.rstd[r];
      const Vec m(mean), rs(rstd);
      // Pass 1: c1 = mean(x̂ · w dy), c2 = mean(w dy); d weight += dy x̂; d bias += dy.
      auto [c1, c2] = row_sums<2>(
          n,
          [&](int64_t i, std::array<Vec, 2>& c) {
            const Vec xhat = (Vec::loadu(s + i) - m) * rs;
            const Vec g = Vec::loadu(dy + i);
            const Vec wg = g * Vec::loadu(weight.data() + i);
            c[0] = at::vec::fmadd(xhat, wg, c[0]);
            c[1] += wg;
            if (dw) at::vec::fmadd(g, xhat, Vec::loadu(dw + i)).store(dw + i);
            if (db) (Vec::loadu(db + i) + g).store(db + i);
          },
          [&](int64_t i, std::array<float, 2>& c) {
            const float xhat = (s[i] - mean) * rstd, wg = dy[i] * weight[i];
            c[0] += xhat * wg;
            c[1] += wg;
            if (dw) dw[i] += dy[i] * xhat;
            if (db) db[i] += dy[i];
          });
      c1 /= n;
      c2 = p.rms ? 0.f : c2 / n;
      // Pass 2: d s = (w dy - x̂ c1 - c2) rstd (+ ds).
      const float* ds = p.ds ? as_float(static_cast<const TS*>(p.ds) + r * p.ds_stride, ds_buf.data(), n) : nullptr;
      TS* dx_row = static_cast<TS*>(p.dx) + r * p.dx_stride;
      float* dx = std::is_same_v<TS, float> ? reinterpret_cast<float*>(dx_row) : dx_buf.data();
      const RowWriter writer(dx, stream && std::is_same_v<TS, float>);
      const Vec c1s(c1), c2s(c2);
      int64_t i = 0;
      for (; i + kW <= n; i += kW) {
        const Vec xhat = (Vec::loadu(s + i) - m) * rs;
        const Vec wg = Vec::loadu(dy + i) * Vec::loadu(weight.data() + i);
        Vec d = (wg - at::vec::fmadd(xhat, c1s, c2s)) * rs;
        if (ds) d += Vec::loadu(ds + i);
        writer.store(i, d);
      }
      for (; i < n; ++i) {
        const float xhat = (s[i] - mean) * rstd;
        dx[i] = (dy[i] * weight[i] - (xhat * c1 + c2)) * rstd + (ds ? ds[i] : 0.f);
      }
      if constexpr (!std::is_same_v<TS, float>) at::vec::convert(dx_buf.data(), dx_row, n);
      if (dw_sum) dw_sum->next();
      if (db_sum) db_sum->next();
    }
    if (dw_sum) dw_sum->add_to(p.dweight_partial + t * n);
    if (db_sum) db_sum->add_to(p.dbias_partial + t * n);
    RowWriter::fence();
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
