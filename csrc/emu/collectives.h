// Block and warp synchronisation: __syncthreads, __syncwarp, the warp shuffles and votes. Each is
// a real barrier between the emulated threads, so the values exchanged are the ones the other
// lanes hold at that point of their own execution.
#pragma once

#include <cstring>

#include "runtime.h"

namespace fastlm_emu::detail {

// Waits until every lane in call.mask has brought a matching call, then completes it for all of
// them. The last lane to arrive completes it and runs on; the others resume in a later round.
inline void warp_collective(const WarpCall& call) {
  Thread* t = current;
  Block& b = *block;
  auto mask_str = [&] {
    char hex[16];
    std::snprintf(hex, sizeof hex, "0x%08x", call.mask);
    return std::string(hex);
  };
  if (!(call.mask >> t->lane & 1u)) {
    fail(std::string(call.name) + ": mask " + mask_str() + " does not include the calling lane " +
         std::to_string(t->lane));
  }
  Thread* const* lanes = b.threads + t->warp * 32;
  const unsigned nlanes = std::min(32u, b.nthreads - t->warp * 32);
  t->call = call;
  t->state = State::at_warp;
  for (unsigned l = 0; l < 32; ++l) {
    if (!(call.mask >> l & 1u) || l == t->lane) continue;
    if (l >= nlanes) {
      fail(std::string(call.name) + ": mask " + mask_str() + " names lane " + std::to_string(l) +
           ", which does not exist (block of " + std::to_string(b.nthreads) + " threads)");
    }
    const Thread& o = *lanes[l];
    if (o.state == State::exited) {
      fail(std::string(call.name) + ": mask " + mask_str() + " names lane " + std::to_string(l) +
           ", which has exited");
    }
    if (o.state != State::at_warp) {
      yield();  // not all here yet: the last lane to arrive completes the call for us
      return;
    }
    if (o.call.complete != call.complete || o.call.mask != call.mask) {
      fail(std::string(call.name) + " with mask " + mask_str() + " meets lane " + std::to_string(l) +
           " waiting in " + o.call.name + " with a different mask or operation");
    }
  }
  call.complete(lanes, call.mask);
  for (unsigned l = 0; l < 32; ++l) {
    if (!(call.mask >> l & 1u) || l == t->lane) continue;
    lanes[l]->state = State::ready;
    b.ready.push_back(lanes[l]);
  }
  t->state = State::ready;
}

enum class ShflMode { idx, up, down, bfly };

// The source lane of a shuffle as the CUDA programming guide defines it for `width`-lane segments;
// the lane itself when the source falls outside its segment (up/down/xor).
inline unsigned shfl_source(ShflMode mode, unsigned lane, int arg, int width) {
  const unsigned w = static_cast<unsigned>(width);
  const unsigned base = lane & ~(w - 1);
  switch (mode) {
    case ShflMode::idx: return base + (static_cast<unsigned>(arg) & (w - 1));
    case ShflMode::up: return (lane - base) >= static_cast<unsigned>(arg) ? lane - arg : lane;
    case ShflMode::down: return (lane - base) + arg < w ? lane + arg : lane;
    case ShflMode::bfly: {
      const unsigned src = lane ^ static_cast<unsigned>(arg);
      return src < base + w ? src : lane;
    }
  }
  return lane;
}

template <class T, ShflMode Mode>
void shfl_complete(Thread* const* lanes, unsigned mask) {
  for (unsigned l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    const WarpCall& c = lanes[l]->call;
    const unsigned src = shfl_source(Mode, l, c.arg, c.width);
    if (!(mask >> src & 1u)) {
      fail(std::string(c.name) + ": lane " + std::to_string(l) + " reads lane " +
           std::to_string(src) + ", which is not in the mask");
    }
    std::memcpy(c.out, lanes[src]->call.in, sizeof(T));
  }
}

template <ShflMode Mode, class T>
T shfl(const char* name, unsigned mask, T var, int arg, int width) {
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    fail(std::string(name) + ": width " + std::to_string(width) + " is not a power of two <= 32");
  }
  T result;
  WarpCall c;
  c.complete = &shfl_complete<T, Mode>;
  c.name = name;
  c.mask = mask;
  c.in = &var;
  c.out = &result;
  c.arg = arg;
  c.width = width;
  warp_collective(c);
  return result;
}

enum class Vote { ballot, any, all };

template <Vote V>
void vote_complete(Thread* const* lanes, unsigned mask) {
  unsigned ballot = 0;
  for (unsigned l = 0; l < 32; ++l) {
    if ((mask >> l & 1u) && *static_cast<const int*>(lanes[l]->call.in)) ballot |= 1u << l;
  }
  const unsigned r = V == Vote::ballot ? ballot : V == Vote::any ? ballot != 0 : ballot == mask;
  for (unsigned l = 0; l < 32; ++l) {
    if (mask >> l & 1u) *static_cast<unsigned*>(lanes[l]->call.out) = r;
  }
}

template <Vote V>
unsigned vote(const char* name, unsigned mask, int pred) {
  unsigned result;
  WarpCall c;
  c.complete = &vote_complete<V>;
  c.name = name;
  c.mask = mask;
  c.in = &pred;
  c.out = &result;
  warp_collective(c);
  return result;
}

inline void syncwarp_complete(Thread* const*, unsigned) {}

}  // namespace fastlm_emu::detail

// bar.sync 0: waits until every thread of the block that has not exited arrives.
inline void __syncthreads() {
  using namespace fastlm_emu::detail;
  current->state = State::at_syncthreads;
  ++block->at_sync;
  yield();
}

// bar.warp.sync: the lanes in mask wait for each other.
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  fastlm_emu::detail::WarpCall c;
  c.complete = &fastlm_emu::detail::syncwarp_complete;
  c.name = "__syncwarp";
  c.mask = mask;
  fastlm_emu::detail::warp_collective(c);
}

// shfl.sync.idx / .up / .down / .bfly with CUDA's `width` segments.
template <class T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  using fastlm_emu::detail::ShflMode;
  return fastlm_emu::detail::shfl<ShflMode::idx>("__shfl_sync", mask, var, src_lane, width);
}
template <class T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  using fastlm_emu::detail::ShflMode;
  return fastlm_emu::detail::shfl<ShflMode::up>("__shfl_up_sync", mask, var, delta, width);
}
template <class T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  using fastlm_emu::detail::ShflMode;
  return fastlm_emu::detail::shfl<ShflMode::down>("__shfl_down_sync", mask, var, delta, width);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  using fastlm_emu::detail::ShflMode;
  return fastlm_emu::detail::shfl<ShflMode::bfly>("__shfl_xor_sync", mask, var, lane_mask, width);
}

// vote.sync.ballot / .any / .all over the lanes in mask.
inline unsigned __ballot_sync(unsigned mask, int pred) {
  using fastlm_emu::detail::Vote;
  return fastlm_emu::detail::vote<Vote::ballot>("__ballot_sync", mask, pred != 0);
}
inline int __any_sync(unsigned mask, int pred) {
  using fastlm_emu::detail::Vote;
  return static_cast<int>(fastlm_emu::detail::vote<Vote::any>("__any_sync", mask, pred != 0));
}
inline int __all_sync(unsigned mask, int pred) {
  using fastlm_emu::detail::Vote;
  return static_cast<int>(fastlm_emu::detail::vote<Vote::all>("__all_sync", mask, pred != 0));
}

// activemask: the emulation does not track divergence inside a warp, so every lane of the
// caller's warp that exists in the block counts as active.
inline unsigned __activemask() {
  using namespace fastlm_emu::detail;
  const unsigned nlanes = std::min(32u, block->nthreads - current->warp * 32);
  return nlanes == 32 ? 0xffffffffu : (1u << nlanes) - 1;
}
