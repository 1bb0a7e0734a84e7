// The ISA paths of the CPU attention kernels and the macros that compile one file for one of them.
//
// One build runs on any x86-64 CPU: the library is compiled for the baseline target (no -march), and
// each isa_<name>.cpp compiles kernels.h for one instruction set inside `KK_TARGET_BEGIN(...)` /
// `KK_TARGET_END` (a target pragma placed after every library header, so only that file's own
// functions, in its own namespace, use the ISA; shared inline code from ATen or libstdc++ keeps the
// baseline and the one-definition rule holds). dispatch.cpp picks the fastest path the CPU runs, by
// CPUID, at every call; KANDINSKY_CPU_ISA=<name> forces one (tests, benchmarks).
#pragma once

#include <ATen/ATen.h>

#if defined(__x86_64__) || defined(_M_X64)
#define KK_X86 1
#else
#define KK_X86 0
#endif

// AMX-TILE / AMX-BF16 intrinsics: GCC 11, clang 12.
#if defined(__clang__)
#define KK_AMX_COMPILER (__clang_major__ >= 12)
#elif defined(__GNUC__)
#define KK_AMX_COMPILER (__GNUC__ >= 11)
#else
#define KK_AMX_COMPILER 0
#endif

#define KK_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define KK_TARGET_BEGIN(t) KK_PRAGMA(clang attribute push(__attribute__((target(t))), apply_to = function))
#define KK_TARGET_END KK_PRAGMA(clang attribute pop)
#else
#define KK_TARGET_BEGIN(t) KK_PRAGMA(GCC push_options) KK_PRAGMA(GCC target(t))
#define KK_TARGET_END KK_PRAGMA(GCC pop_options)
#endif

namespace kk::attn {
struct Problem;

// Declares path NS's entry points (defined by kernels.h in isa_NS.cpp): outputs allocated by the caller.
#define KK_DECLARE_PATH(NS)                                                                                \
  namespace NS {                                                                                           \
  void forward(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,            \
               at::Tensor& out, at::Tensor& lse);                                                          \
  void backward(const Problem& p, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,        \
                const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq,         \
                at::Tensor& dk, at::Tensor& dv);                                                           \
  }
KK_DECLARE_PATH(baseline)
#if KK_X86
KK_DECLARE_PATH(avx2)
KK_DECLARE_PATH(avx512)
KK_DECLARE_PATH(avx512_bf16)
#if KK_AMX_COMPILER
KK_DECLARE_PATH(amx)
namespace amx {
bool ready();  // asks Linux for the AMX tile state (once); false where it refuses
}
#endif
#endif
#undef KK_DECLARE_PATH
}  // namespace kk::attn
