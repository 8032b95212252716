// The pybind11 module: fastlm._C (CPU kernels, plus CUDA kernels when built with CUDA) or, with
// FASTLM_EMU, fastlm._C_emu (the CUDA kernels run by the host emulator on CPU tensors).
#include <ATen/Parallel.h>

#include "glue.h"

namespace fastlm {
void bind_attention(pybind11::module_& m);
void bind_cross_entropy(pybind11::module_& m);
void bind_norms(pybind11::module_& m);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastlm kernels";
  m.def("built_with_cuda", [] {
#if defined(FASTLM_WITH_CUDA)
    return true;
#else
    return false;
#endif
  });
  m.def(
      "cpu_threads",
      [] {
#if defined(_OPENMP)
        return at::get_num_threads();
#else
        return 1;
#endif
      },
      "Threads the CPU kernels of this build run on (1 when it was compiled without OpenMP, in which case "
      "ATen's at::parallel_for runs serially)");
  m.def("set_poison_outputs", &fastlm::set_poison_outputs,
        "NaN-fill every kernel output before the kernel runs (testing)");
  fastlm::bind_norms(m);
  fastlm::bind_cross_entropy(m);
  fastlm::bind_attention(m);
}
