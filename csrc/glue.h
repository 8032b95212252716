// Helpers shared by the glue files (csrc/*.cpp): argument checks, output allocation, and the device
// abstraction that lets the same glue drive the CUDA kernels on CUDA tensors (fastlm._C built with
// FASTLM_WITH_CUDA) or, emulated, on CPU tensors (fastlm._C_emu, built with FASTLM_EMU).
#pragma once
#include <torch/extension.h>

#include <cstddef>
#include <type_traits>

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

// "torch.float32": a dtype as Python writes it (the glue's messages use the words of the Python checks).
std::string dtype_name(at::ScalarType type);

DType to_dtype(at::ScalarType type, const char* op, const char* arg);
inline DType dtype_of(const at::Tensor& t, const char* op, const char* arg) {
  return to_dtype(t.scalar_type(), op, arg);
}

// The kernels KernelDevice::run takes, and the macros that name them: a csrc/cuda launcher (nullptr in a
// build without CUDA kernels) and a csrc/cpu kernel (nullptr in fastlm._C_emu, which has none; also
// for an op without CPU kernels).
template <class Params>
using CpuKernel = void (*)(const Params&);
#if defined(FASTLM_HAS_CUDA_KERNELS)
template <class Params>
using CudaLauncher = cudaError_t (*)(const Params&, cudaStream_t);
#define FASTLM_CUDA_KERNEL(launcher) (launcher)
#else
template <class Params>
using CudaLauncher = std::nullptr_t;
#define FASTLM_CUDA_KERNEL(launcher) nullptr
#endif
#if defined(FASTLM_EMU)
#define FASTLM_CPU_KERNEL(kernel) nullptr
#else
#define FASTLM_CPU_KERNEL(kernel) (kernel)
#endif

// The error of a kernel call on a tensor on `device`, which this module has no kernel for (with_cpu: the
// op has CPU kernels).
[[noreturn]] void no_kernel_for(const char* op, const c10::Device& device, bool with_cpu);

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
// (so a tensor on cuda:1 is served on cuda:1 whatever the caller's current device), and `run` launches a
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

  // One kernel call of op `op` on the tensor `t`'s device: `cuda` (a csrc/cuda launcher, on stream()) when
  // t is on this module's kernel device (on_kernel_device), else `cpu` (a csrc/cpu kernel) on a CPU tensor,
  // else a TORCH_CHECK failure naming the backends this module has for the op and the device they take.
  // Pass the kernels through FASTLM_CUDA_KERNEL / FASTLM_CPU_KERNEL (nullptr where the build has none).
  template <class Params>
  void run(const char* op, const at::Tensor& t, const Params& p,
           [[maybe_unused]] std::type_identity_t<CudaLauncher<Params>> cuda,
           std::type_identity_t<CpuKernel<Params>> cpu) const {
#if defined(FASTLM_HAS_CUDA_KERNELS)
    if (on_kernel_device(t)) {
      const cudaError_t err = cuda(p, stream());
      TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
      return;
    }
#endif
    if (cpu != nullptr && t.is_cpu()) return cpu(p);
    no_kernel_for(op, t.device(), cpu != nullptr);
  }

 private:
#if defined(FASTLM_HAS_CUDA_KERNELS)
  cudaStream_t stream() const {
#if defined(FASTLM_CUDA_DEVICE)
    return c10::cuda::getCurrentCUDAStream(index_).stream();
#else
    return nullptr;  // the emulator's default stream
#endif
  }
#endif

  c10::DeviceIndex index_;
#if defined(FASTLM_CUDA_DEVICE)
  c10::cuda::OptionalCUDAGuard guard_;
#endif
};

// TORCH_CHECK that argument `name` is on the device of argument `ref_name`, in the words of the Python
// checks: "<op>: <name> is on <device> but <ref_name> is on <device><hint>".
inline void check_same_device(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref,
                              const char* ref_name, const char* hint = "") {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), hint);
}

}  // namespace fastlm

#define FASTLM_CHECK_2D_ROWS(OP, T, NAME)                                                              \
  TORCH_CHECK((T).dim() == 2 && ((T).stride(1) == 1 || (T).numel() == 0), OP, ": ", NAME,                               \
              " must be 2-D (rows, cols) with unit stride along cols, got sizes ", (T).sizes(),      \
              " and strides ", (T).strides())
