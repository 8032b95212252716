// The few CUDA runtime API calls that kernel launchers make, with the emulation's semantics:
// errors of a launch's configuration are reported through cudaGetLastError() as in CUDA, and
// cudaGetErrorString() of that error says what was wrong.
#pragma once

#include <cuda_runtime_api.h>

#include "runtime.h"

// cudaGetLastError: returns and clears the last error of this OS thread.
extern "C" inline cudaError_t cudaGetLastError() {
  const cudaError_t e = fastlm_emu::detail::last_error;
  fastlm_emu::detail::last_error = cudaSuccess;
  return e;
}

// cudaPeekAtLastError: returns the last error without clearing it.
extern "C" inline cudaError_t cudaPeekAtLastError() { return fastlm_emu::detail::last_error; }

extern "C" inline const char* cudaGetErrorString(cudaError_t e) {
  using fastlm_emu::detail::last_error_code;
  using fastlm_emu::detail::last_error_detail;
  if (e == last_error_code && !last_error_detail.empty()) return last_error_detail.c_str();
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unknown error";
  }
}

// cudaGetDevice: the emulated device is device 0.
extern "C" inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

// cudaDeviceGetAttribute: an sm_90-like device with only 3 multiprocessors, so that launchers
// sizing grids by the SM count get small grids whose grid-stride loops take several turns.
extern "C" inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  using namespace fastlm_emu::detail;
  if (device != 0) {
    set_error(cudaErrorInvalidDevice, "cudaDeviceGetAttribute: the emulation has device 0 only");
    return cudaErrorInvalidDevice;
  }
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = 3; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = static_cast<int>(kDefaultSmemLimit); break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(kMaxSmemOptIn); break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    default:
      set_error(cudaErrorInvalidValue, "cudaDeviceGetAttribute: attribute " +
                                           std::to_string(static_cast<int>(attr)) +
                                           " is not emulated (csrc/emu/runtime_api.h)");
      return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes): the limit
// that launches of `kernel` are checked against (48 KiB without it, at most 227 KiB).
template <class F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  using namespace fastlm_emu::detail;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || static_cast<size_t>(value) > kMaxSmemOptIn) {
    set_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: " + std::to_string(value) +
                                         " bytes of dynamic shared memory exceed the device's " +
                                         std::to_string(kMaxSmemOptIn));
    return cudaErrorInvalidValue;
  }
  std::lock_guard<std::mutex> lock(smem_limits_mutex());
  smem_limits()[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(value);
  return cudaSuccess;
}
