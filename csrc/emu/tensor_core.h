// Emulation of the tensor-core building blocks of sm_80+, with the fragment layouts of the PTX ISA
// ("Matrix Fragments for mma.m16n8k16 with floating point type", "ldmatrix", "cp.async"):
// mma.sync and ldmatrix are warp collectives over all 32 lanes; cp.async copies land at
// cp.async.wait_group. Called by csrc/cuda/tensor_core.cuh when compiled without nvcc.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <math.h>

#include <cstdint>
#include <cstring>

#include "collectives.h"

namespace fastlm_emu {
namespace detail {

template <class T>
float b16_to_float(uint16_t bits);
template <>
inline float b16_to_float<__half>(uint16_t bits) {
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}
template <>
inline float b16_to_float<__nv_bfloat16>(uint16_t bits) {
  const uint32_t f = uint32_t{bits} << 16;
  float x;
  std::memcpy(&x, &f, 4);
  return x;
}

// Element i (0 = low half) of a .f16x2 / .bf16x2 register.
inline uint16_t half_of(uint32_t reg, int i) { return static_cast<uint16_t>(reg >> (16 * i)); }

struct MmaOperands {
  const uint32_t* a;
  const uint32_t* b;
  const float* c;
};

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, for lane = 4 * groupID +
// threadID_in_group (g, q):
//   A (16x16): a[r] holds a_{2r}, a_{2r+1}; a_i sits at row g + 8 * (i / 2 % 2),
//              column 2q + i % 2 + 8 * (i / 4)
//   B (16x8):  b[r] holds b_{2r}, b_{2r+1}; b_i sits at row 2q + i % 2 + 8 * (i / 2), column g
//   C, D (16x8 f32): c_i sits at row g + 8 * (i / 2), column 2q + i % 2
template <class T>
void mma_complete(Thread* const* lanes, unsigned) {
  float a[16][16], b[16][8], c[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, q = l & 3;
    const auto* op = static_cast<const MmaOperands*>(lanes[l]->call.in);
    for (int i = 0; i < 8; ++i) {
      a[g + 8 * (i / 2 % 2)][2 * q + i % 2 + 8 * (i / 4)] =
          b16_to_float<T>(half_of(op->a[i / 2], i % 2));
    }
    for (int i = 0; i < 4; ++i) {
      b[2 * q + i % 2 + 8 * (i / 2)][g] = b16_to_float<T>(half_of(op->b[i / 2], i % 2));
      c[g + 8 * (i / 2)][2 * q + i % 2] = op->c[i];
    }
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, q = l & 3;
    auto* d = static_cast<float*>(lanes[l]->call.out);
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i / 2), col = 2 * q + i % 2;
      float acc = c[row][col];
      for (int k = 0; k < 16; ++k) acc = fmaf(a[row][k], b[k][col], acc);
      d[i] = acc;
    }
  }
}

// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{,.trans}.shared.b16: lanes 8j..8j+7 give the row addresses
// (16 bytes each, 16-byte aligned) of matrix j; lane 4g + q receives in r[j] the elements (g, 2q)
// and (g, 2q+1) of matrix j, or (2q, g) and (2q+1, g) with .trans.
inline void ldmatrix_complete(Thread* const* lanes, unsigned) {
  const int num = lanes[0]->call.arg;
  const bool trans = lanes[0]->call.width != 0;
  uint16_t m[4][8][8];
  for (int j = 0; j < num; ++j) {
    for (int r = 0; r < 8; ++r) {
      const void* row = *static_cast<const void* const*>(lanes[8 * j + r]->call.in);
      if (reinterpret_cast<uintptr_t>(row) % 16 != 0) {
        fail("ldmatrix: lane " + std::to_string(8 * j + r) +
             " gives a row address that is not 16-byte aligned");
      }
      std::memcpy(m[j][r], row, 16);
    }
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, q = l & 3;
    auto* out = static_cast<uint32_t*>(lanes[l]->call.out);
    for (int j = 0; j < num; ++j) {
      const uint16_t lo = trans ? m[j][2 * q][g] : m[j][g][2 * q];
      const uint16_t hi = trans ? m[j][2 * q + 1][g] : m[j][g][2 * q + 1];
      out[j] = uint32_t{lo} | (uint32_t{hi} << 16);
    }
  }
}

}  // namespace detail

template <class T>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                  const float (&c)[4]) {
  detail::MmaOperands op{a, b, c};
  float result[4];
  detail::WarpCall call;
  call.complete = &detail::mma_complete<T>;
  call.name = "mma.sync.m16n8k16";
  call.mask = 0xffffffffu;
  call.in = &op;
  call.out = result;
  detail::warp_collective(call);
  for (int i = 0; i < 4; ++i) d[i] = result[i];
}

inline void ldmatrix(uint32_t* r, int num, bool trans, const void* smem_row) {
  uint32_t result[4];
  detail::WarpCall call;
  call.complete = &detail::ldmatrix_complete;
  call.name = trans ? "ldmatrix.trans" : "ldmatrix";
  call.mask = 0xffffffffu;
  call.in = &smem_row;
  call.out = result;
  call.arg = num;
  call.width = trans;
  detail::warp_collective(call);
  for (int j = 0; j < num; ++j) r[j] = result[j];
}

// cp.async.cg.shared.global [dst], [src], 16, src_bytes: the first src_bytes come from global
// memory (read now), the rest of the 16 are zeros; dst is written at cp.async.wait_group.
inline void cp_async(void* dst, const void* src, int src_bytes) {
  detail::Thread& t = *detail::current;
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0) {
    detail::fail("cp.async: 16-byte copy with an address that is not 16-byte aligned");
  }
  if (src_bytes < 0 || src_bytes > 16) {
    detail::fail("cp.async: src-size " + std::to_string(src_bytes) + " is not in [0, 16]");
  }
  detail::AsyncCopy c;
  c.dst = dst;
  std::memset(c.data, 0, 16);
  if (src_bytes > 0) std::memcpy(c.data, src, static_cast<size_t>(src_bytes));
  c.group = t.open_group;
  t.copies.push_back(c);
}

// cp.async.commit_group: closes the group of all copies issued since the last commit.
inline void cp_async_commit() { ++detail::current->open_group; }

// cp.async.wait_group n: waits until at most n committed groups are still in flight.
inline void cp_async_wait(unsigned n) { detail::retire_copies(*detail::current, n); }

}  // namespace fastlm_emu
