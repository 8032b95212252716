// Parameters of the fused attention kernels: plain pointers, sizes and strides, shared by the CUDA
// launchers (attention*.cu) and the glue (csrc/attention.cpp) that fills them.
#pragma once
#include <cstdint>

#include "attention_hdims.h"
#include "dtype.h"
#if defined(__CUDACC__) || defined(FASTLM_WITH_CUDA) || defined(FASTLM_EMU)
#include "runtime.h"
#endif

namespace fastlm {

constexpr int64_t kAttentionSlab = 16;  // queries per partial of the table gradient (dtable below)

// q, o: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D), each with unit stride along D and the other strides
// (elements) multiples of 8 on 16-byte aligned data, so that rows move in 16-byte cp.async copies.
// dtype is f16 or bf16; lse is fp32 (B, Hq, Lq) contiguous, natural log, -inf for rows with no key.
struct AttentionParams {
  int64_t B = 0, Hq = 0, Hkv = 0, Lq = 0, Lk = 0;
  int head_dim = 0;
  float scale = 0.f;
  bool causal = false;  // key j visible to query i iff j <= i + (Lk - Lq)
  DType dtype = DType::f16;

  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  float* lse = nullptr;
  const uint8_t* mask = nullptr;  // (B, Lk) bool as bytes, 1 = attend, or null
  int64_t q_stride[3] = {0, 0, 0}, k_stride[3] = {0, 0, 0}, v_stride[3] = {0, 0, 0};  // (b, h, l)
  int64_t o_stride[3] = {0, 0, 0};
  int64_t mask_stride[2] = {0, 0};  // (b, j)

  // Score extras, read only by the kernels instantiated with EXTRAS (has_extras()): an additive bias
  // (B, Hq, Lq, Lk) with any strides (0 along broadcast dims); T5's relative-position bias table
  // (num_buckets, Hq), any strides, read at bucket[j - i + Lq - 1] (int32, Lq + Lk - 1 entries, each in
  // [0, num_buckets)); dropout of the probabilities with Philox (philox.cuh) at offset
  // ((b * Hq + h) * Lq + i) * Lk + j, kept iff uniform >= dropout_p.
  const void* bias = nullptr;
  DType bias_dtype = DType::f32;
  int64_t bias_stride[4] = {0, 0, 0, 0};  // (b, h, i, j)
  const void* table = nullptr;
  DType table_dtype = DType::f32;
  int64_t table_stride[2] = {0, 0};  // (bucket, h)
  const int32_t* bucket = nullptr;
  int64_t num_buckets = 0;
  float dropout_p = 0.f;
  uint64_t seed = 0;

  // backward: o and lse (above) are the forward's; dq, dk, dv have the shapes, dtype and layout rules
  // of q, k, v; delta and lse_log2 are (B, Hq, Lq) fp32 scratch written by the preprocess kernel
  const void* dout = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  float* delta = nullptr;     // rowsum(dO * O)
  float* lse_log2 = nullptr;  // lse * log2(e), +inf for rows with no key (their P is 0)
  int64_t do_stride[3] = {0, 0, 0}, dq_stride[3] = {0, 0, 0}, dk_stride[3] = {0, 0, 0}, dv_stride[3] = {0, 0, 0};
  // Optional gradients of the score extras, written by the dQ kernel, fp32, contiguous, zero-filled by
  // the caller: dbias (B, Hq, Lq, Lk) = dS, the gradient of the expanded bias (masked entries 0);
  // dtable (B, Hq, ceil(Lq / kAttentionSlab), num_buckets): partial sums of dS per bucket, one per slab
  // of kAttentionSlab queries (the 16 rows of one warp of the dQ kernel), summed by the caller.
  float* dbias = nullptr;
  float* dtable = nullptr;

  // Varlen: B sequences packed along the rows of q, k, v, o, dout, dq, dk, dv (their b strides are 0);
  // sequence b's queries are rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]), its keys likewise (int32 on the
  // kernels' device); Lq and Lk are the longest lengths (they fix the dropout offsets and the rel_pos
  // buckets: bucket holds the relative positions 1 - Lk .. Lq - 1); lse, delta and lse_log2 are
  // (Hq, total_q). No mask, no bias.
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  int64_t total_q = 0;

  bool has_extras() const { return bias != nullptr || table != nullptr || dropout_p > 0.f; }
  bool varlen() const { return cu_seqlens_q != nullptr; }
};

// Whether this build has kernels for head dim D: one of generate_kernels.py's HEAD_DIMS that setup.py's
// FASTLM_ATTN_HDIMS kept (attention_hdims.h).
constexpr bool attention_head_dim_built(int64_t D) {
#define FASTLM_ATTN_IS_HEAD_DIM(DIM) \
  if (D == DIM) return true;
  FASTLM_ATTN_FOR_EACH_HEAD_DIM(FASTLM_ATTN_IS_HEAD_DIM)
#undef FASTLM_ATTN_IS_HEAD_DIM
  return false;
}

// Whether this build has the EXTRAS kernels (attn_bias, rel_pos, dropout; varlen calls run them too):
// setup.py's FASTLM_ATTN_EXTRAS=0 drops them for a quick developer build, defining FASTLM_ATTN_NO_EXTRAS (two
// thirds of the attention kernels).
constexpr bool attention_extras_built() {
#if defined(FASTLM_ATTN_NO_EXTRAS)
  return false;
#else
  return true;
#endif
}

#if defined(__CUDACC__) || defined(FASTLM_WITH_CUDA) || defined(FASTLM_EMU)
// Launchers (attention.cu). Each returns the launch's cudaGetLastError().
cudaError_t launch_attention_fwd(const AttentionParams& p, cudaStream_t stream);
cudaError_t launch_attention_bwd(const AttentionParams& p, cudaStream_t stream);  // preprocess, dK/dV, dQ
cudaError_t launch_attention_bwd_preprocess(const AttentionParams& p, cudaStream_t stream);
template <int D>
cudaError_t launch_attention_fwd_hdim(const AttentionParams& p, cudaStream_t stream);  // attention_fwd_hdim*.cu
template <int D>
cudaError_t launch_attention_bwd_hdim(const AttentionParams& p, cudaStream_t stream);  // attention_bwd_hdim*.cu
#endif

}  // namespace fastlm
