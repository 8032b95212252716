// CPU fused attention, flash-style: the conventions of every fastlm attention backend (kernels/attention.py's
// docstring states them), computed in fp32 without an (Lq, Lk) buffer anywhere.
//
// Forward: one task per block of kBlockQ queries of one head (at::parallel_for). The block's queries,
// scaled and in fp32, stay in L1/L2 while blocks of kBlockK keys stream through: scores by a
// register-blocked micro-kernel (at::vec FMAs), the score terms (attn_bias, the T5 table read per
// diagonal, masks) added row by row, the online softmax in fp32, then P V into the output accumulator.
// K (transposed, in blocks) and V are first packed to fp32 once per KV head, so every task reads them
// unit-stride whatever the input layout and dtype. The LSE of every row is saved.
//
// Backward: one task per (batch, KV head), or when those are fewer than the threads per chunk of its key
// blocks: it owns the dK and dV of its keys and a partial dQ of the queries of every head of its GQA group,
// so nothing is shared between tasks (no atomics); the partials are summed in chunk order afterwards, so
// every sum has a fixed order (bit-identical reruns). For each key block, it recomputes P block by block
// from the LSE and accumulates dV += P^T dO, dK += dS^T Q, dQ += dS K, with dS = P * (dP - Delta),
// Delta = rowsum(dO * O) from the stored O. dbias is dS; the table gradient is summed per diagonal, then
// per bucket.
//
// Work that cannot contribute is skipped as on the GPU: key blocks after the last kept key of a sequence
// and key blocks above the causal diagonal.
#include "cpu/attention.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <vector>

#include "cuda/philox.cuh"

namespace fastlm::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
constexpr int64_t kBlockQ = 64;  // queries per forward task and per backward step
constexpr int64_t kBlockK = 64;  // keys per step, a multiple of kW; also the row stride of score tiles
constexpr int kTileRows = 6;     // micro-kernel: rows of C per tile
constexpr int kTileVecs = 2;     // micro-kernel: vectors of C per tile row
constexpr float kInf = std::numeric_limits<float>::infinity();
static_assert(kBlockK % kW == 0);

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// max that propagates NaN from either side (a NaN score reaches the output, as in PyTorch)
float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }

// ---------------------------------------------------------------------------------------------------
// The micro-kernel: C (M x N) = (or += with ACC) A (M x K) B (K x N)
// ---------------------------------------------------------------------------------------------------

// One MR x (NV * kW) tile of C: A's element (m, k) is a[m * am + k * ak] (any strides, so that A^T is
// free), B and C are row-major with row strides ldb and ldc. The MR * NV accumulators stay in registers.
template <int MR, int NV, bool ACC>
void gemm_tile(int64_t K, const float* a, int64_t am, int64_t ak, const float* b, int64_t ldb, float* c,
               int64_t ldc) {
  Vec acc[MR][NV];
  for (int m = 0; m < MR; ++m) {
    for (int v = 0; v < NV; ++v) acc[m][v] = ACC ? Vec::loadu(c + m * ldc + v * kW) : Vec(0.f);
  }
  for (int64_t k = 0; k < K; ++k) {
    Vec bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = Vec::loadu(b + k * ldb + v * kW);
    for (int m = 0; m < MR; ++m) {
      const Vec av(a[m * am + k * ak]);
      for (int v = 0; v < NV; ++v) acc[m][v] = at::vec::fmadd(av, bv[v], acc[m][v]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int v = 0; v < NV; ++v) acc[m][v].store(c + m * ldc + v * kW);
  }
}

template <bool ACC>
using TileFn = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t);

// kTiles<ACC>[nv - 1][mr - 1]: the tile of mr rows and nv vectors.
template <bool ACC, int... MR>
constexpr TileFn<ACC> kTilesOf[2][sizeof...(MR)] = {{&gemm_tile<MR, 1, ACC>...}, {&gemm_tile<MR, 2, ACC>...}};
template <bool ACC>
constexpr auto& kTiles = kTilesOf<ACC, 1, 2, 3, 4, 5, 6>;
static_assert(kTileVecs == 2 && kTileRows == 6);

// C (M x N) = (ACC: +=) A (M x K) B (K x N) with A, B, C as gemm_tile takes them; N a multiple of kW.
// Column panels of B outside, so a panel (K x kTileVecs vectors) stays in L1 while the rows sweep it.
template <bool ACC>
void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t am, int64_t ak, const float* b, int64_t ldb,
          float* c, int64_t ldc) {
  for (int64_t n0 = 0; n0 < N; n0 += kTileVecs * kW) {
    const int64_t nv = std::min<int64_t>(kTileVecs, (N - n0) / kW);
    for (int64_t m0 = 0; m0 < M; m0 += kTileRows) {
      const int64_t mr = std::min<int64_t>(kTileRows, M - m0);
      kTiles<ACC>[nv - 1][mr - 1](K, a + m0 * am, am, ak, b + n0, ldb, c + m0 * ldc + n0, ldc);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Rows: fp32 copies in and out, vector loops
// ---------------------------------------------------------------------------------------------------

// dst[0, n) = scale * src[0, n) in fp32 (src unit-stride, of type T), zeros in [n, n_padded).
template <typename T>
void load_row(const T* src, int64_t n, float scale, float* dst, int64_t n_padded) {
  at::vec::convert(src, dst, n);
  if (scale != 1.f) at::vec::map([scale](Vec x) { return x * Vec(scale); }, dst, dst, n);
  std::fill(dst + n, dst + n_padded, 0.f);
}

// dst[0, n) = scale * src[0, n), rounded to T.
template <typename T>
void store_row(const float* src, int64_t n, float scale, T* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i] * scale);
}

// dst[0, n) += src[0, n)
void add_row(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW) (Vec::loadu(dst + i) + Vec::loadu(src + i)).store(dst + i);
  for (; i < n; ++i) dst[i] += src[i];
}

float dot(const float* a, const float* b, int64_t n) {  // n a multiple of kW
  Vec acc(0.f);
  for (int64_t i = 0; i < n; i += kW) acc = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc);
  return at::vec::vec_reduce_all([](Vec& x, Vec& y) { return x + y; }, acc);
}

float row_max(const float* s, int64_t n) {  // n a multiple of kW
  Vec m(-kInf);
  for (int64_t i = 0; i < n; i += kW) m = at::vec::maximum(m, Vec::loadu(s + i));
  return at::vec::vec_reduce_all([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, m);
}

// s = exp(s - shift) in place over [0, n) (n a multiple of kW); returns the sum.
float exp_and_sum(float* s, int64_t n, float shift) {
  Vec sum(0.f);
  for (int64_t i = 0; i < n; i += kW) {
    const Vec e = (Vec::loadu(s + i) - Vec(shift)).exp();
    e.store(s + i);
    sum = sum + e;
  }
  return at::vec::vec_reduce_all([](Vec& x, Vec& y) { return x + y; }, sum);
}

void scale_row(float* x, int64_t n, float factor) {
  at::vec::map([factor](Vec v) { return v * Vec(factor); }, x, x, n);
}

// ---------------------------------------------------------------------------------------------------
// Dropout: the Philox stream of every backend (cuda/philox.cuh), kW consecutive offsets at a time
// ---------------------------------------------------------------------------------------------------

#if defined(CPU_CAPABILITY_AVX2)
static_assert(kW == 8);

// (high, low) 32-bit halves of the 64-bit products a * x of the 8 lanes of x.
inline void mul_hi_lo(uint32_t a, __m256i x, __m256i& hi, __m256i& lo) {
  const __m256i va = _mm256_set1_epi32(static_cast<int>(a));
  lo = _mm256_mullo_epi32(x, va);
  const __m256i even = _mm256_mul_epu32(x, va);                         // lanes 0, 2, 4, 6 as 64-bit
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), va);  // lanes 1, 3, 5, 7
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// u[c] = philox_uniform(seed, offset + c) for c in [0, 8)
Vec philox_uniforms(uint64_t seed, uint64_t offset) {
  const __m256i lo = _mm256_set1_epi32(static_cast<int>(uint32_t(offset)));
  __m256i c0 = _mm256_add_epi32(lo, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  // carry into the high word of the lanes whose low word wrapped (c0 < lo as unsigned: -1 there)
  const __m256i sign = _mm256_set1_epi32(INT32_MIN);
  const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(lo, sign), _mm256_xor_si256(c0, sign));
  __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(uint32_t(offset >> 32))), wrapped);
  __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    __m256i hi_b, lo_b, hi_a, lo_a;
    mul_hi_lo(kPhiloxMulB, c2, hi_b, lo_b);
    mul_hi_lo(kPhiloxMulA, c0, hi_a, lo_a);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c1 = lo_b;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  const __m256i x = _mm256_xor_si256(c0, _mm256_srai_epi32(c0, 31));  // x < 0 ? ~x : x
  return Vec(_mm256_mul_ps(_mm256_cvtepi32_ps(x), _mm256_set1_ps(kPhiloxToUnit)));
}
#else
Vec philox_uniforms(uint64_t seed, uint64_t offset) {
  float u[kW];
  for (int64_t c = 0; c < kW; ++c) u[c] = philox_uniform(seed, offset + c);
  return Vec::loadu(u);
}
#endif

// Dropout of probabilities p[0, n) and, when dp is not null, of their upstream gradients dp[0, n) with the
// same decisions: element c is kept iff uniform(seed, offset + c) >= dropout_p, kept ones scaled by
// 1 / (1 - dropout_p), dropped ones zeroed. n is a multiple of kW.
void drop(float* p, float* dp, int64_t n, uint64_t seed, uint64_t offset, float dropout_p) {
  const Vec threshold(dropout_p), rescale(1.f / (1.f - dropout_p)), zero(0.f);
  for (int64_t c = 0; c < n; c += kW) {
    const Vec keep = philox_uniforms(seed, offset + c) >= threshold;
    Vec::blendv(zero, Vec::loadu(p + c) * rescale, keep).store(p + c);
    if (dp != nullptr) Vec::blendv(zero, Vec::loadu(dp + c) * rescale, keep).store(dp + c);
  }
}

// ---------------------------------------------------------------------------------------------------
// What every task shares: per-batch key visibility, the table's bias per diagonal, packed K and V
// ---------------------------------------------------------------------------------------------------

// One sequence: its lengths and first rows (a batch entry: the tensors' lengths and row 0; varlen: from
// cu_seqlens).
struct Seq {
  int64_t Lq, Lk, q0, k0;
  // the rel_pos bucket of the sequence's diagonal t = j - i + Lq - 1 is bucket[t + shift] (varlen: the
  // buckets are those of the longest lengths)
  int64_t rel_shift;
};

Seq seq_of(const AttentionParams& p, int64_t b) {
  if (p.cu_seqlens_q == nullptr) return {p.Lq, p.Lk, 0, 0, 0};
  const int64_t q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
  const int64_t Lk = p.cu_seqlens_k[b + 1] - k0;
  return {p.cu_seqlens_q[b + 1] - q0, Lk, q0, k0, p.Lk - Lk};
}

// The LSE of sequence b's queries of head h, unit stride along the queries.
float* lse_of(const AttentionParams& p, const Seq& seq, int64_t b, int64_t h) {
  return p.cu_seqlens_q == nullptr ? p.lse + (b * p.Hq + h) * p.Lq : p.lse + h * p.total_q + seq.q0;
}

struct Shared {
  int64_t G = 1;           // query heads per KV head
  int64_t Dp = 0;          // head dim padded to a multiple of kW (the padding is zeros)
  int64_t Lkp = 0;         // keys padded to a multiple of kBlockK
  int64_t diagonals = 0;   // Lq + Lk - 1
  std::vector<Seq> seqs;            // (B,)
  std::vector<int64_t> key_end;     // (B,): key blocks after the one of the last kept key are skipped
  std::vector<uint32_t> visible;    // (B, Lkp): all ones where key j exists and is kept, else 0
  std::vector<float> rel;           // (Hq, diagonals + kW): table[bucket[t], h], or empty
};

Shared share(const AttentionParams& p) {
  Shared s;
  s.G = p.Hq / p.Hkv;
  s.Dp = round_up(p.head_dim, kW);
  s.Lkp = round_up(p.Lk, kBlockK);
  s.diagonals = p.Lq + p.Lk - 1;
  s.key_end.assign(p.B, 0);
  s.visible.assign(p.B * s.Lkp, 0u);
  for (int64_t b = 0; b < p.B; ++b) {
    s.seqs.push_back(seq_of(p, b));
    const int64_t Lk = s.seqs.back().Lk;
    for (int64_t j = 0; j < Lk; ++j) {
      if (p.mask != nullptr && p.mask[b * p.mask_stride[0] + j * p.mask_stride[1]] == 0) continue;
      s.visible[b * s.Lkp + j] = ~0u;
      s.key_end[b] = std::min(round_up(j + 1, kBlockK), Lk);  // its whole block, as the GPU kernels do
    }
  }
  if (p.table != nullptr) {
    const int64_t width = s.diagonals + kW;  // padded: whole vectors may be read past the last diagonal
    s.rel.assign(p.Hq * width, 0.f);
    FASTLM_DTYPE_SWITCH(p.table_dtype, T, c10::Half, c10::BFloat16, [&] {
      const T* table = static_cast<const T*>(p.table);
      for (int64_t h = 0; h < p.Hq; ++h) {
        for (int64_t t = 0; t < s.diagonals; ++t) {
          s.rel[h * width + t] = static_cast<float>(table[p.bucket[t] * p.table_stride[0] + h * p.table_stride[1]]);
        }
      }
    });
  }
  return s;
}

// One head's keys or values (Lk rows of D, unit stride along D, row stride `stride`) in fp32:
// `rows` (Lkp, Dp) row-major, and/or `blocked`, the transpose in key blocks: (Lkp / kBlockK, Dp, kBlockK),
// element (j, d) at ((j / kBlockK) * Dp + d) * kBlockK + j % kBlockK. Padding is zeros.
template <typename T>
void pack_keys(const T* src, int64_t stride, int64_t Lk, const AttentionParams& p, const Shared& s, float* rows,
               float* blocked) {
  std::vector<float> row(s.Dp);
  for (int64_t j = 0; j < s.Lkp; ++j) {
    if (j < Lk) {
      load_row(src + j * stride, p.head_dim, 1.f, row.data(), s.Dp);
    } else {
      std::fill(row.begin(), row.end(), 0.f);
    }
    if (rows != nullptr) std::copy(row.begin(), row.end(), rows + j * s.Dp);
    if (blocked != nullptr) {
      float* block = blocked + (j / kBlockK) * s.Dp * kBlockK + j % kBlockK;
      for (int64_t d = 0; d < s.Dp; ++d) block[d * kBlockK] = row[d];
    }
  }
}

// Row `row0` of head h of batch entry b (varlen: stride[0] is 0, row0 the sequence's first row).
template <typename T>
T* head_of(void* base, const int64_t (&stride)[3], int64_t b, int64_t h, int64_t row0) {
  return static_cast<T*>(base) + b * stride[0] + h * stride[1] + row0 * stride[2];
}
template <typename T>
const T* head_of(const void* base, const int64_t (&stride)[3], int64_t b, int64_t h, int64_t row0) {
  return head_of<T>(const_cast<void*>(base), stride, b, h, row0);
}

// ---------------------------------------------------------------------------------------------------
// Scores of a tile
// ---------------------------------------------------------------------------------------------------

// The scores of one query head against one key block: where its inputs are.
struct HeadScores {
  const AttentionParams& p;
  const Shared& s;
  int64_t b, h;
  const Seq& seq;
  const float* keys_t;  // the KV head's K, transposed in blocks (pack_keys' `blocked`)
  const float* rel;     // (diagonals + kW,) the table's bias per diagonal for head h, or null
};

void add_bias_row(float* row, const AttentionParams& p, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n) {
  FASTLM_DTYPE_SWITCH(p.bias_dtype, T, c10::Half, c10::BFloat16, [&] {
    const int64_t* st = p.bias_stride;
    const T* src = static_cast<const T*>(p.bias) + b * st[0] + h * st[1] + i * st[2] + j0 * st[3];
    for (int64_t c = 0; c < n; ++c) row[c] += static_cast<float>(src[c * st[3]]);
  });
}

// S (n x kBlockK, row-major) = the scores of queries [i0, i0 + n) against keys [j0, j0 + nkp): q_rows holds
// the queries' rows (Dp wide, already scaled), nkp is a multiple of kW. Hidden scores (causal, padded
// keys, keys past Lk) are -inf, whatever the bias there.
void scores(const HeadScores& hs, const float* q_rows, int64_t i0, int64_t n, int64_t j0, int64_t nkp, float* S) {
  const AttentionParams& p = hs.p;
  const Seq& seq = hs.seq;
  const int64_t Dp = hs.s.Dp;
  gemm<false>(n, nkp, Dp, q_rows, Dp, 1, hs.keys_t + (j0 / kBlockK) * Dp * kBlockK, kBlockK, S, kBlockK);
  const int64_t real = std::min(nkp, seq.Lk - j0);  // keys that exist
  const float* visible = reinterpret_cast<const float*>(hs.s.visible.data() + hs.b * hs.s.Lkp + j0);
  for (int64_t r = 0; r < n; ++r) {
    float* row = S + r * kBlockK;
    const int64_t i = i0 + r;
    if (p.bias != nullptr) add_bias_row(row, p, hs.b, hs.h, i, j0, real);
    if (hs.rel != nullptr) add_row(row, hs.rel + (j0 - i + seq.Lq - 1 + seq.rel_shift), real);
    for (int64_t c = 0; c < nkp; c += kW) {
      Vec::blendv(Vec(-kInf), Vec::loadu(row + c), Vec::loadu(visible + c)).store(row + c);
    }
    if (p.causal) std::fill(row + std::clamp<int64_t>(i + seq.Lk - seq.Lq - j0 + 1, 0, nkp), row + nkp, -kInf);
  }
}

// The keys a block of queries [i0, i0 + n) can see end before this: the block of the sequence's last kept key, and for
// causal the last query's diagonal.
int64_t key_end_of(const AttentionParams& p, const Shared& s, int64_t b, int64_t i0, int64_t n) {
  const int64_t end = s.key_end[b];
  const Seq& seq = s.seqs[b];
  return p.causal ? std::clamp<int64_t>(i0 + n + seq.Lk - seq.Lq, 0, end) : end;
}

// The Philox offset of score (b, h, i, j).
uint64_t dropout_offset(const AttentionParams& p, int64_t b, int64_t h, int64_t i, int64_t j) {
  return uint64_t(((b * p.Hq + h) * p.Lq + i) * p.Lk + j);
}

// ---------------------------------------------------------------------------------------------------
// Scratch memory: from torch's allocator, taken by the calling thread (so that memory profilers count it)
// ---------------------------------------------------------------------------------------------------

at::Tensor float_buffer(int64_t n) { return at::empty({n}, at::TensorOptions().dtype(at::kFloat)); }

// Consecutive spans carved from one thread's scratch.
struct Carve {
  float* next;
  std::span<float> operator()(int64_t n) {
    const std::span<float> span(next, static_cast<size_t>(n));
    next += n;
    return span;
  }
};

// Scratch of type S (whose floats(...) is its size, built from a Carve and the same arguments) for every
// thread of the parallel regions that follow; mine() is the calling thread's.
template <typename S>
class ThreadScratch {
 public:
  template <typename... Args>
  explicit ThreadScratch(const Args&... args)
      : size_(S::floats(args...)), buffer_(float_buffer(at::get_num_threads() * size_)) {}
  template <typename... Args>
  S mine(const Args&... args) const {
    return S(Carve{buffer_.data_ptr<float>() + at::get_thread_num() * size_}, args...);
  }

 private:
  int64_t size_;
  at::Tensor buffer_;
};

// ---------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------

struct ForwardScratch {
  static int64_t floats(int64_t Dp) { return 2 * kBlockQ * Dp + kBlockQ * kBlockK + 2 * kBlockQ; }
  ForwardScratch(Carve carve, int64_t Dp)
      : q(carve(kBlockQ * Dp)), o(carve(kBlockQ * Dp)), S(carve(kBlockQ * kBlockK)), m(carve(kBlockQ)),
        l(carve(kBlockQ)) {}
  std::span<float> q, o, S, m, l;
};

// One block of queries [i0, i0 + kBlockQ) of head (b, h). keys_t / values: the KV head's packed K and V.
template <typename T>
void forward_block(const AttentionParams& p, const Shared& s, int64_t b, int64_t h, int64_t i0,
                   const float* keys_t, const float* values, ForwardScratch& w) {
  const int64_t Dp = s.Dp, D = p.head_dim;
  const Seq& seq = s.seqs[b];
  const int64_t n = std::min(kBlockQ, seq.Lq - i0);
  const T* q = head_of<T>(p.q, p.q_stride, b, h, seq.q0);
  for (int64_t r = 0; r < n; ++r) load_row(q + (i0 + r) * p.q_stride[2], D, p.scale, w.q.data() + r * Dp, Dp);
  std::fill(w.o.begin(), w.o.end(), 0.f);
  std::fill(w.m.begin(), w.m.end(), -kInf);
  std::fill(w.l.begin(), w.l.end(), 0.f);
  const HeadScores hs{p, s, b, h, seq, keys_t, s.rel.empty() ? nullptr : s.rel.data() + h * (s.diagonals + kW)};
  const int64_t end = key_end_of(p, s, b, i0, n);
  for (int64_t j0 = 0; j0 < end; j0 += kBlockK) {
    const int64_t nkp = round_up(std::min(kBlockK, end - j0), kW);
    scores(hs, w.q.data(), i0, n, j0, nkp, w.S.data());
    for (int64_t r = 0; r < n; ++r) {
      float* row = w.S.data() + r * kBlockK;
      float& m = w.m[r];
      const float m_new = nan_max(m, row_max(row, nkp));
      if (m_new == -kInf) {  // nothing visible to this row yet
        std::fill(row, row + nkp, 0.f);
        continue;
      }
      const float alpha = std::exp(m - m_new);
      w.l[r] = w.l[r] * alpha + exp_and_sum(row, nkp, m_new);
      if (alpha != 1.f) scale_row(w.o.data() + r * Dp, Dp, alpha);
      m = m_new;
      if (p.dropout_p > 0.f) drop(row, nullptr, nkp, p.seed, dropout_offset(p, b, h, i0 + r, j0), p.dropout_p);
    }
    gemm<true>(n, Dp, nkp, w.S.data(), kBlockK, 1, values + j0 * Dp, Dp, w.o.data(), Dp);
  }
  T* o = head_of<T>(p.o, p.o_stride, b, h, seq.q0);
  float* lse = lse_of(p, seq, b, h);
  for (int64_t r = 0; r < n; ++r) {
    const float l = w.l[r];
    // a row that saw no key: zeros and an LSE of -inf
    store_row(w.o.data() + r * Dp, D, l == 0.f ? 0.f : 1.f / l, o + (i0 + r) * p.o_stride[2]);
    lse[i0 + r] = l == 0.f ? -kInf : w.m[r] + std::log(l);
  }
}

template <typename T>
void forward(const AttentionParams& p) {
  const Shared s = share(p);
  const int64_t kv_size = s.Lkp * s.Dp;  // floats per packed KV head
  const at::Tensor packed = float_buffer(2 * p.B * p.Hkv * kv_size);
  float* keys_t = packed.data_ptr<float>();
  float* values = keys_t + p.B * p.Hkv * kv_size;
  at::parallel_for(0, p.B * p.Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.Hkv, h = bh % p.Hkv;
      const Seq& seq = s.seqs[b];
      pack_keys(head_of<T>(p.k, p.k_stride, b, h, seq.k0), p.k_stride[2], seq.Lk, p, s, nullptr,
                keys_t + bh * kv_size);
      pack_keys(head_of<T>(p.v, p.v_stride, b, h, seq.k0), p.v_stride[2], seq.Lk, p, s, values + bh * kv_size,
                nullptr);
    }
  });
  const int64_t blocks = (p.Lq + kBlockQ - 1) / kBlockQ;
  const ThreadScratch<ForwardScratch> scratch(s.Dp);
  at::parallel_for(0, p.B * p.Hq * blocks, 1, [&](int64_t begin, int64_t end) {
    ForwardScratch w = scratch.mine(s.Dp);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, b = bh / p.Hq, h = bh % p.Hq, i0 = (task % blocks) * kBlockQ;
      if (i0 >= s.seqs[b].Lq) continue;  // varlen: past a shorter sequence's queries
      const int64_t kv = (b * p.Hkv + h / s.G) * kv_size;
      forward_block<T>(p, s, b, h, i0, keys_t + kv, values + kv, w);
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------

// A backward task's buffers: its KV head packed (K as rows and transposed, V transposed), and for each of
// the G query heads of the group its queries (scaled), dO, Delta, LSE; and where its partial dQ and table
// gradient go.
struct BackwardScratch {
  static int64_t rel_size(const AttentionParams& p, const Shared& s) {
    return p.table != nullptr ? s.G * (s.diagonals + kW) : 0;
  }
  static int64_t floats(const AttentionParams& p, const Shared& s) {
    return 3 * s.Lkp * s.Dp + 2 * kBlockK * s.Dp + 2 * s.G * p.Lq * s.Dp + 2 * s.G * p.Lq + 3 * kBlockQ * kBlockK;
  }
  BackwardScratch(Carve carve, const AttentionParams& p, const Shared& s)
      : keys(carve(s.Lkp * s.Dp)), keys_t(carve(s.Lkp * s.Dp)), values_t(carve(s.Lkp * s.Dp)),
        dk(carve(kBlockK * s.Dp)), dv(carve(kBlockK * s.Dp)), q(carve(s.G * p.Lq * s.Dp)),
        dout(carve(s.G * p.Lq * s.Dp)), delta(carve(s.G * p.Lq)), lse(carve(s.G * p.Lq)),
        P(carve(kBlockQ * kBlockK)), dP(carve(kBlockQ * kBlockK)), P_kept(carve(kBlockQ * kBlockK)) {}
  std::span<float> keys, keys_t, values_t, dk, dv, q, dout, delta, lse, P, dP, P_kept;
  std::span<float> dq, drel;  // the task's partials (backward), G * Lq * Dp and rel_size floats
};

// Head h's rows of Q (scaled), dO, Delta and its LSE (+inf for rows that saw no key, so that their P is 0)
// into group slot g of w.
template <typename T>
void load_query_head(const AttentionParams& p, const Shared& s, int64_t b, int64_t h, int64_t g, BackwardScratch& w) {
  const int64_t Dp = s.Dp, D = p.head_dim;
  const Seq& seq = s.seqs[b];
  const T* q = head_of<T>(p.q, p.q_stride, b, h, seq.q0);
  const T* o = head_of<T>(p.o, p.o_stride, b, h, seq.q0);
  const T* dout = head_of<T>(p.dout, p.do_stride, b, h, seq.q0);
  const float* lse = lse_of(p, seq, b, h);
  std::vector<float> o_row(Dp);
  for (int64_t i = 0; i < seq.Lq; ++i) {
    const int64_t slot = g * p.Lq + i;
    load_row(q + i * p.q_stride[2], D, p.scale, w.q.data() + slot * Dp, Dp);
    load_row(dout + i * p.do_stride[2], D, 1.f, w.dout.data() + slot * Dp, Dp);
    load_row(o + i * p.o_stride[2], D, 1.f, o_row.data(), Dp);
    w.delta[slot] = dot(w.dout.data() + slot * Dp, o_row.data(), Dp);
    w.lse[slot] = lse[i] == -kInf ? kInf : lse[i];
  }
}

// One (query block, key block) step of head slot g: accumulates dV, dK (w.dk, w.dv: the key block's
// rows) and dQ, and writes dbias / adds to the diagonal sums of the table gradient.
void backward_step(const HeadScores& hs, int64_t g, int64_t i0, int64_t j0, int64_t nk, BackwardScratch& w) {
  const AttentionParams& p = hs.p;
  const int64_t Dp = hs.s.Dp, n = std::min(kBlockQ, hs.seq.Lq - i0), nkp = round_up(nk, kW);
  const float* q = w.q.data() + (g * p.Lq + i0) * Dp;
  const float* dout = w.dout.data() + (g * p.Lq + i0) * Dp;
  float* P = w.P.data();
  float* dS = w.dP.data();
  scores(hs, q, i0, n, j0, nkp, P);
  for (int64_t r = 0; r < n; ++r) exp_and_sum(P + r * kBlockK, nkp, w.lse[g * p.Lq + i0 + r]);
  // dP = dO V^T
  gemm<false>(n, nkp, Dp, dout, Dp, 1, w.values_t.data() + (j0 / kBlockK) * Dp * kBlockK, kBlockK, dS, kBlockK);
  const float* P_kept = P;  // P after dropout, what multiplied V
  if (p.dropout_p > 0.f) {
    std::copy(w.P.begin(), w.P.begin() + n * kBlockK, w.P_kept.begin());
    for (int64_t r = 0; r < n; ++r) {
      drop(w.P_kept.data() + r * kBlockK, dS + r * kBlockK, nkp, p.seed, dropout_offset(p, hs.b, hs.h, i0 + r, j0),
           p.dropout_p);
    }
    P_kept = w.P_kept.data();
  }
  gemm<true>(nk, Dp, n, P_kept, 1, kBlockK, dout, Dp, w.dv.data(), Dp);  // dV += P_kept^T dO
  for (int64_t r = 0; r < n; ++r) {  // dS = P * (dP - Delta)
    const Vec delta(w.delta[g * p.Lq + i0 + r]);
    float* row = dS + r * kBlockK;
    const float* prob = P + r * kBlockK;
    for (int64_t c = 0; c < nkp; c += kW) (Vec::loadu(prob + c) * (Vec::loadu(row + c) - delta)).store(row + c);
  }
  gemm<true>(nk, Dp, n, dS, 1, kBlockK, q, Dp, w.dk.data(), Dp);                            // dK += dS^T (scale Q)
  gemm<true>(n, Dp, nk, dS, kBlockK, 1, w.keys.data() + j0 * Dp, Dp, w.dq.data() + (g * p.Lq + i0) * Dp, Dp);
  if (p.dbias != nullptr) {
    float* dbias = p.dbias + ((hs.b * p.Hq + hs.h) * p.Lq + i0) * p.Lk + j0;
    for (int64_t r = 0; r < n; ++r) std::copy(dS + r * kBlockK, dS + r * kBlockK + nk, dbias + r * p.Lk);
  }
  if (!w.drel.empty()) {
    float* drel = w.drel.data() + g * (hs.s.diagonals + kW);
    for (int64_t r = 0; r < n; ++r) {
      add_row(drel + (j0 - (i0 + r) + hs.seq.Lq - 1 + hs.seq.rel_shift), dS + r * kBlockK, nk);
    }
  }
}

template <typename T>
void store_rows(const float* src, int64_t rows, const AttentionParams& p, int64_t Dp, float scale, T* dst,
                int64_t stride) {
  for (int64_t r = 0; r < rows; ++r) store_row(src + r * Dp, p.head_dim, scale, dst + r * stride);
}

// The backward's unit of work: KV head (b, hkv) and its key blocks first_block, first_block + stride, ...
// (interleaved, so that chunks of a causal head get as much work each). It writes those keys' dK and dV,
// and the chunk's partial dQ (unscaled) and table-gradient diagonal sums of every query head of the group
// into w.dq and w.drel.
struct KeyChunk {
  int64_t b, hkv, first_block, stride;
};

template <typename T>
void backward_chunk(const AttentionParams& p, const Shared& s, const KeyChunk& chunk, BackwardScratch& w) {
  const int64_t Dp = s.Dp, b = chunk.b, hkv = chunk.hkv;
  const Seq& seq = s.seqs[b];
  pack_keys(head_of<T>(p.k, p.k_stride, b, hkv, seq.k0), p.k_stride[2], seq.Lk, p, s, w.keys.data(),
            w.keys_t.data());
  pack_keys(head_of<T>(p.v, p.v_stride, b, hkv, seq.k0), p.v_stride[2], seq.Lk, p, s, nullptr, w.values_t.data());
  for (int64_t g = 0; g < s.G; ++g) load_query_head<T>(p, s, b, hkv * s.G + g, g, w);
  std::fill(w.dq.begin(), w.dq.end(), 0.f);
  std::fill(w.drel.begin(), w.drel.end(), 0.f);
  T* dk = head_of<T>(p.dk, p.dk_stride, b, hkv, seq.k0);
  T* dv = head_of<T>(p.dv, p.dv_stride, b, hkv, seq.k0);
  const int64_t end = s.key_end[b];  // a multiple of kBlockK, or the sequence's Lk
  for (int64_t j0 = chunk.first_block * kBlockK; j0 < seq.Lk; j0 += chunk.stride * kBlockK) {
    const int64_t nk = std::min(kBlockK, seq.Lk - j0);
    if (j0 >= end) {  // keys no query sees
      for (int64_t j = j0; j < j0 + nk; ++j) {
        std::fill_n(dk + j * p.dk_stride[2], p.head_dim, T(0.f));
        std::fill_n(dv + j * p.dv_stride[2], p.head_dim, T(0.f));
      }
      continue;
    }
    std::fill(w.dk.begin(), w.dk.end(), 0.f);
    std::fill(w.dv.begin(), w.dv.end(), 0.f);
    // causal: the first query that sees key j0, rounded down to its block
    const int64_t first = p.causal ? std::max<int64_t>(0, j0 - (seq.Lk - seq.Lq)) / kBlockQ * kBlockQ : 0;
    for (int64_t g = 0; g < s.G; ++g) {
      const int64_t h = hkv * s.G + g;
      const float* rel = s.rel.empty() ? nullptr : s.rel.data() + h * (s.diagonals + kW);
      const HeadScores hs{p, s, b, h, seq, w.keys_t.data(), rel};
      for (int64_t i0 = first; i0 < seq.Lq; i0 += kBlockQ) backward_step(hs, g, i0, j0, nk, w);
    }
    store_rows(w.dk.data(), nk, p, Dp, 1.f, dk + j0 * p.dk_stride[2], p.dk_stride[2]);
    store_rows(w.dv.data(), nk, p, Dp, 1.f, dv + j0 * p.dv_stride[2], p.dv_stride[2]);
  }
}

// dQ and the table gradient of the query heads of KV head (b, hkv): the sums of its `chunks` partials
// (dq_parts, drel_parts: the first chunk's; one chunk after the other), in chunk order.
template <typename T>
void finish_group(const AttentionParams& p, const Shared& s, int64_t b, int64_t hkv, int64_t chunks,
                  const float* dq_parts, const float* drel_parts) {
  const int64_t Dp = s.Dp, dq_size = s.G * p.Lq * Dp, drel_size = BackwardScratch::rel_size(p, s);
  std::vector<float> sum(Dp);
  const Seq& seq = s.seqs[b];
  for (int64_t g = 0; g < s.G; ++g) {
    const int64_t h = hkv * s.G + g;
    T* dq = head_of<T>(p.dq, p.dq_stride, b, h, seq.q0);
    for (int64_t i = 0; i < seq.Lq; ++i) {
      const int64_t row = (g * p.Lq + i) * Dp;
      std::copy_n(dq_parts + row, Dp, sum.begin());
      for (int64_t c = 1; c < chunks; ++c) add_row(sum.data(), dq_parts + c * dq_size + row, Dp);
      store_row(sum.data(), p.head_dim, p.scale, dq + i * p.dq_stride[2]);
    }
    if (p.dtable == nullptr) continue;
    float* dtable = p.dtable + (b * p.Hq + h) * p.num_buckets;
    for (int64_t c = 0; c < chunks; ++c) {
      const float* drel = drel_parts + c * drel_size + g * (s.diagonals + kW);
      for (int64_t t = 0; t < s.diagonals; ++t) dtable[p.bucket[t]] += drel[t];
    }
  }
}

// Tasks: each (batch, KV head) in `chunks` chunks of its key blocks, chunks > 1 only when there are fewer
// (batch, KV head) pairs than threads; then the reduction of the chunks' partials, in a fixed order (the
// results are the same on every rerun with the same number of threads, and independent of it when
// B * Hkv is at least the number of threads).
template <typename T>
void backward(const AttentionParams& p) {
  const Shared s = share(p);
  const int64_t groups = p.B * p.Hkv, key_blocks = s.Lkp / kBlockK;
  const int64_t chunks =
      std::clamp<int64_t>((at::get_num_threads() + groups - 1) / groups, 1, std::max<int64_t>(key_blocks, 1));
  const int64_t dq_size = s.G * p.Lq * s.Dp, drel_size = BackwardScratch::rel_size(p, s);
  const at::Tensor partials = float_buffer(groups * chunks * (dq_size + drel_size));
  float* dq_parts = partials.data_ptr<float>();
  float* drel_parts = dq_parts + groups * chunks * dq_size;
  const ThreadScratch<BackwardScratch> scratch(p, s);
  at::parallel_for(0, groups * chunks, 1, [&](int64_t begin, int64_t end) {
    BackwardScratch w = scratch.mine(p, s);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task / chunks, c = task % chunks;
      w.dq = std::span<float>(dq_parts + task * dq_size, dq_size);
      w.drel = std::span<float>(drel_parts + task * drel_size, drel_size);
      const KeyChunk chunk{group / p.Hkv, group % p.Hkv, c, chunks};
      backward_chunk<T>(p, s, chunk, w);
    }
  });
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t group = begin; group < end; ++group) {
      finish_group<T>(p, s, group / p.Hkv, group % p.Hkv, chunks, dq_parts + group * chunks * dq_size,
                      drel_parts + group * chunks * drel_size);
    }
  });
}

}  // namespace

void attention_fwd(const AttentionParams& p) {
  FASTLM_DTYPE_SWITCH(p.dtype, T, c10::Half, c10::BFloat16, [&] { forward<T>(p); });
}

void attention_bwd(const AttentionParams& p) {
  FASTLM_DTYPE_SWITCH(p.dtype, T, c10::Half, c10::BFloat16, [&] { backward<T>(p); });
}

}  // namespace fastlm::cpu
