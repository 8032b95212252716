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

DType to_dtype(at::ScalarType type, const char* op, const char* arg) {
  switch (type) {
    case at::kFloat: return DType::f32;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    default:
      TORCH_CHECK(false, op, ": ", arg, " must be float32, float16 or bfloat16, got ", type);
  }
}

}  // namespace fastlm
