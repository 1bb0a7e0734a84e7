// Shared helpers for the C++ kernels: boundary checks with readable messages.
#pragma once
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>

#define KK_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)
#define KK_CHECK_CPU(x) KK_CHECK((x).device().is_cpu(), #x " must be a CPU tensor, got ", (x).device())
#define KK_CHECK_CONTIGUOUS(x) KK_CHECK((x).is_contiguous(), #x " must be contiguous")
#define KK_CHECK_DIM(x, n) KK_CHECK((x).dim() == (n), #x " must have ", n, " dims, got shape ", (x).sizes())

namespace kk {
// Product of sizes, or a ValueError naming `what` when it leaves int64: sizes from user tensors and
// parameters (a huge tile, a huge grid) must never wrap around into a small buffer.
inline int64_t checked_product(const char* what, std::initializer_list<int64_t> factors) {
  int64_t out = 1;
  for (const int64_t f : factors) {
    KK_CHECK(f >= 0 && !__builtin_mul_overflow(out, f, &out), what, " overflows int64 (factor ", f, ")");
  }
  return out;
}
}  // namespace kk
