// Glue for fused attention: checks, output allocation, the params struct, the kernel call. Same
// signature as the Triton launchers (kernels/attention.py); the Python side (fastlm/ops/attention.py)
// validates first, and routes to this backend only what the kernels implement, which is checked here
// again before any launch.
#include "cuda/attention.h"

#include "glue.h"

namespace fastlm {
namespace {

constexpr const char* kFwd = "attention_fwd";
constexpr const char* kBwd = "attention_bwd";

// `t` as the kernels read it: unit stride along D, other strides multiples of 8 elements, 16-byte
// aligned data (views of a fused QKV projection usually qualify; anything else is copied).
at::Tensor rows_of_16_bytes(const at::Tensor& t) {
  bool ok = t.stride(3) == 1 && reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3; ++d) ok = ok && t.stride(d) % 8 == 0;
  return ok ? t : t.contiguous();
}

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be 4-D (B, H, L, D), got q ",
              q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape (B, Hkv, Lk, D), got k ", k.sizes(),
              " and v ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), op, ": k and v must have shape (B=", q.size(0),
              ", Hkv, Lk, D=", q.size(3), "), got ", k.sizes());
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": q heads Hq=", q.size(1),
              " must be a multiple of k/v heads Hkv=", k.size(1));
  FASTLM_CHECK_SAME_DEVICE(op, k, "k", q);
  FASTLM_CHECK_SAME_DEVICE(op, v, "v", q);
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
              ": q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              ": the CUDA attention kernels take float16 or bfloat16 (tensor cores), got ", q.scalar_type());
  const int64_t D = q.size(3);
  TORCH_CHECK(D == 32 || D == 64 || D == 96 || D == 128 || D == 256, op,
              ": the CUDA attention kernels take head dim 32, 64, 96, 128 or 256, got ", D, " (q ", q.sizes(), ")");
  TORCH_CHECK(attention_head_dim_built(D), op, ": head dim ", D, " was left out of this build (FASTLM_ATTN_HDIMS)");
  TORCH_CHECK(q.size(0) * q.size(1) <= 65535, op, ": B * Hq must be at most 65535, got ", q.size(0) * q.size(1));
}

void check_unsupported(const char* op, const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& table,
                       double dropout_p) {
  TORCH_CHECK(!bias.has_value(), op, ": attn_bias is not implemented by the CUDA attention kernels "
              "(use the triton or reference backend)");
  TORCH_CHECK(!table.has_value(), op, ": rel_pos is not implemented by the CUDA attention kernels "
              "(use the triton or reference backend)");
  TORCH_CHECK(dropout_p == 0.0, op, ": dropout is not implemented by the CUDA attention kernels "
              "(use the triton or reference backend), got dropout_p=", dropout_p);
}

void set_mask(AttentionParams& p, const c10::optional<at::Tensor>& mask, const at::Tensor& q, const char* op) {
  if (!mask.has_value()) return;
  FASTLM_CHECK_SAME_DEVICE(op, *mask, "key_padding_mask", q);
  TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 2 && mask->size(0) == p.B && mask->size(1) == p.Lk,
              op, ": key_padding_mask must be a bool (B, Lk) = (", p.B, ", ", p.Lk, ") tensor, got ",
              mask->scalar_type(), " ", mask->sizes());
  p.mask = reinterpret_cast<const uint8_t*>(mask->data_ptr<bool>());
  p.mask_stride[0] = mask->stride(0);
  p.mask_stride[1] = mask->stride(1);
}

void set_strides(int64_t (&dst)[3], const at::Tensor& t) {
  for (int d = 0; d < 3; ++d) dst[d] = t.stride(d);
}

void run_fwd(const AttentionParams& p, const at::Tensor& q) {
#if defined(FASTLM_HAS_CUDA_KERNELS)
  if (on_kernel_device(q)) {
    check_launch(launch_attention_fwd(p, current_stream()), "attention forward kernel launch");
    return;
  }
#endif
  TORCH_CHECK(false, kFwd, ": this build of fastlm has no attention kernels for ", q.device());
}

void run_bwd(const AttentionParams& p, const at::Tensor& q) {
#if defined(FASTLM_HAS_CUDA_KERNELS)
  if (on_kernel_device(q)) {
    check_launch(launch_attention_bwd(p, current_stream()), "attention backward kernel launch");
    return;
  }
#endif
  TORCH_CHECK(false, kBwd, ": this build of fastlm has no attention kernels for ", q.device());
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
  (void)bucket;
  (void)seed;
  check_qkv(kFwd, q_in, k_in, v_in);
  check_unsupported(kFwd, bias, table, dropout_p);
  const at::Tensor q = rows_of_16_bytes(q_in), k = rows_of_16_bytes(k_in), v = rows_of_16_bytes(v_in);
  AttentionParams p = make_params(q, k, v, mask, causal, scale, kFwd);
  at::Tensor o = new_output({p.B, p.Hq, p.Lq, p.head_dim}, q.options());
  at::Tensor lse = new_output({p.B, p.Hq, p.Lq}, q.options().dtype(at::kFloat));
  if (o.numel() == 0) return {o, lse};
  if (p.Lk == 0) return {o.zero_(), lse.fill_(-std::numeric_limits<float>::infinity())};  // no key: zeros
  p.o = o.data_ptr();
  p.lse = lse.data_ptr<float>();
  set_strides(p.o_stride, o);
  run_fwd(p, q);
  return {o, lse};
}

std::vector<at::Tensor> attention_bwd(const at::Tensor& do_in, const at::Tensor& q_in, const at::Tensor& k_in,
                                      const at::Tensor& v_in, const at::Tensor& o_in, const at::Tensor& lse_in,
                                      const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mask,
                                      const c10::optional<at::Tensor>& table,
                                      const c10::optional<at::Tensor>& bucket, const at::Tensor& seed, bool causal,
                                      double scale, double dropout_p, bool need_dbias, bool need_dtable) {
  (void)bucket;
  (void)seed;
  check_qkv(kBwd, q_in, k_in, v_in);
  check_unsupported(kBwd, bias, table, dropout_p);
  TORCH_CHECK(!need_dbias && !need_dtable, kBwd, ": the CUDA attention kernels compute no attn_bias / rel_pos gradient");
  for (const auto& [t, name] : {std::pair{&do_in, "do"}, std::pair{&o_in, "o"}}) {
    TORCH_CHECK(t->sizes() == q_in.sizes() && t->scalar_type() == q_in.scalar_type(), kBwd, ": ", name,
                " must have q's shape ", q_in.sizes(), " and dtype ", q_in.scalar_type(), ", got ", t->sizes(), " ",
                t->scalar_type());
    FASTLM_CHECK_SAME_DEVICE(kBwd, *t, name, q_in);
  }
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.sizes() == q_in.sizes().slice(0, 3), kBwd,
              ": lse must be float32 (B, Hq, Lq) = ", q_in.sizes().slice(0, 3), ", got ", lse_in.scalar_type(), " ",
              lse_in.sizes());
  FASTLM_CHECK_SAME_DEVICE(kBwd, lse_in, "lse", q_in);
  const at::Tensor q = rows_of_16_bytes(q_in), k = rows_of_16_bytes(k_in), v = rows_of_16_bytes(v_in);
  const at::Tensor dout = rows_of_16_bytes(do_in), o = rows_of_16_bytes(o_in), lse = lse_in.contiguous();
  AttentionParams p = make_params(q, k, v, mask, causal, scale, kBwd);
  at::Tensor dq = new_output(q.sizes(), q.options());
  at::Tensor dk = new_output(k.sizes(), k.options());
  at::Tensor dv = new_output(v.sizes(), v.options());
  at::Tensor none = at::empty({0}, q.options().dtype(at::kFloat));
  if (q.numel() == 0 || k.numel() == 0) return {dq.zero_(), dk.zero_(), dv.zero_(), none, none};
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
  run_bwd(p, q);
  return {dq, dk, dv, none, none};
}

}  // namespace

void bind_attention(pybind11::module_& m) {
  m.def("attention_fwd", &attention_fwd,
        "Fused attention forward (fp16/bf16, head dim 32/64/96/128/256): returns [o (B, Hq, Lq, D), "
        "lse (B, Hq, Lq) fp32]",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("bias"), pybind11::arg("mask"),
        pybind11::arg("table"), pybind11::arg("bucket"), pybind11::arg("seed"), pybind11::arg("causal"),
        pybind11::arg("scale"), pybind11::arg("dropout_p"));
  m.def("attention_bwd", &attention_bwd,
        "Fused attention backward (deterministic): returns [dq, dk, dv, dbias (empty), dtable (empty)]",
        pybind11::arg("do"), pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("o"),
        pybind11::arg("lse"), pybind11::arg("bias"), pybind11::arg("mask"), pybind11::arg("table"),
        pybind11::arg("bucket"), pybind11::arg("seed"), pybind11::arg("causal"), pybind11::arg("scale"),
        pybind11::arg("dropout_p"), pybind11::arg("need_dbias"), pybind11::arg("need_dtable"));
}

}  // namespace fastlm
