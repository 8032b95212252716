// The flash-attention forward kernel: one block of 4 warps per 64 queries of one (batch, head); K/V
// tiles stream through shared memory with cp.async double buffering; S = Q K^T and O += P V run on
// mma.sync m16n8k16 (fp16/bf16 in, fp32 accumulators) fed by ldmatrix; the softmax is online in fp32
// (log2 domain) and its log-sum-exp is written for the backward pass. Included by the per-head-dim
// instantiation files attention_fwd_hdim*.cu.
#pragma once

#include "attention_tile.cuh"

namespace fastlm {
namespace attn {

template <int D>
struct FwdTile {
  static constexpr int kBlockM = 16 * kWarps;        // queries per block, 16 per warp
  static constexpr int kBlockN = kStreamRows<D>;     // keys per K/V tile
  static constexpr int kSmemBytes =                  // Q, 2x K, 2x V, 2x key bias
      (kBlockM + 4 * kBlockN) * kPitch<D> * 2 + 2 * kBlockN * int(sizeof(float));
};

// EXTRAS: scores get the bias / relative-position terms and probabilities the dropout mask (times
// 1 / (1 - p)) after they entered the row sums, so the LSE is that of the undropped softmax. VARLEN:
// blockIdx.y is (sequence, head) of packed sequences (Seq); blocks past the sequence's queries exit. VARLEN
// kernels ask for one block per SM (up to 255 registers): left to itself, ptxas caps some at 128 and spills.
template <typename T, int D, bool CAUSAL, bool EXTRAS, bool VARLEN>
__global__ void __launch_bounds__(kThreads, VARLEN ? 1 : 0) attention_fwd_kernel(const AttentionParams p) {
  constexpr int kBlockM = FwdTile<D>::kBlockM, kBlockN = FwdTile<D>::kBlockN, kPitchD = kPitch<D>;
  FASTLM_DYNAMIC_SHARED(T, smem);
  T* s_q = smem;                                   // (kBlockM, kPitchD)
  T* s_k = s_q + kBlockM * kPitchD;                // 2 x (kBlockN, kPitchD)
  T* s_v = s_k + 2 * kBlockN * kPitchD;            // 2 x (kBlockN, kPitchD)
  float* s_kbias = reinterpret_cast<float*>(s_v + 2 * kBlockN * kPitchD);  // 2 x (kBlockN,): 0 or -inf

  const int64_t bh = blockIdx.y, b = bh / p.Hq, h = bh % p.Hq, hkv = h / (p.Hq / p.Hkv);
  const int64_t m0 = int64_t(blockIdx.x) * kBlockM;
  const Seq<VARLEN> seq(p, b);
  if (VARLEN && m0 >= seq.Lq()) return;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const T* q = head_rows<const T>(p.q, p.q_stride, b, h, seq.q0());
  const T* k = head_rows<const T>(p.k, p.k_stride, b, hkv, seq.k0());
  const T* v = head_rows<const T>(p.v, p.v_stride, b, hkv, seq.k0());

  const int n_blocks = visible_key_tiles<kBlockN, kBlockM, CAUSAL>(seq, m0);
  auto load_kv = [&](int n, int buf) {
    load_kv_tile<kBlockN, D>(s_k + buf * kBlockN * kPitchD, s_v + buf * kBlockN * kPitchD, s_kbias + buf * kBlockN, k,
                             v, p, seq, b, int64_t(n) * kBlockN);
  };

  load_tile<kBlockM, D>(s_q, q, p.q_stride[2], m0, seq.Lq());
  stream_start(n_blocks, load_kv);

  float acc[D / 8][4] = {};                       // O accumulators: 8-column tiles of this warp's 16 rows
  float row_max[2] = {-INFINITY, -INFINITY};      // rows g, g+8 (log2 domain, scaled)
  float row_sum[2] = {0.f, 0.f};                  // this lane's partial sums of those rows
  const ScoreRule<CAUSAL, EXTRAS, VARLEN> rule(p, seq, b, h);
  const int64_t row[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};

  for (int n = 0; n < n_blocks; ++n) {
    const int buf = stream_wait(n, n_blocks, load_kv);

    float s[kBlockN / 8][4] = {};  // S = Q K^T for this warp's 16 rows and kBlockN keys
    mma_rows_rows<T, D>(s, s_q + warp * 16 * kPitchD, s_k + buf * kBlockN * kPitchD);

    // Scores (log2 domain, masked: ScoreRule), and the new row maxima (over the 4 lanes of a row).
    const int64_t n0 = int64_t(n) * kBlockN;
    float new_max[2] = {row_max[0], row_max[1]};
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = nt * 8 + 2 * t + e % 2;
        float x = rule.score(s[nt][e], s_kbias[buf * kBlockN + j], row[e / 2], n0 + j);
        s[nt][e] = x;
        new_max[e / 2] = fmaxf(new_max[e / 2], x);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      new_max[r] = fmaxf(new_max[r], __shfl_xor_sync(0xffffffffu, new_max[r], 1));
      new_max[r] = fmaxf(new_max[r], __shfl_xor_sync(0xffffffffu, new_max[r], 2));
      const float base = new_max[r] == -INFINITY ? 0.f : new_max[r];  // rows with no key yet stay at 0
      const float alpha = exp2f(row_max[r] - base);
      row_max[r] = new_max[r];
      row_sum[r] *= alpha;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        acc[dt][2 * r] *= alpha;
        acc[dt][2 * r + 1] *= alpha;
      }
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
        s[nt][2 * r] = exp2f(s[nt][2 * r] - base);
        s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] - base);
        row_sum[r] += s[nt][2 * r] + s[nt][2 * r + 1];
      }
    }
    if constexpr (EXTRAS) {
      const int64_t base = (bh * p.Lq + m0 + warp * 16) * p.Lk + n0;  // dropout offset of this warp's (0, 0)
      apply_keep(p, s, dropout_keep<kBlockN / 8>(p, nonzero_bits(s), base, p.Lk, 1));
    }

    mma_acc_rows<T, D, kBlockN>(acc, s, s_v + buf * kBlockN * kPitchD);  // O += P V
    __syncthreads();  // this buffer is refilled by the next iteration's prefetch
  }
  stream_finish(n_blocks);

  // Epilogue: O / l (zeros for rows with no key, NaN stays NaN), lse = ln(sum exp(scaled scores)).
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[r] = l > 0.f ? 1.f / l : (l == 0.f ? 0.f : l);
    if (t == 0 && row[r] < seq.Lq()) {
      p.lse[seq.row_index(b, h, row[r])] = l > 0.f ? (row_max[r] + log2f(l)) * kLn2 : (l == 0.f ? -INFINITY : l);
    }
  }
  store_rows<T, D>(head_rows<T>(p.o, p.o_stride, b, h, seq.q0()), p.o_stride[2], m0 + warp * 16, seq.Lq(), acc, inv[0],
                   inv[1]);
}

// Instantiates the forward for head dim D over the dtypes, the causal flag, EXTRAS and VARLEN.
template <int D>
cudaError_t launch_fwd_hdim(const AttentionParams& p, cudaStream_t stream) {
  return attention_switch(p, [&]<typename T, bool CAUSAL, bool EXTRAS, bool VARLEN>() {
    auto kernel = attention_fwd_kernel<T, D, CAUSAL, EXTRAS, VARLEN>;
    constexpr int kSmem = FwdTile<D>::kSmemBytes;
    if (const cudaError_t err = allow_smem(kernel, kSmem); err != cudaSuccess) return err;
    const dim3 grid(unsigned((p.Lq + FwdTile<D>::kBlockM - 1) / FwdTile<D>::kBlockM), unsigned(p.B * p.Hq));
    FASTLM_LAUNCH(kernel, grid, kThreads, kSmem, stream)(p);
    return cudaGetLastError();
  });
}

}  // namespace attn
}  // namespace fastlm
