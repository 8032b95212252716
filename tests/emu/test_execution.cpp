// The emulated execution model: indices, barriers, shared memory, warp shuffles and votes,
// atomics, launch configuration errors, deadlocks, and the planted bugs it must expose.
#include <vector>

#include "emu/cuda_emu.h"
#include "emu_test.h"

__global__ void index_kernel(uint4* out) {
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  out[b * blockDim.x * blockDim.y * blockDim.z + t] =
      make_uint4(threadIdx.x + 10 * threadIdx.y + 100 * threadIdx.z,
                 blockIdx.x + 10 * blockIdx.y + 100 * blockIdx.z, blockDim.x * blockDim.y,
                 gridDim.x * gridDim.y * gridDim.z);
}

EMU_TEST(indices_cover_the_grid) {
  const dim3 grid(3, 2, 2), block(4, 3, 2);
  std::vector<uint4> out(12 * 24);
  FASTLM_LAUNCH(index_kernel, grid, block, 0, nullptr)(out.data());
  CHECK_EQ(cudaGetLastError(), cudaSuccess);
  for (unsigned bz = 0; bz < 2; ++bz)
    for (unsigned by = 0; by < 2; ++by)
      for (unsigned bx = 0; bx < 3; ++bx)
        for (unsigned tz = 0; tz < 2; ++tz)
          for (unsigned ty = 0; ty < 3; ++ty)
            for (unsigned tx = 0; tx < 4; ++tx) {
              const uint4 v = out[(bx + 3 * (by + 2 * bz)) * 24 + tx + 4 * (ty + 3 * tz)];
              CHECK_EQ(v.x, tx + 10 * ty + 100 * tz);
              CHECK_EQ(v.y, bx + 10 * by + 100 * bz);
              CHECK_EQ(v.z, 12u);
              CHECK_EQ(v.w, 12u);
            }
}

// Block sum through shared memory: every thread publishes, a barrier, thread 0 adds up and
// publishes, a barrier, every thread reads the total.
template <bool WithBarriers>
__global__ void smem_sum_kernel(const int* x, int* out) {
  __shared__ int vals[256];
  __shared__ int total;
  vals[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
  if (WithBarriers) __syncthreads();
  if (threadIdx.x == 0) {
    int s = 0;
    for (unsigned i = 0; i < blockDim.x; ++i) s += vals[i];
    total = s;
  }
  if (WithBarriers) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = total;
}

template <bool WithBarriers>
int smem_sum_mismatches() {
  const int blocks = 3, threads = 256;
  std::vector<int> x(blocks * threads), out(blocks * threads);
  for (int i = 0; i < blocks * threads; ++i) x[i] = i % 7 + 1;
  auto kernel = &smem_sum_kernel<WithBarriers>;
  FASTLM_LAUNCH(kernel, blocks, threads, 0, nullptr)(x.data(), out.data());
  int bad = 0;
  for (int b = 0; b < blocks; ++b) {
    int s = 0;
    for (int i = 0; i < threads; ++i) s += x[b * threads + i];
    for (int i = 0; i < threads; ++i) bad += out[b * threads + i] != s;
  }
  return bad;
}

EMU_TEST(syncthreads_orders_shared_memory) { CHECK_EQ(smem_sum_mismatches<true>(), 0); }

EMU_TEST(planted_missing_syncthreads_gives_wrong_result) {
  const int bad = smem_sum_mismatches<false>();
  std::printf("  missing __syncthreads: %d of 768 outputs wrong\n", bad);
  CHECK(bad > 0);
}

// Dynamic shared memory: 16-byte aligned, per block, poisoned (NaN) before each block runs.
__global__ void dynamic_smem_kernel(float* out, int n) {
  FASTLM_DYNAMIC_SHARED(float, buf);
  const bool aligned = reinterpret_cast<uintptr_t>(buf) % 16 == 0;
  const bool poisoned = std::isnan(buf[threadIdx.x]);
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) buf[i] = blockIdx.x * 1000.0f + i;
  __syncthreads();
  float s = 0;
  for (int i = 0; i < n; ++i) s += buf[(i + threadIdx.x) % n];
  out[blockIdx.x * blockDim.x + threadIdx.x] = aligned && poisoned ? s : -1.0f;
}

EMU_TEST(dynamic_shared_memory_per_block) {
  const int n = 100, threads = 64, blocks = 4;
  std::vector<float> out(blocks * threads);
  FASTLM_LAUNCH(dynamic_smem_kernel, blocks, threads, n * sizeof(float), nullptr)(out.data(), n);
  CHECK_EQ(cudaGetLastError(), cudaSuccess);
  for (int b = 0; b < blocks; ++b) {
    const float expect = b * 1000.0f * n + n * (n - 1) / 2.0f;
    for (int t = 0; t < threads; ++t) CHECK_NEAR(out[b * threads + t], expect, 1e-3);
  }
}

// Shuffles: out[mode][tid] for the four modes with a 16-lane width, against the CUDA guide.
__global__ void shuffle_kernel(int* out, int arg) {
  const int v = 100 + threadIdx.x;
  const int n = blockDim.x;
  out[0 * n + threadIdx.x] = __shfl_sync(0xffffffffu, v, arg, 16);
  out[1 * n + threadIdx.x] = __shfl_up_sync(0xffffffffu, v, arg, 16);
  out[2 * n + threadIdx.x] = __shfl_down_sync(0xffffffffu, v, arg, 16);
  out[3 * n + threadIdx.x] = __shfl_xor_sync(0xffffffffu, v, arg, 16);
  out[4 * n + threadIdx.x] = static_cast<int>(__shfl_xor_sync(0xffffffffu, v * 0.5, arg) * 2);
}

EMU_TEST(shuffles_follow_the_programming_guide) {
  for (int arg : {1, 3, 7}) {
    std::vector<int> out(5 * 64);
    FASTLM_LAUNCH(shuffle_kernel, 1, 64, 0, nullptr)(out.data(), arg);
    for (int t = 0; t < 64; ++t) {
      const int lane = t % 32, base = t - lane % 16;
      CHECK_EQ(out[t], 100 + base + arg % 16);
      CHECK_EQ(out[64 + t], 100 + (lane % 16 >= arg ? t - arg : t));
      CHECK_EQ(out[128 + t], 100 + (lane % 16 + arg < 16 ? t + arg : t));
      CHECK_EQ(out[192 + t], 100 + (t ^ arg));
      CHECK_EQ(out[256 + t], 100 + (t ^ arg));
    }
  }
}

// Warp sum by xor butterfly; `last_offset` = 1 is right, 2 is the planted bug (one step short).
__global__ void warp_sum_kernel(const float* x, float* out, int last_offset) {
  float v = x[threadIdx.x];
  for (int o = 16; o >= last_offset; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  out[threadIdx.x] = v;
}

static int warp_sum_mismatches(int last_offset) {
  std::vector<float> x(64), out(64);
  for (int i = 0; i < 64; ++i) x[i] = static_cast<float>(i);
  FASTLM_LAUNCH(warp_sum_kernel, 1, 64, 0, nullptr)(x.data(), out.data(), last_offset);
  int bad = 0;
  for (int i = 0; i < 64; ++i) bad += out[i] != (i < 32 ? 496.0f : 1520.0f);
  return bad;
}

EMU_TEST(warp_sum_by_shuffles) { CHECK_EQ(warp_sum_mismatches(1), 0); }

EMU_TEST(planted_wrong_shuffle_offset_gives_wrong_result) {
  const int bad = warp_sum_mismatches(2);
  std::printf("  wrong shuffle offset: %d of 64 outputs wrong\n", bad);
  CHECK(bad > 0);
}

__global__ void shuffle_bad_source_kernel(int* out) {
  out[threadIdx.x] = __shfl_sync(0x0000ffffu, 1, 20);
}

EMU_TEST(shuffle_from_lane_outside_mask_is_an_error) {
  std::vector<int> out(32);
  CHECK_ERROR(FASTLM_LAUNCH(shuffle_bad_source_kernel, 1, 16, 0, nullptr)(out.data()),
              "shuffle_bad_source_kernel", "__shfl_sync", "not in the mask");
}

__global__ void vote_kernel(unsigned* out) {
  const int pred = threadIdx.x % 3 == 0;
  out[threadIdx.x * 4 + 0] = __ballot_sync(0xffffffffu, pred);
  out[threadIdx.x * 4 + 1] = __any_sync(0xffffffffu, threadIdx.x == 37);
  out[threadIdx.x * 4 + 2] = __all_sync(0xffffffffu, threadIdx.x < 48);
  __syncwarp();
  out[threadIdx.x * 4 + 3] = __popc(__activemask());
}

EMU_TEST(votes) {
  std::vector<unsigned> out(64 * 4);
  FASTLM_LAUNCH(vote_kernel, 1, 64, 0, nullptr)(out.data());
  unsigned b0 = 0, b1 = 0;
  for (int l = 0; l < 32; ++l) {
    b0 |= (l % 3 == 0) << l;
    b1 |= ((l + 32) % 3 == 0) << l;
  }
  for (int t = 0; t < 64; ++t) {
    CHECK_EQ(out[t * 4 + 0], t < 32 ? b0 : b1);
    CHECK_EQ(out[t * 4 + 1], t < 32 ? 0u : 1u);
    CHECK_EQ(out[t * 4 + 2], t < 32 ? 1u : 0u);
    CHECK_EQ(out[t * 4 + 3], 32u);
  }
}

__global__ void atomic_kernel(float* fsum, int* isum, unsigned* umax) {
  atomicAdd(fsum, 0.5f);
  atomicAdd(isum, static_cast<int>(threadIdx.x));
  atomicMax(umax, blockIdx.x * 1000 + threadIdx.x);
}

EMU_TEST(atomics_across_blocks) {
  float f = 0;
  int i = 0;
  unsigned u = 0;
  FASTLM_LAUNCH(atomic_kernel, 5, 96, 0, nullptr)(&f, &i, &u);
  CHECK_EQ(f, 5 * 96 * 0.5f);
  CHECK_EQ(i, 5 * (95 * 96 / 2));
  CHECK_EQ(u, 4095u);
}

__global__ void early_exit_kernel(int* out, int n) {
  if (static_cast<int>(threadIdx.x) >= n) return;
  out[threadIdx.x] = 1;
  __syncthreads();  // exited threads count as arrived
  const int v = out[threadIdx.x] + out[(threadIdx.x + 1) % n];
  __syncthreads();
  out[threadIdx.x] = v;
}

EMU_TEST(exited_threads_do_not_block_syncthreads) {
  std::vector<int> out(50);
  FASTLM_LAUNCH(early_exit_kernel, 1, 64, 0, nullptr)(out.data(), 50);
  for (int v : out) CHECK_EQ(v, 2);
}

// Lane 3 waits at a barrier that its warp-mates never reach; they wait for it in a shuffle.
__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x == 3) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
  }
}

EMU_TEST(deadlock_is_reported) {
  std::vector<int> out(64);
  CHECK_ERROR(FASTLM_LAUNCH(divergent_barrier_kernel, 1, 64, 0, nullptr)(out.data()),
              "deadlock", "divergent_barrier_kernel", "__syncthreads");
  // The emulator recovers: the next launch runs normally.
  CHECK_EQ(warp_sum_mismatches(1), 0);
}

__global__ void big_smem_kernel(float* out) {
  FASTLM_DYNAMIC_SHARED(float, buf);
  buf[threadIdx.x] = 1.0f;
  out[threadIdx.x] = buf[threadIdx.x];
}

EMU_TEST(launch_configuration_errors) {
  std::vector<float> out(1024);
  FASTLM_LAUNCH(big_smem_kernel, 1, 1025, 0, nullptr)(out.data());
  CHECK_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  CHECK_EQ(cudaGetLastError(), cudaSuccess);
  auto kernel = &big_smem_kernel;
  FASTLM_LAUNCH(kernel, 1, 32, 64 * 1024, nullptr)(out.data());
  const cudaError_t e = cudaGetLastError();
  CHECK_EQ(e, cudaErrorInvalidValue);
  CHECK(std::string(cudaGetErrorString(e)).find("MaxDynamicSharedMemorySize") != std::string::npos);
  CHECK_EQ(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024),
           cudaSuccess);
  FASTLM_LAUNCH(kernel, 1, 32, 64 * 1024, nullptr)(out.data());
  CHECK_EQ(cudaGetLastError(), cudaSuccess);
  CHECK_EQ(out[31], 1.0f);
}

EMU_TEST(device_attributes) {
  int device = -1, sms = 0, optin = 0;
  CHECK_EQ(cudaGetDevice(&device), cudaSuccess);
  CHECK_EQ(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), cudaSuccess);
  CHECK_EQ(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), cudaSuccess);
  CHECK(sms > 0);
  CHECK_EQ(optin, 227 * 1024);
  CHECK_EQ(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 1), cudaErrorInvalidDevice);
}

// Block b reads what block b - 1 wrote: right only if blocks run in index order, which CUDA
// does not promise.
__global__ void block_order_kernel(int* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = blockIdx.x == 0 ? 1 : out[blockIdx.x - 1] + 1;
}

EMU_TEST(relying_on_block_order_gives_wrong_result) {
  std::vector<int> out(16, 0);
  FASTLM_LAUNCH(block_order_kernel, 16, 32, 0, nullptr)(out.data());
  int bad = 0;
  for (int b = 0; b < 16; ++b) bad += out[b] != b + 1;
  CHECK(bad > 0);
}
