// Glue for the cross-entropy row kernel: checks, output allocation, the params struct, the kernel call.
// Callers (fastlm/ops/cross_entropy.py) pass a (rows, V) view with unit stride along V.
#include "cuda/cross_entropy.h"

#include "cpu/cross_entropy.h"
#include "glue.h"

namespace fastlm {
namespace {

constexpr const char* kFwd = "cross_entropy_fwd";

std::vector<at::Tensor> cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& labels,
                                          const at::Tensor& scale, int64_t ignore_index, double label_smoothing,
                                          double z_loss, bool compute_grad) {
  const KernelDevice device(logits);
  FASTLM_CHECK_2D_ROWS(kFwd, logits, "logits");
  const int64_t rows = logits.size(0);
  TORCH_CHECK(logits.size(1) > 0, kFwd, ": logits need at least one class, got shape ", logits.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == rows, kFwd, ": labels must have shape (", rows,
              ",) (one label per row), got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous(), kFwd,
              ": labels must be a contiguous int64 tensor of class indices, got dtype ",
              dtype_name(labels.scalar_type()));
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == rows, kFwd, ": scale must have shape (", rows, ",), got ",
              scale.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous(), kFwd,
              ": scale must be a contiguous float32 tensor, got dtype ", dtype_name(scale.scalar_type()));
  TORCH_CHECK(labels.device() == logits.device(), kFwd, ": labels are on ", labels.device(),
              " but the inputs are on ", logits.device());
  check_same_device(kFwd, scale, "scale", logits, "logits");
  CrossEntropyParams p;
  p.rows = rows;
  p.cols = logits.size(1);
  p.ignore_index = ignore_index;
  p.label_smoothing = static_cast<float>(label_smoothing);
  p.z_loss = static_cast<float>(z_loss);
  p.dtype = dtype_of(logits, kFwd, "logits");
  p.logits = logits.data_ptr();
  p.logits_stride = logits.stride(0);
  p.labels = labels.data_ptr<int64_t>();
  p.scale = scale.data_ptr<float>();

  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor loss = new_output({rows}, f32);
  at::Tensor lse = new_output({rows}, f32);
  at::Tensor dlogits = new_output(compute_grad ? at::IntArrayRef{rows, p.cols} : at::IntArrayRef{0}, logits.options());
  p.loss = loss.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  p.dlogits = compute_grad ? dlogits.data_ptr() : nullptr;
  p.dlogits_stride = compute_grad ? dlogits.stride(0) : 0;
  if (rows > 0) {
    device.run(kFwd, logits, p, FASTLM_CUDA_KERNEL(launch_cross_entropy_fwd),
               FASTLM_CPU_KERNEL(cpu::cross_entropy_fwd));
  }
  return {loss, lse, dlogits};
}

}  // namespace

void bind_cross_entropy(pybind11::module_& m) {
  m.def("ce_fwd", &cross_entropy_fwd,
        "Cross-entropy row kernel on (rows, V): returns [loss, lse, dlogits] (dlogits empty without grad)",
        pybind11::arg("logits"), pybind11::arg("labels"), pybind11::arg("scale"), pybind11::arg("ignore_index"),
        pybind11::arg("label_smoothing"), pybind11::arg("z_loss"), pybind11::arg("compute_grad"));
}

}  // namespace fastlm
