// Shared helpers for the C++ kernels: boundary checks with readable messages.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>

#define KK_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)
#define KK_CHECK_CPU(x) KK_CHECK((x).device().is_cpu(), #x " must be a CPU tensor, got ", (x).device())
#define KK_CHECK_CONTIGUOUS(x) KK_CHECK((x).is_contiguous(), #x " must be contiguous")
#define KK_CHECK_DIM(x, n) KK_CHECK((x).dim() == (n), #x " must have ", n, " dims, got shape ", (x).sizes())

// Compiles a hot loop once per x86 level and picks the clone by CPUID when the library loads (GCC
// function multiversioning; the build itself has no -march, so it runs on any x86-64). Without it the
// baseline code has no FMA, and std::fma there is a libm call per element.
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(_M_X64))
#define KK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KK_CLONES
#endif

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

// cu_seqlens of videos packed along S, every offset checked before any is used as a bound: a CPU int32
// (n+1,) tensor, n >= 1, with B == 1, starting at 0, non-decreasing, ending at most at S. Returns the
// contiguous tensor (keep it alive while reading its data).
inline at::Tensor checked_cu_seqlens(const at::Tensor& cu_seqlens, int64_t B, int64_t S) {
  KK_CHECK_CPU(cu_seqlens);
  at::Tensor cu = cu_seqlens.contiguous();
  KK_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.size(0) >= 2,
           "cu_seqlens must be int32 (n+1,) with n >= 1, got ", cu.scalar_type(), " ", cu.sizes());
  KK_CHECK(B == 1, "cu_seqlens packs videos along S and needs B == 1, got B=", B);
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t n = cu.size(0) - 1;
  KK_CHECK(c[0] == 0, "cu_seqlens must start at 0, got ", c[0]);
  for (int64_t v = 0; v < n; ++v)
    KK_CHECK(c[v] <= c[v + 1], "cu_seqlens must be non-decreasing, got ", c[v], " then ", c[v + 1],
             " at position ", v);
  KK_CHECK(c[n] <= S, "cu_seqlens must end <= S=", S, ", got ", c[n]);
  return cu;
}
}  // namespace kk
