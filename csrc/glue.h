// Helpers shared by the glue files (csrc/*.cpp): argument checks, output allocation, and the device
// abstraction that lets the same glue drive the CUDA kernels on CUDA tensors (fastlm._C built with
// FASTLM_WITH_CUDA) or, emulated, on CPU tensors (fastlm._C_emu, built with FASTLM_EMU).
#pragma once
#include <torch/extension.h>

#include "cuda/dtype.h"

#if defined(FASTLM_WITH_CUDA) && !defined(FASTLM_EMU)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define FASTLM_CUDA_DEVICE 1  // the kernels run on real CUDA devices (not the emulator)
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

// Where one glue call's kernels run: the device of its first input, entered for the whole call. Built
// before any output is allocated, it makes a CUDA tensor's device the current one until the call returns
// (so a tensor on cuda:1 is served on cuda:1 whatever the caller's current device), and `launch` runs a
// csrc/cuda launcher on that device's current stream, the one torch.cuda.stream(...) selects, so the
// kernel is ordered with the caller's work there. A CPU tensor enters nothing: the cpu kernels and the
// emulator (whose "device" is the CPU) run as before, and the emulator build has no CUDA guard at all.
class KernelDevice {
 public:
  explicit KernelDevice(const at::Tensor& t)
      : index_(t.is_cuda() ? t.get_device() : 0)
#if defined(FASTLM_CUDA_DEVICE)
        ,
        guard_(t.is_cuda() ? std::optional<c10::Device>(t.device()) : std::nullopt)
#endif
  {
  }

  c10::DeviceIndex index() const { return index_; }  // the CUDA device's index (0 for a CPU tensor)

#if defined(FASTLM_HAS_CUDA_KERNELS)
  cudaStream_t stream() const {
#if defined(FASTLM_CUDA_DEVICE)
    return c10::cuda::getCurrentCUDAStream(index_).stream();
#else
    return nullptr;  // the emulator's default stream
#endif
  }

  // launcher(p, stream()) for a csrc/cuda launcher, its error turned into a TORCH_CHECK failure.
  template <class Params>
  void launch(cudaError_t (*launcher)(const Params&, cudaStream_t), const Params& p, const char* what) const {
    const cudaError_t err = launcher(p, stream());
    TORCH_CHECK(err == cudaSuccess, "fastlm: ", what, " failed: ", cudaGetErrorString(err));
  }
#endif

 private:
  c10::DeviceIndex index_;
#if defined(FASTLM_CUDA_DEVICE)
  c10::cuda::OptionalCUDAGuard guard_;
#endif
};

}  // namespace fastlm

#define FASTLM_CHECK_2D_ROWS(OP, T, NAME)                                                              \
  TORCH_CHECK((T).dim() == 2 && ((T).stride(1) == 1 || (T).numel() == 0), OP, ": ", NAME,                               \
              " must be 2-D (rows, cols) with unit stride along cols, got sizes ", (T).sizes(),      \
              " and strides ", (T).strides())
#define FASTLM_CHECK_SAME_DEVICE(OP, T, NAME, REF)                                                     \
  TORCH_CHECK((T).device() == (REF).device(), OP, ": ", NAME, " is on ", (T).device(),             \
              " but x is on ", (REF).device())
