// mma.sync m16n8k16, ldmatrix and cp.async (csrc/cuda/tensor_core.cuh) against the PTX ISA's
// fragment layouts and a plain matmul, in fp16 and bf16.
#include <cstring>
#include <vector>

#include "cuda/tensor_core.cuh"
#include "emu/cuda_emu.h"
#include "emu_test.h"

using namespace fastlm;

template <class T>
static uint32_t pack(T lo, T hi) {
  uint16_t l, h;
  std::memcpy(&l, &lo, 2);
  std::memcpy(&h, &hi, 2);
  return uint32_t{l} | (uint32_t{h} << 16);
}

template <class T>
__device__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  if constexpr (std::is_same_v<T, __half>) {
    mma_m16n8k16_f16(d, a, b, c);
  } else {
    mma_m16n8k16_bf16(d, a, b, c);
  }
}

// Fragments built by each lane straight from the PTX ISA's formulas (groupID g, threadID_in_group
// q): A row-major 16x16, B 16x8 given as K x N row-major, C and D 16x8.
template <class T>
__global__ void mma_fragment_kernel(const T* a, const T* b, const float* c, float* d) {
  const int lane = threadIdx.x, g = lane / 4, q = lane % 4;
  uint32_t ra[4], rb[2];
  float rc[4], rd[4];
  for (int r = 0; r < 4; ++r) {  // a_{2r}, a_{2r+1}: row g (+8 for r odd), cols 2q, 2q+1 (+8 for r >= 2)
    const int row = g + 8 * (r % 2), col = 2 * q + 8 * (r / 2);
    ra[r] = pack(a[row * 16 + col], a[row * 16 + col + 1]);
  }
  for (int r = 0; r < 2; ++r) {  // b_{2r}, b_{2r+1}: rows 2q, 2q+1 (+8 for r = 1), col g
    const int k = 2 * q + 8 * r;
    rb[r] = pack(b[k * 8 + g], b[(k + 1) * 8 + g]);
  }
  for (int i = 0; i < 4; ++i) rc[i] = c[(g + 8 * (i / 2)) * 8 + 2 * q + i % 2];
  mma<T>(rd, ra, rb, rc);
  for (int i = 0; i < 4; ++i) d[(g + 8 * (i / 2)) * 8 + 2 * q + i % 2] = rd[i];
}

// The usual shared-memory path: A (16x16 row-major) through ldmatrix.x4, B either as N x K rows
// through ldmatrix.x2 or as K x N rows through ldmatrix.x2.trans; D = A * B + C.
template <class T, bool BIsKxN>
__global__ void mma_ldmatrix_kernel(const T* a, const T* b, const float* c, float* d) {
  __shared__ __align__(16) T sa[16 * 16];
  __shared__ __align__(16) T sb[16 * 8];
  const int lane = threadIdx.x, g = lane / 4, q = lane % 4;
  for (int i = lane; i < 256; i += 32) sa[i] = a[i];
  for (int i = lane; i < 128; i += 32) sb[i] = b[i];
  __syncwarp();
  uint32_t ra[4], rb[2];
  ldmatrix_x4(ra, &sa[(lane % 16) * 16 + (lane / 16) * 8]);
  if (BIsKxN) {
    ldmatrix_x2_trans(rb, &sb[(lane % 16) * 8]);
  } else {
    ldmatrix_x2(rb, &sb[(lane % 8) * 16 + ((lane / 8) % 2) * 8]);
  }
  float rc[4], rd[4];
  for (int i = 0; i < 4; ++i) rc[i] = c[(g + 8 * (i / 2)) * 8 + 2 * q + i % 2];
  mma<T>(rd, ra, rb, rc);
  for (int i = 0; i < 4; ++i) d[(g + 8 * (i / 2)) * 8 + 2 * q + i % 2] = rd[i];
}

template <class T>
static void check_mma() {
  std::vector<T> a(256), b_kn(128), b_nk(128);
  std::vector<float> c(128), d(128), ref(128);
  for (int i = 0; i < 256; ++i) a[i] = T(static_cast<float>((i * 7) % 23 - 11) / 8);
  for (int k = 0; k < 16; ++k) {
    for (int n = 0; n < 8; ++n) {
      b_kn[k * 8 + n] = b_nk[n * 16 + k] = T(static_cast<float>((k * 5 + n * 3) % 13 - 6) / 4);
    }
  }
  for (int i = 0; i < 128; ++i) c[i] = static_cast<float>(i % 5) - 2;
  for (int m = 0; m < 16; ++m) {
    for (int n = 0; n < 8; ++n) {
      double s = c[m * 8 + n];
      for (int k = 0; k < 16; ++k) s += double(float(a[m * 16 + k])) * double(float(b_kn[k * 8 + n]));
      ref[m * 8 + n] = static_cast<float>(s);
    }
  }
  auto frag = &mma_fragment_kernel<T>;
  FASTLM_LAUNCH(frag, 1, 32, 0, nullptr)(a.data(), b_kn.data(), c.data(), d.data());
  for (int i = 0; i < 128; ++i) CHECK_NEAR(d[i], ref[i], 1e-5);
  auto kxn = &mma_ldmatrix_kernel<T, true>;
  std::fill(d.begin(), d.end(), NAN);
  FASTLM_LAUNCH(kxn, 1, 32, 0, nullptr)(a.data(), b_kn.data(), c.data(), d.data());
  for (int i = 0; i < 128; ++i) CHECK_NEAR(d[i], ref[i], 1e-5);
  auto nxk = &mma_ldmatrix_kernel<T, false>;
  std::fill(d.begin(), d.end(), NAN);
  FASTLM_LAUNCH(nxk, 1, 32, 0, nullptr)(a.data(), b_nk.data(), c.data(), d.data());
  for (int i = 0; i < 128; ++i) CHECK_NEAR(d[i], ref[i], 1e-5);
}

EMU_TEST(mma_m16n8k16_f16_matches_matmul) { check_mma<__half>(); }
EMU_TEST(mma_m16n8k16_bf16_matches_matmul) { check_mma<__nv_bfloat16>(); }

// Four 8x8 matrices of 16-bit values v = 64 * matrix + 8 * row + col, rows given by lanes 8j..8j+7
// in reverse order (the addresses, not the lane numbers, decide the rows).
template <int N, bool Trans>
__global__ void ldmatrix_kernel(uint32_t* out) {
  __shared__ __align__(16) uint16_t m[4 * 64];
  for (int i = threadIdx.x; i < 256; i += 32) m[i] = static_cast<uint16_t>(i);
  __syncwarp();
  const int j = threadIdx.x / 8, row = 7 - threadIdx.x % 8;
  const void* p = &m[(j % N) * 64 + row * 8];
  uint32_t r[N];
  if constexpr (N == 1) Trans ? ldmatrix_x1_trans(r, p) : ldmatrix_x1(r, p);
  if constexpr (N == 2) Trans ? ldmatrix_x2_trans(r, p) : ldmatrix_x2(r, p);
  if constexpr (N == 4) Trans ? ldmatrix_x4_trans(r, p) : ldmatrix_x4(r, p);
  for (int i = 0; i < N; ++i) out[threadIdx.x * 4 + i] = r[i];
}

template <int N, bool Trans>
static void check_ldmatrix() {
  std::vector<uint32_t> out(128);
  auto kernel = &ldmatrix_kernel<N, Trans>;
  FASTLM_LAUNCH(kernel, 1, 32, 0, nullptr)(out.data());
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, q = lane % 4;
    for (int j = 0; j < N; ++j) {
      // Lane 8j + r gave the address of array row 7 - r as row r of matrix j.
      auto elem = [&](int r, int col) { return static_cast<uint32_t>(64 * j + 8 * (7 - r) + col); };
      const uint32_t lo = Trans ? elem(2 * q, g) : elem(g, 2 * q);
      const uint32_t hi = Trans ? elem(2 * q + 1, g) : elem(g, 2 * q + 1);
      CHECK_EQ(out[lane * 4 + j], lo | (hi << 16));
    }
  }
}

EMU_TEST(ldmatrix_fragment_layouts) {
  check_ldmatrix<1, false>();
  check_ldmatrix<2, false>();
  check_ldmatrix<4, false>();
  check_ldmatrix<1, true>();
  check_ldmatrix<2, true>();
  check_ldmatrix<4, true>();
}

__global__ void ldmatrix_misaligned_kernel(uint32_t* out) {
  __shared__ __align__(16) uint16_t m[128];
  uint32_t r[1];
  ldmatrix_x1(r, &m[threadIdx.x % 8 * 8 + 1]);
  out[threadIdx.x] = r[0];
}

EMU_TEST(ldmatrix_misaligned_row_is_an_error) {
  std::vector<uint32_t> out(32);
  CHECK_ERROR(FASTLM_LAUNCH(ldmatrix_misaligned_kernel, 1, 32, 0, nullptr)(out.data()),
              "ldmatrix", "not 16-byte aligned", "ldmatrix_misaligned_kernel");
}

// Each thread copies two 16-byte chunks in two groups and records what its shared memory holds
// before any wait, after wait_group 1 and after wait_group 0; a third, zero-filled copy reads
// only 4 bytes.
__global__ void cp_async_kernel(const float* src, float* out) {
  FASTLM_DYNAMIC_SHARED(float, buf);
  float* mine = buf + threadIdx.x * 12;
  cp_async_16(mine, src + threadIdx.x * 12);
  cp_async_commit();
  cp_async_16(mine + 4, src + threadIdx.x * 12 + 4);
  cp_async_commit();
  cp_async_16_zfill(mine + 8, src + threadIdx.x * 12 + 8, 4);
  cp_async_commit();
  float* o = out + threadIdx.x * 4;
  o[0] = mine[0];  // nothing has landed yet: poison (NaN)
  cp_async_wait<2>();
  o[1] = mine[0] + mine[4];  // only the first of three groups landed: mine[4] still NaN
  cp_async_wait<0>();
  o[2] = mine[0] + mine[4];
  o[3] = mine[8] + mine[9] + mine[10] + mine[11];
}

EMU_TEST(cp_async_lands_at_wait_group) {
  const int threads = 32;
  std::vector<float> src(threads * 12), out(threads * 4);
  for (int i = 0; i < threads * 12; ++i) src[i] = static_cast<float>(i);
  FASTLM_LAUNCH(cp_async_kernel, 1, threads, threads * 12 * sizeof(float), nullptr)(src.data(), out.data());
  for (int t = 0; t < threads; ++t) {
    CHECK(std::isnan(out[t * 4 + 0]));
    CHECK(std::isnan(out[t * 4 + 1]));
    CHECK_EQ(out[t * 4 + 2], src[t * 12] + src[t * 12 + 4]);
    CHECK_EQ(out[t * 4 + 3], src[t * 12 + 8]);
  }
}
