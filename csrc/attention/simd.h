// Vector pieces of the softmax work between the block products, for one ISA path: a float-vector
// type (AVX-512, AVX2 or none), 2^x, the row kernels on fp32 scratch and the 32-bit block transpose.
// Included by kernels.h inside the ISA's namespace, after its `#pragma GCC target`.
//
// GCC does not vectorize the reductions or the exp2 polynomial by itself (measured: scalar code, half
// the forward time), hence intrinsics, with exp2f_fast as the scalar tail and the baseline path.
#pragma once

// 2^x, exact 0 below -126 (so -inf and masked scores vanish), NaN for NaN: a NaN (or inf - inf)
// score must make its row NaN, as in torch's SDPA, not drop the key. x = n + f, |f| <= 1/2, 2^f by
// its degree-7 Taylor polynomial (truncation error < 1e-8 relative). Scalar twin of Vec::exp2.
inline float exp2f_fast(float x) {
  if (std::isnan(x)) return x;
  if (x > 127.f) return kInf;  // 2^n below would leave the exponent field
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

#if KK_VEC_BITS == 512
// GCC 12 flags the _mm512_undefined_ps() inside its own max/roundscale/scalef intrinsics.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
struct Vec {
  using V = __m512;
  static constexpr int W = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V x) { _mm512_storeu_ps(p, x); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static float hmax(V x) { return _mm512_reduce_max_ps(x); }
  static float hsum(V x) { return _mm512_reduce_add_ps(x); }
  static V exp2(V x) {
    const V lo = set1(-126.f);
    const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);  // false for -inf and NaN
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    const V xc = _mm512_max_ps(x, lo);
    const V n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V f = mul(sub(xc, n), set1(kLn2));
    V p = set1(1.f / 5040.f);
    for (const float c : {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f}) p = fmadd(p, f, set1(c));
    return _mm512_mask_mov_ps(_mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n)), nan, x);
  }
  static V exp2_nonpos(V x) { return exp2(x); }
};
#elif KK_VEC_BITS == 256
struct Vec {
  using V = __m256;
  static constexpr int W = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V x) { _mm256_storeu_ps(p, x); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static float hmax(V x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  static float hsum(V x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // 2^x = 2^n * 2^f, n = round(x), |f| <= 1/2, 2^f by a degree-6 polynomial fitted to 2^f in the log2
  // domain (relative error < 8e-8 in fp32, as the degree-7 Taylor polynomial of the scalar twin). The
  // clamp to [-127, 128] takes x as the second operand of max/min, which return it when it is NaN, so a
  // NaN flows through to the result (its exponent bits below multiply a NaN). n comes from the 1.5 * 2^23
  // shifter with the exponent bias folded in: t's low mantissa bits are n + 127 in [0, 255], and shifting
  // t's bits left by 23 leaves exactly the exponent field of 2^n: 0 (so a result of 0) for n = -127, i.e.
  // below about -126.5 and for -inf; 255 (inf) for n = 128. About half the instructions of a masked,
  // blended version (measured: the AVX2 fp32 forward's exp pass was ~9-15 % of its time).
  static V exp2(V x) { return exp2_clamped(_mm256_min_ps(set1(128.f), _mm256_max_ps(set1(-127.f), x))); }
  // exp2 for x <= 0 or NaN (x - the row max in the forward's softmax): no clamp at 128 needed.
  static V exp2_nonpos(V x) { return exp2_clamped(_mm256_max_ps(set1(-127.f), x)); }
  // 2^xc for xc already clamped to [-127, 128] (or NaN).
  static V exp2_clamped(V xc) {
    const V shift = set1(12582912.f + 127.f);  // 1.5 * 2^23 + the exponent bias
    const V t = add(xc, shift);
    const V f = sub(xc, sub(t, shift));
    V p = set1(1.5345811e-4f);
    for (const float c : {1.3399931e-3f, 9.6184891e-3f, 5.5503286e-2f, 2.4022646e-1f, 6.9314718e-1f, 1.f})
      p = fmadd(p, f, set1(c));
    return mul(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23)));
  }
};
#endif

inline float row_max(const float* x, int64_t n, float init) {
  int64_t c = 0;
  float mx = init;
#if KK_VEC_BITS
  typename Vec::V vm = Vec::set1(init);
  for (; c + Vec::W <= n; c += Vec::W) vm = Vec::max(vm, Vec::load(x + c));
  mx = Vec::hmax(vm);
#endif
  for (; c < n; ++c) mx = std::max(mx, x[c]);
  return mx;
}

// x = 2^(x - sub); returns the sum. sub >= every x (the row max of the forward's softmax), or NaN.
inline float row_exp2_sum(float* x, int64_t n, float sub) {
  int64_t c = 0;
  float sum = 0.f;
#if KK_VEC_BITS
  using V = typename Vec::V;
  const V vs = Vec::set1(sub);
  V acc0 = Vec::zero(), acc1 = Vec::zero();  // two sums: one add chain bounds the pass
  for (; c + 2 * Vec::W <= n; c += 2 * Vec::W) {
    const V e0 = Vec::exp2_nonpos(Vec::sub(Vec::load(x + c), vs));
    const V e1 = Vec::exp2_nonpos(Vec::sub(Vec::load(x + c + Vec::W), vs));
    Vec::store(x + c, e0);
    Vec::store(x + c + Vec::W, e1);
    acc0 = Vec::add(acc0, e0);
    acc1 = Vec::add(acc1, e1);
  }
  for (; c + Vec::W <= n; c += Vec::W) {
    const V e = Vec::exp2_nonpos(Vec::sub(Vec::load(x + c), vs));
    Vec::store(x + c, e);
    acc0 = Vec::add(acc0, e);
  }
  sum = Vec::hsum(Vec::add(acc0, acc1));
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
#if KK_VEC_BITS
  const typename Vec::V vh = Vec::set1(hi), vl = Vec::set1(lo), vd = Vec::set1(delta);
  for (; c + Vec::W <= n; c += Vec::W) {
    const typename Vec::V e = Vec::exp2(Vec::sub(Vec::sub(Vec::load(x + c), vh), vl));
    Vec::store(x + c, Vec::mul(e, Vec::sub(Vec::load(dp + c), vd)));
  }
#endif
  for (; c < n; ++c) x[c] = exp2f_fast((x[c] - hi) - lo) * (dp[c] - delta);
}

// P = 2^(x - hi[c] - lo[c]) in place (dK/dV pass: one key row against per-query lse).
inline void row_p_cols(float* x, const float* hi, const float* lo, int64_t n) {
  int64_t c = 0;
#if KK_VEC_BITS
  for (; c + Vec::W <= n; c += Vec::W) {
    const typename Vec::V d = Vec::sub(Vec::load(x + c), Vec::load(hi + c));
    Vec::store(x + c, Vec::exp2(Vec::sub(d, Vec::load(lo + c))));
  }
#endif
  for (; c < n; ++c) x[c] = exp2f_fast((x[c] - hi[c]) - lo[c]);
}

// dst[c * ldd + r] = src[r * lds + c] (* mul) for a rows x cols block of 32-bit elements: fp32 K^T
// tiles (times scale * log2(e)), or with kScale false bit-exact copies of any 32-bit words (the bf16
// pair tiles). Square sub-blocks of the vector width go through registers (butterfly stages of
// two-source permutes on AVX-512, unpack/shuffle/lane-permute stages on AVX2; loads and permutes never
// touch the bits): a scalar transpose writes with a stride of `ldd` and was a tenth of the forward's time.
template <bool kScale>
void transpose32(const void* src_v, int64_t lds, int64_t rows, int64_t cols, float mul, void* dst_v, int64_t ldd) {
  const char* src = static_cast<const char*>(src_v);
  char* dst = static_cast<char*>(dst_v);
  int64_t rw = 0, cw = 0;  // the part done in register blocks
#if KK_VEC_BITS == 512
  rw = rows / 16 * 16;
  cw = cols / 16 * 16;
  alignas(64) int32_t lo_idx[4][16], hi_idx[4][16];
  for (int lv = 0; lv < 4; ++lv) {
    const int sft = 8 >> lv;
    for (int c = 0; c < 16; ++c) {
      lo_idx[lv][c] = (c & sft) ? 16 + c - sft : c;
      hi_idx[lv][c] = (c & sft) ? 16 + c : c + sft;
    }
  }
  const __m512 vm = _mm512_set1_ps(mul);
  for (int64_t rb = 0; rb < rw; rb += 16)
    for (int64_t cb = 0; cb < cw; cb += 16) {
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
#elif KK_VEC_BITS == 256
  rw = rows / 8 * 8;
  cw = cols / 8 * 8;
  const __m256 vm = _mm256_set1_ps(mul);
  for (int64_t rb = 0; rb < rw; rb += 8)
    for (int64_t cb = 0; cb < cw; cb += 8) {
      __m256 x[8], t[8];
      for (int i = 0; i < 8; ++i) {
        x[i] = _mm256_loadu_ps(reinterpret_cast<const float*>(src + 4 * ((rb + i) * lds + cb)));
        if constexpr (kScale) x[i] = _mm256_mul_ps(x[i], vm);
      }
      // 2x2 element blocks, then 2x2 pairs, then the 128-bit halves
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(x[i], x[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(x[i], x[i + 1]);
      }
      for (int i = 0; i < 8; i += 4)
        for (int j = 0; j < 2; ++j) {
          x[i + j] = _mm256_shuffle_ps(t[i + j], t[i + j + 2], _MM_SHUFFLE(1, 0, 1, 0));
          x[i + j + 2] = _mm256_shuffle_ps(t[i + j], t[i + j + 2], _MM_SHUFFLE(3, 2, 3, 2));
        }
      // x[0] holds column 0 of rows 0-3 (low lane) and column 4 (high lane); x[2] column 1 / 5,
      // x[1] column 2 / 6, x[3] column 3 / 7; x[4..7] the same for rows 4-7.
      static constexpr int kCol[4] = {0, 2, 1, 3};
      for (int j = 0; j < 4; ++j) {
        const int c = kCol[j];
        t[c] = _mm256_permute2f128_ps(x[j], x[j + 4], 0x20);
        t[c + 4] = _mm256_permute2f128_ps(x[j], x[j + 4], 0x31);
      }
      for (int i = 0; i < 8; ++i)
        _mm256_storeu_ps(reinterpret_cast<float*>(dst + 4 * ((cb + i) * ldd + rb)), t[i]);
    }
#endif
  // the rest: rows below rw in the first cw columns, every row of the columns past cw (memcpy: the
  // words may live in bf16 storage)
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = c < cw ? rw : 0; r < rows; ++r) {
      float w;
      std::memcpy(&w, src + 4 * (r * lds + c), 4);
      if constexpr (kScale) w *= mul;
      std::memcpy(dst + 4 * (c * ldd + r), &w, 4);
    }
}
