// The baseline path of the CPU attention kernels: kernels.h compiled for it, in namespace kk::attn::baseline.
// No ISA named: the build's own target (any x86-64, or another architecture); the fallback path.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <utility>

#include "isa.h"
#include "common.h"
#define KK_VEC_BITS 0
#define KK_BF16_DOT 0
#define KK_AMX 0

namespace kk::attn::baseline {
#include "kernels.h"
}  // namespace kk::attn::baseline
