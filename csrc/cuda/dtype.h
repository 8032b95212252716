// The element types the kernels are instantiated for, and a FlashAttention-style static switch that
// turns a runtime DType into a compile-time type inside a lambda.
#pragma once

namespace fastlm {

enum class DType { f32, f16, bf16 };

// FASTLM_DTYPE_SWITCH(dtype, T, [&] { ... uses T ... }) with T one of float / HalfT / BFloat16T, the
// caller's names for the 16-bit types (cuda_fp16 / cuda_bf16 types on the device, c10 types on the CPU).
#define FASTLM_DTYPE_SWITCH(DTYPE, T, HALF_T, BF16_T, ...)  \
  [&] {                                                     \
    switch (DTYPE) {                                        \
      case ::fastlm::DType::f16: {                          \
        using T = HALF_T;                                   \
        return __VA_ARGS__();                               \
      }                                                     \
      case ::fastlm::DType::bf16: {                         \
        using T = BF16_T;                                   \
        return __VA_ARGS__();                               \
      }                                                     \
      default: {                                            \
        using T = float;                                    \
        return __VA_ARGS__();                               \
      }                                                     \
    }                                                       \
  }()

// Switch for a type that is either `BASE` or float.
#define FASTLM_SAME_OR_FLOAT_SWITCH(IS_FLOAT, T, BASE, ...) \
  [&] {                                                     \
    if (IS_FLOAT) {                                         \
      using T = float;                                      \
      return __VA_ARGS__();                                 \
    } else {                                                \
      using T = BASE;                                       \
      return __VA_ARGS__();                                 \
    }                                                       \
  }()

}  // namespace fastlm
