// Fibers: each emulated CUDA thread gets its own stack and is switched to and from the block
// scheduler by a dozen instructions of assembly (x86-64 System V), so thousands of threads can be
// interleaved at their barriers without OS threads or system calls.
#pragma once

#include <cstdint>

#if !defined(__x86_64__)
#error "fastlm CUDA emulation: the fiber switch is written for x86-64"
#endif

// fastlm_emu_switch(save, load): push the callee-saved registers and the SSE/x87 control words,
// store the stack pointer in *save, continue on the stack `load` by popping what was pushed there.
// fastlm_emu_fiber_start: first "return address" of a new fiber; calls r13(r12) and never returns.
// Weak and hidden, so every translation unit that includes this header may carry the definition.
asm(R"(
  .pushsection .text
  .weak fastlm_emu_switch
  .hidden fastlm_emu_switch
  .type fastlm_emu_switch, @function
fastlm_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fastlm_emu_switch, .-fastlm_emu_switch

  .weak fastlm_emu_fiber_start
  .hidden fastlm_emu_fiber_start
  .type fastlm_emu_fiber_start, @function
fastlm_emu_fiber_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size fastlm_emu_fiber_start, .-fastlm_emu_fiber_start
  .popsection
)");

extern "C" void fastlm_emu_switch(void** save, void* load);
extern "C" void fastlm_emu_fiber_start();

namespace fastlm_emu::detail {

// Lays out a fresh frame at the top of a stack so that the first fastlm_emu_switch onto the
// returned stack pointer enters entry(arg) with the ABI's 16-byte stack alignment.
inline void* fiber_init(char* stack_top, void (*entry)(void*), void* arg) {
  auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack_top) & ~uintptr_t{15});
  uint64_t* sp = top - 8;
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  sp[0] = mxcsr | (uint64_t{fpucw} << 32);                // control words, popped first
  sp[1] = 0;                                               // r15
  sp[2] = 0;                                               // r14
  sp[3] = reinterpret_cast<uint64_t>(entry);               // r13
  sp[4] = reinterpret_cast<uint64_t>(arg);                 // r12
  sp[5] = 0;                                               // rbx
  sp[6] = 0;                                               // rbp
  sp[7] = reinterpret_cast<uint64_t>(&fastlm_emu_fiber_start);  // return address
  return sp;
}

}  // namespace fastlm_emu::detail
