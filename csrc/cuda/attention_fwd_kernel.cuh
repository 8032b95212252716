// The flash-attention forward kernel: one block of 4 warps per 64 queries of one (batch, head); K/V
// tiles stream through shared memory with cp.async double buffering; S = Q K^T and O += P V run on
// mma.sync m16n8k16 (fp16/bf16 in, fp32 accumulators) fed by ldmatrix; the softmax is online in fp32
// (log2 domain) and its log-sum-exp is written for the backward pass. Included by the per-head-dim
// instantiation files attention_fwd_hdim<D>.cu.
#pragma once

#include <cstring>
#include <type_traits>

#include "attention.h"
#include "common.cuh"
#include "tensor_core.cuh"

namespace fastlm {
namespace attn {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockM = 16 * kWarps;  // each warp owns 16 query rows
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int D>
struct FwdTile {
  static constexpr int kBlockN = D <= 64 ? 64 : 32;  // keys per K/V tile
  static constexpr int kStride = D + 8;  // smem row pitch (elements): +16 bytes keeps ldmatrix conflict-free
  static constexpr int kSmemBytes =
      (kBlockM + 4 * kBlockN) * kStride * 2 + 2 * kBlockN * int(sizeof(float));  // Q, 2x K, 2x V, 2x key bias
};

// Two fp32 values as one .f16x2 / .bf16x2 register, `lo` in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T h[2] = {from_float<T>(lo), from_float<T>(hi)};
  uint32_t r;
  memcpy(&r, h, 4);
  return r;
}

template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint32_t b[2] = {b0, b1};
  if constexpr (std::is_same_v<T, __half>) {
    mma_m16n8k16_f16(d, a, b, d);
  } else {
    mma_m16n8k16_bf16(d, a, b, d);
  }
}

// Rows [row0, row0 + ROWS) of a (L, D) matrix with row pitch `stride` into smem (pitch kStride), 16
// bytes per cp.async; rows at or past L are zero-filled.
template <int ROWS, int D, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* gmem, int64_t stride, int64_t row0, int64_t L) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int c = threadIdx.x; c < ROWS * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool valid = row0 + r < L;
    const T* src = valid ? gmem + (row0 + r) * stride + col : gmem;
    cp_async_16_zfill(smem + r * FwdTile<D>::kStride + col, src, valid ? 16 : 0);
  }
}

// Fragment layouts (PTX ISA, mma.m16n8k16), lane = 4 g + t:
//   A 16x16: a[0] (row g, cols 2t, 2t+1), a[1] (row g+8, same cols), a[2], a[3] the same at cols +8
//   B 16x8:  b[0] (rows 2t, 2t+1, col g), b[1] the same at rows +8
//   C 16x8:  c[0], c[1] (row g, cols 2t, 2t+1), c[2], c[3] (row g+8, same cols)
// So the S accumulators of two adjacent 8-key tiles are, once rounded, the A fragment of P for 16 keys.
template <typename T, int D, bool CAUSAL>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const AttentionParams p) {
  using Tile = FwdTile<D>;
  constexpr int kBlockN = Tile::kBlockN, kStride = Tile::kStride;
  FASTLM_DYNAMIC_SHARED(T, smem);
  T* s_q = smem;                                   // (kBlockM, kStride)
  T* s_k = s_q + kBlockM * kStride;                // 2 x (kBlockN, kStride)
  T* s_v = s_k + 2 * kBlockN * kStride;            // 2 x (kBlockN, kStride)
  float* s_kbias = reinterpret_cast<float*>(s_v + 2 * kBlockN * kStride);  // 2 x (kBlockN,): 0 or -inf

  const int64_t bh = blockIdx.y, b = bh / p.Hq, h = bh % p.Hq, hkv = h / (p.Hq / p.Hkv);
  const int64_t m0 = int64_t(blockIdx.x) * kBlockM;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + hkv * p.k_stride[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + hkv * p.v_stride[1];

  // Keys [0, n_end) can be visible to this block's queries; causal rows see j <= i + Lk - Lq.
  int64_t n_end = p.Lk;
  if (CAUSAL) n_end = max(int64_t(0), min(p.Lk, m0 + kBlockM + p.Lk - p.Lq));
  const int n_blocks = int((n_end + kBlockN - 1) / kBlockN);

  auto load_kv = [&](int n, int buf) {
    const int64_t n0 = int64_t(n) * kBlockN;
    load_tile<kBlockN, D>(s_k + buf * kBlockN * kStride, k, p.k_stride[2], n0, p.Lk);
    load_tile<kBlockN, D>(s_v + buf * kBlockN * kStride, v, p.v_stride[2], n0, p.Lk);
    for (int j = threadIdx.x; j < kBlockN; j += kThreads) {
      const int64_t col = n0 + j;
      const bool keep = col < p.Lk && (p.mask == nullptr || p.mask[b * p.mask_stride[0] + col * p.mask_stride[1]]);
      s_kbias[buf * kBlockN + j] = keep ? 0.f : -INFINITY;
    }
  };

  load_tile<kBlockM, D>(s_q, q, p.q_stride[2], m0, p.Lq);
  if (n_blocks > 0) load_kv(0, 0);
  cp_async_commit();

  float acc[D / 8][4] = {};                       // O accumulators: 8-column tiles of this warp's 16 rows
  float row_max[2] = {-INFINITY, -INFINITY};      // rows g, g+8 (log2 domain, scaled)
  float row_sum[2] = {0.f, 0.f};                  // this lane's partial sums of those rows
  const float scale_log2 = p.scale * kLog2e;
  const int64_t row[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};

  for (int n = 0; n < n_blocks; ++n) {
    const int buf = n % 2;
    if (n + 1 < n_blocks) {
      load_kv(n + 1, buf ^ 1);  // the other buffer was last read before the previous iteration's barrier
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* sk = s_k + buf * kBlockN * kStride;
    const T* sv = s_v + buf * kBlockN * kStride;

    // S = Q K^T for this warp's 16 rows and kBlockN keys.
    float s[kBlockN / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];  // ldmatrix x4: matrix j = lane / 8 holds rows 8 (j % 2), cols 8 (j / 2) of the 16x16 tile
      ldmatrix_x4(a, s_q + (warp * 16 + lane % 16) * kStride + kk * 16 + (lane / 16) * 8);
#pragma unroll
      for (int nn = 0; nn < kBlockN / 16; ++nn) {
        uint32_t bk[4];  // K rows are B columns: matrices (keys +0, d +0), (+0, +8), (+8, +0), (+8, +8)
        ldmatrix_x4(bk, sk + (nn * 16 + (lane / 16) * 8 + lane % 8) * kStride + kk * 16 + ((lane / 8) % 2) * 8);
        mma<T>(s[2 * nn], a, bk[0], bk[1]);
        mma<T>(s[2 * nn + 1], a, bk[2], bk[3]);
      }
    }

    // Mask, scale to the log2 domain, and take the new row maxima (over the 4 lanes of a row).
    const int64_t n0 = int64_t(n) * kBlockN;
    float new_max[2] = {row_max[0], row_max[1]};
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = nt * 8 + 2 * t + e % 2;
        float x = s[nt][e] * scale_log2 + s_kbias[buf * kBlockN + j];
        if (CAUSAL && n0 + j > row[e / 2] + p.Lk - p.Lq) x = -INFINITY;
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

    // O += P V: P from the S accumulators (see the layouts above), V^T fragments by ldmatrix .trans.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                             pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) {
        uint32_t bv[4];  // V rows are B rows: transposed matrices (keys +0, d +0), (+8, +0), (+0, +8), (+8, +8)
        ldmatrix_x4_trans(bv, sv + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * kStride + dd * 16 + (lane / 16) * 8);
        mma<T>(acc[2 * dd], a, bv[0], bv[1]);
        mma<T>(acc[2 * dd + 1], a, bv[2], bv[3]);
      }
    }
    __syncthreads();  // this buffer is refilled by the next iteration's prefetch
  }
  if (n_blocks == 0) cp_async_wait<0>();

  // Epilogue: O / l (zeros for rows with no key), and lse = ln(sum exp(scaled scores)).
  T* o = static_cast<T*>(p.o) + b * p.o_stride[0] + h * p.o_stride[1];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (row[r] >= p.Lq) continue;
    const float inv = l > 0.f ? 1.f / l : (l == 0.f ? 0.f : l);  // l NaN stays NaN
    T* out = o + row[r] * p.o_stride[2] + 2 * t;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const uint32_t pair = pack2<T>(acc[dt][2 * r] * inv, acc[dt][2 * r + 1] * inv);
      memcpy(out + dt * 8, &pair, 4);
    }
    if (t == 0) p.lse[bh * p.Lq + row[r]] = l > 0.f ? (row_max[r] + log2f(l)) * kLn2 : (l == 0.f ? -INFINITY : l);
  }
}

template <typename T, int D, bool CAUSAL>
cudaError_t launch_fwd(const AttentionParams& p, cudaStream_t stream) {
  auto kernel = attention_fwd_kernel<T, D, CAUSAL>;
  constexpr int kSmem = FwdTile<D>::kSmemBytes;
  if (kSmem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(unsigned((p.Lq + kBlockM - 1) / kBlockM), unsigned(p.B * p.Hq));
  FASTLM_LAUNCH(kernel, grid, kThreads, kSmem, stream)(p);
  return cudaGetLastError();
}

// Instantiates the forward for head dim D over the dtypes and the causal flag.
template <int D>
cudaError_t launch_fwd_hdim(const AttentionParams& p, cudaStream_t stream) {
  auto by_causal = [&]<typename T>() {
    return p.causal ? launch_fwd<T, D, true>(p, stream) : launch_fwd<T, D, false>(p, stream);
  };
  if (p.dtype == DType::f16) return by_causal.template operator()<__half>();
  if (p.dtype == DType::bf16) return by_causal.template operator()<__nv_bfloat16>();
  return cudaErrorInvalidValue;
}

}  // namespace attn
}  // namespace fastlm
