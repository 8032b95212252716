// Building blocks shared by the attention kernels (attention_fwd_kernel.cuh, attention_bwd_kernel.cuh):
// the block shape, shared-memory tiles filled by cp.async, and mma.sync on the kernel's element type.
//
// Fragment layouts (PTX ISA, mma.m16n8k16), lane = 4 g + t:
//   A 16x16: a[0] (row g, cols 2t, 2t+1), a[1] (row g+8, same cols), a[2], a[3] the same at cols +8
//   B 16x8:  b[0] (rows 2t, 2t+1, col g), b[1] the same at rows +8
//   C 16x8:  c[0], c[1] (row g, cols 2t, 2t+1), c[2], c[3] (row g+8, same cols)
// So the accumulators of two adjacent 8-column tiles are, once rounded, the A fragment of 16 columns.
// ldmatrix x4 addresses (lane l gives row l % 8 of matrix l / 8), with tiles in row-major smem:
//   A from a 16x16 tile:                     row l % 16,                 col 8 (l / 16)
//   B (two n-tiles) from rows = B columns:   row 8 (l / 16) + l % 8,     col 8 (l / 8 % 2)
//   B (two n-tiles) from rows = B rows, .trans: row 8 (l / 8 % 2) + l % 8, col 8 (l / 16)
#pragma once

#include <cstring>
#include <type_traits>

#include "attention.h"
#include "common.cuh"
#include "philox.cuh"
#include "tensor_core.cuh"

namespace fastlm {
namespace attn {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Smem row pitch (elements) of a D-wide tile: +16 bytes keeps the 8 rows of an ldmatrix conflict-free.
template <int D>
constexpr int kPitch = D + 8;

// Rows of a streamed K/V (or Q/dO) tile of D-wide heads: about the same mma work between barriers for every
// D; the fewer rows at D = 256 leave registers to its accumulators.
template <int D>
constexpr int kStreamRows = D <= 64 ? 64 : (D <= 128 ? 32 : 16);

// Two fp32 values as one .f16x2 / .bf16x2 register, `lo` in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T h[2] = {from_float<T>(lo), from_float<T>(hi)};
  uint32_t r;
  memcpy(&r, h, 4);
  return r;
}

// The A fragment of 16 columns from the fp32 accumulators of 8-column tiles c0 (cols +0) and c1 (+8).
template <typename T>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

// d += a * (b0, b1), on fp16 or bf16 inputs.
template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint32_t b[2] = {b0, b1};
  if constexpr (std::is_same_v<T, __half>) {
    mma_m16n8k16_f16(d, a, b, d);
  } else {
    mma_m16n8k16_bf16(d, a, b, d);
  }
}

// acc[NT][4] += A (16 rows of `a_rows`) * B^T, B the rows of `b_rows` (NT * 8 of them): a 16 x (NT*8)
// product over the D columns of both tiles (Q K^T, dO V^T, K Q^T, ...).
template <typename T, int D, int NT>
__device__ __forceinline__ void mma_rows_rows(float (&acc)[NT][4], const T* a_rows, const T* b_rows) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    ldmatrix_x4(a, a_rows + (lane % 16) * kPitch<D> + kk * 16 + (lane / 16) * 8);
#pragma unroll
    for (int nn = 0; nn < NT / 2; ++nn) {
      uint32_t b[4];
      ldmatrix_x4(b, b_rows + (nn * 16 + (lane / 16) * 8 + lane % 8) * kPitch<D> + kk * 16 + ((lane / 8) % 2) * 8);
      mma<T>(acc[2 * nn], a, b[0], b[1]);
      mma<T>(acc[2 * nn + 1], a, b[2], b[3]);
    }
  }
}

// acc[W/8][4] += P (16 x K, fp32 accumulators p[K/8][4], rounded to T) * B, B the first W columns of the
// K rows of `b_rows` (a tile of pitch kPitch<D>): P V, P^T dO, dS K, dS^T Q.
template <typename T, int D, int K, int W = D>
__device__ __forceinline__ void mma_acc_rows(float (&acc)[W / 8][4], const float (&p)[K / 8][4], const T* b_rows) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    acc_to_a<T>(a, p[2 * kk], p[2 * kk + 1]);
#pragma unroll
    for (int dd = 0; dd < W / 16; ++dd) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, b_rows + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * kPitch<D> + dd * 16 + (lane / 16) * 8);
      mma<T>(acc[2 * dd], a, b[0], b[1]);
      mma<T>(acc[2 * dd + 1], a, b[2], b[3]);
    }
  }
}

// Rows [row0, row0 + ROWS) of an (L, D) matrix with row stride `stride` into smem (pitch kPitch<D>), 16
// bytes per cp.async; rows at or past L are zero-filled.
template <int ROWS, int D, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* gmem, int64_t stride, int64_t row0, int64_t L) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int c = threadIdx.x; c < ROWS * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool valid = row0 + r < L;
    const T* src = valid ? gmem + (row0 + r) * stride + col : gmem;
    cp_async_16_zfill(smem + r * kPitch<D> + col, src, valid ? 16 : 0);
  }
}

// The sequence a block works on. Padded calls (VARLEN false): batch b of the (B, H, L, D) tensors, all of
// its Lq queries and Lk keys. Varlen calls: sequence b of the packed tensors (b strides 0), its rows and
// lengths from cu_seqlens; p.Lq and p.Lk are then the longest lengths, which still fix the dropout offsets
// (and, through diag0(), the rel_pos diagonals). Query and key positions (i, j) count from the sequence's
// start in both, and every bound on them is this struct's. A varlen block reads cu_seqlens once, into shared
// memory, and reads them there where it uses them: held in registers, they spill the dK/dV kernel at D = 128.
template <bool VARLEN>
struct Seq {
  const AttentionParams& p;

  // Construct at the kernel's start, in every thread (a varlen block synchronizes here).
  __device__ __forceinline__ Seq(const AttentionParams& params, int64_t b) : p(params) {
    if constexpr (VARLEN) {
      if (threadIdx.x == 0) {
        int32_t* s = shared();
        s[0] = __ldg(p.cu_seqlens_q + b);
        s[1] = __ldg(p.cu_seqlens_k + b);
        s[2] = __ldg(p.cu_seqlens_q + b + 1) - s[0];
        s[3] = __ldg(p.cu_seqlens_k + b + 1) - s[1];
      }
      __syncthreads();
    }
  }

  __device__ __forceinline__ int64_t q0() const { return VARLEN ? shared()[0] : 0; }  // first query row
  __device__ __forceinline__ int64_t k0() const { return VARLEN ? shared()[1] : 0; }  // first key row
  __device__ __forceinline__ int64_t Lq() const { return VARLEN ? shared()[2] : p.Lq; }  // query count
  __device__ __forceinline__ int64_t Lk() const { return VARLEN ? shared()[3] : p.Lk; }  // key count

  // The element of p.bucket of the sequence's diagonal j - i = 1 - Lq: the buckets are those of the (p.Lq,
  // p.Lk) score matrix, diagonal j - i + p.Lq - 1, and a varlen sequence's query i sits at position
  // i + Lk - Lq of its keys, as it would at i + p.Lk - p.Lq in that matrix.
  __device__ __forceinline__ int64_t diag0() const { return VARLEN ? Lq() - 1 + p.Lk - Lk() : p.Lq - 1; }

  // Element of query i of head h (batch b) in the per-row fp32 arrays: lse, delta, lse_log2 ((B, Hq, Lq),
  // varlen (Hq, total_q)).
  __device__ __forceinline__ int64_t row_index(int64_t b, int64_t h, int64_t i) const {
    return VARLEN ? h * p.total_q + q0() + i : (b * p.Hq + h) * p.Lq + i;
  }

 private:
  // The varlen block's first_q, first_k, count_q, count_k.
  __device__ __forceinline__ static int32_t* shared() {
    __shared__ int32_t values[4];
    return values;
  }
};

// Whether key `col` of the sequence (batch b) exists and is attended (key_padding_mask).
template <bool VARLEN>
__device__ __forceinline__ bool key_kept(const AttentionParams& p, const Seq<VARLEN>& seq, int64_t b, int64_t col) {
  return col < seq.Lk() && (p.mask == nullptr || p.mask[b * p.mask_stride[0] + col * p.mask_stride[1]]);
}

// key_kept as an additive score mask: 0 where the key is kept, -inf where it is not.
template <bool VARLEN>
__device__ __forceinline__ float key_bias(const AttentionParams& p, const Seq<VARLEN>& seq, int64_t b, int64_t col) {
  return key_kept(p, seq, b, col) ? 0.f : -INFINITY;
}

// Rows of head (b, h) of a (B, H, L, D) tensor (`stride`: its (b, h, l) strides, elements) as T, from row
// `row0` on (a varlen sequence's first row; b strides are 0 there).
template <typename T, typename Ptr>
__device__ __forceinline__ T* head_rows(Ptr* base, const int64_t (&stride)[3], int64_t b, int64_t h,
                                        int64_t row0 = 0) {
  return static_cast<T*>(base) + b * stride[0] + h * stride[1] + row0 * stride[2];
}

// Element `idx` of a float32 / float16 / bfloat16 array, as fp32 (the 16-bit types widened from their bits).
__device__ __forceinline__ float load_as_float(const void* ptr, DType dtype, int64_t idx) {
  if (dtype == DType::f32) return __ldg(static_cast<const float*>(ptr) + idx);
  const uint32_t bits = __ldg(static_cast<const unsigned short*>(ptr) + idx);
  return dtype == DType::bf16 ? __uint_as_float(bits << 16) : __half2float(__ushort_as_half(bits));
}

// Score extras (EXTRAS kernels) of query i and key j of head (b, h) (i, j inside the sequence), log2 domain:
// (bias[b, h, i, j] + table[bucket[j - i + diag0], h]) * log2(e) (diag0: Seq::diag0()), bucket entries
// clamped to the table.
__device__ __forceinline__ float score_extras_log2(const AttentionParams& p, int64_t b, int64_t h, int64_t i,
                                                   int64_t j, int64_t diag0) {
  float extra = 0.f;
  if (p.bias != nullptr) {
    extra += load_as_float(p.bias, p.bias_dtype,
                           b * p.bias_stride[0] + h * p.bias_stride[1] + i * p.bias_stride[2] + j * p.bias_stride[3]);
  }
  if (p.table != nullptr) {
    const int64_t bucket = min(max(int64_t(__ldg(p.bucket + (j - i + diag0))), int64_t(0)), p.num_buckets - 1);
    extra += load_as_float(p.table, p.table_dtype, bucket * p.table_stride[0] + h * p.table_stride[1]);
  }
  return extra * kLog2e;
}

// The scores of head (b, h) as every kernel computes them, written once: query i sees key j when the key is
// kept (it exists and key_padding_mask attends it: key_kept) and, with CAUSAL, j <= i + Lk - Lq (the
// sequence's lengths: Seq); the log2-domain score of a pair it sees is q.k * scale * log2(e) plus the score
// terms (terms()). A new score term goes into terms(), and only there.
template <bool CAUSAL, bool EXTRAS, bool VARLEN>
struct ScoreRule {
  const AttentionParams& p;
  Seq<VARLEN> seq;
  int64_t b, h;
  float scale_log2;

  __device__ __forceinline__ ScoreRule(const AttentionParams& params, const Seq<VARLEN>& sequence, int64_t batch,
                                       int64_t head)
      : p(params), seq(sequence), b(batch), h(head), scale_log2(params.scale * kLog2e) {}

  // Whether the causal mask lets query i see key j (always without CAUSAL).
  __device__ __forceinline__ bool causal_visible(int64_t i, int64_t j) const {
    return !CAUSAL || j <= i + seq.Lk() - seq.Lq();
  }

  // Whether query i sees key j, given whether the key is kept.
  __device__ __forceinline__ bool visible(bool kept, int64_t i, int64_t j) const {
    return kept && causal_visible(i, j);
  }

  // x, the scaled q.k of query i and a key j it sees, plus the score terms: in the EXTRAS kernels
  // score_extras_log2 (none for rows past the sequence's Lq, so nothing outside the inputs is read).
  __device__ __forceinline__ float terms(float x, int64_t i, int64_t j) const {
    if constexpr (EXTRAS) {
      if (i < seq.Lq()) x += score_extras_log2(p, b, h, i, j, seq.diag0());
    }
    return x;
  }

  // The log2-domain score of query i and key j from their dot product qk and the key's additive mask
  // kbias (0 kept, -inf not: key_bias()): -inf where i does not see j.
  __device__ __forceinline__ float score(float qk, float kbias, int64_t i, int64_t j) const {
    float x = qk * scale_log2 + kbias;
    if (!causal_visible(i, j)) x = -INFINITY;
    return x == -INFINITY ? x : terms(x, i, j);
  }

  // exp2(score - *lse_log2) of a pair given whether its key is kept: 0 where i does not see j. The row's
  // LSE is read only where it is used: read for every pair, it spills the sm_80 dK/dV kernel at D = 256.
  // (visible() written out: calling it here spills too, as does `kept && causal_visible(i, j)`.)
  __device__ __forceinline__ float prob(float qk, bool kept, int64_t i, int64_t j, const float* lse_log2) const {
    bool seen = kept;
    if (CAUSAL) seen = seen && j <= i + seq.Lk() - seq.Lq();
    return seen ? exp2f(terms(qk * scale_log2, i, j) - *lse_log2) : 0.f;
  }
};

// The double-buffered cp.async stream of `tiles` tiles through two smem buffers, written once for every
// kernel; load(n, buf) issues the copies of tile n into buffer buf (0 or 1):
//   stream_start(tiles, load);             // after the caller's own copies (its resident tiles)
//   for (int n = 0; n < tiles; ++n) {
//     const int buf = stream_wait(n, tiles, load);  // tile n has landed, tile n + 1 is on its way
//     ... read buffer buf ...
//     __syncthreads();                     // the block is done with buffer buf
//   }
//   stream_finish(tiles);

// Starts tile 0 (if any): its copies and the caller's earlier ones form the first cp.async group.
template <typename Load>
__device__ __forceinline__ void stream_start(int tiles, Load&& load) {
  if (tiles > 0) load(0, 0);
  cp_async_commit();
}

// Prefetches tile n + 1 into the other buffer (last read before the previous iteration's closing barrier),
// waits for tile n and the block; returns tile n's buffer.
template <typename Load>
__device__ __forceinline__ int stream_wait(int n, int tiles, Load&& load) {
  const int buf = n % 2;
  if (n + 1 < tiles) {
    load(n + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
  __syncthreads();
  return buf;
}

// With no tile, waits for the caller's copies.
__device__ __forceinline__ void stream_finish(int tiles) {
  if (tiles == 0) cp_async_wait<0>();
}

// Bit 4 nt + e set where element (nt, e) of a 16 x (8 NT) tile of accumulators is nonzero.
template <int NT>
__device__ __forceinline__ uint32_t nonzero_bits(const float (&x)[NT][4]) {
  static_assert(4 * NT <= 32, "one bit per element");
  uint32_t bits = 0;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) bits |= uint32_t(x[nt][e] != 0.f) << (4 * nt + e);
  }
  return bits;
}

// Dropout (EXTRAS kernels) of a warp's 16 x (8 NT) tile of accumulators (element (nt, e) at tile row
// g + 8 (e / 2), column 8 nt + 2 t + e % 2): bit 4 nt + e set where dropout keeps it, i.e. where Philox at
// offset base + row * row_step + column * col_step (((b * Hq + h) * Lq + i) * Lk + j, the caller placing
// queries and keys on the tile's rows and columns) is >= dropout_p; drawn only for the bits of `live`
// (probabilities that can be nonzero), the others read as dropped; every bit set without dropout. A
// rolled loop: one Philox per kernel.
template <int NT>
__device__ __forceinline__ uint32_t dropout_keep(const AttentionParams& p, uint32_t live, int64_t base,
                                                 int64_t row_step, int64_t col_step) {
  static_assert(4 * NT <= 32, "one bit per element");
  if (p.dropout_p == 0.f) return ~0u;
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  uint32_t keep = 0;
#pragma unroll 1
  for (int bit = 0; bit < 4 * NT; ++bit) {
    if (!(live >> bit & 1u)) continue;
    const int nt = bit / 4, e = bit % 4;
    const int64_t offset = base + (g + 8 * (e / 2)) * row_step + (nt * 8 + 2 * t + e % 2) * col_step;
    if (philox_uniform(p.seed, uint64_t(offset)) >= p.dropout_p) keep |= 1u << bit;
  }
  return keep;
}

// x *= Z / (1 - dropout_p) for the tile of `keep` (dropout_keep), Z = its bit; nothing without dropout.
template <int NT>
__device__ __forceinline__ void apply_keep(const AttentionParams& p, float (&x)[NT][4], uint32_t keep) {
  if (p.dropout_p == 0.f) return;
  const float scale = 1.f / (1.f - p.dropout_p);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) x[nt][e] = keep >> (4 * nt + e) & 1u ? x[nt][e] * scale : 0.f;
  }
}

// Number of ROWS-key tiles of the sequence that can be visible to queries [m0, m0 + QUERIES): every tile, or
// with CAUSAL those up to the last query's diagonal (key j is visible to query i iff j <= i + Lk - Lq).
template <int ROWS, int QUERIES, bool CAUSAL, bool VARLEN>
__device__ __forceinline__ int visible_key_tiles(const Seq<VARLEN>& seq, int64_t m0) {
  int64_t n_end = seq.Lk();
  if (CAUSAL) n_end = max(int64_t(0), min(seq.Lk(), m0 + QUERIES + seq.Lk() - seq.Lq()));
  return int((n_end + ROWS - 1) / ROWS);
}

// Keys [j0, j0 + ROWS) of the sequence (batch b; k, v its first rows): K and V rows into s_k, s_v (cp.async,
// zeros past its Lk) and their key mask as an additive bias into s_kbias (0 kept, -inf padded out or past
// Lk: key_bias).
template <int ROWS, int D, typename T, bool VARLEN>
__device__ __forceinline__ void load_kv_tile(T* s_k, T* s_v, float* s_kbias, const T* k, const T* v,
                                             const AttentionParams& p, const Seq<VARLEN>& seq, int64_t b, int64_t j0) {
  load_tile<ROWS, D>(s_k, k, p.k_stride[2], j0, seq.Lk());
  load_tile<ROWS, D>(s_v, v, p.v_stride[2], j0, seq.Lk());
  for (int j = threadIdx.x; j < ROWS; j += kThreads) s_kbias[j] = key_bias(p, seq, b, j0 + j);
}

// Rows [row0, row0 + 16) of this warp's accumulators (row g, cols 2t, 2t+1 of each 8-column tile, then
// row g + 8), scaled, stored as T to rows < L of `out` (row stride `stride`).
template <typename T, int D>
__device__ __forceinline__ void store_rows(T* out, int64_t stride, int64_t row0, int64_t L, const float (&acc)[D / 8][4],
                                           float scale0, float scale1) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = row0 + g + 8 * r;
    if (row >= L) continue;
    const float s = r == 0 ? scale0 : scale1;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const uint32_t pair = pack2<T>(acc[dt][2 * r] * s, acc[dt][2 * r + 1] * s);
      memcpy(static_cast<void*>(out + row * stride + dt * 8 + 2 * t), &pair, 4);
    }
  }
}

// Instantiates launch<T, CAUSAL, EXTRAS, VARLEN>(p, stream) for p's dtype, causal flag, p.has_extras() and
// p.varlen(): one EXTRAS kernel serves every mix of bias / rel_pos / dropout through warp-uniform runtime
// checks, and the plain kernels carry none of that code. Varlen calls always take the EXTRAS kernels (their
// VARLEN variants, the only ones instantiated), which keeps the count of kernels at 3 per dtype and causal
// flag; so a build without EXTRAS (FASTLM_ATTN_EXTRAS=0) has no varlen kernels either.
template <typename Launch>
cudaError_t attention_switch(const AttentionParams& p, Launch&& launch) {
  auto by_extras = [&]<typename T, bool CAUSAL>() {
    if (!p.has_extras() && !p.varlen()) return launch.template operator()<T, CAUSAL, false, false>();
    if constexpr (attention_extras_built()) {
      if (p.varlen()) return launch.template operator()<T, CAUSAL, true, true>();
      return launch.template operator()<T, CAUSAL, true, false>();
    }
    return cudaErrorInvalidValue;
  };
  auto by_causal = [&]<typename T>() {
    return p.causal ? by_extras.template operator()<T, true>() : by_extras.template operator()<T, false>();
  };
  if (p.dtype == DType::f16) return by_causal.template operator()<__half>();
  if (p.dtype == DType::bf16) return by_causal.template operator()<__nv_bfloat16>();
  return cudaErrorInvalidValue;
}

// Sets the dynamic shared memory opt-in of `kernel` when it needs more than the default 48 KiB.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

}  // namespace attn
}  // namespace fastlm
