// Half / bfloat16 conversions, vector types and 16-byte loads, math and bit intrinsics, min/max.
#include <cstring>
#include <vector>

#include "emu/cuda_emu.h"
#include "emu_test.h"

static uint16_t bits(__half h) { return __half_as_ushort(h); }
static uint16_t bits(__nv_bfloat16 h) { return __bfloat16_as_ushort(h); }

EMU_TEST(half_conversions_round_to_nearest_even) {
  CHECK_EQ(bits(__float2half(1.0f)), 0x3C00);
  CHECK_EQ(bits(__float2half_rn(-2.5f)), 0xC100);
  CHECK_EQ(bits(__float2half(65504.0f)), 0x7BFF);
  CHECK_EQ(bits(__float2half(1e6f)), 0x7C00);                 // overflow -> inf
  CHECK_EQ(bits(__float2half(1.0f + 1.0f / 2048)), 0x3C00);   // tie -> even
  CHECK_EQ(bits(__float2half(1.0f + 3.0f / 2048)), 0x3C02);   // tie -> even (up)
  CHECK_EQ(__half2float(__ushort_as_half(0x0001)), std::ldexp(1.0f, -24));  // smallest subnormal
  CHECK(std::isnan(__half2float(__float2half(NAN))));
  CHECK_EQ(static_cast<float>(__float2half(0.1f)), 0.0999755859375f);
}

EMU_TEST(bfloat16_conversions_round_to_nearest_even) {
  CHECK_EQ(bits(__float2bfloat16(1.0f)), 0x3F80);
  CHECK_EQ(bits(__float2bfloat16(-3.0f)), 0xC040);
  CHECK_EQ(bits(__float2bfloat16(1.0f + 1.0f / 256)), 0x3F80);  // tie -> even
  CHECK_EQ(bits(__float2bfloat16(1.0f + 3.0f / 256)), 0x3F82);  // tie -> even (up)
  CHECK_EQ(__bfloat162float(__ushort_as_bfloat16(0x4049)), 3.140625f);
  CHECK(std::isinf(__bfloat162float(__float2bfloat16(3.4e38f))));
}

// Rows of 16-bit values read as 16-byte vectors, converted, summed per row.
template <class T>
__global__ void vector_load_kernel(const T* x, float* out, int cols) {
  const uint4* row = reinterpret_cast<const uint4*>(x + blockIdx.x * cols);
  float s = 0;
  for (int i = threadIdx.x; i < cols / 8; i += blockDim.x) {
    const uint4 v = row[i];
    const T* e = reinterpret_cast<const T*>(&v);
    for (int j = 0; j < 8; ++j) s += static_cast<float>(e[j]);
  }
  for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}

template <class T>
static void check_vector_loads() {
  const int rows = 3, cols = 96;
  std::vector<T> x(rows * cols);
  for (int i = 0; i < rows * cols; ++i) x[i] = T(static_cast<float>(i % 17) * 0.25f);
  std::vector<float> out(rows);
  auto kernel = &vector_load_kernel<T>;
  FASTLM_LAUNCH(kernel, rows, 32, 0, nullptr)(x.data(), out.data(), cols);
  for (int r = 0; r < rows; ++r) {
    float s = 0;
    for (int i = 0; i < cols; ++i) s += static_cast<float>(x[r * cols + i]);
    CHECK_NEAR(out[r], s, 1e-3);
  }
}

EMU_TEST(vector_loads_of_half_and_bfloat16) {
  static_assert(sizeof(uint4) == 16 && alignof(uint4) == 16, "uint4");
  static_assert(sizeof(float4) == 16 && alignof(float4) == 16, "float4");
  static_assert(sizeof(float2) == 8 && alignof(float2) == 8, "float2");
  check_vector_loads<__half>();
  check_vector_loads<__nv_bfloat16>();
}

EMU_TEST(half2_and_bfloat162) {
  const half2 h = __floats2half2_rn(1.5f, -2.0f);
  CHECK_EQ(__low2float(h), 1.5f);
  CHECK_EQ(__high2float(h), -2.0f);
  const float2 f = __half22float2(h);
  CHECK_EQ(f.x + f.y, -0.5f);
  const __nv_bfloat162 b = __floats2bfloat162_rn(0.5f, 4.0f);
  CHECK_EQ(__low2float(b) * __high2float(b), 2.0f);
  const float4 v = make_float4(1, 2, 3, 4);
  CHECK_EQ(v.x + v.y + v.z + v.w, 10.0f);
}

EMU_TEST(math_and_bit_intrinsics) {
  CHECK_NEAR(rsqrtf(4.0f), 0.5f, 1e-7);
  CHECK_NEAR(__expf(1.0f), 2.718281828f, 1e-6);
  CHECK_NEAR(__logf(8.0f), 2.079441542f, 1e-6);
  CHECK_NEAR(exp2f(3.0f), 8.0f, 0);
  CHECK_NEAR(__fdividef(1.0f, 4.0f), 0.25f, 0);
  CHECK_EQ(fmaxf(1.0f, NAN), 1.0f);
  CHECK_EQ(__popc(0xF0F0u), 8);
  CHECK_EQ(__ffs(0), 0);
  CHECK_EQ(__ffs(0x18), 4);
  CHECK_EQ(__clz(1), 31);
  CHECK_EQ(__brev(1u), 0x80000000u);
  CHECK_EQ(__umulhi(0xD2511F53u, 0xFFFFFFFFu), 0xD2511F52u);  // (2^32 - 1) a = a 2^32 - a
  CHECK_EQ(__umulhi(0x10000u, 0x10000u), 1u);
  CHECK_EQ(max(3, 7u), 7u);          // int, unsigned -> unsigned
  CHECK_EQ(min(-1, 2), -1);
  CHECK_EQ(max(1.5f, 2.5f), 2.5f);
  CHECK_EQ(min(2.0, 1.0f), 1.0);
  CHECK_EQ(__float_as_uint(1.0f), 0x3F800000u);
}
