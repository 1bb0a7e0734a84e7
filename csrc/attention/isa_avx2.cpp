// The avx2 path of the CPU attention kernels: kernels.h compiled for it, in namespace kk::attn::avx2.
// Only this file's own functions carry the ISA (the target pragma comes after every library header),
// so the build runs on any x86-64 CPU and dispatch.cpp calls in here only where CPUID says it may.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <utility>

#include "isa.h"
#include "common.h"
#if KK_X86
#include <immintrin.h>
KK_TARGET_BEGIN("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define KK_VEC_BITS 256
#define KK_BF16_DOT 0
#define KK_AMX 0

namespace kk::attn::avx2 {
#include "kernels.h"
}  // namespace kk::attn::avx2
KK_TARGET_END
#endif
