// CUDA LayerNorm / RMSNorm with a fused residual add (forward and backward) and their launchers.
//
// Rows up to kMaxWarpCols wide (BERT, GPT-2, T5 widths) take one warp per row, the row held in
// registers; wider rows take one block per row and re-read the row from L2 instead. Accesses are
// 16-byte vectors when every pointer, stride and the width allow it. Backward writes d weight / d bias
// as one fp32 partial row per block (plain stores into a zeroed buffer, no atomics); the glue sums
// the partials once.
#include "common.cuh"
#include "norms.h"

namespace fastlm {
namespace {

constexpr int kWarpRowsPerBlock = 4;  // warp kernels: one row per warp
constexpr int kMaxWarpCols = 1024;    // widest row the warp kernels keep in registers
constexpr int kBlockThreads = 512;    // block kernels (wide rows)

// s = x (+ residual) for VEC columns starting at `col` of `row`, in fp32. The sum is rounded to TS, the
// dtype s is stored in, so the statistics, y and backward all see the same s.
template <typename T, typename TS, int VEC>
__device__ __forceinline__ void load_input(const NormParams& p, int64_t row, int64_t col, float (&v)[VEC]) {
  load_float<VEC>(static_cast<const T*>(p.x) + row * p.x_stride + col, v);
  if (p.residual != nullptr) {
    float r[VEC];
    load_float<VEC>(static_cast<const TS*>(p.residual) + row * p.residual_stride + col, r);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = to_float(from_float<TS>(v[k] + r[k]));
  }
}

// y = (v - mean) * rstd * weight + bias for VEC columns, stored in T.
template <typename T, typename TW, int VEC>
__device__ __forceinline__ void store_output(const NormParams& p, int64_t row, int64_t col, float (&v)[VEC],
                                             float mean, float rstd) {
  float w[VEC], b[VEC];
  if (p.weight != nullptr) {
    load_float<VEC>(static_cast<const TW*>(p.weight) + col, w);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) w[k] = 1.f;
  }
  if (p.bias != nullptr) {
    load_float<VEC>(static_cast<const TW*>(p.bias) + col, b);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) b[k] = 0.f;
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) v[k] = (v[k] - mean) * rstd * w[k] + b[k];
  store_float<VEC>(static_cast<T*>(p.y) + row * p.y_stride + col, v);
}

template <typename T, typename TS, typename TW, int VEC>
__global__ void __launch_bounds__(kWarpRowsPerBlock * 32) norm_fwd_warp_kernel(const NormParams p) {
  constexpr int kVecs = kMaxWarpCols / (32 * VEC);
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarpRowsPerBlock + threadIdx.x / 32;
  if (row >= p.rows) return;  // the whole warp leaves together; no block-wide barrier follows
  const int64_t n = p.cols;
  float v[kVecs][VEC];
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int64_t col = (int64_t(i) * 32 + lane) * VEC;
    if (col < n) {
      load_input<T, TS, VEC>(p, row, col, v[i]);
      if (p.s != nullptr) store_float<VEC>(static_cast<TS*>(p.s) + row * p.s_stride + col, v[i]);
#pragma unroll
      for (int k = 0; k < VEC; ++k) sum += v[i][k];
    }
  }
  const float mean = p.rms ? 0.f : warp_sum(sum) / n;
  float sq = 0.f;
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    if ((int64_t(i) * 32 + lane) * VEC < n) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) sq += (v[i][k] - mean) * (v[i][k] - mean);
    }
  }
  const float rstd = rsqrtf(warp_sum(sq) / n + p.eps);
  if (lane == 0) {
    if (p.mean != nullptr) p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int64_t col = (int64_t(i) * 32 + lane) * VEC;
    if (col < n) store_output<T, TW, VEC>(p, row, col, v[i], mean, rstd);
  }
}

template <typename T, typename TS, typename TW, int VEC>
__global__ void __launch_bounds__(kBlockThreads) norm_fwd_block_kernel(const NormParams p) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x, n = p.cols;
  const int64_t step = int64_t(blockDim.x) * VEC;
  float v[VEC];
  float sum = 0.f;
  for (int64_t col = int64_t(threadIdx.x) * VEC; col < n; col += step) {
    load_input<T, TS, VEC>(p, row, col, v);
    if (p.s != nullptr) store_float<VEC>(static_cast<TS*>(p.s) + row * p.s_stride + col, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum += v[k];
  }
  const float mean = p.rms ? 0.f : block_sum(sum, scratch) / n;
  float sq = 0.f;
  for (int64_t col = int64_t(threadIdx.x) * VEC; col < n; col += step) {
    load_input<T, TS, VEC>(p, row, col, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) sq += (v[k] - mean) * (v[k] - mean);
  }
  const float rstd = rsqrtf(block_sum(sq, scratch) / n + p.eps);
  if (threadIdx.x == 0) {
    if (p.mean != nullptr) p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
  for (int64_t col = int64_t(threadIdx.x) * VEC; col < n; col += step) {
    load_input<T, TS, VEC>(p, row, col, v);
    store_output<T, TW, VEC>(p, row, col, v, mean, rstd);
  }
}

// x̂ and d x̂ = dy * weight for VEC columns; accumulates dy * x̂ and dy into dw, db.
template <typename T, typename TS, typename TW, int VEC>
__device__ __forceinline__ void load_grad(const NormParams& p, int64_t row, int64_t col, float mean, float rstd,
                                          float (&xhat)[VEC], float (&wdy)[VEC], float (&dw)[VEC],
                                          float (&db)[VEC]) {
  float w[VEC];
  load_float<VEC>(static_cast<const TS*>(p.s) + row * p.s_stride + col, xhat);
  load_float<VEC>(static_cast<const T*>(p.dy) + row * p.dy_stride + col, wdy);
  if (p.weight != nullptr) {
    load_float<VEC>(static_cast<const TW*>(p.weight) + col, w);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) w[k] = 1.f;
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    xhat[k] = (xhat[k] - mean) * rstd;
    dw[k] += wdy[k] * xhat[k];
    db[k] += wdy[k];
    wdy[k] *= w[k];
  }
}

// d s = (d x̂ - x̂ c1 - c2) * rstd (+ the gradient flowing into s directly), stored in TS.
template <typename TS, int VEC>
__device__ __forceinline__ void store_grad(const NormParams& p, int64_t row, int64_t col, const float (&xhat)[VEC],
                                           const float (&wdy)[VEC], float c1, float c2, float rstd) {
  float dx[VEC], ds[VEC];
  if (p.ds != nullptr) {
    load_float<VEC>(static_cast<const TS*>(p.ds) + row * p.ds_stride + col, ds);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) ds[k] = 0.f;
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) dx[k] = (wdy[k] - xhat[k] * c1 - c2) * rstd + ds[k];
  store_float<VEC>(static_cast<TS*>(p.dx) + row * p.dx_stride + col, dx);
}

template <typename T, typename TS, typename TW, int VEC>
__global__ void __launch_bounds__(kWarpRowsPerBlock * 32) norm_bwd_warp_kernel(const NormParams p) {
  constexpr int kVecs = kMaxWarpCols / (32 * VEC);
  __shared__ float reduce[kWarpRowsPerBlock][kMaxWarpCols];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t n = p.cols;
  float dw[kVecs][VEC] = {}, db[kVecs][VEC] = {};
  for (int64_t row = int64_t(blockIdx.x) * kWarpRowsPerBlock + warp; row < p.rows;
       row += int64_t(gridDim.x) * kWarpRowsPerBlock) {
    const float mean = p.rms ? 0.f : p.mean[row], rstd = p.rstd[row];
    float xhat[kVecs][VEC], wdy[kVecs][VEC];
    float c1 = 0.f, c2 = 0.f;
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const int64_t col = (int64_t(i) * 32 + lane) * VEC;
      if (col < n) {
        load_grad<T, TS, TW, VEC>(p, row, col, mean, rstd, xhat[i], wdy[i], dw[i], db[i]);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          c1 += xhat[i][k] * wdy[i][k];
          c2 += wdy[i][k];
        }
      }
    }
    c1 = warp_sum(c1) / n;
    c2 = p.rms ? 0.f : warp_sum(c2) / n;
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const int64_t col = (int64_t(i) * 32 + lane) * VEC;
      if (col < n) store_grad<TS, VEC>(p, row, col, xhat[i], wdy[i], c1, c2, rstd);
    }
  }
  // Reduce the warps' d weight / d bias into this block's partial row.
  for (int pass = 0; pass < 2; ++pass) {
    float* partial = pass == 0 ? p.dweight_partial : p.dbias_partial;
    if (partial == nullptr) continue;
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const int64_t col = (int64_t(i) * 32 + lane) * VEC;
      if (col < n) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) reduce[warp][col + k] = pass == 0 ? dw[i][k] : db[i][k];
      }
    }
    __syncthreads();
    for (int64_t col = threadIdx.x; col < n; col += blockDim.x) {
      float total = 0.f;
#pragma unroll
      for (int w = 0; w < kWarpRowsPerBlock; ++w) total += reduce[w][col];
      partial[int64_t(blockIdx.x) * n + col] = total;
    }
    __syncthreads();
  }
}

template <typename T, typename TS, typename TW, int VEC>
__global__ void __launch_bounds__(kBlockThreads) norm_bwd_block_kernel(const NormParams p) {
  __shared__ float scratch[32];
  const int64_t n = p.cols, step = int64_t(blockDim.x) * VEC;
  float* dw_row = p.dweight_partial == nullptr ? nullptr : p.dweight_partial + int64_t(blockIdx.x) * n;
  float* db_row = p.dbias_partial == nullptr ? nullptr : p.dbias_partial + int64_t(blockIdx.x) * n;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const float mean = p.rms ? 0.f : p.mean[row], rstd = p.rstd[row];
    float xhat[VEC], wdy[VEC];
    float c1 = 0.f, c2 = 0.f;
    for (int64_t col = int64_t(threadIdx.x) * VEC; col < n; col += step) {
      float dw[VEC] = {}, db[VEC] = {};
      load_grad<T, TS, TW, VEC>(p, row, col, mean, rstd, xhat, wdy, dw, db);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        c1 += xhat[k] * wdy[k];
        c2 += wdy[k];
        // Each (block, column) is owned by one thread: plain read-modify-write of the block's row.
        if (dw_row != nullptr) dw_row[col + k] += dw[k];
        if (db_row != nullptr) db_row[col + k] += db[k];
      }
    }
    c1 = block_sum(c1, scratch) / n;
    c2 = p.rms ? 0.f : block_sum(c2, scratch) / n;
    for (int64_t col = int64_t(threadIdx.x) * VEC; col < n; col += step) {
      float dw[VEC], db[VEC];
      load_grad<T, TS, TW, VEC>(p, row, col, mean, rstd, xhat, wdy, dw, db);
      store_grad<TS, VEC>(p, row, col, xhat, wdy, c1, c2, rstd);
    }
  }
}

// Vectors of 16 / sizeof(T) elements (16-byte accesses for T, 16-byte pieces for fp32 TS / TW) when
// every pointer, row stride and the width allow them, else scalars.
template <typename T, typename TS, typename TW>
bool can_vectorize(const NormParams& p) {
  constexpr int V = 16 / sizeof(T);
  constexpr int kAlignS = sizeof(TS) * V < 16 ? sizeof(TS) * V : 16;
  constexpr int kAlignW = sizeof(TW) * V < 16 ? sizeof(TW) * V : 16;
  const bool strides = p.cols % V == 0 && p.x_stride % V == 0 && p.residual_stride % V == 0 &&
                       p.y_stride % V == 0 && p.s_stride % V == 0 && p.dy_stride % V == 0 &&
                       p.ds_stride % V == 0 && p.dx_stride % V == 0;
  return strides && aligned(p.x, sizeof(T) * V) && aligned(p.y, sizeof(T) * V) && aligned(p.dy, sizeof(T) * V) &&
         aligned(p.residual, kAlignS) && aligned(p.s, kAlignS) && aligned(p.ds, kAlignS) && aligned(p.dx, kAlignS) &&
         aligned(p.weight, kAlignW) && aligned(p.bias, kAlignW);
}

int multiprocessors(int device) {
  int count = 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || count <= 0) {
    count = 1;
  }
  return count;
}

// Calls fn.template operator()<T, TS, TW, VEC>() for p's types.
template <typename Fn>
void dispatch(const NormParams& p, Fn fn) {
  FASTLM_DTYPE_SWITCH(p.dtype, T, __half, __nv_bfloat16, [&] {
    FASTLM_SAME_OR_FLOAT_SWITCH(p.s_dtype == DType::f32, TS, T, [&] {
      FASTLM_SAME_OR_FLOAT_SWITCH(p.weight_dtype == DType::f32, TW, T, [&] {
        if (can_vectorize<T, TS, TW>(p)) {
          fn.template operator()<T, TS, TW, 16 / sizeof(T)>();
        } else {
          fn.template operator()<T, TS, TW, 1>();
        }
      });
    });
  });
}

}  // namespace

int64_t norm_bwd_partials(int64_t rows, int64_t cols, int device) {
  const int64_t sms = multiprocessors(device);
  if (cols <= kMaxWarpCols) {
    const int64_t blocks = (rows + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock;
    return std::max<int64_t>(1, std::min<int64_t>(blocks, 8 * sms));
  }
  return std::max<int64_t>(1, std::min<int64_t>(rows, 2 * sms));
}

cudaError_t launch_norm_fwd(const NormParams& p, cudaStream_t stream) {
  dispatch(p, [&]<typename T, typename TS, typename TW, int VEC>() {
    if (p.cols <= kMaxWarpCols) {
      auto kernel = &norm_fwd_warp_kernel<T, TS, TW, VEC>;
      const dim3 grid((p.rows + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock);
      FASTLM_LAUNCH(kernel, grid, kWarpRowsPerBlock * 32, 0, stream)(p);
    } else {
      auto kernel = &norm_fwd_block_kernel<T, TS, TW, VEC>;
      FASTLM_LAUNCH(kernel, dim3(p.rows), kBlockThreads, 0, stream)(p);
    }
  });
  return cudaGetLastError();
}

cudaError_t launch_norm_bwd(const NormParams& p, cudaStream_t stream) {
  dispatch(p, [&]<typename T, typename TS, typename TW, int VEC>() {
    if (p.cols <= kMaxWarpCols) {
      auto kernel = &norm_bwd_warp_kernel<T, TS, TW, VEC>;
      FASTLM_LAUNCH(kernel, dim3(p.partials), kWarpRowsPerBlock * 32, 0, stream)(p);
    } else {
      auto kernel = &norm_bwd_block_kernel<T, TS, TW, VEC>;
      FASTLM_LAUNCH(kernel, dim3(p.partials), kBlockThreads, 0, stream)(p);
    }
  });
  return cudaGetLastError();
}

}  // namespace fastlm
