// Guarded memory: mappings whose data ends exactly at a PROT_NONE page, so an access past the end
// faults at once, and a registry that turns a faulting address back into "n bytes past the end of
// the m-byte <what>". Used for the emulated thread stacks, each block's dynamic shared memory and
// the checked mode's global buffers.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <string>

namespace fastlm_emu {
namespace detail {

enum class RegionKind { global, shared, stack };

inline size_t page_size() {
  static const size_t size = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return size;
}

inline size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

// Layout: [guard page][front gap filled with kCanary][data][guard page]. The data ends at the
// trailing guard; the front gap (< one page) cannot fault, so writes into it are found afterwards
// by check_front_canary().
struct Region {
  char* map = nullptr;
  size_t map_bytes = 0;
  char* data = nullptr;
  size_t bytes = 0;
  RegionKind kind = RegionKind::global;
};

constexpr unsigned char kCanary = 0xA5;

class Registry {
 public:
  void add(const Region& r) {
    std::lock_guard<std::mutex> lock(mutex_);
    regions_[reinterpret_cast<uintptr_t>(r.map)] = r;
  }
  void remove(const char* map) {
    std::lock_guard<std::mutex> lock(mutex_);
    regions_.erase(reinterpret_cast<uintptr_t>(map));
  }
  // The region whose mapping (guards included) holds `addr`, if any.
  bool lookup(const void* addr, Region* out) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto a = reinterpret_cast<uintptr_t>(addr);
    auto it = regions_.upper_bound(a);
    if (it == regions_.begin()) return false;
    --it;
    if (a >= it->first + it->second.map_bytes) return false;
    *out = it->second;
    return true;
  }
  // Describes every checked global buffer whose front gap was written, or "" when none was;
  // the canary is restored so that one bad write is reported once.
  std::string damaged_fronts() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::string out;
    for (auto& [start, r] : regions_) {
      if (r.kind != RegionKind::global) continue;
      for (const char* p = r.map + page_size(); p < r.data; ++p) {
        if (static_cast<unsigned char>(*p) != kCanary) {
          out += "write at byte " + std::to_string(p - r.data) + " of " + std::to_string(r.bytes) +
                 "-byte global buffer (checked mode); ";
          std::memset(r.map + page_size(), kCanary, static_cast<size_t>(r.data - (r.map + page_size())));
          break;
        }
      }
    }
    return out;
  }

 private:
  std::mutex mutex_;
  std::map<uintptr_t, Region> regions_;
};

inline Registry& registry() {
  static Registry* r = new Registry;  // never destroyed: buffers may be freed during exit
  return *r;
}

// Maps `bytes` of data (start aligned to `align`, end at the trailing guard when bytes is a
// multiple of `align`) and registers it.
inline Region map_guarded(size_t bytes, size_t align, RegionKind kind) {
  const size_t page = page_size();
  const size_t padded = round_up(bytes, align);
  Region r;
  r.map_bytes = page + round_up(padded, page) + page;
  void* map = mmap(nullptr, r.map_bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (map == MAP_FAILED) throw std::bad_alloc();
  r.map = static_cast<char*>(map);
  char* tail = r.map + r.map_bytes - page;
  mprotect(r.map, page, PROT_NONE);
  mprotect(tail, page, PROT_NONE);
  r.data = tail - padded;
  r.bytes = bytes;
  r.kind = kind;
  std::memset(r.map + page, kCanary, static_cast<size_t>(r.data - (r.map + page)));
  registry().add(r);
  return r;
}

inline void unmap_guarded(const Region& r) {
  registry().remove(r.map);
  munmap(r.map, r.map_bytes);
}

}  // namespace detail

// Checked mode's global buffers: `bytes` of memory ending exactly at a PROT_NONE page, so a read or
// write past the end faults in the emulated thread that made it, and the launch reports kernel,
// block and thread. Alignment follows `bytes` (16 bytes when it is a multiple of 16, as for a
// cudaMalloc'd buffer whose size allows vector loads).
inline void* checked_alloc(size_t bytes) {
  size_t align = 16;
  while (align > 1 && bytes % align != 0) align /= 2;
  return detail::map_guarded(bytes, align, detail::RegionKind::global).data;
}

inline void checked_free(void* data) {
  if (data == nullptr) return;
  detail::Region r;
  if (detail::registry().lookup(data, &r) && r.data == data) detail::unmap_guarded(r);
}

}  // namespace fastlm_emu
