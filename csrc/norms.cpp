// Glue for LayerNorm / RMSNorm: checks, output allocation, the params struct, the kernel call.
// Callers (fastlm/ops/norms.py) pass (rows, cols) views with unit stride along cols.
#include "cuda/norms.h"

#include "cpu/norms.h"
#include "glue.h"

namespace fastlm {
namespace {

constexpr const char* kFwd = "norm_fwd";
constexpr const char* kBwd = "norm_bwd";
constexpr const char* kOneDevice = "; put them on one device";  // the end of fastlm.layer_norm's device error

// Weight / bias in x's dtype or fp32 (anything else is converted to fp32, a (cols,) copy).
at::Tensor weight_like(const at::Tensor& w, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1), op, ": ", name, " must have shape (", x.size(1),
              ",) to match x ", x.sizes(), ", got ", w.sizes());
  check_same_device(op, w, name, x, "x", kOneDevice);
  dtype_of(w, op, name);
  at::Tensor out = (w.scalar_type() == x.scalar_type()) ? w : w.to(at::kFloat);
  return out.contiguous();
}

int64_t bwd_partials([[maybe_unused]] const at::Tensor& s, [[maybe_unused]] const KernelDevice& device) {
#if defined(FASTLM_HAS_CUDA_KERNELS)
  if (on_kernel_device(s)) return norm_bwd_partials(s.size(0), s.size(1), device.index());
#endif
#if defined(FASTLM_EMU)
  return 1;
#else
  return cpu::norm_bwd_partials();
#endif
}

std::vector<at::Tensor> norm_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                 const c10::optional<at::Tensor>& bias,
                                 const c10::optional<at::Tensor>& residual, double eps, bool rms,
                                 bool store_residual) {
  const KernelDevice device(x);
  FASTLM_CHECK_2D_ROWS(kFwd, x, "x");
  TORCH_CHECK(!rms || !bias.has_value(), kFwd, ": RMSNorm takes no bias");
  NormParams p;
  p.rows = x.size(0);
  p.cols = x.size(1);
  p.eps = static_cast<float>(eps);
  p.rms = rms;
  p.dtype = dtype_of(x, kFwd, "x");
  p.x = x.data_ptr();
  p.x_stride = x.stride(0);

  at::Tensor w, b;
  if (weight.has_value()) w = weight_like(*weight, x, kFwd, "weight");
  if (bias.has_value()) {
    b = weight_like(*bias, x, kFwd, "bias");
    if (w.defined() && b.scalar_type() != w.scalar_type()) {
      w = w.to(at::kFloat);
      b = b.to(at::kFloat);
    }
  }
  const at::Tensor& wb = w.defined() ? w : b;
  p.weight_dtype = wb.defined() ? dtype_of(wb, kFwd, "weight") : DType::f32;
  p.weight = w.defined() ? w.data_ptr() : nullptr;
  p.bias = b.defined() ? b.data_ptr() : nullptr;

  at::ScalarType s_type = x.scalar_type();
  at::Tensor r;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes(), kFwd, ": residual must have shape ", x.sizes(), " to match x ",
                x.sizes(), ", got ", residual->sizes());
    check_same_device(kFwd, *residual, "residual", x, "x", kOneDevice);
    dtype_of(*residual, kFwd, "residual");
    s_type = at::promote_types(x.scalar_type(), residual->scalar_type());
    r = residual->to(s_type);
    if (r.stride(1) != 1) r = r.contiguous();
    p.residual = r.data_ptr();
    p.residual_stride = r.stride(0);
  }
  TORCH_CHECK(!store_residual || residual.has_value(), kFwd, ": store_residual needs a residual");
  p.s_dtype = to_dtype(s_type, kFwd, "x + residual");

  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor y = new_output({p.rows, p.cols}, x.options());
  at::Tensor s = new_output(store_residual ? at::IntArrayRef{p.rows, p.cols} : at::IntArrayRef{0},
                            x.options().dtype(s_type));
  at::Tensor mean = new_output({rms ? 0 : p.rows}, f32);
  at::Tensor rstd = new_output({p.rows}, f32);
  p.y = y.data_ptr();
  p.y_stride = y.stride(0);
  p.s = store_residual ? s.data_ptr() : nullptr;
  p.s_stride = store_residual ? s.stride(0) : 0;
  p.mean = rms ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  if (p.rows > 0) device.run(kFwd, x, p, FASTLM_CUDA_KERNEL(launch_norm_fwd), FASTLM_CPU_KERNEL(cpu::norm_fwd));
  return {y, s, mean, rstd};
}

std::vector<at::Tensor> norm_bwd(const at::Tensor& dy, const c10::optional<at::Tensor>& ds,
                                 const at::Tensor& s, const c10::optional<at::Tensor>& weight,
                                 bool has_bias, const at::Tensor& mean, const at::Tensor& rstd,
                                 bool rms) {
  const KernelDevice device(s);
  FASTLM_CHECK_2D_ROWS(kBwd, s, "s");
  FASTLM_CHECK_2D_ROWS(kBwd, dy, "dy");
  TORCH_CHECK(dy.sizes() == s.sizes(), kBwd, ": dy must have shape ", s.sizes(), ", got ", dy.sizes());
  check_same_device(kBwd, dy, "dy", s, "s", kOneDevice);
  TORCH_CHECK(rstd.numel() == s.size(0) && rstd.scalar_type() == at::kFloat && rstd.is_contiguous(),
              kBwd, ": rstd must be a contiguous float32 (", s.size(0), ",) tensor");
  TORCH_CHECK(rms || (mean.numel() == s.size(0) && mean.scalar_type() == at::kFloat && mean.is_contiguous()),
              kBwd, ": mean must be a contiguous float32 (", s.size(0), ",) tensor");
  NormParams p;
  p.rows = s.size(0);
  p.cols = s.size(1);
  p.rms = rms;
  p.dtype = dtype_of(dy, kBwd, "dy");
  p.s_dtype = dtype_of(s, kBwd, "s");
  TORCH_CHECK(s.scalar_type() == dy.scalar_type() || s.scalar_type() == at::kFloat, kBwd,
              ": s must have dy's dtype or float32, got ", dtype_name(s.scalar_type()), " and ",
              dtype_name(dy.scalar_type()));
  p.s = s.data_ptr();
  p.s_stride = s.stride(0);
  p.dy = dy.data_ptr();
  p.dy_stride = dy.stride(0);
  p.mean = rms ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();

  at::Tensor d;
  if (ds.has_value()) {
    check_same_device(kBwd, *ds, "ds", s, "s", kOneDevice);
    TORCH_CHECK(ds->sizes() == s.sizes(), kBwd, ": ds must have shape ", s.sizes(), ", got ", ds->sizes());
    d = ds->to(s.scalar_type());
    if (d.stride(1) != 1) d = d.contiguous();
    p.ds = d.data_ptr();
    p.ds_stride = d.stride(0);
  }
  at::Tensor w;
  if (weight.has_value()) {
    w = weight_like(*weight, dy, kBwd, "weight");
    p.weight = w.data_ptr();
    p.weight_dtype = dtype_of(w, kBwd, "weight");
  }

  at::Tensor dx = new_output({p.rows, p.cols}, s.options());
  p.dx = dx.data_ptr();
  p.dx_stride = dx.stride(0);
  p.partials = bwd_partials(s, device);
  auto f32 = s.options().dtype(at::kFloat);
  at::Tensor dw_partial = at::zeros({w.defined() ? p.partials : 0, p.cols}, f32);
  at::Tensor db_partial = at::zeros({has_bias ? p.partials : 0, p.cols}, f32);
  p.dweight_partial = w.defined() ? dw_partial.data_ptr<float>() : nullptr;
  p.dbias_partial = has_bias ? db_partial.data_ptr<float>() : nullptr;
  if (p.rows > 0) device.run(kBwd, s, p, FASTLM_CUDA_KERNEL(launch_norm_bwd), FASTLM_CPU_KERNEL(cpu::norm_bwd));
  at::Tensor dw = w.defined() ? dw_partial.sum(0) : at::empty({0}, f32);
  at::Tensor db = has_bias ? db_partial.sum(0) : at::empty({0}, f32);
  return {dx, dw, db};
}

}  // namespace

void bind_norms(pybind11::module_& m) {
  m.def("norm_fwd", &norm_fwd, "LayerNorm/RMSNorm forward on (rows, cols): returns [y, s, mean, rstd]",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("residual"),
        pybind11::arg("eps"), pybind11::arg("rms"), pybind11::arg("store_residual"));
  m.def("norm_bwd", &norm_bwd, "LayerNorm/RMSNorm backward: returns [dx, dweight, dbias] (fp32 grads)",
        pybind11::arg("dy"), pybind11::arg("ds"), pybind11::arg("s"), pybind11::arg("weight"),
        pybind11::arg("has_bias"), pybind11::arg("mean"), pybind11::arg("rstd"), pybind11::arg("rms"));
}

}  // namespace fastlm
