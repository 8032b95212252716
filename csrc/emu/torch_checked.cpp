// Checked mode of the cuda_emu backend (part of fastlm._C_emu): while it is on, every CPU tensor
// torch allocates is a checked buffer (memory.h) that ends at a PROT_NONE page, so an emulated
// kernel that reads or writes past the end of any tensor it was given faults, and its launch
// raises RuntimeError naming kernel, block and thread. fastlm/emu.py turns it on around each
// emulated kernel call and hands the kernels checked copies of their input tensors.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <mutex>

#include "memory.h"

namespace {

class CheckedAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    void* data = fastlm_emu::checked_alloc(bytes);
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  static void release(void* data) { fastlm_emu::checked_free(data); }
};

std::mutex mutex;
c10::Allocator* previous = nullptr;  // the CPU allocator to restore; null while checked mode is off

// Turns checked allocation of CPU tensors on or off; returns whether it was on.
bool set_checked(bool on) {
  static CheckedAllocator checked;
  std::lock_guard<std::mutex> lock(mutex);
  const bool was_on = previous != nullptr;
  if (on && !was_on) {
    previous = c10::GetCPUAllocator();
    c10::SetCPUAllocator(&checked);
  } else if (!on && was_on) {
    c10::SetCPUAllocator(previous);
    previous = nullptr;
  }
  return was_on;
}

}  // namespace

TORCH_LIBRARY(fastlm_emu, m) { m.def("set_checked(bool on) -> bool", &set_checked); }
