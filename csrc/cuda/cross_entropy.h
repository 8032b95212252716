// Parameters of the cross-entropy row kernel: plain pointers, sizes and strides, shared by the CUDA
// launcher (cross_entropy.cu), the CPU kernel (cpu/cross_entropy.cpp) and the glue (cross_entropy.cpp).
#pragma once
#include <cstdint>

#include "dtype.h"
#if defined(__CUDACC__) || defined(FASTLM_WITH_CUDA) || defined(FASTLM_EMU)
#include "runtime.h"
#endif

namespace fastlm {

// One row per label. Per non-ignored row i with label y (see fastlm/ops/cross_entropy.py):
//   lse_i  = log Σ_j exp(x_ij)
//   loss_i = (1 - ε)(lse_i - x_iy) + ε(lse_i - mean_j x_ij) + z lse_i²   (the ε term only when ε > 0)
//   dx_ij  = scale_i (softmax_ij (1 + 2 z lse_i) - ε / V - (1 - ε)[j == y])
// Ignored rows (label == ignore_index) get loss 0, lse 0 and a zero gradient row; rows whose label is
// outside [0, V) get a NaN loss and a NaN gradient row, and nothing is read at the label.
struct CrossEntropyParams {
  int64_t rows = 0, cols = 0;  // cols = V
  int64_t ignore_index = -100;
  float label_smoothing = 0.f, z_loss = 0.f;
  DType dtype = DType::f32;  // logits and dlogits

  const void* logits = nullptr;    // (rows, cols), row stride logits_stride
  const int64_t* labels = nullptr; // (rows,)
  const float* scale = nullptr;    // (rows,), per-row gradient factor
  float* loss = nullptr;           // (rows,)
  float* lse = nullptr;            // (rows,)
  void* dlogits = nullptr;         // (rows, cols), row stride dlogits_stride, or null (no gradient)
  int64_t logits_stride = 0, dlogits_stride = 0;
};

#if defined(__CUDACC__) || defined(FASTLM_WITH_CUDA) || defined(FASTLM_EMU)
// Launcher (cross_entropy.cu). Returns the launch's cudaGetLastError().
cudaError_t launch_cross_entropy_fwd(const CrossEntropyParams& p, cudaStream_t stream);
#endif

}  // namespace fastlm
