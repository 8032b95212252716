// Glue for fused attention: checks, output allocation, the params struct, the kernel call (the CUDA
// kernels on their device, the CPU kernels on CPU tensors). Same signature as the Triton launchers
// (kernels/attention.py); the Python side (fastlm/ops/attention.py) validates first, and routes to this
// backend only what the kernels implement, which is checked here again before any launch.
#include "cpu/attention.h"
#include "cuda/attention.h"

#include "glue.h"

namespace fastlm {
namespace {

constexpr const char* kFwd = "attention_fwd";
constexpr const char* kBwd = "attention_bwd";

// `t` (any dims, D last: (B, H, L, D) or varlen (T, H, D)) as the kernels read it: unit stride along D, and for
// the CUDA kernels (cuda: t is on their device) other strides multiples of 8 elements and 16-byte aligned data
// (views of a fused QKV projection usually qualify; anything else is copied).
at::Tensor rows_as_read(const at::Tensor& t, bool cuda) {
  bool ok = t.stride(-1) == 1 || t.size(-1) <= 1;
  if (cuda) {
    ok = t.stride(-1) == 1 && reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0;
    for (int64_t d = 0; d + 1 < t.dim(); ++d) ok = ok && t.stride(d) % 8 == 0;
  }
  return ok ? t : t.contiguous();
}

// The head dims this build has kernels for, in increasing order (csrc/cuda/attention_hdims.h).
std::vector<int64_t> attention_head_dims() {
  std::vector<int64_t> dims;
#define FASTLM_ATTN_APPEND_HEAD_DIM(D) dims.push_back(D);
  FASTLM_ATTN_FOR_EACH_HEAD_DIM(FASTLM_ATTN_APPEND_HEAD_DIM)
#undef FASTLM_ATTN_APPEND_HEAD_DIM
  return dims;
}

// "32, 64, 96, 128, 256": attention_head_dims() as fastlm.attention's messages write it.
std::string head_dims_text() {
  std::string text;
  for (const int64_t d : attention_head_dims()) text += (text.empty() ? "" : ", ") + std::to_string(d);
  return text;
}

// q, k, v as the kernels take them; the messages are fastlm.attention's (fastlm/ops/attention.py), or for
// what only one backend's kernels lack, the reason that routes such calls away from them there.
void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const auto& [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    TORCH_CHECK(t->dim() == 4, op, ": ", name, " must be 4-D (B, H, L, D), got shape ", t->sizes());
  }
  for (const auto& [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": ", name, " dtype ", dtype_name(t->scalar_type()),
                " differs from q dtype ", dtype_name(q.scalar_type()));
    check_same_device(op, *t, name, q, "q");
  }
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape (B, Hkv, Lk, D), got k ", k.sizes(),
              " and v ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0), op, ": k batch size ", k.size(0), " differs from q batch size ", q.size(0),
              " (q ", q.sizes(), ", k ", k.sizes(), ")");
  TORCH_CHECK(k.size(3) == q.size(3), op, ": head dims differ: q has D=", q.size(3), " (shape ", q.sizes(),
              "), k and v have D=", k.size(3), " (shape ", k.sizes(), ")");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": q heads Hq=", q.size(1),
              " must be a multiple of k/v heads Hkv=", k.size(1), " (q ", q.sizes(), ", k ", k.sizes(), ")");
  if (!on_kernel_device(q)) {
    TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                op, ": no attention with ", dtype_name(q.scalar_type()), " (CPU kernels: fp32/fp16/bf16)");
    TORCH_CHECK(q.size(3) <= cpu::kAttentionMaxHeadDim, op, ": no attention with head dim ", q.size(3),
                " (CPU kernels: up to ", cpu::kAttentionMaxHeadDim, ")");
    return;
  }
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op, ": no attention with ",
              dtype_name(q.scalar_type()), " (CUDA kernels: fp16/bf16)");
  TORCH_CHECK(attention_head_dim_built(q.size(3)), op, ": no attention with head dim ", q.size(3),
              " (CUDA kernels: ", head_dims_text(), ")");
  TORCH_CHECK(q.size(0) * q.size(1) <= 65535, op, ": B * Hq must be at most 65535, got ", q.size(0) * q.size(1));
}

// attn_bias, rel_pos (table, bucket) and dropout (seed, dropout_p) into p for the EXTRAS kernels.
void set_extras(AttentionParams& p, const at::Tensor& q, const c10::optional<at::Tensor>& bias,
                const c10::optional<at::Tensor>& table, const c10::optional<at::Tensor>& bucket,
                const at::Tensor& seed, double dropout_p, const char* op) {
  TORCH_CHECK(attention_extras_built() || (!bias.has_value() && !table.has_value() && dropout_p == 0.0), op,
              ": attn_bias, rel_pos and dropout were left out of this build (FASTLM_ATTN_EXTRAS=0)");
  if (bias.has_value()) {
    check_same_device(op, *bias, "attn_bias", q, "q");
    TORCH_CHECK(bias->sizes() == at::IntArrayRef({p.B, p.Hq, p.Lq, p.Lk}), op,
                ": attn_bias must be (B, Hq, Lq, Lk) = (", p.B, ", ", p.Hq, ", ", p.Lq, ", ", p.Lk,
                ") (an expanded view), got ", bias->sizes());
    p.bias_dtype = dtype_of(*bias, op, "attn_bias");
    p.bias = bias->data_ptr();
    for (int d = 0; d < 4; ++d) p.bias_stride[d] = bias->stride(d);
  }
  TORCH_CHECK(table.has_value() == bucket.has_value(), op, ": rel_pos needs both table and bucket, got ",
              table.has_value() ? "no bucket" : "no table");
  if (table.has_value()) {
    check_same_device(op, *table, "rel_pos table", q, "q");
    check_same_device(op, *bucket, "bucket", q, "q");
    TORCH_CHECK(table->dim() == 2 && table->size(0) > 0 && table->size(1) == p.Hq, op,
                ": rel_pos table must be (num_buckets, Hq=", p.Hq, "), got ", table->sizes());
    p.table_dtype = dtype_of(*table, op, "rel_pos table");
    const int64_t diagonals = p.Lq + p.Lk - 1;
    TORCH_CHECK(bucket->scalar_type() == at::kInt && bucket->dim() == 1 && bucket->size(0) == diagonals &&
                    bucket->is_contiguous(),
                op, ": bucket must be a contiguous int32 (Lq + Lk - 1,) = (", diagonals, ",) tensor, got ",
                bucket->scalar_type(), " ", bucket->sizes(), " with strides ", bucket->strides());
    // Reading the range back would be a host sync on a GPU: there the kernels clamp out-of-range entries
    // instead (never an out-of-bounds read), and fastlm.attention only builds in-range buckets.
    if (diagonals > 0 && bucket->is_cpu()) {
      const auto [lo, hi] = at::aminmax(*bucket);
      TORCH_CHECK(lo.item<int32_t>() >= 0 && hi.item<int32_t>() < table->size(0), op,
                  ": bucket entries must lie in [0, num_buckets=", table->size(0), "), got [", lo.item<int32_t>(),
                  ", ", hi.item<int32_t>(), "]");
    }
    p.table = table->data_ptr();
    p.table_stride[0] = table->stride(0);
    p.table_stride[1] = table->stride(1);
    p.bucket = bucket->data_ptr<int32_t>();
    p.num_buckets = table->size(0);
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p > 0.0) {
    TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.is_cpu(), op,
                ": seed must be a (1,) int64 CPU tensor, got ", seed.scalar_type(), " ", seed.sizes(), " on ",
                seed.device());
    p.seed = static_cast<uint64_t>(seed.item<int64_t>());
    p.dropout_p = static_cast<float>(dropout_p);
  }
}

void set_mask(AttentionParams& p, const c10::optional<at::Tensor>& mask, const at::Tensor& q, const char* op) {
  if (!mask.has_value()) return;
  TORCH_CHECK(mask->scalar_type() == at::kBool, op, ": key_padding_mask must be a bool tensor (B, Lk) = (", p.B, ", ",
              p.Lk, "), got dtype ", dtype_name(mask->scalar_type()));
  TORCH_CHECK(mask->dim() == 2 && mask->size(0) == p.B && mask->size(1) == p.Lk, op,
              ": key_padding_mask must have shape (B, Lk) = (", p.B, ", ", p.Lk, "), got ", mask->sizes());
  check_same_device(op, *mask, "key_padding_mask", q, "q");
  p.mask = reinterpret_cast<const uint8_t*>(mask->data_ptr<bool>());
  p.mask_stride[0] = mask->stride(0);
  p.mask_stride[1] = mask->stride(1);
}

// The rel_pos table gradient of a backward call: the partials the kernels add to, zero-filled, (B, Hq, slabs,
// num_buckets) with a slab per kAttentionSlab queries from the CUDA kernels (cuda) and one per head from the CPU
// kernels, empty when the gradient is not needed; and their sum, (num_buckets, Hq) in a fixed order.
class DtablePartials {
 public:
  DtablePartials(const AttentionParams& p, bool needed, bool cuda, const at::TensorOptions& fp32)
      : needed_(needed),
        partial_(at::zeros(needed ? std::vector<int64_t>{p.B, p.Hq, slabs(p, cuda), p.num_buckets}
                                  : std::vector<int64_t>{0},
                           fp32)) {}

  float* data() { return needed_ ? partial_.data_ptr<float>() : nullptr; }  // for p.dtable

  // (B, Hq, slabs, num_buckets) -> (num_buckets, Hq); torch's sum has a fixed order. Empty when not needed.
  at::Tensor sum() const { return needed_ ? partial_.sum(at::IntArrayRef{0, 2}).t().contiguous() : partial_; }

 private:
  static int64_t slabs(const AttentionParams& p, bool cuda) {
    return cuda ? (p.Lq + kAttentionSlab - 1) / kAttentionSlab : 1;
  }

  bool needed_;
  at::Tensor partial_;
};

void set_strides(int64_t (&dst)[3], const at::Tensor& t) {
  for (int d = 0; d < 3; ++d) dst[d] = t.stride(d);
}

AttentionParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask, bool causal, double scale, const char* op) {
  AttentionParams p;
  p.B = q.size(0);
  p.Hq = q.size(1);
  p.Lq = q.size(2);
  p.head_dim = static_cast<int>(q.size(3));
  p.Hkv = k.size(1);
  p.Lk = k.size(2);
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.dtype = dtype_of(q, op, "q");
  set_mask(p, mask, q, op);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  set_strides(p.q_stride, q);
  set_strides(p.k_stride, k);
  set_strides(p.v_stride, v);
  return p;
}

std::vector<at::Tensor> attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                      const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mask,
                                      const c10::optional<at::Tensor>& table,
                                      const c10::optional<at::Tensor>& bucket, const at::Tensor& seed, bool causal,
                                      double scale, double dropout_p) {
  const KernelDevice device(q_in);
  check_qkv(kFwd, q_in, k_in, v_in);
  const bool cuda = on_kernel_device(q_in);
  const at::Tensor q = rows_as_read(q_in, cuda), k = rows_as_read(k_in, cuda), v = rows_as_read(v_in, cuda);
  AttentionParams p = make_params(q, k, v, mask, causal, scale, kFwd);
  set_extras(p, q, bias, table, bucket, seed, dropout_p, kFwd);
  at::Tensor o = new_output({p.B, p.Hq, p.Lq, p.head_dim}, q.options());
  at::Tensor lse = new_output({p.B, p.Hq, p.Lq}, q.options().dtype(at::kFloat));
  if (lse.numel() == 0) return {o, lse};  // (an empty head dim still has an LSE: that of the bias)
  if (p.Lk == 0) return {o.zero_(), lse.fill_(-std::numeric_limits<float>::infinity())};  // no key: zeros
  p.o = o.data_ptr();
  p.lse = lse.data_ptr<float>();
  set_strides(p.o_stride, o);
  device.run(kFwd, q, p, FASTLM_CUDA_KERNEL(launch_attention_fwd), FASTLM_CPU_KERNEL(cpu::attention_fwd));
  return {o, lse};
}

std::vector<at::Tensor> attention_bwd(const at::Tensor& do_in, const at::Tensor& q_in, const at::Tensor& k_in,
                                      const at::Tensor& v_in, const at::Tensor& o_in, const at::Tensor& lse_in,
                                      const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mask,
                                      const c10::optional<at::Tensor>& table,
                                      const c10::optional<at::Tensor>& bucket, const at::Tensor& seed, bool causal,
                                      double scale, double dropout_p, bool need_dbias, bool need_dtable) {
  const KernelDevice device(q_in);
  check_qkv(kBwd, q_in, k_in, v_in);
  TORCH_CHECK(bias.has_value() || !need_dbias, kBwd, ": need_dbias without attn_bias");
  TORCH_CHECK(table.has_value() || !need_dtable, kBwd, ": need_dtable without a rel_pos table");
  for (const auto& [t, name] : {std::pair{&do_in, "do"}, std::pair{&o_in, "o"}}) {
    TORCH_CHECK(t->sizes() == q_in.sizes() && t->scalar_type() == q_in.scalar_type(), kBwd, ": ", name,
                " must have q's shape ", q_in.sizes(), " and dtype ", q_in.scalar_type(), ", got ", t->sizes(), " ",
                t->scalar_type());
    check_same_device(kBwd, *t, name, q_in, "q");
  }
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.sizes() == q_in.sizes().slice(0, 3), kBwd,
              ": lse must be float32 (B, Hq, Lq) = ", q_in.sizes().slice(0, 3), ", got ", lse_in.scalar_type(), " ",
              lse_in.sizes());
  check_same_device(kBwd, lse_in, "lse", q_in, "q");
  const bool cuda = on_kernel_device(q_in);
  const at::Tensor q = rows_as_read(q_in, cuda), k = rows_as_read(k_in, cuda), v = rows_as_read(v_in, cuda);
  const at::Tensor dout = rows_as_read(do_in, cuda), o = rows_as_read(o_in, cuda), lse = lse_in.contiguous();
  AttentionParams p = make_params(q, k, v, mask, causal, scale, kBwd);
  set_extras(p, q, bias, table, bucket, seed, dropout_p, kBwd);
  at::Tensor dq = new_output(q.sizes(), q.options());
  at::Tensor dk = new_output(k.sizes(), k.options());
  at::Tensor dv = new_output(v.sizes(), v.options());
  const at::TensorOptions fp32 = q.options().dtype(at::kFloat);
  // zero-filled: the kernels skip the tiles above the causal diagonal
  at::Tensor dbias = at::zeros(need_dbias ? std::vector<int64_t>{p.B, p.Hq, p.Lq, p.Lk} : std::vector<int64_t>{0},
                               fp32);
  DtablePartials dtable(p, need_dtable, cuda, fp32);
  if (q.numel() == 0 || k.numel() == 0) return {dq.zero_(), dk.zero_(), dv.zero_(), dbias, dtable.sum()};
  at::Tensor delta = at::empty({p.B, p.Hq, p.Lq}, q.options().dtype(at::kFloat));
  at::Tensor lse_log2 = at::empty({p.B, p.Hq, p.Lq}, q.options().dtype(at::kFloat));
  p.o = o.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.dout = dout.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.delta = delta.data_ptr<float>();
  p.lse_log2 = lse_log2.data_ptr<float>();
  set_strides(p.o_stride, o);
  set_strides(p.do_stride, dout);
  set_strides(p.dq_stride, dq);
  set_strides(p.dk_stride, dk);
  set_strides(p.dv_stride, dv);
  if (need_dbias) p.dbias = dbias.data_ptr<float>();
  p.dtable = dtable.data();
  device.run(kBwd, q, p, FASTLM_CUDA_KERNEL(launch_attention_bwd), FASTLM_CPU_KERNEL(cpu::attention_bwd));
  return {dq, dk, dv, dbias, dtable.sum()};
}

// Varlen attention: the CPU kernels on CPU tensors, the CUDA kernels (their VARLEN variants) on their device.
constexpr const char* kVarlenFwd = "varlen_attention_fwd";
constexpr const char* kVarlenBwd = "varlen_attention_bwd";

// q (Tq, Hq, D), k, v (Tk, Hkv, D) and cu_seqlens as the kernels take them, checked before any read. The prefix
// sums address the rows: where they live on the host (CPU tensors, and the emulator's) their values are checked
// here; on a GPU that would be a host sync, so there they are the caller's contract (fastlm.varlen_attention
// checks them under FASTLM_DEBUG_CHECKS=1).
void check_varlen(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q, int64_t max_k) {
  for (const auto& [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    TORCH_CHECK(t->dim() == 3, op, ": ", name, " must be 3-D (T, H, D), got shape ", t->sizes());
  }
  // (T, H, D) -> (1, H, T, D) views: the shape checks of attention
  check_qkv(op, q.permute({1, 0, 2}).unsqueeze(0), k.permute({1, 0, 2}).unsqueeze(0), v.permute({1, 0, 2}).unsqueeze(0));
  TORCH_CHECK(!on_kernel_device(q) || attention_extras_built(), op,
              ": the CUDA varlen kernels were left out of this build (FASTLM_ATTN_EXTRAS=0)");
  TORCH_CHECK(!on_kernel_device(q) || (cu_q.numel() - 1) * q.size(1) <= 65535, op,
              ": B * Hq must be at most 65535, got ", (cu_q.numel() - 1) * q.size(1));
  for (const auto& [cu, name, rows, longest] :
       {std::tuple{&cu_q, "cu_seqlens_q", q.size(0), max_q}, std::tuple{&cu_k, "cu_seqlens_k", k.size(0), max_k}}) {
    TORCH_CHECK(cu->scalar_type() == at::kInt && cu->dim() == 1 && cu->numel() == cu_q.numel() && cu->numel() >= 1 &&
                    cu->is_contiguous(),
                op, ": ", name, " must be a contiguous int32 (B + 1,) tensor like cu_seqlens_q, got ",
                cu->scalar_type(), " ", cu->sizes());
    check_same_device(op, *cu, name, q, "q");
    if (!cu->is_cpu()) continue;
    const int32_t* starts = cu->data_ptr<int32_t>();
    TORCH_CHECK(starts[0] == 0 && starts[cu->numel() - 1] == rows, op, ": ", name,
                " must start at 0 and end at the token count ", rows, ", got ", starts[0], " and ",
                starts[cu->numel() - 1]);
    for (int64_t b = 0; b + 1 < cu->numel(); ++b) {
      const int64_t length = starts[b + 1] - starts[b];
      TORCH_CHECK(length >= 0 && length <= longest, op, ": ", name, " gives sequence ", b, " a length of ", length,
                  " (it must lie in [0, max_seqlen=", longest, "])");
    }
  }
}

// The params of a varlen call: rows packed along dim 0 of every (T, H, D) tensor (b strides 0).
void set_varlen_strides(int64_t (&dst)[3], const at::Tensor& t) {
  dst[0] = 0;
  dst[1] = t.stride(1);
  dst[2] = t.stride(0);
}

AttentionParams make_varlen_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q, int64_t max_k,
                                   bool causal, double scale) {
  AttentionParams p;
  p.B = cu_q.numel() - 1;
  p.Hq = q.size(1);
  p.Hkv = k.size(1);
  p.Lq = max_q;
  p.Lk = max_k;
  p.head_dim = static_cast<int>(q.size(2));
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.dtype = dtype_of(q, kVarlenFwd, "q");
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  set_varlen_strides(p.q_stride, q);
  set_varlen_strides(p.k_stride, k);
  set_varlen_strides(p.v_stride, v);
  p.cu_seqlens_q = cu_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_k.data_ptr<int32_t>();
  p.total_q = q.size(0);
  return p;
}

std::vector<at::Tensor> varlen_attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                             const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q,
                                             int64_t max_k, const c10::optional<at::Tensor>& table,
                                             const c10::optional<at::Tensor>& bucket, const at::Tensor& seed,
                                             bool causal, double scale, double dropout_p) {
  const KernelDevice device(q_in);
  check_varlen(kVarlenFwd, q_in, k_in, v_in, cu_q, cu_k, max_q, max_k);
  const bool cuda = on_kernel_device(q_in);
  const at::Tensor q = rows_as_read(q_in, cuda), k = rows_as_read(k_in, cuda), v = rows_as_read(v_in, cuda);
  AttentionParams p = make_varlen_params(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale);
  set_extras(p, q, c10::nullopt, table, bucket, seed, dropout_p, kVarlenFwd);
  at::Tensor o = new_output(q.sizes(), q.options());
  at::Tensor lse = new_output({p.Hq, p.total_q}, q.options().dtype(at::kFloat));
  if (lse.numel() == 0 || p.B == 0) return {o, lse};
  p.o = o.data_ptr();
  p.lse = lse.data_ptr<float>();
  set_varlen_strides(p.o_stride, o);
  device.run(kVarlenFwd, q, p, FASTLM_CUDA_KERNEL(launch_attention_fwd), FASTLM_CPU_KERNEL(cpu::attention_fwd));
  return {o, lse};
}

std::vector<at::Tensor> varlen_attention_bwd(const at::Tensor& do_in, const at::Tensor& q_in, const at::Tensor& k_in,
                                             const at::Tensor& v_in, const at::Tensor& o_in, const at::Tensor& lse_in,
                                             const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q,
                                             int64_t max_k, const c10::optional<at::Tensor>& table,
                                             const c10::optional<at::Tensor>& bucket, const at::Tensor& seed,
                                             bool causal, double scale, double dropout_p, bool need_dtable) {
  const KernelDevice device(q_in);
  check_varlen(kVarlenBwd, q_in, k_in, v_in, cu_q, cu_k, max_q, max_k);
  TORCH_CHECK(table.has_value() || !need_dtable, kVarlenBwd, ": need_dtable without a rel_pos table");
  for (const auto& [t, name] : {std::pair{&do_in, "do"}, std::pair{&o_in, "o"}}) {
    TORCH_CHECK(t->sizes() == q_in.sizes() && t->scalar_type() == q_in.scalar_type(), kVarlenBwd, ": ", name,
                " must have q's shape ", q_in.sizes(), " and dtype ", q_in.scalar_type(), ", got ", t->sizes(), " ",
                t->scalar_type());
    check_same_device(kVarlenBwd, *t, name, q_in, "q");
  }
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.sizes() == at::IntArrayRef({q_in.size(1), q_in.size(0)}),
              kVarlenBwd, ": lse must be float32 (Hq, Tq) = (", q_in.size(1), ", ", q_in.size(0), "), got ",
              lse_in.scalar_type(), " ", lse_in.sizes());
  check_same_device(kVarlenBwd, lse_in, "lse", q_in, "q");
  const bool cuda = on_kernel_device(q_in);
  const at::Tensor q = rows_as_read(q_in, cuda), k = rows_as_read(k_in, cuda), v = rows_as_read(v_in, cuda);
  const at::Tensor dout = rows_as_read(do_in, cuda), o = rows_as_read(o_in, cuda), lse = lse_in.contiguous();
  AttentionParams p = make_varlen_params(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale);
  set_extras(p, q, c10::nullopt, table, bucket, seed, dropout_p, kVarlenBwd);
  at::Tensor dq = new_output(q.sizes(), q.options());
  at::Tensor dk = new_output(k.sizes(), k.options());
  at::Tensor dv = new_output(v.sizes(), v.options());
  DtablePartials dtable(p, need_dtable, cuda, q.options().dtype(at::kFloat));
  if (q.numel() == 0 || k.numel() == 0 || p.B == 0) return {dq.zero_(), dk.zero_(), dv.zero_(), dtable.sum()};
  // the CUDA kernels' per-row scratch, (Hq, Tq) like lse: delta = rowsum(dO * O) and lse * log2(e)
  at::Tensor delta, lse_log2;
  if (cuda) {
    delta = at::empty({p.Hq, p.total_q}, q.options().dtype(at::kFloat));
    lse_log2 = at::empty({p.Hq, p.total_q}, q.options().dtype(at::kFloat));
    p.delta = delta.data_ptr<float>();
    p.lse_log2 = lse_log2.data_ptr<float>();
  }
  p.o = const_cast<void*>(o.data_ptr());
  p.lse = lse.data_ptr<float>();
  p.dout = dout.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  set_varlen_strides(p.o_stride, o);
  set_varlen_strides(p.do_stride, dout);
  set_varlen_strides(p.dq_stride, dq);
  set_varlen_strides(p.dk_stride, dk);
  set_varlen_strides(p.dv_stride, dv);
  p.dtable = dtable.data();
  device.run(kVarlenBwd, q, p, FASTLM_CUDA_KERNEL(launch_attention_bwd), FASTLM_CPU_KERNEL(cpu::attention_bwd));
  return {dq, dk, dv, dtable.sum()};
}

}  // namespace

void bind_attention(pybind11::module_& m) {
  m.def("attention_head_dims", &attention_head_dims,
        "The head dims this build has CUDA attention kernels for, in increasing order (csrc/cuda/generate_kernels.py's "
        "HEAD_DIMS less those setup.py's FASTLM_ATTN_HDIMS left out)");
  m.def("attention_fwd", &attention_fwd,
        "Fused attention forward (CUDA kernels: fp16/bf16, a head dim of attention_head_dims(); CPU kernels: fp32/fp16/bf16, head "
        "dims up to 256; bias (B, Hq, Lq, Lk) any strides, rel_pos table "
        "(num_buckets, Hq) with bucket (Lq + Lk - 1,) int32, dropout from seed (1,) int64 CPU, all optional): "
        "returns [o (B, Hq, Lq, D), lse (B, Hq, Lq) fp32]",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("bias"), pybind11::arg("mask"),
        pybind11::arg("table"), pybind11::arg("bucket"), pybind11::arg("seed"), pybind11::arg("causal"),
        pybind11::arg("scale"), pybind11::arg("dropout_p"));
  m.def("attention_bwd", &attention_bwd,
        "Fused attention backward (deterministic): returns [dq, dk, dv, dbias, dtable]; dbias (B, Hq, Lq, Lk) "
        "fp32, the gradient of the expanded bias, when need_dbias, dtable (num_buckets, Hq) fp32 when need_dtable, "
        "else empty",
        pybind11::arg("do"), pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("o"),
        pybind11::arg("lse"), pybind11::arg("bias"), pybind11::arg("mask"), pybind11::arg("table"),
        pybind11::arg("bucket"), pybind11::arg("seed"), pybind11::arg("causal"), pybind11::arg("scale"),
        pybind11::arg("dropout_p"), pybind11::arg("need_dbias"), pybind11::arg("need_dtable"));
  m.def("varlen_attention_fwd", &varlen_attention_fwd,
        "Varlen attention forward (the dtypes and head dims of attention_fwd): q (Tq, Hq, D), k/v (Tk, Hkv, D), "
        "cu_seqlens (B + 1,) int32 on q's device, the longest lengths, rel_pos table (num_buckets, Hq) with bucket "
        "(max_q + max_k - 1,) int32, dropout from seed: returns [o (Tq, Hq, D), lse (Hq, Tq) fp32]",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("cu_seqlens_q"),
        pybind11::arg("cu_seqlens_k"), pybind11::arg("max_seqlen_q"), pybind11::arg("max_seqlen_k"),
        pybind11::arg("table"), pybind11::arg("bucket"), pybind11::arg("seed"), pybind11::arg("causal"),
        pybind11::arg("scale"), pybind11::arg("dropout_p"));
  m.def("varlen_attention_bwd", &varlen_attention_bwd,
        "Varlen attention backward (deterministic): returns [dq, dk, dv, dtable]; dtable (num_buckets, Hq) fp32 when "
        "need_dtable, else empty",
        pybind11::arg("do"), pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("o"),
        pybind11::arg("lse"), pybind11::arg("cu_seqlens_q"), pybind11::arg("cu_seqlens_k"),
        pybind11::arg("max_seqlen_q"), pybind11::arg("max_seqlen_k"), pybind11::arg("table"),
        pybind11::arg("bucket"), pybind11::arg("seed"), pybind11::arg("causal"), pybind11::arg("scale"),
        pybind11::arg("dropout_p"), pybind11::arg("need_dtable"));
}

}  // namespace fastlm
