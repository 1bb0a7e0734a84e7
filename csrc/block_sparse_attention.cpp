// Block-sparse attention on the CPU: forward and backward, FlashAttention-2 style.
//
// Layout: q, k, v, out (B, S, H, D) with any strides except a unit stride on D; lse (B, H, S) fp32,
// natural log, -inf for a query row that sees no key. Mask (BlockSparseMask): kv_num_blocks (Bm, Hm,
// Nq), kv_indices (Bm, Hm, Nq, Nk) with Bm in {1, B}, Hm in {1, H} (broadcast). Optional token_valid
// (Bt, S) bool with Bt in {1, B} (False = pad key) and cu_seqlens int32 (n+1,) (packed videos, B == 1).
//
// Design:
// * Forward: one task per (batch, head, block), split into contiguous, cost-balanced pieces that the
//   threads take in turn: consecutive tasks share (b, h), so K/V stay in cache.
// * Backward, no atomics either way (every output tile has one writer):
//   - with enough heads to share out evenly, one pass per (b, h) over its key blocks walking the
//     transposed mask; dQ accumulates in the task's own fp32 head buffer. Scores and dP are computed
//     once per pair: 5 products (backward_fused, ~1.3x the two-pass scheme at S = 8192, H = 4).
//   - otherwise a dQ pass over query blocks, then a dK/dV pass over key blocks (7 products, but any
//     number of threads share a single head).
// * Inputs are converted to fp32 once per call into GEMM-friendly layouts (Packed): block rows and
//   transposed block tiles. Every product is then C (+)= A @ B on contiguous panels by a
//   register-blocked AVX-512 kernel; no per-pair gathers or conversions, no BLAS call overhead.
// * bf16 inputs on a build with AVX512-BF16 (and pair-readable strides) take bf16 dot products
//   instead: the forward (forward_bf16_dot: ~1.7x the conversion path at S = 8192, H = 28) and both
//   backward schemes (backward_fused_bf16: 1.67-1.76x at S = 8192, H = 4 and 28;
//   backward_two_pass_bf16: 1.73-1.88x at H = 4); P and dS are rounded to bf16 for the products that
//   take them, as FlashAttention does. KANDINSKY_BSA_CPU_BF16_DOT=0 turns the bf16 products off.
// * Scores live in the log2 domain (Q pre-scaled by scale*log2(e)); exp2 is a polynomial in AVX-512
//   (libm's expf is a scalar call and GCC does not vectorize the softmax reductions by itself).
//   A chunk of up to 512 key columns is softmaxed at once (online softmax across chunks).
// * Masking is per block pair: skip (different videos / all-pad keys), full (no per-element test),
//   or partial (a block straddling a video boundary or holding pad keys): then the score is kept
//   only where the query's segment code equals the key's (pad keys get a code no query has).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "registration.h"

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr double kLn2d = 0.6931471805599453, kLog2ed = 1.4426950408889634;
constexpr float kInf = std::numeric_limits<float>::infinity();
// Key (or query) blocks whose scores are softmaxed together: ~512 columns, few online rescales.
inline int64_t chunk_blocks(int64_t bs) { return std::max<int64_t>(1, 512 / bs); }
constexpr int64_t kMaxChunk = 32;  // chunk_blocks() for the smallest block size (16)

// 2^x, exact 0 below -126 (so -inf and masked scores vanish), NaN for NaN: a NaN (or inf - inf)
// score must make its row NaN, as in torch's SDPA, not drop the key. x = n + f, |f| <= 1/2, 2^f by
// its degree-7 Taylor polynomial (truncation error < 1e-8 relative). Scalar twin of exp2_ps below.
inline float exp2f_fast(float x) {
  if (std::isnan(x)) return x;
  const float xc = x < -126.f ? -126.f : x;
  const float n = std::floor(xc + 0.5f);
  const float f = (xc - n) * kLn2;
  float p = 1.f / 5040.f;
  p = p * f + 1.f / 720.f;
  p = p * f + 1.f / 120.f;
  p = p * f + 1.f / 24.f;
  p = p * f + 1.f / 6.f;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -126.f ? 0.f : p * scale;
}

// Row kernels of the softmax work between the GEMMs, on fp32 scratch. GCC does not vectorize the
// reductions or the polynomial by itself (measured: scalar code, half the forward time), hence
// AVX-512 intrinsics where the build targets it, with exp2f_fast as the scalar tail / fallback.
#ifdef __AVX512F__
// GCC 12 flags the _mm512_undefined_ps() inside its own max/roundscale/scalef intrinsics.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
inline __m512 exp2_ps(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-126.f);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);  // false for -inf and NaN
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  const __m512 xc = _mm512_max_ps(x, lo);
  const __m512 n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(xc, n), _mm512_set1_ps(kLn2));
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_mask_mov_ps(_mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n)), nan, x);
}
#endif

inline float row_max(const float* x, int64_t n, float init) {
  int64_t c = 0;
  float mx = init;
#ifdef __AVX512F__
  __m512 vm = _mm512_set1_ps(init);
  for (; c + 16 <= n; c += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(x + c));
  mx = _mm512_reduce_max_ps(vm);
#endif
  for (; c < n; ++c) mx = std::max(mx, x[c]);
  return mx;
}

// x = 2^(x - sub); returns the sum.
inline float row_exp2_sum(float* x, int64_t n, float sub) {
  int64_t c = 0;
  float sum = 0.f;
#ifdef __AVX512F__
  const __m512 vs = _mm512_set1_ps(sub);
  __m512 acc = _mm512_setzero_ps();
  for (; c + 16 <= n; c += 16) {
    const __m512 e = exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(x + c), vs));
    _mm512_storeu_ps(x + c, e);
    acc = _mm512_add_ps(acc, e);
  }
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; c < n; ++c) {
    x[c] = exp2f_fast(x[c] - sub);
    sum += x[c];
  }
  return sum;
}

// dS = P * (dP - delta) with P = 2^(x - hi - lo), in place in x (dQ pass: one query row). The
// log2-domain lse comes as a float pair hi + lo: with inputs at scale 16 it is ~1e3, and one
// rounding of it alone would cost ~3e-5 relative in every P of the row.
inline void row_ds(float* x, const float* dp, int64_t n, float hi, float lo, float delta) {
  int64_t c = 0;
#ifdef __AVX512F__
  const __m512 vh = _mm512_set1_ps(hi), vl = _mm512_set1_ps(lo), vd = _mm512_set1_ps(delta);
  for (; c + 16 <= n; c += 16) {
    const __m512 e = exp2_ps(_mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(x + c), vh), vl));
    _mm512_storeu_ps(x + c, _mm512_mul_ps(e, _mm512_sub_ps(_mm512_loadu_ps(dp + c), vd)));
  }
#endif
  for (; c < n; ++c) x[c] = exp2f_fast((x[c] - hi) - lo) * (dp[c] - delta);
}

// P = 2^(x - hi[c] - lo[c]) in place (dK/dV pass: one key row against per-query lse).
inline void row_p_cols(float* x, const float* hi, const float* lo, int64_t n) {
  int64_t c = 0;
#ifdef __AVX512F__
  for (; c + 16 <= n; c += 16) {
    const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(x + c), _mm512_loadu_ps(hi + c));
    _mm512_storeu_ps(x + c, exp2_ps(_mm512_sub_ps(d, _mm512_loadu_ps(lo + c))));
  }
#endif
  for (; c < n; ++c) x[c] = exp2f_fast((x[c] - hi[c]) - lo[c]);
}

// C(MxN) = alpha * A(MxK) @ B(KxN) (+ C when accumulate), all row-major fp32, N a multiple of 16.
// Register-blocked: a kMR x 64 tile of C lives in 24 zmm registers while K streams through, fed by
// broadcasts of A and row loads of B (a K^T tile or a block of rows, see Packed). Measured at
// S = 4096, 10 % density, one thread: ~1.3x the forward throughput of MKL sgemm calls on gathered
// chunks (MKL re-packs its operands on every call; these operands are small and already laid out).
#ifdef __AVX512F__
constexpr int kMR = 6, kNV = 4;  // rows x 16-float vectors per register tile

// Element policies of the micro-kernel. A step consumes kA elements of an A row and one row of B
// words (16 words per vector); Fp32: plain FMAs; Bf16 (below): pair dot products.
struct Fp32Dot {
  using Elem = float;
  static constexpr int kA = 1, kWord = 1;  // A elements per step, B elements per word
  using Vec = __m512;
  static Vec load_b(const float* p) { return _mm512_loadu_ps(p); }
  static Vec bcast_a(const float* p) { return _mm512_set1_ps(*p); }
  static __m512 madd(__m512 acc, Vec a, Vec b) { return _mm512_fmadd_ps(a, b, acc); }
};

// The K steps come as nblk blocks of kb steps: block `blk` reads A columns [blk * kb, (blk + 1) * kb)
// (in steps) and B rows from Bblk[blk] + boff. One block list lets P @ V (and the backward's three
// accumulating products) run over a whole chunk of blocks with C in registers: one C round trip per
// chunk instead of per block (measured 1-4 % of the fp32 forward and backward at S = 8192).
template <class Dot, int R, int NV>
void micro_kernel(int64_t nblk, int64_t kb, float alpha, const typename Dot::Elem* A, int64_t lda,
                  const typename Dot::Elem* const* Bblk, int64_t boff, int64_t ldb, bool accumulate, float* C,
                  int64_t ldc) {
  __m512 acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const typename Dot::Elem* B = Bblk[blk] + boff;
    const typename Dot::Elem* Ab = A + Dot::kA * kb * blk;
    for (int64_t k = 0; k < kb; ++k) {
      typename Dot::Vec b[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) b[v] = Dot::load_b(B + Dot::kWord * (k * ldb + 16 * v));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const typename Dot::Vec a = Dot::bcast_a(Ab + r * lda + Dot::kA * k);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = Dot::madd(acc[r][v], a, b[v]);
      }
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* c = C + r * ldc + 16 * v;
      const __m512 x = alpha == 1.f ? acc[r][v] : _mm512_mul_ps(acc[r][v], va);
      _mm512_storeu_ps(c, accumulate ? _mm512_add_ps(x, _mm512_loadu_ps(c)) : x);
    }
}

// C(MxN) = alpha * sum over blk of A[:, blk-th kb steps] @ Bblk[blk] (+ C), each Bblk[blk] kb x N
// words with row stride ldb; A row-major (row stride lda elements), N a multiple of 16.
template <class Dot>
void gemm_blocks(int64_t M, int64_t N, int64_t nblk, int64_t kb, float alpha, const typename Dot::Elem* A,
                 int64_t lda, const typename Dot::Elem* const* Bblk, int64_t ldb, bool accumulate, float* C,
                 int64_t ldc) {
  using Fn = void (*)(int64_t, int64_t, float, const typename Dot::Elem*, int64_t, const typename Dot::Elem* const*,
                      int64_t, int64_t, bool, float*, int64_t);
#define KK_ROW(R) {micro_kernel<Dot, R, 1>, micro_kernel<Dot, R, 2>, micro_kernel<Dot, R, 3>, micro_kernel<Dot, R, 4>}
  static constexpr Fn kMicro[kMR][kNV] = {KK_ROW(1), KK_ROW(2), KK_ROW(3), KK_ROW(4), KK_ROW(5), KK_ROW(6)};
#undef KK_ROW
  for (int64_t n0 = 0; n0 < N; n0 += 16 * kNV) {
    const int nv = static_cast<int>(std::min<int64_t>(kNV, (N - n0) / 16));
    for (int64_t m0 = 0; m0 < M; m0 += kMR) {
      const int r = static_cast<int>(std::min<int64_t>(kMR, M - m0));
      kMicro[r - 1][nv - 1](nblk, kb, alpha, A + m0 * lda, lda, Bblk, Dot::kWord * n0, ldb, accumulate,
                            C + m0 * ldc + n0, ldc);
    }
  }
}

// C(MxN) = alpha * A @ B (+ C): A row-major (row stride lda elements), B as K x N words (row stride
// ldb words), K counted in steps (Dot::kA elements of A each), N a multiple of 16.
template <class Dot>
void gemm_tiles(int64_t M, int64_t N, int64_t K, float alpha, const typename Dot::Elem* A, int64_t lda,
                const typename Dot::Elem* B, int64_t ldb, bool accumulate, float* C, int64_t ldc) {
  // K in slices of 128 steps so a panel of B (<= 32 KiB) stays near L1 across the row tiles
  // (measured at D = 128 fp32: unsliced 4 % faster than slices of 64; D = 256 is sliced in two).
  for (int64_t k0 = 0; k0 < K; k0 += 128) {
    const int64_t kc = std::min<int64_t>(128, K - k0);
    const typename Dot::Elem* Bk = B + Dot::kWord * k0 * ldb;
    gemm_blocks<Dot>(M, N, 1, kc, alpha, A + Dot::kA * k0, lda, &Bk, ldb, accumulate || k0 > 0, C, ldc);
  }
}

void gemm(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
          int64_t ldb, bool accumulate, float* C, int64_t ldc) {
  gemm_tiles<Fp32Dot>(M, N, K, alpha, A, lda, B, ldb, accumulate, C, ldc);
}

// C(MxN) = alpha * A @ [Bblk[0]; Bblk[1]; ...] (+ C) for nblk row blocks of kb rows each (fp32).
void gemm_multi(int64_t M, int64_t N, int64_t nblk, int64_t kb, float alpha, const float* A, int64_t lda,
                const float* const* Bblk, int64_t ldb, bool accumulate, float* C, int64_t ldc) {
  gemm_blocks<Fp32Dot>(M, N, nblk, kb, alpha, A, lda, Bblk, ldb, accumulate, C, ldc);
}
#else
// Portable version (the compiler vectorizes the inner loop for the target's SIMD width).
void gemm(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
          int64_t ldb, bool accumulate, float* C, int64_t ldc) {
  for (int64_t m = 0; m < M; ++m) {
    float* c = C + m * ldc;
    if (!accumulate) std::fill(c, c + N, 0.f);
    for (int64_t k = 0; k < K; ++k) {
      const float a = alpha * A[m * lda + k];
      const float* b = B + k * ldb;
      for (int64_t n = 0; n < N; ++n) c[n] += a * b[n];
    }
  }
}

void gemm_multi(int64_t M, int64_t N, int64_t nblk, int64_t kb, float alpha, const float* A, int64_t lda,
                const float* const* Bblk, int64_t ldb, bool accumulate, float* C, int64_t ldc) {
  for (int64_t blk = 0; blk < nblk; ++blk)
    gemm(M, N, kb, alpha, A + blk * kb, lda, Bblk[blk], ldb, accumulate || blk > 0, C, ldc);
}
#endif

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define KK_BF16_DOT 1
// bf16 pairs: A (M x 2 K) bf16 row-major, B as K x N words, word (k, n) = (B[2k][n], B[2k+1][n]);
// each vdpbf16ps does 16 x 2 multiply-adds with fp32 accumulation.
struct Bf16Dot {
  using Elem = uint16_t;
  static constexpr int kA = 2, kWord = 2;
  using Vec = __m512bh;
  static Vec load_b(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static Vec bcast_a(const uint16_t* p) {
    int32_t word;
    std::memcpy(&word, p, sizeof(word));
    return (__m512bh)_mm512_set1_epi32(word);
  }
  static __m512 madd(__m512 acc, Vec a, Vec b) { return _mm512_dpbf16_ps(acc, a, b); }
};

// fp32 -> bf16, round to nearest even (what torch's conversion does).
inline void to_bf16(const float* x, int64_t n, uint16_t* y) {
  int64_t c = 0;
  for (; c + 16 <= n; c += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + c), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + c)));
  for (; c < n; ++c) y[c] = c10::BFloat16(x[c]).x;
}

// dst (2n bf16) = r0[0], r1[0], r0[1], r1[1], ...: two rows of V as one row of pair words.
inline void interleave_rows(const uint16_t* r0, const uint16_t* r1, int64_t n, uint16_t* dst) {
  alignas(64) int16_t idx_arr[32];
  for (int i = 0; i < 16; ++i) {
    idx_arr[2 * i] = static_cast<int16_t>(i);
    idx_arr[2 * i + 1] = static_cast<int16_t>(32 + i);
  }
  const __m512i idx = _mm512_load_si512(idx_arr);
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    const __m512i a = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + c)));
    const __m512i b = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + c)));
    _mm512_storeu_si512(dst + 2 * c, _mm512_permutex2var_epi16(a, idx, b));
  }
  for (; c < n; ++c) {
    dst[2 * c] = r0[c];
    dst[2 * c + 1] = r1[c];
  }
}

#else
#define KK_BF16_DOT 0
#endif

// A (B, S, H, D) tensor seen through its strides.
template <typename T>
struct Bshd {
  T* p;
  int64_t sb, ss, sh;
  explicit Bshd(const at::Tensor& t)
      : p(static_cast<T*>(t.data_ptr())), sb(t.stride(0)), ss(t.stride(1)), sh(t.stride(2)) {}
  T* row(int64_t b, int64_t s, int64_t h) const { return p + b * sb + s * ss + h * sh; }
};

// Copies `rows` rows starting at token s0 into dst (rows x D, fp32), times mul.
template <typename T>
inline void load_rows(const Bshd<T>& x, int64_t b, int64_t h, int64_t s0, int64_t rows, int64_t D,
                      float mul, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = x.row(b, s0 + r, h);
    float* d = dst + r * D;
    for (int64_t c = 0; c < D; ++c) d[c] = static_cast<float>(src[c]) * mul;
  }
}

template <typename T>
inline void store_rows(const Bshd<T>& x, int64_t b, int64_t h, int64_t s0, int64_t rows, int64_t D,
                       float mul, const float* src) {
  for (int64_t r = 0; r < rows; ++r) {
    T* d = x.row(b, s0 + r, h);
    const float* s = src + r * D;
    for (int64_t c = 0; c < D; ++c) d[c] = static_cast<T>(s[c] * mul);
  }
}

// dst[c * ldd + r] = src[r * lds + c] (* mul) for a rows x cols block of 32-bit elements: fp32 K^T
// tiles (times scale * log2(e)), or with kScale false bit-exact copies of any 32-bit words (the bf16
// pair tiles). 16 x 16 sub-blocks go through registers (four butterfly stages of two-source permutes,
// each swapping the off-diagonal s x s blocks, s = 8, 4, 2, 1; loads and permutes never touch the
// bits): a scalar transpose writes with a stride of `ldd` and was a tenth of the forward's time.
template <bool kScale>
void transpose32(const void* src_v, int64_t lds, int64_t rows, int64_t cols, float mul, void* dst_v, int64_t ldd) {
  const char* src = static_cast<const char*>(src_v);
  char* dst = static_cast<char*>(dst_v);
  int64_t r16 = 0, c16 = 0;  // the part done in 16 x 16 register blocks
#ifdef __AVX512F__
  r16 = rows / 16 * 16;
  c16 = cols / 16 * 16;
  alignas(64) int32_t lo_idx[4][16], hi_idx[4][16];
  for (int lv = 0; lv < 4; ++lv) {
    const int sft = 8 >> lv;
    for (int c = 0; c < 16; ++c) {
      lo_idx[lv][c] = (c & sft) ? 16 + c - sft : c;
      hi_idx[lv][c] = (c & sft) ? 16 + c : c + sft;
    }
  }
  const __m512 vm = _mm512_set1_ps(mul);
  for (int64_t rb = 0; rb < r16; rb += 16)
    for (int64_t cb = 0; cb < c16; cb += 16) {
      __m512 x[16];
      for (int i = 0; i < 16; ++i) {
        x[i] = _mm512_loadu_ps(src + 4 * ((rb + i) * lds + cb));
        if constexpr (kScale) x[i] = _mm512_mul_ps(x[i], vm);
      }
      for (int lv = 0; lv < 4; ++lv) {
        const int sft = 8 >> lv;
        const __m512i lo = _mm512_load_si512(lo_idx[lv]), hi = _mm512_load_si512(hi_idx[lv]);
        for (int i = 0; i < 16; ++i) {
          if (i & sft) continue;
          const __m512 a = x[i], b = x[i + sft];
          x[i] = _mm512_permutex2var_ps(a, lo, b);
          x[i + sft] = _mm512_permutex2var_ps(a, hi, b);
        }
      }
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + 4 * ((cb + i) * ldd + rb), x[i]);
    }
#endif
  // the rest: rows below r16 in the first c16 columns, every row of the columns past c16 (memcpy: the
  // words may live in bf16 storage)
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = c < c16 ? r16 : 0; r < rows; ++r) {
      float w;
      std::memcpy(&w, src + 4 * (r * lds + c), 4);
      if constexpr (kScale) w *= mul;
      std::memcpy(dst + 4 * (c * ldd + r), &w, 4);
    }
}

enum PairMode : int8_t { kSkip = 0, kFull = 1, kPartial = 2 };

// Everything about the problem except the data pointers.
struct Problem {
  int64_t B, S, H, D, bs, nb;  // nb = blocks per sequence (Nq == Nk)
  int64_t Bm, Hm, Bt;          // mask batch/heads and token_valid batch (1 = broadcast)
  float scale;
  const int32_t* kv_num;  // (Bm, Hm, nb)
  const int32_t* kv_idx;  // (Bm, Hm, nb, nb)
  // Per-token codes: a query row attends key column only where qcode == kcode. qcode: segment id, or
  // -4 beyond cu_seqlens[-1]; kcode (Bt, S): segment id, or -3 for a pad / beyond-the-end key.
  std::vector<int32_t> qcode, kcode;
  // Per-block codes: the common token code of the block, or -2 when its tokens differ.
  std::vector<int32_t> qblk, kblk;  // (nb), (Bt, nb)
  bool per_element;                 // false: no cu_seqlens and no token_valid, every pair is full

  int64_t mask_row(int64_t b, int64_t h, int64_t i) const {
    return ((Bm == 1 ? 0 : b) * Hm + (Hm == 1 ? 0 : h)) * nb + i;
  }
  int64_t tb(int64_t b) const { return Bt == 1 ? 0 : b; }
  const int32_t* kcode_of(int64_t b) const { return kcode.data() + tb(b) * S; }

  PairMode pair(int64_t b, int64_t qi, int64_t kj) const {
    if (!per_element) return kFull;
    const int32_t qc = qblk[qi], kc = kblk[tb(b) * nb + kj];
    if (qc == -4 || kc == -3) return kSkip;
    if (qc >= 0 && kc >= 0) return qc == kc ? kFull : kSkip;
    return kPartial;
  }
};

Problem make_problem(const at::Tensor& q, const at::Tensor& kv_num_blocks, const at::Tensor& kv_indices,
                     int64_t block_size, double scale, const std::optional<at::Tensor>& token_valid,
                     const std::optional<at::Tensor>& cu_seqlens) {
  Problem p;
  p.B = q.size(0);
  p.S = q.size(1);
  p.H = q.size(2);
  p.D = q.size(3);
  p.bs = block_size;
  KK_CHECK(block_size > 0 && p.S % block_size == 0, "S=", p.S, " must be a multiple of block_size=",
           block_size);
  p.nb = p.S / block_size;
  KK_CHECK(p.D > 0 && p.D % 16 == 0 && block_size % 16 == 0, "head dim D=", p.D, " and block_size=",
           block_size, " must be positive multiples of 16");
  KK_CHECK_CPU(kv_num_blocks);
  KK_CHECK_CPU(kv_indices);
  if (token_valid.has_value() && token_valid->defined()) KK_CHECK_CPU(*token_valid);
  if (cu_seqlens.has_value() && cu_seqlens->defined()) KK_CHECK_CPU(*cu_seqlens);
  KK_CHECK(kv_num_blocks.dim() == 3 && kv_indices.dim() == 4, "kv_num_blocks must be (B, H, Nq) and "
           "kv_indices (B, H, Nq, Nk), got ", kv_num_blocks.sizes(), " and ", kv_indices.sizes());
  KK_CHECK(kv_num_blocks.scalar_type() == at::kInt && kv_indices.scalar_type() == at::kInt,
           "kv_num_blocks and kv_indices must be int32");
  p.Bm = kv_indices.size(0);
  p.Hm = kv_indices.size(1);
  KK_CHECK((p.Bm == 1 || p.Bm == p.B) && (p.Hm == 1 || p.Hm == p.H) && kv_indices.size(2) == p.nb &&
               kv_indices.size(3) == p.nb && kv_num_blocks.sizes() == kv_indices.sizes().slice(0, 3),
           "mask shape ", kv_indices.sizes(), " does not fit B=", p.B, " H=", p.H, " blocks=", p.nb);
  KK_CHECK(kv_num_blocks.is_contiguous() && kv_indices.is_contiguous(), "mask tensors must be contiguous");
  p.kv_num = kv_num_blocks.data_ptr<int32_t>();
  p.kv_idx = kv_indices.data_ptr<int32_t>();
  // Every index is read by the kernels, so the whole active part is checked first, in O(active
  // blocks): counts in range, ids in range and no id twice in a row (a repeat would count its block
  // twice). `seen[j] == row + 1` marks id j as used in this row without clearing between rows.
  {
    std::vector<int64_t> seen(p.nb, 0);
    for (int64_t row = 0; row < p.Bm * p.Hm * p.nb; ++row) {
      const int32_t n = p.kv_num[row];
      KK_CHECK(n >= 0 && n <= p.nb, "kv_num_blocks must lie in [0, Nk=", p.nb, "], got ", n,
               " at flat index ", row);
      for (int32_t t = 0; t < n; ++t) {
        const int32_t j = p.kv_idx[row * p.nb + t];
        KK_CHECK(j >= 0 && j < p.nb, "kv_indices must lie in [0, Nk=", p.nb, ") in the first kv_num_blocks "
                 "entries of each row, got ", j, " in row ", row);
        KK_CHECK(seen[j] != row + 1, "kv_indices repeats block ", j, " in the active part of row ", row,
                 " (each key block may appear once)");
        seen[j] = row + 1;
      }
    }
  }
  KK_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  p.scale = static_cast<float>(scale);

  const bool has_tv = token_valid.has_value() && token_valid->defined();
  const bool has_cu = cu_seqlens.has_value() && cu_seqlens->defined();
  p.per_element = has_tv || has_cu;
  const at::Tensor tv = has_tv ? token_valid->contiguous() : at::Tensor();
  if (has_tv) {
    KK_CHECK(tv.scalar_type() == at::kBool && tv.dim() == 2 && tv.size(1) == p.S &&
                 (tv.size(0) == 1 || tv.size(0) == p.B),
             "token_valid must be bool (1 or B, S), got ", tv.scalar_type(), " ", tv.sizes());
  }
  p.Bt = has_tv ? tv.size(0) : 1;
  p.qcode.assign(p.S, 0);
  if (has_cu) {
    const at::Tensor cu = kk::checked_cu_seqlens(*cu_seqlens, p.B, p.S);
    const int32_t* c = cu.data_ptr<int32_t>();
    const int64_t n = cu.size(0) - 1;
    std::fill(p.qcode.begin(), p.qcode.end(), -4);
    for (int64_t seg = 0; seg < n; ++seg)
      for (int64_t t = c[seg]; t < c[seg + 1]; ++t) p.qcode[t] = static_cast<int32_t>(seg);
  }
  p.kcode.resize(p.Bt * p.S);
  for (int64_t b = 0; b < p.Bt; ++b) {
    const bool* v = has_tv ? tv.data_ptr<bool>() + b * p.S : nullptr;
    for (int64_t t = 0; t < p.S; ++t) {
      const int32_t c = p.qcode[t];
      p.kcode[b * p.S + t] = (c < 0 || (v && !v[t])) ? -3 : c;
    }
  }
  auto block_code = [&](const int32_t* codes, int64_t j) {
    const int32_t c0 = codes[j * p.bs];
    for (int64_t t = 1; t < p.bs; ++t)
      if (codes[j * p.bs + t] != c0) return -2;
    return c0;
  };
  p.qblk.resize(p.nb);
  p.kblk.resize(p.Bt * p.nb);
  for (int64_t j = 0; j < p.nb; ++j) p.qblk[j] = block_code(p.qcode.data(), j);
  for (int64_t b = 0; b < p.Bt; ++b)
    for (int64_t j = 0; j < p.nb; ++j) p.kblk[b * p.nb + j] = block_code(p.kcode.data() + b * p.S, j);
  return p;
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    KK_CHECK_CPU(*t);
    KK_CHECK_DIM(*t, 4);
    KK_CHECK(t->sizes() == q.sizes(), "q, k, v must share one (B, S, H, D) shape, got ", q.sizes(), ", ",
             k.sizes(), ", ", v.sizes());
    KK_CHECK(t->scalar_type() == q.scalar_type(), "q, k, v must share one dtype");
    KK_CHECK(t->stride(3) == 1, "the head dim of q, k, v must have unit stride");
  }
}

// Sets -inf where the query (row) and key (column) codes differ. Rows index `rows_code`, columns
// `cols_code`; the caller orients them (forward/dQ: rows = queries; dK/dV: rows = keys).
inline void mask_tile(float* s, int64_t ld, int64_t rows, int64_t cols, const int32_t* rows_code,
                      const int32_t* cols_code) {
  for (int64_t r = 0; r < rows; ++r) {
    float* sr = s + r * ld;
    const int32_t rc = rows_code[r];
    for (int64_t c = 0; c < cols; ++c)
      if (cols_code[c] != rc) sr[c] = -kInf;
  }
}

// The active blocks of mask row (b, h, i) that the pair test does not skip.
inline int64_t active_blocks(const Problem& p, int64_t b, int64_t h, int64_t i, std::vector<int32_t>& out,
                             std::vector<int8_t>& mode) {
  const int64_t row = p.mask_row(b, h, i);
  const int32_t n = p.kv_num[row];
  const int32_t* idx = p.kv_idx + row * p.nb;
  out.clear();
  mode.clear();
  for (int32_t t = 0; t < n; ++t) {
    const PairMode m = p.pair(b, i, idx[t]);
    if (m == kSkip) continue;
    out.push_back(idx[t]);
    mode.push_back(m);
  }
  return static_cast<int64_t>(out.size());
}

// at::parallel_for splits a range evenly by count, but NABLA rows differ a lot in active blocks
// (dense heads next to sparse ones), and on a shared machine one thread may get less CPU time. So
// the tasks are cut into 8 contiguous pieces per thread of about equal cost (cost(task) = active
// blocks + 1; contiguous pieces keep K/V in cache) which the threads take from a shared counter.
template <typename Cost, typename Body>
void parallel_balanced(int64_t n, const Cost& cost, const Body& body) {
  std::vector<int64_t> prefix(n + 1, 0);
  for (int64_t t = 0; t < n; ++t) prefix[t + 1] = prefix[t] + cost(t) + 1;
  const int64_t threads = at::get_num_threads();
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(n, 8 * threads));
  auto start = [&](int64_t part) {
    const int64_t target = prefix[n] * part / parts;
    return static_cast<int64_t>(std::lower_bound(prefix.begin(), prefix.end(), target) - prefix.begin());
  };
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t part = next++; part < parts; part = next++) body(start(part), start(part + 1));
  });
}

// parallel_balanced over the (b, h, query block) tasks, each costing its active key blocks.
template <typename Body>
void over_query_blocks(const Problem& p, const Body& body) {
  const int64_t nb = p.nb, H = p.H;
  const auto cost = [&](int64_t task) {
    return static_cast<int64_t>(p.kv_num[p.mask_row(task / (nb * H), (task / nb) % H, task % nb)]);
  };
  parallel_balanced(p.B * H * nb, cost, body);
}

// One (B, S, H, D) input in the two fp32 layouts gemm() wants, so the inner loops never gather or
// convert. `row(b, h, s)`: a block is a row-major (bs x D) matrix with leading dimension `ld`; for
// fp32 inputs this is the input itself (no copy), otherwise an fp32 copy (B, H, S, D). `tile(b, h,
// j)`: block j transposed (D x bs, ld bs) and multiplied by `tile_mul`, the B operand of q.k^T;
// always a copy (B, H, nb, D, bs).
struct Packed {
  at::Tensor rows_t, tiles_t;
  const float* rows = nullptr;
  float* tiles = nullptr;
  int64_t rb = 0, rh = 0, ld = 0, H = 0, nb = 0, tile_size = 0;
  const float* row(int64_t b, int64_t h, int64_t s) const { return rows + b * rb + h * rh + s * ld; }
  const float* tile(int64_t b, int64_t h, int64_t j) const { return tiles + ((b * H + h) * nb + j) * tile_size; }
};

template <typename T>
Packed pack(const at::Tensor& x, const Problem& p, bool want_rows, bool want_tiles, float tile_mul = 1.f) {
  Packed pk;
  pk.H = p.H;
  pk.nb = p.nb;
  pk.tile_size = p.D * p.bs;
  const auto opts = x.options().dtype(at::kFloat);
  const bool copy_rows = want_rows && !std::is_same_v<T, float>;
  if (want_rows && !copy_rows) {
    pk.rows = reinterpret_cast<const float*>(x.data_ptr());
    pk.rb = x.stride(0);
    pk.rh = x.stride(2);
    pk.ld = x.stride(1);
  } else if (copy_rows) {
    pk.rows_t = at::empty({p.B, p.H, p.S, p.D}, opts);
    pk.rows = pk.rows_t.data_ptr<float>();
    pk.rb = p.H * p.S * p.D;
    pk.rh = p.S * p.D;
    pk.ld = p.D;
  }
  if (want_tiles) {
    pk.tiles_t = at::empty({p.B, p.H, p.nb, p.D, p.bs}, opts);
    pk.tiles = pk.tiles_t.data_ptr<float>();
  }
  if (!copy_rows && !want_tiles) return pk;
  const Bshd<T> X(x);
  const int64_t bs = p.bs, D = p.D;
  at::parallel_for(0, p.B * p.H * p.nb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(bs * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t j = task % p.nb, h = (task / p.nb) % p.H, b = task / (p.nb * p.H);
      float* t = want_tiles ? pk.tiles + ((b * p.H + h) * p.nb + j) * D * bs : nullptr;
      if constexpr (std::is_same_v<T, float>) {
        if (!copy_rows) {  // fp32 tiles straight from the strided input: one pass, no staging copy
          transpose32<true>(X.row(b, j * bs, h), X.ss, bs, D, tile_mul, t, bs);
          continue;
        }
      }
      float* dst = copy_rows ? const_cast<float*>(pk.row(b, h, j * bs)) : buf.data();
      load_rows(X, b, h, j * bs, bs, D, 1.f, dst);
      if (want_tiles) transpose32<true>(dst, D, bs, D, tile_mul, t, bs);
    }
  });
  return pk;
}

// The forward's walk over (b, h, query block) with an online softmax over chunks of active key
// blocks. The two products come from `Ops` (fp32 panels, or bf16 dot products):
//   ops.scores(b, h, s0, j, st, ld): st (bs x bs, row stride ld) = scores of query block at s0 against
//                                    key block j, in the log2 domain (times scale * log2(e));
//   ops.pv(b, h, js, n, pt, ld, acc): acc (bs x D) += P (bs x n * bs at pt, row stride ld) @ the V
//                                    blocks js[0..n) stacked (one chunk).
template <typename T, typename Ops>
void forward_loop(const Problem& p, const Ops& ops, at::Tensor& out, at::Tensor& lse) {
  const int64_t bs = p.bs, D = p.D, nb = p.nb;
  const Bshd<T> O(out);
  float* L = lse.data_ptr<float>();
  const int64_t chunk = chunk_blocks(bs);
  over_query_blocks(p, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(bs * D), st(bs * chunk * bs), m(bs), l(bs);
    std::vector<int32_t> blocks;
    std::vector<int8_t> modes;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task % nb, h = (task / nb) % p.H, b = task / (nb * p.H);
      const int64_t s0 = i * bs;
      const int64_t n = active_blocks(p, b, h, i, blocks, modes);
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -kInf);
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t c0 = 0; c0 < n; c0 += chunk) {
        const int64_t nc = std::min(chunk, n - c0), cols = nc * bs;
        for (int64_t c = 0; c < nc; ++c) {
          ops.scores(b, h, s0, blocks[c0 + c], st.data() + c * bs, cols);
          if (modes[c0 + c] == kPartial)
            mask_tile(st.data() + c * bs, cols, bs, bs, p.qcode.data() + s0,
                      p.kcode_of(b) + blocks[c0 + c] * bs);
        }
        for (int64_t r = 0; r < bs; ++r) {
          float* sr = st.data() + r * cols;
          const float mx = row_max(sr, cols, m[r]);
          if (mx == -kInf) {  // nothing visible yet: contribute zeros, keep the state
            std::fill(sr, sr + cols, 0.f);
            continue;
          }
          const float alpha = exp2f_fast(m[r] - mx);
          const float sum = row_exp2_sum(sr, cols, mx);
          if (alpha != 1.f) {
            float* ar = acc.data() + r * D;
            for (int64_t d = 0; d < D; ++d) ar[d] *= alpha;
          }
          l[r] = l[r] * alpha + sum;
          m[r] = mx;
        }
        ops.pv(b, h, blocks.data() + c0, nc, st.data(), cols, acc.data());
      }
      float* lrow = L + (b * p.H + h) * p.S + s0;
      for (int64_t r = 0; r < bs; ++r) {
        // l is NaN for a row that met a NaN or inf - inf score: its output and lse stay NaN (not the
        // "no visible key" zeros), so the backward sees the same NaN.
        const bool any = l[r] != 0.f;
        const float inv = any ? 1.f / l[r] : 0.f;
        float* ar = acc.data() + r * D;
        for (int64_t d = 0; d < D; ++d) ar[d] *= inv;
        lrow[r] = any ? static_cast<float>((m[r] + std::log2(static_cast<double>(l[r]))) * kLn2d) : -kInf;
      }
      store_rows(O, b, h, s0, bs, D, 1.f, acc.data());
    }
  });
}


template <typename T>
void forward_impl(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  at::Tensor& out, at::Tensor& lse) {
  const int64_t bs = p.bs, D = p.D;
  // Scores in the log2 domain: the K^T tiles carry scale * log2(e).
  const Packed Qp = pack<T>(q, p, true, false);
  const Packed Kp = pack<T>(k, p, false, true, p.scale * kLog2e);
  const Packed Vp = pack<T>(v, p, true, false);
  struct {
    const Packed &Q, &K, &V;
    int64_t bs, D;
    void scores(int64_t b, int64_t h, int64_t s0, int64_t j, float* st, int64_t ld) const {
      gemm(bs, bs, D, 1.f, Q.row(b, h, s0), Q.ld, K.tile(b, h, j), bs, false, st, ld);
    }
    void pv(int64_t b, int64_t h, const int32_t* js, int64_t n, const float* pt, int64_t ld, float* acc) const {
      const float* vb[kMaxChunk];
      for (int64_t c = 0; c < n; ++c) vb[c] = V.row(b, h, js[c] * bs);
      gemm_multi(bs, D, n, bs, 1.f, pt, ld, vb, V.ld, true, acc, D);
    }
  } ops{Qp, Kp, Vp, bs, D};
  forward_loop<T>(p, ops, out, lse);
}

#if KK_BF16_DOT
// bf16 inputs on CPUs with AVX512-BF16: both products on bf16 dot products (two products summed in
// fp32 per instruction, twice the fp32 FMA rate), fp32 accumulation, fp32 softmax; P is rounded to
// bf16 for the P @ V product as in FlashAttention and torch's own bf16 CPU attention. Q is read in
// place; K becomes pair tiles (D/2 x bs words, each word a (d, d+1) pair of one key), V pair rows
// (word (t, n) = (V[2t][n], V[2t+1][n])). Scores are scaled after the product (K cannot carry the
// scale in bf16 without rounding it).
struct Bf16Ops {
  const at::BFloat16* q;
  int64_t qsb, qss, qsh;
  const uint16_t *kt, *vp;
  int64_t H, S, nb, bs, D;
  float qmul;
  void scores(int64_t b, int64_t h, int64_t s0, int64_t j, float* st, int64_t ld) const {
    const uint16_t* qs = reinterpret_cast<const uint16_t*>(q + b * qsb + s0 * qss + h * qsh);
    gemm_tiles<Bf16Dot>(bs, bs, D / 2, qmul, qs, qss, kt + ((b * H + h) * nb + j) * D * bs, bs, false, st, ld);
  }
  void pv(int64_t b, int64_t h, const int32_t* js, int64_t n, const float* pt, int64_t ld, float* acc) const {
    thread_local std::vector<uint16_t> pb;
    pb.resize(bs * ld);
    for (int64_t r = 0; r < bs; ++r) to_bf16(pt + r * ld, n * bs, pb.data() + r * ld);
    const uint16_t* vb[kMaxChunk];
    for (int64_t c = 0; c < n; ++c) vb[c] = vp + ((b * H + h) * S + js[c] * bs) * D;
    gemm_blocks<Bf16Dot>(bs, D, n, bs / 2, 1.f, pb.data(), ld, vb, D, true, acc, D);
  }
};

// KANDINSKY_BSA_CPU_BF16_DOT=0 sends bf16 through the fp32 conversion path instead (A/B measurements,
// tests of that path); read at every call.
bool bf16_dot_enabled() {
  const char* e = std::getenv("KANDINSKY_BSA_CPU_BF16_DOT");
  return !(e && std::strcmp(e, "0") == 0);
}

// Whether the bf16 path can read q, k, v: pairs must be whole 32-bit words in every row.
bool bf16_dot_layout_ok(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const at::Tensor* t : {&q, &k, &v})
    if (t->stride(0) % 2 || t->stride(1) % 2 || t->stride(2) % 2 ||
        reinterpret_cast<uintptr_t>(t->data_ptr()) % 4)
      return false;
  return true;
}

void forward_bf16_dot(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      at::Tensor& out, at::Tensor& lse) {
  const int64_t bs = p.bs, D = p.D, nb = p.nb, H = p.H, S = p.S;
  at::Tensor kt = at::empty({p.B, H, nb, D / 2, bs}, k.options().dtype(at::kInt));
  at::Tensor vp = at::empty({p.B, H, S, D}, v.options());
  const Bshd<at::BFloat16> K(k), V(v);
  auto* ktp = reinterpret_cast<uint32_t*>(kt.data_ptr());
  auto* vpp = reinterpret_cast<uint16_t*>(vp.data_ptr());
  at::parallel_for(0, p.B * H * nb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t j = task % nb, h = (task / nb) % H, b = task / (nb * H);
      transpose32<false>(K.row(b, j * bs, h), K.ss / 2, bs, D / 2, 1.f, ktp + task * (D / 2) * bs, bs);
      uint16_t* dst = vpp + ((b * H + h) * S + j * bs) * D;
      for (int64_t t = 0; t < bs / 2; ++t)
        interleave_rows(reinterpret_cast<const uint16_t*>(V.row(b, j * bs + 2 * t, h)),
                        reinterpret_cast<const uint16_t*>(V.row(b, j * bs + 2 * t + 1, h)), D, dst + 2 * t * D);
    }
  });
  const Bf16Ops ops{q.data_ptr<at::BFloat16>(), q.stride(0), q.stride(1), q.stride(2),
                    reinterpret_cast<const uint16_t*>(ktp), vpp, H, S, nb, bs, D, p.scale * kLog2e};
  forward_loop<at::BFloat16>(p, ops, out, lse);
}
#endif

std::tuple<at::Tensor, at::Tensor> bsa_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& kv_num_blocks, const at::Tensor& kv_indices,
                                           int64_t block_size, double scale,
                                           const std::optional<at::Tensor>& token_valid,
                                           const std::optional<at::Tensor>& cu_seqlens) {
  check_qkv(q, k, v);
  const Problem p = make_problem(q, kv_num_blocks, kv_indices, block_size, scale, token_valid, cu_seqlens);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({p.B, p.H, p.S}, q.options().dtype(at::kFloat));
#if KK_BF16_DOT
  if (q.scalar_type() == at::kBFloat16 && bf16_dot_layout_ok(q, k, v) && bf16_dot_enabled()) {
    forward_bf16_dot(p, q, k, v, out, lse);
    return {out, lse};
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "bsa_fwd",
                                  [&] { forward_impl<scalar_t>(p, q, k, v, out, lse); });
  return {out, lse};
}

// The mask seen from the key side, CSR per (mask batch, mask head, key block): ascending query blocks.
struct Transposed {
  std::vector<int32_t> off, idx;
};

Transposed transpose_mask(const Problem& p) {
  Transposed t;
  const int64_t rows = p.Bm * p.Hm * p.nb;
  std::vector<int32_t> count(rows, 0);
  for (int64_t bh = 0; bh < p.Bm * p.Hm; ++bh)
    for (int64_t i = 0; i < p.nb; ++i) {
      const int64_t row = bh * p.nb + i;
      for (int32_t s = 0; s < p.kv_num[row]; ++s) ++count[bh * p.nb + p.kv_idx[row * p.nb + s]];
    }
  t.off.assign(rows + 1, 0);
  for (int64_t r = 0; r < rows; ++r) t.off[r + 1] = t.off[r] + count[r];
  t.idx.resize(t.off[rows]);
  std::vector<int32_t> fill(t.off.begin(), t.off.end() - 1);
  for (int64_t bh = 0; bh < p.Bm * p.Hm; ++bh)
    for (int64_t i = 0; i < p.nb; ++i) {
      const int64_t row = bh * p.nb + i;
      for (int32_t s = 0; s < p.kv_num[row]; ++s)
        t.idx[fill[bh * p.nb + p.kv_idx[row * p.nb + s]]++] = static_cast<int32_t>(i);
    }
  return t;
}

// The two-pass scheme's dK/dV pass: the (b, h, key block) tasks shared out by their number of query
// blocks; each thread makes one worker (make()) and calls run(worker, b, h, j) per task.
template <class Make, class Run>
void over_key_blocks(const Problem& p, const Transposed& tr, const Make& make, const Run& run) {
  const int64_t nb = p.nb, H = p.H;
  const auto cost = [&](int64_t task) {
    const int64_t row = p.mask_row(task / (nb * H), (task / nb) % H, task % nb);
    return static_cast<int64_t>(tr.off[row + 1] - tr.off[row]);
  };
  parallel_balanced(p.B * H * nb, cost, [&](int64_t begin, int64_t end) {
    auto worker = make();
    for (int64_t task = begin; task < end; ++task) run(worker, task / (nb * H), (task / nb) % H, task % nb);
  });
}

// Per query row of block i of (b, h): lse in the log2 domain as hi + lo (hi = +inf for a row that sees
// nothing, so every P is 0) and Delta = rowsum(dO * O). dos: the block's dO rows in fp32 (row stride
// ldd); os: bs x D scratch.
template <typename T>
void block_stats(const Problem& p, const Bshd<T>& O, const float* dos, int64_t ldd, const float* L, int64_t b,
                 int64_t h, int64_t i, float* os, std::vector<float>& lse2, std::vector<float>& lse2lo,
                 std::vector<float>& delta) {
  const int64_t bs = p.bs, D = p.D, s0 = i * bs, rbase = (b * p.H + h) * p.S + s0;
  load_rows(O, b, h, s0, bs, D, 1.f, os);
  for (int64_t r = 0; r < bs; ++r) {
    float d = 0.f;
#pragma omp simd reduction(+ : d)
    for (int64_t c = 0; c < D; ++c) d += dos[r * ldd + c] * os[r * D + c];
    delta[rbase + r] = d;
    const double x = L[rbase + r] * kLog2ed;
    const float hi = std::isinf(x) ? kInf : static_cast<float>(x);
    lse2[rbase + r] = hi;
    lse2lo[rbase + r] = std::isinf(x) ? 0.f : static_cast<float>(x - hi);
  }
}

// block_stats for every block; dO straight from the input (B, S, H, D).
template <typename T>
void row_stats(const Problem& p, const Bshd<T>& O, const Bshd<T>& dO, const float* L, std::vector<float>& lse2,
               std::vector<float>& lse2lo, std::vector<float>& delta) {
  at::parallel_for(0, p.B * p.H * p.nb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> os(p.bs * p.D), dos(p.bs * p.D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task % p.nb, h = (task / p.nb) % p.H, b = task / (p.nb * p.H);
      load_rows(dO, b, h, i * p.bs, p.bs, p.D, 1.f, dos.data());
      block_stats(p, O, dos.data(), p.D, L, b, h, i, os.data(), lse2, lse2lo, delta);
    }
  });
}

// The query blocks that key block j of (b, h) meets (ascending), without the skipped pairs.
inline int64_t key_block_pairs(const Problem& p, const Transposed& tr, int64_t b, int64_t h, int64_t j,
                               std::vector<int32_t>& blocks, std::vector<int8_t>& modes) {
  const int64_t row = p.mask_row(b, h, j);
  blocks.clear();
  modes.clear();
  for (int32_t s = tr.off[row]; s < tr.off[row + 1]; ++s) {
    const PairMode md = p.pair(b, tr.idx[s], j);
    if (md == kSkip) continue;
    blocks.push_back(tr.idx[s]);
    modes.push_back(md);
  }
  return static_cast<int64_t>(blocks.size());
}

// dK and dV of key block j of (b, h), walking its query blocks through the transposed mask: S^T and
// dP^T per pair, then dV += P^T dO and dK += scale dS^T Q over a chunk of query blocks at once. With
// dqa (this head's S x D fp32 rows) it also adds dS_ij K_j to dQ_i (the single-pass scheme). Scores
// are bitwise the forward's: the key block is scaled by scale * log2(e) as the forward's K^T tiles are.
template <typename T>
struct KeyBlockGrads {
  const Problem& p;
  const Transposed& tr;
  const Packed &Qp, &Dp, &Kp, &Vp;  // Q, dO: rows and tiles; K, V: rows
  const std::vector<float> &lse2, &lse2lo, &delta;
  const Bshd<T> &dK, &dV;
  std::vector<float> ks, dka, dva, st, dp, lb, lbl, db, dsq;
  std::vector<int32_t> blocks;
  std::vector<int8_t> modes;

  KeyBlockGrads(const Problem& p_, const Transposed& tr_, const Packed& Q, const Packed& Dd, const Packed& K,
                const Packed& V, const std::vector<float>& l2, const std::vector<float>& l2lo,
                const std::vector<float>& dl, const Bshd<T>& dK_, const Bshd<T>& dV_)
      : p(p_), tr(tr_), Qp(Q), Dp(Dd), Kp(K), Vp(V), lse2(l2), lse2lo(l2lo), delta(dl), dK(dK_), dV(dV_) {
    const int64_t bs = p.bs, D = p.D, cb = chunk_blocks(bs) * bs;
    for (auto* v : {&ks, &dka, &dva}) v->resize(bs * D);
    for (auto* v : {&st, &dp}) v->resize(bs * cb);
    for (auto* v : {&lb, &lbl, &db}) v->resize(cb);
    dsq.resize(bs * bs);
  }

  void run(int64_t b, int64_t h, int64_t j, float* dqa) {
    const int64_t bs = p.bs, D = p.D, S = p.S, chunk = chunk_blocks(bs), t0 = j * bs;
    const int64_t n = key_block_pairs(p, tr, b, h, j, blocks, modes);
    const float* kr = Kp.row(b, h, t0);
    const float* vs = Vp.row(b, h, t0);
    const int32_t* kc = p.kcode_of(b) + t0;
    const float qmul = p.scale * kLog2e;
    for (int64_t r = 0; r < bs && n > 0; ++r)
      for (int64_t d = 0; d < D; ++d) ks[r * D + d] = kr[r * Kp.ld + d] * qmul;
    std::fill(dka.begin(), dka.end(), 0.f);
    std::fill(dva.begin(), dva.end(), 0.f);
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
      const int64_t nc = std::min(chunk, n - c0), cols = nc * bs;
      // Transposed tiles: rows are this block's keys, columns the chunk's queries.
      for (int64_t c = 0; c < nc; ++c) {
        const int64_t i = blocks[c0 + c], rbase = (b * p.H + h) * S + i * bs;
        gemm(bs, bs, D, 1.f, ks.data(), D, Qp.tile(b, h, i), bs, false, st.data() + c * bs, cols);
        gemm(bs, bs, D, 1.f, vs, Vp.ld, Dp.tile(b, h, i), bs, false, dp.data() + c * bs, cols);
        if (modes[c0 + c] == kPartial) mask_tile(st.data() + c * bs, cols, bs, bs, kc, p.qcode.data() + i * bs);
        std::memcpy(lb.data() + c * bs, lse2.data() + rbase, bs * sizeof(float));
        std::memcpy(lbl.data() + c * bs, lse2lo.data() + rbase, bs * sizeof(float));
        std::memcpy(db.data() + c * bs, delta.data() + rbase, bs * sizeof(float));
      }
      for (int64_t r = 0; r < bs; ++r) row_p_cols(st.data() + r * cols, lb.data(), lbl.data(), cols);
      const float* db_rows[kMaxChunk];
      const float* qb_rows[kMaxChunk];
      for (int64_t c = 0; c < nc; ++c) {
        db_rows[c] = Dp.row(b, h, blocks[c0 + c] * bs);
        qb_rows[c] = Qp.row(b, h, blocks[c0 + c] * bs);
      }
      gemm_multi(bs, D, nc, bs, 1.f, st.data(), cols, db_rows, Dp.ld, true, dva.data(), D);
      for (int64_t r = 0; r < bs; ++r) {
        float* sr = st.data() + r * cols;
        const float* pr = dp.data() + r * cols;
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) sr[c] *= pr[c] - db[c];
      }
      gemm_multi(bs, D, nc, bs, p.scale, st.data(), cols, qb_rows, Qp.ld, true, dka.data(), D);  // dK
      for (int64_t c = 0; dqa && c < nc; ++c) {  // dQ_i += dS_ij K_j, dS from its transposed tile
        transpose32<false>(st.data() + c * bs, cols, bs, bs, 1.f, dsq.data(), bs);
        gemm(bs, D, bs, 1.f, dsq.data(), bs, kr, Kp.ld, true, dqa + blocks[c0 + c] * bs * D, D);
      }
    }
    store_rows(dK, b, h, t0, bs, D, 1.f, dka.data());
    store_rows(dV, b, h, t0, bs, D, 1.f, dva.data());
  }
};

template <typename T>
void backward_impl(const Problem& p, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq,
                   at::Tensor& dk, at::Tensor& dv) {
  const int64_t bs = p.bs, D = p.D, nb = p.nb, S = p.S;
  const float qmul = p.scale * kLog2e;
  // Both layouts of everything: the dQ pass multiplies by K^T, V^T and K, the dK/dV pass by Q^T,
  // dO^T, dO and Q. Scores must be bitwise the forward's (lse was computed from them), so K carries
  // scale * log2(e) in every pass: the K^T tiles here, a scaled copy of the key block in pass 2.
  const Packed Qp = pack<T>(q, p, true, true);
  const Packed Dp = pack<T>(dout, p, true, true);
  const Packed Kp = pack<T>(k, p, true, true, qmul);
  const Packed Vp = pack<T>(v, p, true, true);
  const Bshd<T> O(out), dQ(dq), dK(dk), dV(dv);
  const float* L = lse.data_ptr<float>();
  const int64_t chunk = chunk_blocks(bs);
  // Per query row: lse in the log2 domain as hi + lo (hi = +inf for a row that sees nothing, so every
  // P is 0) and Delta = rowsum(dO * O). Written by the dQ pass, read by the dK/dV pass.
  std::vector<float> lse2(p.B * p.H * S), lse2lo(p.B * p.H * S), delta(p.B * p.H * S);

  // ---- pass 1: dQ, one task per (b, h, query block)
  over_query_blocks(p, [&](int64_t begin, int64_t end) {
    std::vector<float> os(bs * D), acc(bs * D), st(bs * chunk * bs), dp(bs * chunk * bs);
    std::vector<int32_t> blocks;
    std::vector<int8_t> modes;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task % nb, h = (task / nb) % p.H, b = task / (nb * p.H);
      const int64_t s0 = i * bs, rbase = (b * p.H + h) * S + s0;
      const float* qs = Qp.row(b, h, s0);
      const float* dos = Dp.row(b, h, s0);
      block_stats(p, O, dos, Dp.ld, L, b, h, i, os.data(), lse2, lse2lo, delta);
      const float* lr = lse2.data() + rbase;
      const float* lo = lse2lo.data() + rbase;
      const float* dr = delta.data() + rbase;
      const int64_t n = active_blocks(p, b, h, i, blocks, modes);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t c0 = 0; c0 < n; c0 += chunk) {
        const int64_t nc = std::min(chunk, n - c0), cols = nc * bs;
        for (int64_t c = 0; c < nc; ++c) {
          const int64_t j = blocks[c0 + c];
          gemm(bs, bs, D, 1.f, qs, Qp.ld, Kp.tile(b, h, j), bs, false, st.data() + c * bs, cols);
          gemm(bs, bs, D, 1.f, dos, Dp.ld, Vp.tile(b, h, j), bs, false, dp.data() + c * bs, cols);
          if (modes[c0 + c] == kPartial)
            mask_tile(st.data() + c * bs, cols, bs, bs, p.qcode.data() + s0, p.kcode_of(b) + j * bs);
        }
        for (int64_t r = 0; r < bs; ++r)
          row_ds(st.data() + r * cols, dp.data() + r * cols, cols, lr[r], lo[r], dr[r]);
        const float* kb[kMaxChunk];
        for (int64_t c = 0; c < nc; ++c) kb[c] = Kp.row(b, h, blocks[c0 + c] * bs);
        gemm_multi(bs, D, nc, bs, 1.f, st.data(), cols, kb, Kp.ld, true, acc.data(), D);
      }
      store_rows(dQ, b, h, s0, bs, D, p.scale, acc.data());
    }
  });

  // ---- pass 2: dK and dV, one task per (b, h, key block), walking its query blocks
  const Transposed tr = transpose_mask(p);
  over_key_blocks(
      p, tr, [&] { return KeyBlockGrads<T>(p, tr, Qp, Dp, Kp, Vp, lse2, lse2lo, delta, dK, dV); },
      [](KeyBlockGrads<T>& kbg, int64_t b, int64_t h, int64_t j) { kbg.run(b, h, j, nullptr); });
}

// The single-pass schedule: whole heads by decreasing cost, taken from a shared counter (NABLA heads
// differ a lot in density). Each thread makes one worker (make()) and calls run(worker, b, h, dqa) per
// head with dqa its zeroed S x D fp32 dQ buffer.
template <class Make, class Run>
void for_heads_by_cost(const Problem& p, const Transposed& tr, const Make& make, const Run& run) {
  std::vector<int64_t> heads(p.B * p.H), cost(p.B * p.H, 0);
  for (int64_t bh = 0; bh < p.B * p.H; ++bh) {
    heads[bh] = bh;
    for (int64_t j = 0; j < p.nb; ++j) {
      const int64_t row = p.mask_row(bh / p.H, bh % p.H, j);
      cost[bh] += tr.off[row + 1] - tr.off[row] + 1;
    }
  }
  std::stable_sort(heads.begin(), heads.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    auto worker = make();
    std::vector<float> dqa;
    for (int64_t t = next++; t < p.B * p.H; t = next++) {
      dqa.assign(p.S * p.D, 0.f);
      run(worker, heads[t] / p.H, heads[t] % p.H, dqa.data());
    }
  });
}

// Single-pass backward: one task per (b, h), walking its key blocks; each pair adds to dK_j and dV_j
// (owned by the task) and to dQ_i (in the task's own fp32 head buffer), so the scores and dP are
// computed once per pair: 5 products instead of the two-pass scheme's 7. Whole heads per thread, so it
// is taken only when there are enough heads to share out (see use_fused_backward).
template <typename T>
void backward_fused(const Problem& p, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq,
                    at::Tensor& dk, at::Tensor& dv) {
  const int64_t D = p.D, nb = p.nb, S = p.S;
  // KeyBlockGrads takes Q and dO as rows and tiles, K and V as rows.
  const Packed Qp = pack<T>(q, p, true, true);
  const Packed Dp = pack<T>(dout, p, true, true);
  const Packed Kp = pack<T>(k, p, true, false);
  const Packed Vp = pack<T>(v, p, true, false);
  const Bshd<T> O(out), dO(dout), dQ(dq), dK(dk), dV(dv);
  std::vector<float> lse2(p.B * p.H * S), lse2lo(p.B * p.H * S), delta(p.B * p.H * S);
  row_stats(p, O, dO, lse.data_ptr<float>(), lse2, lse2lo, delta);
  const Transposed tr = transpose_mask(p);
  for_heads_by_cost(
      p, tr, [&] { return KeyBlockGrads<T>(p, tr, Qp, Dp, Kp, Vp, lse2, lse2lo, delta, dK, dV); },
      [&](KeyBlockGrads<T>& kbg, int64_t b, int64_t h, float* dqa) {
        for (int64_t j = 0; j < nb; ++j) kbg.run(b, h, j, dqa);
        store_rows(dQ, b, h, 0, S, D, p.scale, dqa);
      });
}

#if KK_BF16_DOT
// The single pass on bf16 dot products (bf16 inputs, AVX512-BF16): the five products of
// KeyBlockGrads with bf16 operands and fp32 accumulation; softmax, dS and every accumulator in fp32.
// P and dS are rounded to bf16 for the three accumulating products, as FlashAttention's bf16 backward
// does. Scores are computed as the bf16 forward computes them (the same pair dot products in the same
// order, then scaled; vdpbf16ps is symmetric in its sources), so they should match it bitwise.
// Operands, each bf16 (B, H, ...) per call:
//   qT, dT  Q and dO pair tiles (D/2 x bs words per block): B of S^T = K Q^T and dP^T = V dO^T;
//   qI, dI, kI  Q, dO, K as pair rows (word (t, n) = (X[2t][n], X[2t+1][n])): B of dK += dS^T Q,
//           dV += P^T dO and dQ += dS K;
// K and V rows are read in place as the A operands of S^T and dP^T.
struct KeyBlockGradsBf16 {
  const Problem& p;
  const Transposed& tr;
  const uint16_t *k, *v, *qT, *dT, *qI, *dI, *kI;
  int64_t ksb, kss, ksh, vsb, vss, vsh;  // K and V strides (elements)
  const std::vector<float> &lse2, &lse2lo, &delta;
  const Bshd<at::BFloat16> &dK, &dV;
  std::vector<float> dka, dva, st, dp, lb, lbl, db, dsq;
  std::vector<uint16_t> pb, dsb;
  std::vector<int32_t> blocks;
  std::vector<int8_t> modes;

  KeyBlockGradsBf16(const Problem& p_, const Transposed& tr_, const at::Tensor& k_, const at::Tensor& v_,
                    const uint16_t* qT_, const uint16_t* dT_, const uint16_t* qI_, const uint16_t* dI_,
                    const uint16_t* kI_, const std::vector<float>& l2, const std::vector<float>& l2lo,
                    const std::vector<float>& dl, const Bshd<at::BFloat16>& dK_, const Bshd<at::BFloat16>& dV_)
      : p(p_), tr(tr_), k(reinterpret_cast<const uint16_t*>(k_.data_ptr())),
        v(reinterpret_cast<const uint16_t*>(v_.data_ptr())), qT(qT_), dT(dT_), qI(qI_), dI(dI_), kI(kI_),
        ksb(k_.stride(0)), kss(k_.stride(1)), ksh(k_.stride(2)), vsb(v_.stride(0)), vss(v_.stride(1)),
        vsh(v_.stride(2)), lse2(l2), lse2lo(l2lo), delta(dl), dK(dK_), dV(dV_) {
    const int64_t bs = p.bs, D = p.D, cb = chunk_blocks(bs) * bs;
    for (auto* x : {&dka, &dva}) x->resize(bs * D);
    for (auto* x : {&st, &dp}) x->resize(bs * cb);
    for (auto* x : {&lb, &lbl, &db}) x->resize(cb);
    pb.resize(bs * cb);
    dsq.resize(bs * bs);
    dsb.resize(bs * bs);
  }

  // Offset (elements) of (b, h)'s block j in the per-call operand arrays.
  int64_t blk(int64_t b, int64_t h, int64_t j) const { return ((b * p.H + h) * p.nb + j) * p.bs * p.D; }

  // dqa: the head's S x D fp32 dQ rows to add dS K to (single pass), or null (two-pass scheme).
  void run(int64_t b, int64_t h, int64_t j, float* dqa) {
    const int64_t bs = p.bs, D = p.D, S = p.S, chunk = chunk_blocks(bs), t0 = j * bs;
    const int64_t n = key_block_pairs(p, tr, b, h, j, blocks, modes);
    const uint16_t* kr = k + b * ksb + h * ksh + t0 * kss;
    const uint16_t* vr = v + b * vsb + h * vsh + t0 * vss;
    const int32_t* kc = p.kcode_of(b) + t0;
    const float qmul = p.scale * kLog2e;
    std::fill(dka.begin(), dka.end(), 0.f);
    std::fill(dva.begin(), dva.end(), 0.f);
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
      const int64_t nc = std::min(chunk, n - c0), cols = nc * bs;
      for (int64_t c = 0; c < nc; ++c) {  // S^T and dP^T: rows are this block's keys
        const int64_t i = blocks[c0 + c], rbase = (b * p.H + h) * S + i * bs;
        gemm_tiles<Bf16Dot>(bs, bs, D / 2, qmul, kr, kss, qT + blk(b, h, i), bs, false, st.data() + c * bs, cols);
        gemm_tiles<Bf16Dot>(bs, bs, D / 2, 1.f, vr, vss, dT + blk(b, h, i), bs, false, dp.data() + c * bs, cols);
        if (modes[c0 + c] == kPartial) mask_tile(st.data() + c * bs, cols, bs, bs, kc, p.qcode.data() + i * bs);
        std::memcpy(lb.data() + c * bs, lse2.data() + rbase, bs * sizeof(float));
        std::memcpy(lbl.data() + c * bs, lse2lo.data() + rbase, bs * sizeof(float));
        std::memcpy(db.data() + c * bs, delta.data() + rbase, bs * sizeof(float));
      }
      const uint16_t* qb_rows[kMaxChunk];
      const uint16_t* db_rows[kMaxChunk];
      for (int64_t c = 0; c < nc; ++c) {
        qb_rows[c] = qI + blk(b, h, blocks[c0 + c]);
        db_rows[c] = dI + blk(b, h, blocks[c0 + c]);
      }
      for (int64_t r = 0; r < bs; ++r) {
        row_p_cols(st.data() + r * cols, lb.data(), lbl.data(), cols);
        to_bf16(st.data() + r * cols, cols, pb.data() + r * cols);
      }
      gemm_blocks<Bf16Dot>(bs, D, nc, bs / 2, 1.f, pb.data(), cols, db_rows, D, true, dva.data(), D);  // dV
      for (int64_t r = 0; r < bs; ++r) {
        float* sr = st.data() + r * cols;
        const float* pr = dp.data() + r * cols;
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) sr[c] *= pr[c] - db[c];
        to_bf16(sr, cols, pb.data() + r * cols);
      }
      gemm_blocks<Bf16Dot>(bs, D, nc, bs / 2, p.scale, pb.data(), cols, qb_rows, D, true, dka.data(), D);  // dK
      for (int64_t c = 0; dqa && c < nc; ++c) {  // dQ_i += dS_ij K_j, dS from its transposed tile
        transpose32<false>(st.data() + c * bs, cols, bs, bs, 1.f, dsq.data(), bs);
        to_bf16(dsq.data(), bs * bs, dsb.data());
        gemm_tiles<Bf16Dot>(bs, D, bs / 2, 1.f, dsb.data(), bs, kI + blk(b, h, j), D, true,
                            dqa + blocks[c0 + c] * bs * D, D);
      }
    }
    store_rows(dK, b, h, t0, bs, D, 1.f, dka.data());
    store_rows(dV, b, h, t0, bs, D, 1.f, dva.data());
  }
};

// The per-call bf16 operands of the backward (each (B, H, nb) blocks of bs x D elements): qT, dT,
// qI, dI, kI as KeyBlockGradsBf16 takes them, and with `two_pass` the dQ pass's K and V pair tiles
// kT, vT (B of S = Q K^T and dP = dO V^T).
struct Bf16Operands {
  at::Tensor buf;
  const uint16_t *qT, *dT, *qI, *dI, *kI, *kT = nullptr, *vT = nullptr;

  Bf16Operands(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& dout, bool two_pass) {
    const int64_t bs = p.bs, D = p.D, nb = p.nb, H = p.H, plane = p.B * H * p.S * D;
    buf = at::empty({two_pass ? 7 : 5, plane}, q.options().dtype(at::kBFloat16));
    uint16_t* x[7];
    for (int64_t i = 0; i < buf.size(0); ++i) x[i] = reinterpret_cast<uint16_t*>(buf.data_ptr()) + i * plane;
    qT = x[0], dT = x[1], qI = x[2], dI = x[3], kI = x[4];
    if (two_pass) kT = x[5], vT = x[6];
    const Bshd<at::BFloat16> Q(q), K(k), V(v), dO(dout);
    at::parallel_for(0, p.B * H * nb, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t j = task % nb, h = (task / nb) % H, b = task / (nb * H), off = task * bs * D;
        const auto tile = [&](const Bshd<at::BFloat16>& X, uint16_t* dst) {
          transpose32<false>(X.row(b, j * bs, h), X.ss / 2, bs, D / 2, 1.f, dst + off, bs);
        };
        const auto pairs = [&](const Bshd<at::BFloat16>& X, uint16_t* dst) {
          for (int64_t t = 0; t < bs / 2; ++t)
            interleave_rows(reinterpret_cast<const uint16_t*>(X.row(b, j * bs + 2 * t, h)),
                            reinterpret_cast<const uint16_t*>(X.row(b, j * bs + 2 * t + 1, h)), D,
                            dst + off + 2 * t * D);
        };
        tile(Q, x[0]);
        tile(dO, x[1]);
        pairs(Q, x[2]);
        pairs(dO, x[3]);
        pairs(K, x[4]);
        if (two_pass) {
          tile(K, x[5]);
          tile(V, x[6]);
        }
      }
    });
  }
};

void backward_fused_bf16(const Problem& p, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq,
                         at::Tensor& dk, at::Tensor& dv) {
  const int64_t D = p.D, nb = p.nb, S = p.S;
  const Bf16Operands x(p, q, k, v, dout, false);
  const Bshd<at::BFloat16> dO(dout), O(out), dQ(dq), dK(dk), dV(dv);
  std::vector<float> lse2(p.B * p.H * S), lse2lo(p.B * p.H * S), delta(p.B * p.H * S);
  row_stats(p, O, dO, lse.data_ptr<float>(), lse2, lse2lo, delta);
  const Transposed tr = transpose_mask(p);
  for_heads_by_cost(
      p, tr,
      [&] { return KeyBlockGradsBf16(p, tr, k, v, x.qT, x.dT, x.qI, x.dI, x.kI, lse2, lse2lo, delta, dK, dV); },
      [&](KeyBlockGradsBf16& kbg, int64_t b, int64_t h, float* dqa) {
        for (int64_t j = 0; j < nb; ++j) kbg.run(b, h, j, dqa);
        store_rows(dQ, b, h, 0, S, D, p.scale, dqa);
      });
}

// The two-pass scheme on bf16 dot products: a dQ pass over query blocks (S = Q K^T and dP = dO V^T
// again, then dQ += dS K), then KeyBlockGradsBf16 per key block without its dQ part.
void backward_two_pass_bf16(const Problem& p, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq,
                            at::Tensor& dk, at::Tensor& dv) {
  const int64_t bs = p.bs, D = p.D, nb = p.nb, S = p.S, chunk = chunk_blocks(bs);
  const float qmul = p.scale * kLog2e;
  const Bf16Operands x(p, q, k, v, dout, true);
  const Bshd<at::BFloat16> Q(q), dO(dout), O(out), dQ(dq), dK(dk), dV(dv);
  const float* L = lse.data_ptr<float>();
  std::vector<float> lse2(p.B * p.H * S), lse2lo(p.B * p.H * S), delta(p.B * p.H * S);
  const auto blk = [&](int64_t b, int64_t h, int64_t j) { return ((b * p.H + h) * nb + j) * bs * D; };

  over_query_blocks(p, [&](int64_t begin, int64_t end) {
    std::vector<float> os(bs * D), dos(bs * D), acc(bs * D), st(bs * chunk * bs), dp(bs * chunk * bs);
    std::vector<uint16_t> dsb(bs * chunk * bs);
    std::vector<int32_t> blocks;
    std::vector<int8_t> modes;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task % nb, h = (task / nb) % p.H, b = task / (nb * p.H);
      const int64_t s0 = i * bs, rbase = (b * p.H + h) * S + s0;
      const auto* qs = reinterpret_cast<const uint16_t*>(Q.row(b, s0, h));
      const auto* ds = reinterpret_cast<const uint16_t*>(dO.row(b, s0, h));
      load_rows(dO, b, h, s0, bs, D, 1.f, dos.data());
      block_stats(p, O, dos.data(), D, L, b, h, i, os.data(), lse2, lse2lo, delta);
      const int64_t n = active_blocks(p, b, h, i, blocks, modes);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t c0 = 0; c0 < n; c0 += chunk) {
        const int64_t nc = std::min(chunk, n - c0), cols = nc * bs;
        const uint16_t* kb[kMaxChunk];
        for (int64_t c = 0; c < nc; ++c) {
          const int64_t j = blocks[c0 + c];
          gemm_tiles<Bf16Dot>(bs, bs, D / 2, qmul, qs, Q.ss, x.kT + blk(b, h, j), bs, false, st.data() + c * bs,
                              cols);
          gemm_tiles<Bf16Dot>(bs, bs, D / 2, 1.f, ds, dO.ss, x.vT + blk(b, h, j), bs, false, dp.data() + c * bs,
                              cols);
          if (modes[c0 + c] == kPartial)
            mask_tile(st.data() + c * bs, cols, bs, bs, p.qcode.data() + s0, p.kcode_of(b) + j * bs);
          kb[c] = x.kI + blk(b, h, j);
        }
        for (int64_t r = 0; r < bs; ++r) {
          row_ds(st.data() + r * cols, dp.data() + r * cols, cols, lse2[rbase + r], lse2lo[rbase + r],
                 delta[rbase + r]);
          to_bf16(st.data() + r * cols, cols, dsb.data() + r * cols);
        }
        gemm_blocks<Bf16Dot>(bs, D, nc, bs / 2, 1.f, dsb.data(), cols, kb, D, true, acc.data(), D);
      }
      store_rows(dQ, b, h, s0, bs, D, p.scale, acc.data());
    }
  });

  const Transposed tr = transpose_mask(p);
  over_key_blocks(
      p, tr, [&] { return KeyBlockGradsBf16(p, tr, k, v, x.qT, x.dT, x.qI, x.dI, x.kI, lse2, lse2lo, delta, dK, dV); },
      [](KeyBlockGradsBf16& kbg, int64_t b, int64_t h, int64_t j) { kbg.run(b, h, j, nullptr); });
}
#endif

// The single pass needs whole heads per thread. It does ~1.3x less work, so it pays while the heads'
// rounds leave at most ~20 % of the thread time idle: n heads on t threads take ceil(n / t) rounds
// (4 heads on 2 threads, 28 on 16 or 8: yes; 3 on 2, 28 on 32: no). KANDINSKY_BSA_CPU_BWD=fused|two_pass
// forces a scheme (tests, A/B measurements).
bool use_fused_backward(const Problem& p) {
  if (const char* e = std::getenv("KANDINSKY_BSA_CPU_BWD")) {
    if (std::strcmp(e, "fused") == 0) return true;
    if (std::strcmp(e, "two_pass") == 0) return false;
  }
  const int64_t n = p.B * p.H, t = at::get_num_threads();
  return n >= t && 4 * ((n + t - 1) / t) * t <= 5 * n;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bsa_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& kv_num_blocks,
    const at::Tensor& kv_indices, int64_t block_size, double scale,
    const std::optional<at::Tensor>& token_valid, const std::optional<at::Tensor>& cu_seqlens) {
  check_qkv(q, k, v);
  check_qkv(q, dout, out);
  const Problem p = make_problem(q, kv_num_blocks, kv_indices, block_size, scale, token_valid, cu_seqlens);
  KK_CHECK(lse.scalar_type() == at::kFloat && lse.sizes() == at::IntArrayRef({p.B, p.H, p.S}) &&
               lse.is_contiguous(),
           "lse must be contiguous fp32 (B, H, S), got ", lse.scalar_type(), " ", lse.sizes());
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(q.sizes(), q.options());
  at::Tensor dv = at::empty(q.sizes(), q.options());
#if KK_BF16_DOT
  if (q.scalar_type() == at::kBFloat16 && bf16_dot_layout_ok(q, k, v) && bf16_dot_layout_ok(dout, dout, dout) &&
      bf16_dot_enabled()) {
    if (use_fused_backward(p))
      backward_fused_bf16(p, dout, q, k, v, out, lse, dq, dk, dv);
    else
      backward_two_pass_bf16(p, dout, q, k, v, out, lse, dq, dk, dv);
    return {dq, dk, dv};
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "bsa_bwd", [&] {
    if (use_fused_backward(p))
      backward_fused<scalar_t>(p, dout, q, k, v, out, lse, dq, dk, dv);
    else
      backward_impl<scalar_t>(p, dout, q, k, v, out, lse, dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace

namespace kk {
bool bsa_bf16_dot_compiled() {
#if KK_BF16_DOT
  return true;
#else
  return false;
#endif
}
}  // namespace kk

TORCH_LIBRARY_FRAGMENT(kandinsky_kernels_C, m) {
  m.def(
      "bsa_fwd(Tensor q, Tensor k, Tensor v, Tensor kv_num_blocks, Tensor kv_indices, int block_size, "
      "float scale, Tensor? token_valid, Tensor? cu_seqlens) -> (Tensor, Tensor)");
  m.def(
      "bsa_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor kv_num_blocks, "
      "Tensor kv_indices, int block_size, float scale, Tensor? token_valid, Tensor? cu_seqlens) -> "
      "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kandinsky_kernels_C, CPU, m) {
  m.impl("bsa_fwd", &bsa_fwd);
  m.impl("bsa_bwd", &bsa_bwd);
}
