// Parameters of the LayerNorm / RMSNorm kernels: plain pointers, sizes and strides, shared by the
// CUDA launchers (norms.cu), the CPU kernels (cpu/norms.cpp) and the glue (norms.cpp) that fills them.
#pragma once
#include <cstdint>

#include "dtype.h"
#if defined(__CUDACC__) || defined(FASTLM_WITH_CUDA) || defined(FASTLM_EMU)
#include "runtime.h"
#endif

namespace fastlm {

// Types: x, y, dy have dtype `dtype`; s = x + residual, residual, ds and dx have `s_dtype` (dtype or
// fp32); weight and bias have `weight_dtype` (dtype or fp32); statistics and partials are fp32.
struct NormParams {
  int64_t rows = 0, cols = 0;
  float eps = 0.f;
  bool rms = false;
  DType dtype = DType::f32, s_dtype = DType::f32, weight_dtype = DType::f32;

  // forward
  const void* x = nullptr;         // (rows, cols), row stride x_stride
  const void* residual = nullptr;  // (rows, cols), row stride residual_stride, or null
  const void* weight = nullptr;    // (cols,) or null
  const void* bias = nullptr;      // (cols,) or null
  void* y = nullptr;               // (rows, cols), row stride y_stride
  void* s = nullptr;               // (rows, cols), row stride s_stride, or null (not stored)
  float* mean = nullptr;           // (rows,), null for RMSNorm
  float* rstd = nullptr;           // (rows,)
  int64_t x_stride = 0, residual_stride = 0, y_stride = 0, s_stride = 0;

  // backward: s (above) is the normalised input, x when there was no residual
  const void* dy = nullptr;        // (rows, cols), row stride dy_stride
  const void* ds = nullptr;        // (rows, cols), row stride ds_stride, or null
  void* dx = nullptr;              // (rows, cols), row stride dx_stride
  float* dweight_partial = nullptr;  // (partials, cols) or null
  float* dbias_partial = nullptr;    // (partials, cols) or null
  int64_t partials = 0;              // number of partial rows the kernel writes
  int64_t dy_stride = 0, ds_stride = 0, dx_stride = 0;
};

#if defined(__CUDACC__) || defined(FASTLM_WITH_CUDA) || defined(FASTLM_EMU)
// Launchers (norms.cu). Each returns the launch's cudaGetLastError().
int64_t norm_bwd_partials(int64_t rows, int64_t cols, int device);  // partial rows launch_norm_bwd writes
cudaError_t launch_norm_fwd(const NormParams& p, cudaStream_t stream);
cudaError_t launch_norm_bwd(const NormParams& p, cudaStream_t stream);
#endif

}  // namespace fastlm
