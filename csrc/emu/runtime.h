// The emulated execution model: a launch runs its grid synchronously on the calling OS thread,
// one block after another (in a scrambled order); the threads of a block are fibers that run concurrently, interleaved
// at every barrier (__syncthreads) and warp collective. Each scheduling round runs the ready
// threads in a fresh pseudo-random order (fixed per block and round, so failures reproduce), so a
// missing barrier or a wrong shuffle shows up as a wrong result instead of passing by luck.
// Faults (bad addresses, guard pages), deadlocks and misuse of collectives end the launch with a
// std::runtime_error naming kernel, block and thread; configuration errors are returned through
// cudaGetLastError() as in CUDA.
#pragma once

#include <driver_types.h>
#include <signal.h>
#include <ucontext.h>
#include <vector_types.h>

#include <csetjmp>
#include <cstdio>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "fiber.h"
#include "memory.h"

// CUDA's built-in index variables. Fibers of a block share the OS thread, so the scheduler stores
// the running fiber's threadIdx here at every switch.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace fastlm_emu {
namespace detail {

struct Block;
struct Thread;

// A collective of one warp (shuffle, vote, __syncwarp, ldmatrix, mma): every lane in `mask` brings
// its own WarpCall; the last to arrive runs `complete`, which reads each lane's `in` and writes each
// lane's `out` (both point into the lanes' own stacks, which live on while they wait).
struct WarpCall {
  void (*complete)(Thread* const* lanes, unsigned mask) = nullptr;
  const char* name = "";
  unsigned mask = 0;
  const void* in = nullptr;
  void* out = nullptr;
  int arg = 0;
  int width = 32;
};

// A cp.async copy in flight: the source was read at issue, the destination is written when a
// cp.async.wait_group retires its group (the latest moment the PTX ISA allows).
struct AsyncCopy {
  void* dst;
  unsigned char data[16];
  unsigned group;
};

enum class State : unsigned char { ready, at_syncthreads, at_warp, exited };

struct Thread {
  void* sp = nullptr;
  uint3 idx{};
  unsigned linear = 0, lane = 0, warp = 0;
  State state = State::ready;
  WarpCall call;
  std::vector<AsyncCopy> copies;
  unsigned open_group = 0;  // cp.async group that the next cp_async_commit() closes
  sigjmp_buf fault_jmp;
  int fault_sig = 0;
  void* fault_addr = nullptr;
  bool fault_write = false;
};

struct Block {
  const char* kernel = "";
  const char* site = "";  // the launching function, with its template arguments
  unsigned nthreads = 0, live = 0, at_sync = 0, round = 0;
  uint64_t linear = 0;
  Thread* const* threads = nullptr;  // all threads of the block, by linear index
  std::vector<Thread*> ready, running;
  void* sched_sp = nullptr;
  std::string error;
  void (*body)(const void*) = nullptr;
  const void* body_ctx = nullptr;
};

inline thread_local Thread* current = nullptr;  // the fiber running now; null in the scheduler
inline thread_local Block* block = nullptr;     // the block being run on this OS thread
inline thread_local char* dynamic_smem = nullptr;
inline thread_local size_t dynamic_smem_bytes = 0;

constexpr size_t kStackBytes = 128 * 1024;

// Fibers, their stacks and the dynamic shared memory arena, reused across launches of one OS thread.
struct Pool {
  std::vector<std::unique_ptr<Thread>> owned;
  std::vector<Thread*> threads;
  std::vector<Region> stacks;
  Region smem;
  Block blk;
  ~Pool() {
    for (auto& s : stacks) unmap_guarded(s);
    if (smem.map != nullptr) unmap_guarded(smem);
  }
  void reserve(unsigned n) {
    while (threads.size() < n) {
      owned.push_back(std::make_unique<Thread>());
      threads.push_back(owned.back().get());
      stacks.push_back(map_guarded(kStackBytes, 16, RegionKind::stack));
    }
  }
  // Dynamic shared memory of `bytes`, ending at a guard page.
  char* shared(size_t bytes) {
    const size_t padded = round_up(bytes, 16);
    if (smem.map == nullptr || round_up(smem.bytes, page_size()) < padded) {
      if (smem.map != nullptr) unmap_guarded(smem);
      smem = map_guarded(round_up(padded, page_size()), 16, RegionKind::shared);
    }
    return smem.data + smem.bytes - padded;
  }
};

inline Pool& pool() {
  static thread_local Pool p;
  return p;
}

inline std::string dim_str(uint3 v) {
  return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
}

// "kernel 'k' (launched in f [with T = float]) block (x,y,z)": the kernel variable's name alone
// says little when it is a function pointer, the launching function's signature says which one.
inline std::string kernel_str(const Block& b) {
  return "kernel '" + std::string(b.kernel) + "' (launched in " + b.site + ") block " +
         dim_str(blockIdx);
}

inline std::string where(const Thread& t) { return kernel_str(*block) + " thread " + dim_str(t.idx); }

// Back to the scheduler; returns when the scheduler resumes this fiber.
inline void yield() {
  Thread* t = current;
  fastlm_emu_switch(&t->sp, block->sched_sp);
}

// Ends the launch with `msg` (prefixed by kernel, block and thread). Called on a fiber; never returns.
[[noreturn]] inline void fail(const std::string& msg) {
  Thread* t = current;
  block->error = where(*t) + ": " + msg;
  t->state = State::exited;
  yield();
  __builtin_unreachable();
}

// cp.async.wait_group semantics: lands every copy except those of the `keep_groups` most recently
// committed groups and of the still open group.
inline void retire_copies(Thread& t, unsigned keep_groups) {
  size_t kept = 0;
  for (const AsyncCopy& c : t.copies) {
    if (c.group + keep_groups < t.open_group) {
      std::memcpy(c.dst, c.data, sizeof c.data);
    } else {
      t.copies[kept++] = c;
    }
  }
  t.copies.resize(kept);
}

inline std::string describe_fault(const Thread& t) {
  char addr[32];
  std::snprintf(addr, sizeof addr, "%p", t.fault_addr);
  if (t.fault_sig == SIGFPE) return "arithmetic exception (integer division by zero?)";
  const std::string access = t.fault_write ? "write" : "read";
  Region r;
  if (t.fault_addr == nullptr || !registry().lookup(t.fault_addr, &r)) {
    return "invalid " + access + " at address " + addr +
           (t.fault_addr == nullptr ? " (or a misaligned vector access)" : "");
  }
  if (r.kind == RegionKind::stack) {
    return "stack overflow of the emulated thread (" + std::to_string(kStackBytes) + " bytes)";
  }
  const bool shared = r.kind == RegionKind::shared;
  const long offset = static_cast<const char*>(t.fault_addr) - (shared ? dynamic_smem : r.data);
  return "out-of-bounds " + access + " at byte " + std::to_string(offset) + " of " +
         std::to_string(shared ? dynamic_smem_bytes : r.bytes) + "-byte " +
         (shared ? "dynamic shared memory" : "global buffer (checked mode)") + " (address " + addr +
         ")";
}

// Entry of every fiber: run the kernel body, then leave for good.
inline void fiber_main(void* arg) {
  auto* t = static_cast<Thread*>(arg);
  Block& b = *block;
  if (sigsetjmp(t->fault_jmp, 0) == 0) {
    b.body(b.body_ctx);
    ++t->open_group;  // copies never waited for still land when the thread exits
    retire_copies(*t, 0);
  } else {
    fail(describe_fault(*t));
  }
  t->state = State::exited;
  --b.live;
  yield();
  __builtin_unreachable();
}

// ---- faults ---------------------------------------------------------------------------------
// SIGSEGV/SIGBUS/SIGFPE on a fiber jump back to its fiber_main, which fails the launch; on any
// other code the previous handler (Python's faulthandler, the default action) takes over.

inline struct sigaction* previous_actions() {
  static struct sigaction prev[3];
  return prev;
}

constexpr int kFaultSignals[3] = {SIGSEGV, SIGBUS, SIGFPE};

inline void on_fault(int sig, siginfo_t* info, void* uc) {
  Thread* t = current;
  if (t != nullptr) {
    t->fault_sig = sig;
    t->fault_addr = info->si_addr;
    t->fault_write = (static_cast<ucontext_t*>(uc)->uc_mcontext.gregs[REG_ERR] & 2) != 0;
    siglongjmp(t->fault_jmp, 1);
  }
  for (int i = 0; i < 3; ++i) {
    if (kFaultSignals[i] != sig) continue;
    struct sigaction& prev = previous_actions()[i];
    if ((prev.sa_flags & SA_SIGINFO) && prev.sa_sigaction != nullptr) {
      prev.sa_sigaction(sig, info, uc);
    } else if (prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN) {
      prev.sa_handler(sig);
    } else {
      signal(sig, SIG_DFL);  // returning re-runs the faulting instruction: default action
    }
  }
}

// Installs on_fault (again, if someone replaced it) and an alternate signal stack, so that even a
// fiber's stack overflow can be reported.
inline void install_fault_handler() {
  for (int i = 0; i < 3; ++i) {
    struct sigaction now;
    sigaction(kFaultSignals[i], nullptr, &now);
    if ((now.sa_flags & SA_SIGINFO) && now.sa_sigaction == &on_fault) continue;
    struct sigaction act {};
    act.sa_sigaction = &on_fault;
    act.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&act.sa_mask);
    sigaction(kFaultSignals[i], &act, &previous_actions()[i]);
  }
  static thread_local std::vector<char> alt;
  stack_t ss;
  sigaltstack(nullptr, &ss);
  if (ss.ss_flags & SS_DISABLE) {
    alt.resize(64 * 1024);
    ss.ss_sp = alt.data();
    ss.ss_size = alt.size();
    ss.ss_flags = 0;
    sigaltstack(&ss, nullptr);
  }
}

// ---- scheduling -----------------------------------------------------------------------------

inline void shuffle(std::vector<Thread*>& v, uint64_t seed) {
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
  for (size_t i = v.size(); i > 1; --i) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    std::swap(v[i - 1], v[s % i]);
  }
}

inline const char* state_name(const Thread& t) {
  switch (t.state) {
    case State::at_syncthreads: return "__syncthreads";
    case State::at_warp: return t.call.name;
    case State::exited: return "exit";
    default: return "running";
  }
}

inline std::string deadlock_report(Thread* const* threads, unsigned n) {
  std::string msg = "deadlock: no thread can proceed;";
  unsigned shown = 0;
  for (unsigned i = 0; i < n && shown < 8; ++i) {
    const Thread& t = *threads[i];
    if (t.state != State::at_warp) continue;
    char mask[16];
    std::snprintf(mask, sizeof mask, "0x%08x", t.call.mask);
    msg += " thread " + dim_str(t.idx) + " waits in " + t.call.name + " (mask " + mask + ");";
    ++shown;
  }
  unsigned at_sync = 0, exited = 0;
  std::string waiting;
  for (unsigned i = 0; i < n; ++i) {
    exited += threads[i]->state == State::exited;
    if (threads[i]->state != State::at_syncthreads) continue;
    if (at_sync++ < 4) waiting += " " + dim_str(threads[i]->idx);
  }
  if (at_sync > 4) waiting += " ...";
  return msg + " " + std::to_string(at_sync) + " threads wait in __syncthreads" + waiting + "; " +
         std::to_string(exited) + " have exited";
}

inline void switch_to(Block& b, Thread* t) {
  current = t;
  threadIdx = t->idx;
  fastlm_emu_switch(&b.sched_sp, t->sp);
  current = nullptr;
}

// Runs one block to completion; returns false with b.error set when the launch must stop.
inline bool run_block(Block& b, Pool& p) {
  const unsigned n = b.nthreads;
  b.ready.clear();
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = *p.threads[i];
    t.linear = i;
    t.idx = uint3{i % blockDim.x, i / blockDim.x % blockDim.y, i / (blockDim.x * blockDim.y)};
    t.lane = i % 32;
    t.warp = i / 32;
    t.state = State::ready;
    t.copies.clear();
    t.open_group = 0;
    t.sp = fiber_init(p.stacks[i].data + kStackBytes, &fiber_main, &t);
    b.ready.push_back(&t);
  }
  b.live = n;
  b.at_sync = 0;
  b.round = 0;
  Thread* const* all = p.threads.data();
  while (true) {
    if (b.ready.empty()) {
      if (b.live == 0) return true;
      if (b.at_sync != b.live) {
        b.error = kernel_str(b) + ": " + deadlock_report(all, n);
        return false;
      }
      for (unsigned i = 0; i < n; ++i) {
        if (all[i]->state != State::at_syncthreads) continue;
        all[i]->state = State::ready;
        b.ready.push_back(all[i]);
      }
      b.at_sync = 0;
    }
    b.running.swap(b.ready);
    b.ready.clear();
    shuffle(b.running, b.linear * 1000003u + b.round++);
    for (Thread* t : b.running) {
      switch_to(b, t);
      if (!b.error.empty()) return false;
    }
  }
}

// ---- launches -------------------------------------------------------------------------------

inline thread_local cudaError_t last_error = cudaSuccess;
inline thread_local cudaError_t last_error_code = cudaSuccess;  // the error last_error_detail explains
inline thread_local std::string last_error_detail;

inline void set_error(cudaError_t e, std::string detail) {
  last_error = e;
  last_error_code = e;
  last_error_detail = std::move(detail);
}

constexpr size_t kDefaultSmemLimit = 48 * 1024;
constexpr size_t kMaxSmemOptIn = 227 * 1024;  // sm_90's opt-in maximum per block

// Per-kernel cudaFuncAttributeMaxDynamicSharedMemorySize, keyed by the kernel's address.
inline std::map<const void*, size_t>& smem_limits() {
  static std::map<const void*, size_t> limits;
  return limits;
}
inline std::mutex& smem_limits_mutex() {
  static std::mutex m;
  return m;
}

inline bool check_config(const char* kernel, const void* key, dim3 grid, dim3 blk, size_t smem) {
  const std::string k = std::string("kernel '") + kernel + "': ";
  const uint64_t threads = uint64_t{blk.x} * blk.y * blk.z;
  if (threads == 0 || threads > 1024 || blk.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535) {
    set_error(cudaErrorInvalidConfiguration,
              k + "invalid configuration grid " + dim_str(uint3{grid.x, grid.y, grid.z}) +
                  " block " + dim_str(uint3{blk.x, blk.y, blk.z}));
    return false;
  }
  size_t limit = kDefaultSmemLimit;
  {
    std::lock_guard<std::mutex> lock(smem_limits_mutex());
    auto it = smem_limits().find(key);
    if (it != smem_limits().end()) limit = it->second;
  }
  if (smem > limit) {
    set_error(cudaErrorInvalidValue,
              k + std::to_string(smem) + " bytes of dynamic shared memory exceed the limit of " +
                  std::to_string(limit) +
                  " (raise it with cudaFuncSetAttribute(MaxDynamicSharedMemorySize))");
    return false;
  }
  return true;
}

// Runs body(ctx) as every thread of every block of the grid.
inline void run_grid(const char* kernel, const char* site, const void* key, dim3 grid, dim3 blk,
                     size_t smem, void (*body)(const void*), const void* ctx) {
  if (current != nullptr) throw std::logic_error("fastlm_emu: kernel launch from inside a kernel");
  if (!check_config(kernel, key, grid, blk, smem)) return;
  install_fault_handler();
  Pool& p = pool();
  Block& b = p.blk;
  b.kernel = kernel;
  b.site = site;
  b.nthreads = blk.x * blk.y * blk.z;
  b.body = body;
  b.body_ctx = ctx;
  b.error.clear();
  p.reserve(b.nthreads);
  b.threads = p.threads.data();
  char* smem_ptr = p.shared(smem);
  dynamic_smem_bytes = smem;
  gridDim = grid;
  blockDim = blk;
  block = &b;
  // Blocks run one after another in a scrambled order (i -> (stride * i + 1) mod count, a
  // permutation since gcd(stride, count) = 1), so a kernel relying on block order fails too.
  const uint64_t count = uint64_t{grid.x} * grid.y * grid.z;
  uint64_t stride = 0x9E3779B97F4A7C15ull % count;
  while (std::gcd(stride, count) != 1) ++stride;
  for (uint64_t i = 0; i < count; ++i) {
    b.linear = static_cast<uint64_t>((static_cast<unsigned __int128>(stride) * i + 1) % count);
    blockIdx = uint3{static_cast<unsigned>(b.linear % grid.x),
                     static_cast<unsigned>(b.linear / grid.x % grid.y),
                     static_cast<unsigned>(b.linear / (uint64_t{grid.x} * grid.y))};
    std::memset(smem_ptr, 0xFF, smem);  // poison: reads of unwritten shared memory are NaN
    dynamic_smem = smem_ptr;
    if (!run_block(b, p)) {
      block = nullptr;
      throw std::runtime_error("fastlm CUDA emulation: " + b.error);
    }
  }
  block = nullptr;
  const std::string damaged = registry().damaged_fronts();
  if (!damaged.empty()) {
    throw std::runtime_error("fastlm CUDA emulation: kernel '" + std::string(kernel) +
                             "' (launched in " + site + "): out-of-bounds " + damaged.substr(0, damaged.size() - 2) +
                             " (found after the launch, so the thread is unknown)");
  }
}

// The object FASTLM_LAUNCH(kernel, grid, block, smem, stream) evaluates to; calling it with the
// kernel's arguments runs the launch. The arguments are converted to the kernel's parameter types
// once and every emulated thread gets its own copy, as with by-value CUDA kernel parameters.
template <class... P>
class Launch {
 public:
  Launch(void (*kernel)(P...), const char* name, const char* site, dim3 grid, dim3 blk, size_t smem)
      : kernel_(kernel), name_(name), site_(site), grid_(grid), block_(blk), smem_(smem) {}

  template <class... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "wrong number of kernel arguments");
    struct Ctx {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> args;
    } ctx{kernel_, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    auto body = [](const void* c) {
      auto* x = static_cast<const Ctx*>(c);
      std::apply(x->kernel, x->args);
    };
    run_grid(name_, site_, reinterpret_cast<const void*>(kernel_), grid_, block_, smem_, body, &ctx);
  }

 private:
  void (*kernel_)(P...);
  const char* name_;
  const char* site_;
  dim3 grid_, block_;
  size_t smem_;
};

template <class... P>
Launch<P...> make_launch(void (*kernel)(P...), const char* name, const char* site, dim3 grid,
                         dim3 blk, size_t smem, cudaStream_t) {
  return Launch<P...>(kernel, name, site, grid, blk, smem);
}

}  // namespace detail
}  // namespace fastlm_emu

// kernel<<<grid, block, smem, stream>>>(args...), run synchronously on the CPU.
#define FASTLM_LAUNCH(kernel, grid, block, smem_bytes, stream) \
  ::fastlm_emu::detail::make_launch(kernel, #kernel, __PRETTY_FUNCTION__, grid, block, smem_bytes, stream)

// `T* name` = this block's dynamic shared memory (16-byte aligned, ending at a guard page).
#define FASTLM_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::fastlm_emu::detail::dynamic_smem)
