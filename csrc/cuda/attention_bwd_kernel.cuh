// The flash-attention backward kernels, deterministic (no atomics): after the preprocess (delta =
// rowsum(dO * O), in attention.cu), one kernel owns a block of 64 keys (32 at D = 256) and accumulates
// its dK and dV in registers over every query block of every query head of its GQA group; another owns
// a block of 64 queries and accumulates dQ (fp32 registers) over the key blocks. Both recompute P =
// exp(S - lse) from the forward's LSE, with S, dP and the gradient products on mma.sync fed by ldmatrix
// and the streamed tiles double-buffered with cp.async. Included by attention_bwd_hdim*.cu.
#pragma once

#include "attention_tile.cuh"

namespace fastlm {
namespace attn {

template <int D>
struct BwdTile {
  // dK/dV kernel: kSplit warps share 16 keys, each accumulating dK, dV for kCols = D / kSplit of the
  // columns (2 x 128 fp32 per thread at D = 256 would not fit in registers).
  static constexpr int kSplit = D <= 128 ? 1 : 2;
  static constexpr int kCols = D / kSplit;
  static constexpr int kKeys = 16 * kWarps / kSplit;  // dK/dV kernel: keys per block
  static constexpr int kSteps = kStreamRows<D>;       // dK/dV kernel: queries per streamed Q/dO tile
  static constexpr int kQueries = 16 * kWarps;        // dQ kernel: queries per block, 16 per warp
  static constexpr int kKeyStep = kStreamRows<D>;     // dQ kernel: keys per streamed K/V tile
  static constexpr int kDkdvSmem =  // K, V, 2x Q, 2x dO, 2x (lse_log2, delta)
      (2 * kKeys + 4 * kSteps) * kPitch<D> * 2 + 4 * kSteps * int(sizeof(float));
  static constexpr int kDqSmem =  // Q, dO, 2x K, 2x V, 2x key bias
      (2 * kQueries + 4 * kKeyStep) * kPitch<D> * 2 + 2 * kKeyStep * int(sizeof(float));
};

// dK, dV of keys [n0, n0 + kKeys) of kv head (b, hkv). Warp w owns keys n0 + 16 (w / kSplit) ... + 15,
// columns [c0, c0 + kCols) with c0 = kCols (w % kSplit), and computes, per streamed tile of queries i:
// S^T = K Q^T, P^T = exp2(S^T scale log2e - lse_log2[i]) (masked), dV += P^T dO, dP^T = V dO^T,
// dS^T = P^T (dP^T - delta[i]), dK += dS^T Q (S^T and dP^T over all D columns, dV and dK over its own).
// EXTRAS: S^T gets the bias / relative-position terms; with dropout Z, dV += (Z P / (1 - p))^T dO and
// dS^T = P^T (Z dP^T / (1 - p) - delta[i]): Z is drawn before S^T takes its registers, and dV waits for
// dS^T, after which P^T becomes Z P^T / (1 - p). EXTRAS kernels ask for one block per SM (up to 255
// registers) rather than spill to fit 3. VARLEN: blockIdx.y is (sequence, kv head) of packed sequences
// (Seq); blocks past the sequence's keys exit.
template <typename T, int D, bool CAUSAL, bool EXTRAS, bool VARLEN>
__global__ void __launch_bounds__(kThreads, EXTRAS ? 1 : 0) attention_bwd_dkdv_kernel(const AttentionParams p) {
  constexpr int kKeys = BwdTile<D>::kKeys, kSteps = BwdTile<D>::kSteps, kPitchD = kPitch<D>;
  constexpr int kSplit = BwdTile<D>::kSplit, kCols = BwdTile<D>::kCols;
  FASTLM_DYNAMIC_SHARED(T, smem);
  T* s_k = smem;                           // (kKeys, kPitchD)
  T* s_v = s_k + kKeys * kPitchD;          // (kKeys, kPitchD)
  T* s_q = s_v + kKeys * kPitchD;          // 2 x (kSteps, kPitchD)
  T* s_do = s_q + 2 * kSteps * kPitchD;    // 2 x (kSteps, kPitchD)
  float* s_lse = reinterpret_cast<float*>(s_do + 2 * kSteps * kPitchD);  // 2 x (kSteps,)
  float* s_delta = s_lse + 2 * kSteps;                                   // 2 x (kSteps,)

  const int64_t b = blockIdx.y / p.Hkv, hkv = blockIdx.y % p.Hkv, group = p.Hq / p.Hkv;
  const int64_t n0 = int64_t(blockIdx.x) * kKeys;
  const Seq<VARLEN> seq(p, b);
  if (VARLEN && n0 >= seq.Lk()) return;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int w16 = 16 * (warp / kSplit), c0 = kCols * (warp % kSplit);  // its keys from n0 + w16, columns from c0
  const T* k = head_rows<const T>(p.k, p.k_stride, b, hkv, seq.k0());
  const T* v = head_rows<const T>(p.v, p.v_stride, b, hkv, seq.k0());

  // Causal: query i sees key j iff i >= j - (Lk - Lq); the first query that sees key n0 starts the scan.
  const int64_t m_first = CAUSAL ? max(int64_t(0), n0 - (seq.Lk() - seq.Lq())) / kSteps : 0;
  const int64_t m_blocks = (seq.Lq() + kSteps - 1) / kSteps;
  const int steps = int(max(int64_t(0), m_blocks - m_first) * group);

  auto load_step = [&](int step, int buf) {
    const int64_t h = hkv * group + step / (m_blocks - m_first);
    const int64_t m0 = (m_first + step % (m_blocks - m_first)) * kSteps;
    load_tile<kSteps, D>(s_q + buf * kSteps * kPitchD, head_rows<const T>(p.q, p.q_stride, b, h, seq.q0()),
                         p.q_stride[2], m0, seq.Lq());
    load_tile<kSteps, D>(s_do + buf * kSteps * kPitchD, head_rows<const T>(p.dout, p.do_stride, b, h, seq.q0()),
                         p.do_stride[2], m0, seq.Lq());
    for (int i = threadIdx.x; i < kSteps; i += kThreads) {
      const bool valid = m0 + i < seq.Lq();  // rows past Lq: P = 0
      s_lse[buf * kSteps + i] = valid ? p.lse_log2[seq.row_index(b, h, m0 + i)] : INFINITY;
      s_delta[buf * kSteps + i] = valid ? p.delta[seq.row_index(b, h, m0 + i)] : 0.f;
    }
  };

  load_tile<kKeys, D>(s_k, k, p.k_stride[2], n0, seq.Lk());
  load_tile<kKeys, D>(s_v, v, p.v_stride[2], n0, seq.Lk());
  stream_start(steps, load_step);

  float dk[kCols / 8][4] = {}, dv[kCols / 8][4] = {};  // this warp's 16 keys x kCols columns
  const int64_t key[2] = {n0 + w16 + g, n0 + w16 + g + 8};
  const bool kept[2] = {key_kept(p, seq, b, key[0]), key_kept(p, seq, b, key[1])};

  for (int step = 0; step < steps; ++step) {
    const int buf = stream_wait(step, steps, load_step);
    const T* sq = s_q + buf * kSteps * kPitchD;
    const T* sdo = s_do + buf * kSteps * kPitchD;
    const int64_t m0 = (m_first + step % (m_blocks - m_first)) * kSteps;
    const int64_t h = hkv * group + step / (m_blocks - m_first);
    const ScoreRule<CAUSAL, EXTRAS, VARLEN> rule(p, seq, b, h);
    // dropout's Z^T (rows: keys, columns: queries), drawn where P^T can be nonzero, before S^T takes registers
    [[maybe_unused]] uint32_t keep = ~0u;
    if constexpr (EXTRAS) {
      uint32_t live = 0;
#pragma unroll
      for (int bit = 0; bit < kSteps / 2; ++bit) {
        const int64_t i = m0 + bit / 4 * 8 + 2 * t + bit % 2;
        live |= uint32_t(i < seq.Lq() && rule.visible(kept[bit % 4 / 2], i, key[bit % 4 / 2])) << bit;
      }
      const int64_t base = ((b * p.Hq + h) * p.Lq + m0) * p.Lk + key[0] - g;  // offset of (query m0, first key)
      keep = dropout_keep<kSteps / 8>(p, live, base, 1, p.Lk);
    }

    float pt[kSteps / 8][4] = {};  // S^T, then P^T: rows = this warp's keys, cols = queries
    mma_rows_rows<T, D>(pt, s_k + w16 * kPitchD, sq);
#pragma unroll
    for (int nt = 0; nt < kSteps / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = nt * 8 + 2 * t + e % 2;
        pt[nt][e] = rule.prob(pt[nt][e], kept[e / 2], m0 + i, key[e / 2], s_lse + buf * kSteps + i);
      }
    }
    if constexpr (!EXTRAS) mma_acc_rows<T, D, kSteps, kCols>(dv, pt, sdo + c0);  // dV += P^T dO

    float dst[kSteps / 8][4] = {};  // dP^T = V dO^T, then dS^T
    mma_rows_rows<T, D>(dst, s_v + w16 * kPitchD, sdo);
    if constexpr (EXTRAS) apply_keep(p, dst, keep);  // Z dP^T / (1 - p)
#pragma unroll
    for (int nt = 0; nt < kSteps / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dst[nt][e] = pt[nt][e] * (dst[nt][e] - s_delta[buf * kSteps + nt * 8 + 2 * t + e % 2]);
    }
    if constexpr (EXTRAS) {
      apply_keep(p, pt, keep);
      mma_acc_rows<T, D, kSteps, kCols>(dv, pt, sdo + c0);  // dV += (Z P / (1 - p))^T dO
    }
    mma_acc_rows<T, D, kSteps, kCols>(dk, dst, sq + c0);  // dK += dS^T Q
    __syncthreads();  // this buffer is refilled by the next iteration's prefetch
  }
  stream_finish(steps);

  store_rows<T, kCols>(head_rows<T>(p.dk, p.dk_stride, b, hkv, seq.k0()) + c0, p.dk_stride[2], n0 + w16, seq.Lk(), dk,
                       p.scale, p.scale);
  store_rows<T, kCols>(head_rows<T>(p.dv, p.dv_stride, b, hkv, seq.k0()) + c0, p.dv_stride[2], n0 + w16, seq.Lk(), dv,
                       1.f, 1.f);
}

// The table gradient's smem (EXTRAS dQ kernel with p.dtable): per warp, its 16 x N dS tile skewed so that
// row r, column c sits at column c - r + 15 (zeros elsewhere: the tile's diagonals become columns), then
// a row of the diagonal sums.
template <int N>
struct DiagSkew {
  static constexpr int kDiags = N + 15;
  static constexpr int kStride = N + 16;  // floats per row
  static constexpr int kWarpFloats = (kAttentionSlab + 1) * kStride;
  static constexpr int kBytes = kWarps * kWarpFloats * int(sizeof(float));
};

// Adds this warp's dS tile (queries row0 + [0, 16) of head bh, keys j0 + [0, N); the sequence's diagonal
// j - i reads bucket[j - i + diag0]: Seq::diag0()) to its slab's partial of dtable, deterministically: each
// diagonal summed over its rows in order (one lane per diagonal), then lane l sums the diagonals of buckets
// l, l + 32, ... in diagonal order into its own entries of the partial (one writer per entry, in program
// order).
template <int N>
__device__ __forceinline__ void add_dtable_tile(const AttentionParams& p, const float (&ds)[N / 8][4], float* skew,
                                                int64_t bh, int64_t row0, int64_t j0, int64_t diag0) {
  using Skew = DiagSkew<N>;
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int nt = 0; nt < N / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = g + 8 * (e / 2), c = nt * 8 + 2 * t + e % 2;
      skew[r * Skew::kStride + c - r + 15] = ds[nt][e];
    }
  }
  __syncwarp();
  float* diag = skew + kAttentionSlab * Skew::kStride;
  for (int d = lane; d < Skew::kDiags; d += 32) {
    float sum = 0.f;
#pragma unroll
    for (int r = 0; r < kAttentionSlab; ++r) sum += skew[r * Skew::kStride + d];
    diag[d] = sum;
  }
  __syncwarp();
  const int64_t t0 = j0 - (row0 + 15) + diag0;  // diagonal d is j - i + diag0 = t0 + d
  const int64_t slabs = (p.Lq + kAttentionSlab - 1) / kAttentionSlab;
  float* partial = p.dtable + (bh * slabs + row0 / kAttentionSlab) * p.num_buckets;
  for (int64_t nb = lane; nb < p.num_buckets; nb += 32) {
    float sum = 0.f;
    for (int d = 0; d < Skew::kDiags; ++d) {
      const int64_t diagonal = t0 + d;
      if (diagonal >= 0 && diagonal < p.Lq + p.Lk - 1 && __ldg(p.bucket + diagonal) == nb) sum += diag[d];
    }
    partial[nb] += sum;
  }
}

// dQ of queries [m0, m0 + 64) of head (b, h): per streamed K/V tile, S = Q K^T, P = exp2(S scale log2e -
// lse_log2) (masked), dP = dO V^T, dS = P (dP - delta), dQ += dS K; dQ scaled once at the end. EXTRAS: S
// gets the bias / relative-position terms, dropout Z makes dS = P (Z dP / (1 - p) - delta), and dS is
// what the score extras' gradients are made of: written to dbias, summed per bucket into dtable. VARLEN:
// blockIdx.y is (sequence, head) of packed sequences (Seq); blocks past the sequence's queries exit.
template <typename T, int D, bool CAUSAL, bool EXTRAS, bool VARLEN>
__global__ void __launch_bounds__(kThreads, 1) attention_bwd_dq_kernel(const AttentionParams p) {
  constexpr int kQueries = BwdTile<D>::kQueries, kKeyStep = BwdTile<D>::kKeyStep, kPitchD = kPitch<D>;
  FASTLM_DYNAMIC_SHARED(T, smem);
  T* s_q = smem;                                 // (kQueries, kPitchD)
  T* s_do = s_q + kQueries * kPitchD;            // (kQueries, kPitchD)
  T* s_k = s_do + kQueries * kPitchD;            // 2 x (kKeyStep, kPitchD)
  T* s_v = s_k + 2 * kKeyStep * kPitchD;         // 2 x (kKeyStep, kPitchD)
  float* s_kbias = reinterpret_cast<float*>(s_v + 2 * kKeyStep * kPitchD);  // 2 x (kKeyStep,): 0 or -inf

  const int64_t bh = blockIdx.y, b = bh / p.Hq, h = bh % p.Hq, hkv = h / (p.Hq / p.Hkv);
  const int64_t m0 = int64_t(blockIdx.x) * kQueries;
  const Seq<VARLEN> seq(p, b);
  if (VARLEN && m0 >= seq.Lq()) return;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  static_assert(kQueries == kAttentionSlab * kWarps, "a dtable slab is one warp's rows");
  float* s_skew = s_kbias + 2 * kKeyStep + warp * DiagSkew<kKeyStep>::kWarpFloats;  // with p.dtable only
  if (EXTRAS && p.dtable != nullptr) {
    for (int i = lane; i < kAttentionSlab * DiagSkew<kKeyStep>::kStride; i += 32) s_skew[i] = 0.f;
  }
  const T* k = head_rows<const T>(p.k, p.k_stride, b, hkv, seq.k0());
  const T* v = head_rows<const T>(p.v, p.v_stride, b, hkv, seq.k0());

  const int n_blocks = visible_key_tiles<kKeyStep, kQueries, CAUSAL>(seq, m0);
  auto load_kv = [&](int n, int buf) {
    load_kv_tile<kKeyStep, D>(s_k + buf * kKeyStep * kPitchD, s_v + buf * kKeyStep * kPitchD,
                              s_kbias + buf * kKeyStep, k, v, p, seq, b, int64_t(n) * kKeyStep);
  };

  load_tile<kQueries, D>(s_q, head_rows<const T>(p.q, p.q_stride, b, h, seq.q0()), p.q_stride[2], m0, seq.Lq());
  load_tile<kQueries, D>(s_do, head_rows<const T>(p.dout, p.do_stride, b, h, seq.q0()), p.do_stride[2], m0, seq.Lq());
  stream_start(n_blocks, load_kv);

  const int64_t row[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};
  // Per row: lse_log2 and delta; rows past Lq get P = 0.
  const float lse[2] = {row[0] < seq.Lq() ? p.lse_log2[seq.row_index(b, h, row[0])] : INFINITY,
                        row[1] < seq.Lq() ? p.lse_log2[seq.row_index(b, h, row[1])] : INFINITY};
  const float delta[2] = {row[0] < seq.Lq() ? p.delta[seq.row_index(b, h, row[0])] : 0.f,
                          row[1] < seq.Lq() ? p.delta[seq.row_index(b, h, row[1])] : 0.f};
  float dq[D / 8][4] = {};
  const ScoreRule<CAUSAL, EXTRAS, VARLEN> rule(p, seq, b, h);

  for (int n = 0; n < n_blocks; ++n) {
    const int buf = stream_wait(n, n_blocks, load_kv);
    const T* sk = s_k + buf * kKeyStep * kPitchD;
    const int64_t j0 = int64_t(n) * kKeyStep;

    float ps[kKeyStep / 8][4] = {};  // S, then P
    mma_rows_rows<T, D>(ps, s_q + warp * 16 * kPitchD, sk);
#pragma unroll
    for (int nt = 0; nt < kKeyStep / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = nt * 8 + 2 * t + e % 2;
        ps[nt][e] = exp2f(rule.score(ps[nt][e], s_kbias[buf * kKeyStep + j], row[e / 2], j0 + j) - lse[e / 2]);
      }
    }
    float ds[kKeyStep / 8][4] = {};  // dP = dO V^T, then dS
    mma_rows_rows<T, D>(ds, s_do + warp * 16 * kPitchD, s_v + buf * kKeyStep * kPitchD);
    if constexpr (EXTRAS) {
      const int64_t base = (bh * p.Lq + m0 + warp * 16) * p.Lk + j0;  // dropout offset of this warp's (0, 0)
      apply_keep(p, ds, dropout_keep<kKeyStep / 8>(p, nonzero_bits(ps), base, p.Lk, 1));  // Z dP / (1 - p)
    }
#pragma unroll
    for (int nt = 0; nt < kKeyStep / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) ds[nt][e] = ps[nt][e] * (ds[nt][e] - delta[e / 2]);
    }
    if constexpr (EXTRAS) {
      if (p.dbias != nullptr) {
#pragma unroll
        for (int nt = 0; nt < kKeyStep / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int64_t i = row[e / 2], j = j0 + nt * 8 + 2 * t + e % 2;
            if (i < p.Lq && j < p.Lk) p.dbias[(bh * p.Lq + i) * p.Lk + j] = ds[nt][e];
          }
        }
      }
      const int64_t row0 = m0 + warp * 16;
      if (p.dtable != nullptr && row0 < seq.Lq()) add_dtable_tile<kKeyStep>(p, ds, s_skew, bh, row0, j0, seq.diag0());
    }
    mma_acc_rows<T, D, kKeyStep>(dq, ds, sk);  // dQ += dS K
    __syncthreads();  // this buffer is refilled by the next iteration's prefetch
  }
  stream_finish(n_blocks);

  store_rows<T, D>(head_rows<T>(p.dq, p.dq_stride, b, h, seq.q0()), p.dq_stride[2], m0 + warp * 16, seq.Lq(), dq, p.scale,
                   p.scale);
}

// Instantiates the dK/dV and dQ kernels for head dim D over the dtypes, the causal flag, EXTRAS and VARLEN
// (after the preprocess has written delta and lse_log2).
template <int D>
cudaError_t launch_bwd_hdim(const AttentionParams& p, cudaStream_t stream) {
  return attention_switch(p, [&]<typename T, bool CAUSAL, bool EXTRAS, bool VARLEN>() {
    using Tile = BwdTile<D>;
    auto dkdv = attention_bwd_dkdv_kernel<T, D, CAUSAL, EXTRAS, VARLEN>;
    auto dq = attention_bwd_dq_kernel<T, D, CAUSAL, EXTRAS, VARLEN>;
    if (const cudaError_t err = allow_smem(dkdv, Tile::kDkdvSmem); err != cudaSuccess) return err;
    const int dq_smem = Tile::kDqSmem + (EXTRAS && p.dtable != nullptr ? DiagSkew<Tile::kKeyStep>::kBytes : 0);
    if (const cudaError_t err = allow_smem(dq, dq_smem); err != cudaSuccess) return err;
    const dim3 kv_grid(unsigned((p.Lk + Tile::kKeys - 1) / Tile::kKeys), unsigned(p.B * p.Hkv));
    FASTLM_LAUNCH(dkdv, kv_grid, kThreads, Tile::kDkdvSmem, stream)(p);
    if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    const dim3 q_grid(unsigned((p.Lq + Tile::kQueries - 1) / Tile::kQueries), unsigned(p.B * p.Hq));
    FASTLM_LAUNCH(dq, q_grid, kThreads, dq_smem, stream)(p);
    return cudaGetLastError();
  });
}

}  // namespace attn
}  // namespace fastlm
