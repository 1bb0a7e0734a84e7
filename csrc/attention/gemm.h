// Block products for one ISA path: C (+)= alpha * A @ B on small, already laid-out panels.
// Included by kernels.h inside the ISA's namespace, after simd.h.
//
// Register-blocked: a kMR x (kNV vectors) tile of C lives in registers while K streams through, fed
// by broadcasts of A and row loads of B (a K^T tile or a block of rows, see Packed). Measured at
// S = 4096, 10 % density, one thread (AVX-512): ~1.3x the forward throughput of MKL sgemm calls on
// gathered chunks (MKL re-packs its operands on every call; these operands are small and laid out).
#pragma once

// Operands of the products that come next, to bring into L2 while a product runs: up to kMax ranges of
// `rows` rows, each `row_bytes` long, `stride` bytes apart. The product spreads their cache lines over
// its micro-kernel calls, a few before each (a burst of hundreds of prefetches stalls the loads behind
// it). The forward's K^T tiles and V blocks are picked at random by the mask, so without this each
// one comes from L3 in 4 KiB-strided panel reads the hardware prefetchers do not run ahead of.
// Tried and not kept (AVX2 forward, S = 8192, H = 4, D = 128, 10 %): issuing the lines inside the
// micro-kernel, one every 4 K steps, instead of a few before each call. The ~4 % of samples that sat
// on the instruction after a prefetch moved into the micro-kernel; paired runs neutral (median of the
// pairwise ratios 0.98-1.02, cpu-clock samples in the kernels 0.8-1.1x).
struct Prefetch {
  static constexpr int kMax = 3;
  struct Range {
    const char* p;
    int64_t rows, lines, stride;
  };
  Range r[kMax];
  int n = 0;
  void add(const void* p, int64_t rows, int64_t row_bytes, int64_t stride) {
    if (n < kMax && p && rows > 0 && row_bytes > 0)
      r[n++] = Range{static_cast<const char*>(p), rows, (row_bytes + 63) / 64, stride};
  }
  int64_t lines() const {
    int64_t t = 0;
    for (int q = 0; q < n; ++q) t += r[q].rows * r[q].lines;
    return t;
  }
};

// Walks a Prefetch's lines: step(k) issues the next k (prefetcht1: into L2).
struct PrefetchCursor {
  const Prefetch* pf;
  int q = 0;
  int64_t row = 0, line = 0;
  explicit PrefetchCursor(const Prefetch* p) : pf(p) {}
  void step(int64_t k) {
    for (; k > 0 && pf && q < pf->n; --k) {
      const Prefetch::Range& g = pf->r[q];
      __builtin_prefetch(g.p + row * g.stride + line * 64, 0, 2);
      if (++line == g.lines) {
        line = 0;
        if (++row == g.rows) row = 0, ++q;
      }
    }
  }
};

#if KK_VEC_BITS
// AVX-512: 6 x 4 zmm accumulators (24 of 32 registers); AVX2: 6 x 2 ymm (12 of 16).
constexpr int kMR = 6, kNV = KK_VEC_BITS == 512 ? 4 : 2;

// Element policies of the micro-kernel. A step consumes kA elements of an A row and one row of B
// words (Vec::W words per vector); Fp32: plain FMAs; Bf16 (below): pair dot products.
struct Fp32Dot {
  using Elem = float;
  static constexpr int kA = 1, kWord = 1;  // A elements per step, B elements per word
  using V = typename Vec::V;
  static V load_b(const float* p) { return Vec::load(p); }
  static V bcast_a(const float* p) { return Vec::set1(*p); }
  static V madd(V acc, V a, V b) { return Vec::fmadd(a, b, acc); }
};

#if KK_BF16_DOT
// bf16 pairs: A (M x 2 K) bf16 row-major, B as K x N words, word (k, n) = (B[2k][n], B[2k+1][n]);
// each vdpbf16ps does 16 x 2 multiply-adds with fp32 accumulation.
struct Bf16Dot {
  using Elem = uint16_t;
  static constexpr int kA = 2, kWord = 2;
  using V = __m512bh;
  static V load_b(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static V bcast_a(const uint16_t* p) {
    int32_t word;
    std::memcpy(&word, p, sizeof(word));
    return (__m512bh)_mm512_set1_epi32(word);
  }
  static __m512 madd(__m512 acc, V a, V b) { return _mm512_dpbf16_ps(acc, a, b); }
};
#endif

// The K steps come as nblk blocks of kb steps: block `blk` reads A columns [blk * kb, (blk + 1) * kb)
// (in steps) and B rows from Bblk[blk] + boff. One block list lets P @ V (and the backward's three
// accumulating products) run over a whole chunk of blocks with C in registers: one C round trip per
// chunk instead of per block (measured 1-4 % of the fp32 forward and backward at S = 8192).
template <class Dot, int R, int NV>
void micro_kernel(int64_t nblk, int64_t kb, float alpha, const typename Dot::Elem* A, int64_t lda,
                  const typename Dot::Elem* const* Bblk, int64_t boff, int64_t ldb, bool accumulate, float* C,
                  int64_t ldc, float* rmax) {
  constexpr int W = Vec::W;
  typename Vec::V acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec::zero();
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const typename Dot::Elem* B = Bblk[blk] + boff;
    const typename Dot::Elem* Ab = A + Dot::kA * kb * blk;
    for (int64_t k = 0; k < kb; ++k) {
      typename Dot::V b[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) b[v] = Dot::load_b(B + Dot::kWord * (k * ldb + W * v));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const typename Dot::V a = Dot::bcast_a(Ab + r * lda + Dot::kA * k);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = Dot::madd(acc[r][v], a, b[v]);
      }
    }
  }
  const typename Vec::V va = Vec::set1(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* c = C + r * ldc + W * v;
      const typename Vec::V x = alpha == 1.f ? acc[r][v] : Vec::mul(acc[r][v], va);
      acc[r][v] = accumulate ? Vec::add(x, Vec::load(c)) : x;
      Vec::store(c, acc[r][v]);
    }
  if (rmax) {  // rmax[r * W + lane] = max(itself, C's row r over the lanes' columns)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      typename Vec::V mx = Vec::load(rmax + r * W);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) mx = Vec::max(mx, acc[r][v]);
      Vec::store(rmax + r * W, mx);
    }
  }
}

// C(MxN) = alpha * sum over blk of A[:, blk-th kb steps] @ Bblk[blk] (+ C), each Bblk[blk] kb x N
// words with row stride ldb; A row-major (row stride lda elements), N a multiple of 16. With rmax
// (M x Vec::W floats): rmax[m * W + w] = max(itself, C[m][n] over the columns n = w mod W), which saves the
// forward's softmax a pass over its score rows for their maxima.
template <class Dot>
void gemm_blocks(int64_t M, int64_t N, int64_t nblk, int64_t kb, float alpha, const typename Dot::Elem* A,
                 int64_t lda, const typename Dot::Elem* const* Bblk, int64_t ldb, bool accumulate, float* C,
                 int64_t ldc, const Prefetch* pf = nullptr, float* rmax = nullptr) {
  using Fn = void (*)(int64_t, int64_t, float, const typename Dot::Elem*, int64_t, const typename Dot::Elem* const*,
                      int64_t, int64_t, bool, float*, int64_t, float*);
#if KK_VEC_BITS == 512
#define KK_ROW(R) {micro_kernel<Dot, R, 1>, micro_kernel<Dot, R, 2>, micro_kernel<Dot, R, 3>, micro_kernel<Dot, R, 4>}
#else
#define KK_ROW(R) {micro_kernel<Dot, R, 1>, micro_kernel<Dot, R, 2>}
#endif
  static constexpr Fn kMicro[kMR][kNV] = {KK_ROW(1), KK_ROW(2), KK_ROW(3), KK_ROW(4), KK_ROW(5), KK_ROW(6)};
#undef KK_ROW
  PrefetchCursor cur(pf);
  const int64_t calls = (N + Vec::W * kNV - 1) / (Vec::W * kNV) * ((M + kMR - 1) / kMR);
  const int64_t per = pf ? (pf->lines() + calls - 1) / calls : 0;  // lines before each call
  for (int64_t n0 = 0; n0 < N; n0 += Vec::W * kNV) {
    const int nv = static_cast<int>(std::min<int64_t>(kNV, (N - n0) / Vec::W));
    for (int64_t m0 = 0; m0 < M; m0 += kMR) {
      const int r = static_cast<int>(std::min<int64_t>(kMR, M - m0));
      cur.step(per);
      kMicro[r - 1][nv - 1](nblk, kb, alpha, A + m0 * lda, lda, Bblk, Dot::kWord * n0, ldb, accumulate,
                            C + m0 * ldc + n0, ldc, rmax ? rmax + m0 * Vec::W : nullptr);
    }
  }
}

// C(MxN) = alpha * A @ B (+ C): A row-major (row stride lda elements), B as K x N words (row stride
// ldb words), K counted in steps (Dot::kA elements of A each), N a multiple of 16.
template <class Dot>
void gemm_tiles(int64_t M, int64_t N, int64_t K, float alpha, const typename Dot::Elem* A, int64_t lda,
                const typename Dot::Elem* B, int64_t ldb, bool accumulate, float* C, int64_t ldc,
                const Prefetch* pf = nullptr, float* rmax = nullptr) {
  // K in slices of 128 steps so a panel of B (<= 32 KiB) stays near L1 across the row tiles
  // (measured at D = 128 fp32: unsliced 4 % faster than slices of 64; D = 256 is sliced in two).
  for (int64_t k0 = 0; k0 < K; k0 += 128) {
    const int64_t kc = std::min<int64_t>(128, K - k0);
    const typename Dot::Elem* Bk = B + Dot::kWord * k0 * ldb;
    gemm_blocks<Dot>(M, N, 1, kc, alpha, A + Dot::kA * k0, lda, &Bk, ldb, accumulate || k0 > 0, C, ldc,
                     k0 == 0 ? pf : nullptr, k0 + kc >= K ? rmax : nullptr);  // rmax: the final C
  }
}

inline void gemm(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
                 int64_t ldb, bool accumulate, float* C, int64_t ldc, const Prefetch* pf = nullptr,
                 float* rmax = nullptr) {
  gemm_tiles<Fp32Dot>(M, N, K, alpha, A, lda, B, ldb, accumulate, C, ldc, pf, rmax);
}

// C(MxN) = alpha * A @ [Bblk[0]; Bblk[1]; ...] (+ C) for nblk row blocks of kb rows each (fp32).
inline void gemm_multi(int64_t M, int64_t N, int64_t nblk, int64_t kb, float alpha, const float* A, int64_t lda,
                       const float* const* Bblk, int64_t ldb, bool accumulate, float* C, int64_t ldc,
                       const Prefetch* pf = nullptr) {
  gemm_blocks<Fp32Dot>(M, N, nblk, kb, alpha, A, lda, Bblk, ldb, accumulate, C, ldc, pf);
}
#else
// Baseline (no vector ISA named): the compiler vectorizes the inner loop for the build's target. The
// sums are kept in double: x86-64 without a named ISA has no FMA, and rounding every product and every
// sum in fp32 made dQ at input scale 16 ~3.5x less accurate than torch (which uses FMAs), beyond the
// tolerance policy; this path is the fallback for old or other CPUs, so accuracy comes before speed.
inline void gemm(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
                 int64_t ldb, bool accumulate, float* C, int64_t ldc, const Prefetch* = nullptr,
                 float* = nullptr) {  // no row maxima here (forward_loop does not ask on this path)
  thread_local std::vector<double> acc;
  acc.resize(N);
  for (int64_t m = 0; m < M; ++m) {
    float* c = C + m * ldc;
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t k = 0; k < K; ++k) {
      const double a = A[m * lda + k];
      const float* b = B + k * ldb;
      for (int64_t n = 0; n < N; ++n) acc[n] += a * b[n];
    }
    for (int64_t n = 0; n < N; ++n) c[n] = static_cast<float>(alpha * acc[n] + (accumulate ? c[n] : 0.0));
  }
}

inline void gemm_multi(int64_t M, int64_t N, int64_t nblk, int64_t kb, float alpha, const float* A, int64_t lda,
                       const float* const* Bblk, int64_t ldb, bool accumulate, float* C, int64_t ldc,
                       const Prefetch* = nullptr) {
  for (int64_t blk = 0; blk < nblk; ++blk)
    gemm(M, N, kb, alpha, A + blk * kb, lda, Bblk[blk], ldb, accumulate || blk > 0, C, ldc);
}
#endif
