// Row conversions to and from fp32 for the elementwise CPU kernels (vae.cpp, adaln.cpp, qk_norm.cpp).
// Include inside the file's anonymous namespace: each file gets its own per-ISA clones.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "registration.h"

// bf16 <-> fp32 on the bits, so that the loops vectorise (c10::BFloat16's conversions do not): widening
// is a shift; narrowing rounds to nearest even and maps NaN to 0x7FC0, as c10 does.
KK_CLONES void bf16_to_f32(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(src[i]) << 16;
    std::memcpy(dst + i, &u, sizeof(u));
  }
}
KK_CLONES void f32_to_bf16(const float* src, int64_t n, uint16_t* dst) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, src + i, sizeof(u));
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    dst[i] = static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
  }
}

template <typename T>
inline void load_f32(const T* src, int64_t n, float* dst) {
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    bf16_to_f32(reinterpret_cast<const uint16_t*>(src), n, dst);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}
template <typename T>
inline void store_from_f32(const float* src, int64_t n, T* dst) {
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    f32_to_bf16(src, n, reinterpret_cast<uint16_t*>(dst));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  }
}
