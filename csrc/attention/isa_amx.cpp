// The amx path of the CPU attention kernels: kernels.h compiled for it, in namespace kk::attn::amx.
// Only this file's own functions carry the ISA (the target pragma comes after every library header),
// so the build runs on any x86-64 CPU and dispatch.cpp calls in here only where CPUID says it may.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <utility>

#include "isa.h"
#include "common.h"
#if KK_X86 && KK_AMX_COMPILER
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
KK_TARGET_BEGIN("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512vl,avx512dq,avx512cd,avx512bf16,amx-tile,amx-bf16")
#define KK_VEC_BITS 512
#define KK_BF16_DOT 1
#define KK_AMX 1

namespace kk::attn::amx {
#include "kernels.h"
}  // namespace kk::attn::amx
KK_TARGET_END
#endif
