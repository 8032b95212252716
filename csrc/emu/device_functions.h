// Device-side functions of the CUDA math and intrinsic headers, as host code: fast-math
// intrinsics (computed at full precision), integer bit tricks, CUDA's overloaded min/max and
// atomics (real atomics, so they stay correct if blocks ever run on several OS threads).
#pragma once

#include <math.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

// __expf, __logf, ...: the SFU approximations; the emulation computes them exactly.
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return exp10f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanhf(float x) { return tanhf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fmaf_rn(float x, float y, float z) { return fmaf(x, y, z); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline int __float2int_rn(float x) { return static_cast<int>(nearbyintf(x)); }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; std::memcpy(&x, &i, 4); return x; }
inline float __uint_as_float(unsigned i) { float x; std::memcpy(&x, &i, 4); return x; }

// popc / ffs / clz / umulhi (mul.hi.u32) / brev as in the CUDA math API (ffs and clz of 0 are 0 and 32).
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) {
  return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
inline unsigned __umulhi(unsigned x, unsigned y) {
  return static_cast<unsigned>((static_cast<uint64_t>(x) * y) >> 32);
}
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}

// CUDA's global min/max: overloaded for every arithmetic pair, result in the common type.
template <class A, class B,
          class = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) {
    return fmax(static_cast<C>(a), static_cast<C>(b));
  } else {
    return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
  }
}
template <class A, class B,
          class = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) {
    return fmin(static_cast<C>(a), static_cast<C>(b));
  } else {
    return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
  }
}

// __ldg: ld.global.nc, a plain load here.
template <class T>
inline T __ldg(const T* p) { return *p; }

// Memory fences: the emulation is sequentially consistent per OS thread already.
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

namespace fastlm_emu::detail {
template <class T>
struct same {  // keeps a parameter out of template deduction: atomicAdd(unsigned*, 1) works
  using type = T;
};
}  // namespace fastlm_emu::detail

// atom.add / atom.max / atom.min / atom.exch / atom.cas: return the old value.
template <class T, class = std::enable_if_t<std::is_integral_v<T>>>
inline T atomicAdd(T* p, typename fastlm_emu::detail::same<T>::type v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
template <class T, class = std::enable_if_t<std::is_integral_v<T>>>
inline T atomicSub(T* p, typename fastlm_emu::detail::same<T>::type v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }
template <class T, class = std::enable_if_t<std::is_integral_v<T>>>
inline T atomicOr(T* p, typename fastlm_emu::detail::same<T>::type v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }
template <class T, class = std::enable_if_t<std::is_integral_v<T>>>
inline T atomicAnd(T* p, typename fastlm_emu::detail::same<T>::type v) { return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); }
template <class T>
inline T atomicExch(T* p, typename fastlm_emu::detail::same<T>::type v) {
  T old;
  __atomic_exchange(p, &v, &old, __ATOMIC_RELAXED);
  return old;
}
template <class T>
inline T atomicCAS(T* p, typename fastlm_emu::detail::same<T>::type compare,
                   typename fastlm_emu::detail::same<T>::type v) {
  __atomic_compare_exchange(p, &compare, &v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;  // holds the old value whether or not the exchange happened
}

namespace fastlm_emu::detail {
// Read-modify-write of a float/double through a compare-and-swap loop on its bits.
template <class T, class F>
inline T atomic_update(T* p, F f) {
  T old;
  __atomic_load(p, &old, __ATOMIC_RELAXED);
  T next = f(old);
  while (!__atomic_compare_exchange(p, &old, &next, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    next = f(old);
  }
  return old;
}
}  // namespace fastlm_emu::detail

inline float atomicAdd(float* p, float v) {
  return fastlm_emu::detail::atomic_update(p, [v](float x) { return x + v; });
}
inline double atomicAdd(double* p, double v) {
  return fastlm_emu::detail::atomic_update(p, [v](double x) { return x + v; });
}
template <class T, class = std::enable_if_t<std::is_integral_v<T>>>
inline T atomicMax(T* p, typename fastlm_emu::detail::same<T>::type v) {
  return fastlm_emu::detail::atomic_update(p, [v](T x) { return x < v ? v : x; });
}
template <class T, class = std::enable_if_t<std::is_integral_v<T>>>
inline T atomicMin(T* p, typename fastlm_emu::detail::same<T>::type v) {
  return fastlm_emu::detail::atomic_update(p, [v](T x) { return v < x ? v : x; });
}
