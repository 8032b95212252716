// Checked mode and fault reporting: out-of-bounds global accesses (buffers from checked_alloc),
// shared-memory overruns, bad addresses and stack overflow become a std::runtime_error from the
// launch that names kernel, block and thread; the planted off-by-one store is caught.
#include <vector>

#include "emu/cuda_emu.h"
#include "emu_test.h"

// y[i] = 2 x[i]; `extra` = 1 is the planted off-by-one (i <= n).
__global__ void scale_kernel(const float* x, float* y, int n, int extra) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n + extra) y[i] = 2.0f * x[i < n ? i : 0];
}

__global__ void read_past_end_kernel(const float* x, float* y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = x[i + 1];
}

__global__ void write_before_start_kernel(float* y, int offset) {
  if (blockIdx.x == 1 && threadIdx.x == 3) y[offset] = 1.0f;
}

struct Buffers {
  explicit Buffers(int n)
      : x(static_cast<float*>(fastlm_emu::checked_alloc(n * sizeof(float)))),
        y(static_cast<float*>(fastlm_emu::checked_alloc(n * sizeof(float)))) {
    for (int i = 0; i < n; ++i) x[i] = static_cast<float>(i);
  }
  ~Buffers() {
    fastlm_emu::checked_free(x);
    fastlm_emu::checked_free(y);
  }
  float* x;
  float* y;
};

EMU_TEST(in_bounds_kernel_runs_clean) {
  Buffers b(1001);
  FASTLM_LAUNCH(scale_kernel, 8, 128, 0, nullptr)(b.x, b.y, 1001, 0);
  for (int i = 0; i < 1001; ++i) CHECK_EQ(b.y[i], 2.0f * i);
}

EMU_TEST(planted_off_by_one_store_is_caught) {
  Buffers b(1001);  // element 1001 = block 7, thread 105
  const std::string msg =
      CHECK_ERROR(FASTLM_LAUNCH(scale_kernel, 8, 128, 0, nullptr)(b.x, b.y, 1001, 1),
                  "kernel 'scale_kernel'", "block (7,0,0)", "thread (105,0,0)",
                  "out-of-bounds write at byte 4004 of 4004-byte global buffer");
  std::printf("  off-by-one store: %s\n", msg.c_str());
}

EMU_TEST(read_past_the_end_is_caught) {
  Buffers b(256);
  CHECK_ERROR(FASTLM_LAUNCH(read_past_end_kernel, 2, 128, 0, nullptr)(b.x, b.y, 256),
              "read_past_end_kernel", "block (1,0,0)", "thread (127,0,0)",
              "out-of-bounds read at byte 1024 of 1024-byte global buffer");
}

EMU_TEST(write_before_the_start_is_caught) {
  Buffers small(1001);  // the front gap before the data holds a canary, checked after the launch
  CHECK_ERROR(FASTLM_LAUNCH(write_before_start_kernel, 2, 32, 0, nullptr)(small.y, -1),
              "write_before_start_kernel", "write at byte -4 of 4004-byte global buffer");
  Buffers paged(1024);  // data starts right after the leading guard page: the write faults
  CHECK_ERROR(FASTLM_LAUNCH(write_before_start_kernel, 2, 32, 0, nullptr)(paged.y, -1),
              "block (1,0,0)", "thread (3,0,0)", "write at byte -4 of 4096-byte global buffer");
}

__global__ void smem_overrun_kernel(float* out, int n) {
  FASTLM_DYNAMIC_SHARED(float, buf);
  for (int i = threadIdx.x; i <= n; i += blockDim.x) buf[i] = 1.0f;  // one too many
  __syncthreads();
  out[threadIdx.x] = buf[threadIdx.x];
}

EMU_TEST(shared_memory_overrun_is_caught) {
  std::vector<float> out(64);
  CHECK_ERROR(FASTLM_LAUNCH(smem_overrun_kernel, 3, 64, 100 * sizeof(float), nullptr)(out.data(), 100),
              "smem_overrun_kernel", "block (", "thread (36,0,0)",
              "write at byte 400 of 400-byte dynamic shared memory");
}

__global__ void null_kernel(float* out) {
  if (threadIdx.x == 7) out[threadIdx.x] = 1.0f;
}

__global__ void divide_kernel(int* out, int d) { out[threadIdx.x] = 100 / (d - static_cast<int>(threadIdx.x)); }

__device__ int recurse(volatile char* prev, int depth) {
  volatile char frame[1024];
  frame[0] = prev[0];
  return depth == 0 ? frame[0] : recurse(frame, depth - 1) + frame[0];
}

__global__ void stack_overflow_kernel(int* out, int depth) {
  volatile char seed[1] = {1};
  out[threadIdx.x] = recurse(seed, depth);
}

EMU_TEST(bad_addresses_are_errors_not_crashes) {
  CHECK_ERROR(FASTLM_LAUNCH(null_kernel, 1, 32, 0, nullptr)(nullptr), "null_kernel",
              "thread (7,0,0)", "invalid write");
  std::vector<int> out(32);
  CHECK_ERROR(FASTLM_LAUNCH(divide_kernel, 1, 32, 0, nullptr)(out.data(), 5), "thread (5,0,0)",
              "division by zero");
  CHECK_ERROR(FASTLM_LAUNCH(stack_overflow_kernel, 1, 32, 0, nullptr)(out.data(), 1000000),
              "stack_overflow_kernel", "stack overflow");
  // The emulator recovers from all of them.
  Buffers b(100);
  FASTLM_LAUNCH(scale_kernel, 1, 128, 0, nullptr)(b.x, b.y, 100, 0);
  CHECK_EQ(b.y[99], 198.0f);
}
