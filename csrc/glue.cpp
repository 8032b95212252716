#include "glue.h"

#include <atomic>
#include <limits>

namespace fastlm {

static std::atomic<bool> poison_outputs{false};

void set_poison_outputs(bool on) { poison_outputs = on; }

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  if (poison_outputs) {
    if (at::isFloatingType(out.scalar_type())) {
      out.fill_(std::numeric_limits<float>::quiet_NaN());
    } else {
      out.fill_(-1);
    }
  }
  return out;
}

std::string dtype_name(at::ScalarType type) { return "torch." + std::string(c10::getDtypeNames(type).first); }

DType to_dtype(at::ScalarType type, const char* op, const char* arg) {
  switch (type) {
    case at::kFloat: return DType::f32;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    default:
      TORCH_CHECK(false, op, ": ", arg, " must be float32, float16 or bfloat16, got dtype ", dtype_name(type));
  }
}

void no_kernel_for(const char* op, const c10::Device& device, bool with_cpu) {
#if defined(FASTLM_EMU)
  (void)with_cpu;
  TORCH_CHECK(false, op, ": the cuda_emu backend takes CPU tensors, not ", device);
#elif defined(FASTLM_WITH_CUDA)
  TORCH_CHECK(false, op, ": the cuda backend takes CUDA tensors", with_cpu ? " and the cpu backend CPU tensors" : "",
              ", not ", device);
#else
  TORCH_CHECK(!with_cpu, op, ": the cpu backend takes CPU tensors, not ", device);
  TORCH_CHECK(false, op, ": fastlm._C was built without CUDA and has no kernels for ", device, " tensors");
#endif
}

}  // namespace fastlm
