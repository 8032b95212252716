// Helpers shared by the glue files (csrc/*.cpp): argument checks, output allocation, and the device
// abstraction that lets the same glue drive the CUDA kernels on CUDA tensors (fastlm._C built with
// FASTLM_WITH_CUDA) or, emulated, on CPU tensors (fastlm._C_emu, built with FASTLM_EMU).
#pragma once
#include <torch/extension.h>

#include "cuda/dtype.h"

#if defined(FASTLM_WITH_CUDA) && !defined(FASTLM_EMU)
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif
#if defined(FASTLM_WITH_CUDA) || defined(FASTLM_EMU)
#include "cuda/runtime.h"
#define FASTLM_HAS_CUDA_KERNELS 1
#endif

namespace fastlm {

// Whether outputs are NaN-filled before kernels run (set from Python by fastlm.testing).
void set_poison_outputs(bool on);
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options);

DType to_dtype(at::ScalarType type, const char* op, const char* arg);
inline DType dtype_of(const at::Tensor& t, const char* op, const char* arg) {
  return to_dtype(t.scalar_type(), op, arg);
}

// Whether `t` is on the device this module's CUDA kernels run on.
inline bool on_kernel_device(const at::Tensor& t) {
#if defined(FASTLM_EMU)
  return t.is_cpu();
#elif defined(FASTLM_WITH_CUDA)
  return t.is_cuda();
#else
  (void)t;
  return false;
#endif
}

#if defined(FASTLM_HAS_CUDA_KERNELS)
inline cudaStream_t current_stream() {
#if defined(FASTLM_EMU)
  return nullptr;
#else
  return c10::cuda::getCurrentCUDAStream().stream();
#endif
}

inline void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fastlm: ", what, " failed: ", cudaGetErrorString(err));
}

inline int device_index(const at::Tensor& t) { return t.is_cuda() ? t.get_device() : 0; }
#endif

}  // namespace fastlm

#define FASTLM_CHECK_2D_ROWS(OP, T, NAME)                                                              \
  TORCH_CHECK((T).dim() == 2 && ((T).stride(1) == 1 || (T).numel() == 0), OP, ": ", NAME,                               \
              " must be 2-D (rows, cols) with unit stride along cols, got sizes ", (T).sizes(),      \
              " and strides ", (T).strides())
#define FASTLM_CHECK_SAME_DEVICE(OP, T, NAME, REF)                                                     \
  TORCH_CHECK((T).device() == (REF).device(), OP, ": ", NAME, " is on ", (T).device(),             \
              " but x is on ", (REF).device())
