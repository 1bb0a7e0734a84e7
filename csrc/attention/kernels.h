// Forward and backward of block-sparse attention for one ISA path, written once over a product policy.
// Included by isa_<name>.cpp inside namespace kk::attn::<name>, after its `#pragma GCC target` and the
// KK_VEC_BITS (512 / 256 / 0), KK_BF16_DOT and KK_AMX macros; everything here is compiled per path.
//
// Design (FlashAttention-2 style):
// * Forward: one task per (batch, head, block), split into contiguous, cost-balanced pieces that the
//   threads take in turn: consecutive tasks share (b, h), so K/V stay in cache. Online softmax over
//   chunks of up to 512 key columns; scores live in the log2 domain (Q K^T times scale * log2(e)).
// * Backward, no atomics either way (every output tile has one writer):
//   - with enough heads to share out evenly, one pass per (b, h) over its key blocks walking the
//     transposed mask; dQ accumulates in the task's own fp32 head buffer. Scores and dP are computed
//     once per pair: 5 products (~1.3x the two-pass scheme at S = 8192, H = 4).
//   - otherwise a dQ pass over query blocks, then a dK/dV pass over key blocks (7 products, but any
//     number of threads share a single head).
// * The products come from a policy, so one forward loop and one backward serve every element type:
//   Fp32Products (fp32 panels: fp32 inputs, and fp16/bf16 inputs converted once per call), and on
//   paths with bf16 products Bf16Products<Engine> (AVX512-BF16 dot products, or AMX tiles): bf16
//   operands in pair layouts, fp32 accumulation and softmax, P and dS rounded to bf16 for the
//   products that take them, as FlashAttention does. KANDINSKY_BSA_CPU_BF16_DOT=0 sends bf16 through
//   the conversion path instead (A/B measurements, tests of that path).
// * Masking is per block pair: skip (different videos / all-pad keys), full (no per-element test),
//   or partial (a block straddling a video boundary or holding pad keys): then the score is kept
//   only where the query's segment code equals the key's (pad keys get a code no query has).
// * token_index (raster-order callers, common.h): rows are looked up through the index only where the
//   inputs are packed (pack(), the Bf16Products constructor) and where rows are loaded / stored
//   (Bshd, load_rows, store_rows); the products read packed blocks as without it. What the index
//   path adds is the copies it forces: operands otherwise read in place (fp32 Q in the AVX-512
//   forward, fp32 V in the backward, the bf16 A operands) are gathered into a packed copy.
#pragma once

#include "simd.h"
#include "gemm.h"
#if KK_AMX
#include "amx_gemm.h"
#endif

// A (B, S, H, D) tensor seen through its strides. With a token index (Problem::tok), s is a position
// and row(b, s, h) is raster row idx[s], or null for a pad position (idx[s] == -1): load_rows reads
// it as zeros, store_rows skips it. Rows of a block are then not equally spaced: whoever reads a
// block at a fixed row stride (row(b, s0, h) + r * ss) must not have an index (`indexed()`).
template <typename T>
struct Bshd {
  T* p;
  int64_t sb, ss, sh;
  const int64_t* idx;
  explicit Bshd(const at::Tensor& t, const int64_t* index = nullptr)
      : p(static_cast<T*>(t.data_ptr())), sb(t.stride(0)), ss(t.stride(1)), sh(t.stride(2)), idx(index) {}
  bool indexed() const { return idx != nullptr; }
  T* row(int64_t b, int64_t s, int64_t h) const {
    if (idx != nullptr) {
      s = idx[s];
      if (s < 0) return nullptr;
    }
    return p + b * sb + s * ss + h * sh;
  }
};

// Copies `rows` rows starting at token s0 into dst (rows x D, fp32), times mul.
template <typename T>
inline void load_rows(const Bshd<T>& x, int64_t b, int64_t h, int64_t s0, int64_t rows, int64_t D,
                      float mul, float* dst, int64_t ldd = 0) {
  if (ldd == 0) ldd = D;
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = x.row(b, s0 + r, h);
    float* d = dst + r * ldd;
    if (src == nullptr) {  // pad position of a token index
      std::fill(d, d + D, 0.f);
      continue;
    }
    for (int64_t c = 0; c < D; ++c) d[c] = static_cast<float>(src[c]) * mul;
  }
}

template <typename T>
inline void store_rows(const Bshd<T>& x, int64_t b, int64_t h, int64_t s0, int64_t rows, int64_t D,
                       float mul, const float* src) {
  for (int64_t r = 0; r < rows; ++r) {
    T* d = x.row(b, s0 + r, h);
    if (d == nullptr) continue;  // pad position of a token index: written nowhere
    const float* s = src + r * D;
    for (int64_t c = 0; c < D; ++c) d[c] = static_cast<T>(s[c] * mul);
  }
}

// Scratch that block products read and write: rows start on cache lines (AMX tile rows that straddle
// two lines load up to 2x slower; see amx_gemm.h).
template <class T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <class U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* ptr, size_t) { ::operator delete(ptr, std::align_val_t(64)); }
  template <class U>
  bool operator==(const Aligned64<U>&) const { return true; }
};
template <class T>
using AVec = std::vector<T, Aligned64<T>>;

#if KK_BF16_DOT

// fp32 -> bf16, round to nearest even (what torch's conversion does).
inline void to_bf16(const float* x, int64_t n, uint16_t* y) {
  int64_t c = 0;
  for (; c + 16 <= n; c += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + c), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + c)));
  for (; c < n; ++c) y[c] = c10::BFloat16(x[c]).x;
}

// row_exp2_sum (simd.h) for the bf16 products: y = bf16(2^(x - sub)) rounded as to_bf16, the fp32 sum of
// the unrounded values returned (the same sum, in the same order, as row_exp2_sum). P goes straight into
// the bf16 A operand of P V instead of an fp32 row that to_bf16 reads back: measured on the AMX path
// (S = 8192, H = 4, D = 64, 10 %) that conversion pass was ~15 % of the forward loop's own time.
inline float row_exp2_sum_bf16(const float* x, int64_t n, float sub, uint16_t* y) {
  static_assert(Vec::W == 16, "the bf16 products run on AVX-512 vectors");
  using V = typename Vec::V;
  int64_t c = 0;
  const V vs = Vec::set1(sub);
  V acc0 = Vec::zero(), acc1 = Vec::zero();
  for (; c + 2 * Vec::W <= n; c += 2 * Vec::W) {
    const V e0 = Vec::exp2_nonpos(Vec::sub(Vec::load(x + c), vs));
    const V e1 = Vec::exp2_nonpos(Vec::sub(Vec::load(x + c + Vec::W), vs));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + c), (__m256i)_mm512_cvtneps_pbh(e0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + c + Vec::W), (__m256i)_mm512_cvtneps_pbh(e1));
    acc0 = Vec::add(acc0, e0);
    acc1 = Vec::add(acc1, e1);
  }
  for (; c + Vec::W <= n; c += Vec::W) {
    const V e = Vec::exp2_nonpos(Vec::sub(Vec::load(x + c), vs));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + c), (__m256i)_mm512_cvtneps_pbh(e));
    acc0 = Vec::add(acc0, e);
  }
  float sum = Vec::hsum(Vec::add(acc0, acc1));
  for (; c < n; ++c) {
    const float e = exp2f_fast(x[c] - sub);
    y[c] = c10::BFloat16(e).x;
    sum += e;
  }
  return sum;
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

#endif

struct Packed {
  at::Tensor rows_t, tiles_t;
  const float* rows = nullptr;
  float* tiles = nullptr;
  int64_t rb = 0, rh = 0, ld = 0, H = 0, nb = 0, tile_size = 0;
  const float* row(int64_t b, int64_t h, int64_t s) const { return rows + b * rb + h * rh + s * ld; }
  const float* tile(int64_t b, int64_t h, int64_t j) const { return tiles + ((b * H + h) * nb + j) * tile_size; }
};

// Row stride (floats) of packed rows: a multiple of 16 (64-byte lines) spanning an odd number of
// lines, so consecutive rows fall in different L1 sets. Read in place at the input's power-of-two
// stride (H * D floats), the rows of a B panel crowd into a few sets and miss L1: copying the B-operand
// rows at this stride made the fp32 forward at D = 128 (H = 4) 10-16 % faster (AVX2 and AVX-512), and
// the backward likewise; at D = 64 it is neutral.
inline int64_t padded_ld(int64_t D) {
  int64_t ld = (D + 15) / 16 * 16;
  if ((ld / 16) % 2 == 0) ld += 16;
  return ld;
}

// A buffer for packed panels (fp32), written once right after it is allocated: from the panel cache
// (common.h) from 4 MiB up. A fresh buffer is faulted in page by page at that first write: on 4 KiB
// pages a fresh 32 MiB took ~25 ms to fill against ~7 ms on 2 MiB pages (Intel), and the forward's K^T
// tiles and V rows at S = 8192, H = 4, D = 128 are 34 MiB; a cached one costs nothing (AMD Zen 5, D = 128
// forward: ~6 % of its samples were the OS zeroing pages on the THP-only avx2 path, and the avx512
// path took 62 instead of 52 ms after each dense SDPA call had made the heap shrink).
inline at::Tensor panel_buffer(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  int64_t n = 1;
  for (const int64_t s : sizes) n *= s;
  const size_t bytes = static_cast<size_t>(n) * sizeof(float);
  if (bytes < (size_t(4) << 20)) return at::empty(sizes, opts);
  size_t cap = 0;
  void* ptr = panel_acquire(bytes, &cap);
  return at::from_blob(ptr, sizes, [cap](void* q) { panel_release(q, cap); }, opts);
}

// How a product policy reads an input's block rows: not at all, only as the broadcast A operand (fp32
// read in place), or also as a B operand (always a packed copy at padded_ld).
enum RowUse : int { kNoRows = 0, kRowsA = 1, kRowsB = 2 };

// With a token index (p.tok) the rows are gathered: always copied, and tiles built from the copy.
template <typename T>
Packed pack(const at::Tensor& x, const Problem& p, RowUse rows, bool want_tiles, float tile_mul = 1.f) {
  Packed pk;
  const bool indexed = p.tok != nullptr;
  const int64_t S = indexed ? p.Sq : x.size(1), nblk = S / p.bs;  // q-side (Sq) or k-side (Sk) input
  pk.H = p.H;
  pk.nb = nblk;
  pk.tile_size = p.D * p.bs;
  const auto opts = x.options().dtype(at::kFloat);
  const bool want_rows = rows != kNoRows;
  const bool copy_rows = rows == kRowsB || (want_rows && (!std::is_same_v<T, float> || indexed));
  if (want_rows && !copy_rows) {
    pk.rows = reinterpret_cast<const float*>(x.data_ptr());
    pk.rb = x.stride(0);
    pk.rh = x.stride(2);
    pk.ld = x.stride(1);
  } else if (copy_rows) {
    pk.ld = padded_ld(p.D);
    pk.rows_t = panel_buffer({p.B, p.H, S, pk.ld}, opts);
    pk.rows = pk.rows_t.data_ptr<float>();
    pk.rb = p.H * S * pk.ld;
    pk.rh = S * pk.ld;
  }
  if (want_tiles) {
    pk.tiles_t = panel_buffer({p.B, p.H, nblk, p.D, p.bs}, opts);
    pk.tiles = pk.tiles_t.data_ptr<float>();
  }
  if (!copy_rows && !want_tiles) return pk;
  const Bshd<T> X(x, p.tok);
  const int64_t bs = p.bs, D = p.D;
  at::parallel_for(0, p.B * p.H * nblk, 1, [&](int64_t begin, int64_t end) {
    AVec<float> buf(bs * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t j = task % nblk, h = (task / nblk) % p.H, b = task / (nblk * p.H);
      float* t = want_tiles ? pk.tiles + ((b * p.H + h) * nblk + j) * D * bs : nullptr;
      if constexpr (std::is_same_v<T, float>) {
        if (!copy_rows && !indexed) {  // fp32 tiles straight from the strided input: one pass, no staging copy
          transpose32<true>(X.row(b, j * bs, h), X.ss, bs, D, tile_mul, t, bs);
          continue;
        }
      }
      float* dst = copy_rows ? const_cast<float*>(pk.row(b, h, j * bs)) : buf.data();
      const int64_t ldd = copy_rows ? pk.ld : D;
      load_rows(X, b, h, j * bs, bs, D, 1.f, dst, ldd);
      if (want_tiles) transpose32<true>(dst, ldd, bs, D, tile_mul, t, bs);
    }
  });
  return pk;
}

// Which input a product reads its B operand rows from.
enum Operand : int { kQ = 0, kDO = 1, kK = 2, kV = 3 };

// Whether a product policy takes prefetch hints (Fp32Products): scores_pf / acc_rows_pf run the
// products of scores / acc_rows while bringing the ranges of a Prefetch into L2, which pf_tile and
// pf_rows fill with the K^T tile and the block rows that come next.
template <class Ops, class = void>
struct TakesPrefetch : std::false_type {};
template <class Ops>
struct TakesPrefetch<Ops, std::void_t<decltype(&Ops::scores_pf)>> : std::true_type {};

// Whether a product policy multiplies P in bf16 (Bf16Products): the forward's exp pass then writes P as
// bf16 (ops.exp2_sum_bf16, i.e. row_exp2_sum_bf16) and hands it to acc_rows_bf16, with no fp32 copy of P
// converted afterwards.
template <class Ops, class = void>
struct TakesBf16P : std::false_type {};
template <class Ops>
struct TakesBf16P<Ops, std::void_t<decltype(&Ops::acc_rows_bf16)>> : std::true_type {};

// The forward's walk over (b, h, query block) with an online softmax over chunks of active key
// blocks. The two products come from the product policy `ops`:
//   ops.scores(b, h, i, j, st, ld): st (bs x bs, row stride ld) = scores of query block i against key
//       block j, in the log2 domain (times scale * log2(e));
//   ops.acc_rows(kV, b, h, js, n, 1, pt, ld, acc): acc (bs x D) += P (bs x n * bs at pt, row stride
//       ld) @ the V blocks js[0..n) stacked (one chunk).
// With a policy that takes prefetch hints, the scores of key block j bring in the next K^T tile (the
// next task's first one after the last) and the V rows of block j, the P V product of a task's last
// chunk the next task's query rows: the blocks of the next task are listed one task ahead for that.
// Measured on the AVX2 path at S = 8192, H = 4, 10 %: the K^T tiles and V blocks otherwise come from
// L3 and the products ran ~15-20 % below their rate on cached blocks. Such a policy's scores also
// leave each row's lane-wise maxima in rmax (vector paths), so a chunk without partial blocks takes
// its row maxima from there instead of a pass over its score rows.
template <typename T, typename Ops>
void forward_loop(const Problem& p, const Ops& ops, at::Tensor& out, at::Tensor& lse) {
  constexpr bool kPf = TakesPrefetch<Ops>::value;
  constexpr bool kP16 = TakesBf16P<Ops>::value;
#if KK_VEC_BITS
  constexpr bool kMaxFused = kPf;
  constexpr int64_t kW = Vec::W;
#else
  constexpr bool kMaxFused = false;
  constexpr int64_t kW = 1;
#endif
  const int64_t bs = p.bs, D = p.D, nb = p.nq;
  const Bshd<T> O(out, p.tok);
  float* L = lse.data_ptr<float>();
  const int64_t chunk = chunk_blocks(bs);
  bool stage = false;  // the policy copies each task's query block into qst (Fp32Products::stage_q)
  if constexpr (kPf) stage = ops.stage_q;
  // AVX2: 32 pieces per thread (not 8): a thread that the host slows down leaves the others at most one
  // piece to wait for at the end, 1/64 of the work on 2 threads instead of 1/16 (paired runs at S = 8192,
  // H = 4, 10 %: 2-6 % faster at D = 128, 1-8 % at D = 64). A piece's first task loses the prefetch of
  // its first K^T tile and query rows; on the AVX-512 path (fp32 on this AMX machine) the same split
  // read 2-5 % slower in paired runs (noisy), so it keeps 8.
  const int64_t pieces = KK_VEC_BITS == 256 ? 32 : 8;
  over_query_blocks(
      p, [&](int64_t begin, int64_t end) {
    AVec<float> acc(bs * D), st(bs * chunk * bs), m(bs), l(bs), rmax(kMaxFused ? bs * kW : 0);
    AVec<uint16_t> p16(kP16 ? bs * chunk * bs : 0);
    AVec<float> qst(stage ? bs * padded_ld(D) : 0);
    std::vector<int32_t> blocks, next_blocks;
    std::vector<int8_t> modes, next_modes;
    int64_t next_n = -1;  // next_blocks holds task + 1's list when >= 0
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task % nb, h = (task / nb) % p.H, b = task / (nb * p.H);
      const int64_t s0 = i * bs;
      int64_t n;
      if (next_n >= 0) {
        std::swap(blocks, next_blocks);
        std::swap(modes, next_modes);
        n = next_n;
      } else {
        n = active_blocks(p, b, h, i, blocks, modes);
      }
      // the next task of this piece: its (b, h, i) and its blocks
      const int64_t tn = task + 1, in = tn % nb, hn = (tn / nb) % p.H, bn = tn / (nb * p.H);
      next_n = -1;
      if (kPf && tn < end) next_n = active_blocks(p, bn, hn, in, next_blocks, next_modes);
      if constexpr (kPf)
        if (stage && n > 0) ops.stage(b, h, i, qst.data());
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -kInf);
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t c0 = 0; c0 < n; c0 += chunk) {
        const int64_t nc = std::min(chunk, n - c0), cols = nc * bs;
        bool partial = false;  // a masked tile: its maxima in rmax predate the mask
        if constexpr (kMaxFused) std::fill(rmax.begin(), rmax.end(), -kInf);
        for (int64_t c = 0; c < nc; ++c) {
          if constexpr (kPf) {
            Prefetch pf;
            if (c0 + c + 1 < n)
              ops.pf_tile(pf, kK, b, h, blocks[c0 + c + 1]);
            else if (next_n > 0)
              ops.pf_tile(pf, kK, bn, hn, next_blocks[0]);
            ops.pf_rows(pf, kV, b, h, blocks[c0 + c] * bs);
            ops.scores_pf(b, h, i, blocks[c0 + c], st.data() + c * bs, cols, pf, kMaxFused ? rmax.data() : nullptr,
                          stage ? qst.data() : nullptr);
          } else {
            ops.scores(b, h, i, blocks[c0 + c], st.data() + c * bs, cols);
          }
          if (modes[c0 + c] == kPartial) {
            partial = true;
            mask_tile(st.data() + c * bs, cols, bs, bs, p.qcode.data() + s0,
                      p.kcode_of(b) + blocks[c0 + c] * bs);
          }
        }
        for (int64_t r = 0; r < bs; ++r) {
          float* sr = st.data() + r * cols;
          const float mx = kMaxFused && !partial ? row_max(rmax.data() + r * kW, kW, m[r]) : row_max(sr, cols, m[r]);
          if (mx == -kInf) {  // nothing visible yet: contribute zeros, keep the state
            if constexpr (kP16)
              std::fill(p16.data() + r * cols, p16.data() + (r + 1) * cols, uint16_t(0));
            else
              std::fill(sr, sr + cols, 0.f);
            continue;
          }
          const float alpha = exp2f_fast(m[r] - mx);
          float sum;
          if constexpr (kP16)
            sum = ops.exp2_sum_bf16(sr, cols, mx, p16.data() + r * cols);
          else
            sum = row_exp2_sum(sr, cols, mx);
          if (alpha != 1.f) {
            float* ar = acc.data() + r * D;
            for (int64_t d = 0; d < D; ++d) ar[d] *= alpha;
          }
          l[r] = l[r] * alpha + sum;
          m[r] = mx;
        }
        if constexpr (kPf) {
          Prefetch pf;
          if (c0 + chunk >= n && next_n >= 0) ops.pf_query(pf, bn, hn, in);
          ops.acc_rows_pf(kV, b, h, blocks.data() + c0, nc, 1.f, st.data(), cols, acc.data(), pf);
        } else if constexpr (kP16) {
          ops.acc_rows_bf16(kV, b, h, blocks.data() + c0, nc, 1.f, p16.data(), cols, acc.data());
        } else {
          ops.acc_rows(kV, b, h, blocks.data() + c0, nc, 1.f, st.data(), cols, acc.data());
        }
      }
      float* lrow = L + (b * p.H + h) * p.Sq + s0;
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
      },
      pieces);
}


// Per query row of block i of (b, h): lse in the log2 domain as hi + lo (hi = +inf for a row that sees
// nothing, so every P is 0) and Delta = rowsum(dO * O). dos: the block's dO rows in fp32 (row stride
// ldd); os: bs x D scratch.
template <typename T>
void block_stats(const Problem& p, const Bshd<T>& O, const float* dos, int64_t ldd, const float* L, int64_t b,
                 int64_t h, int64_t i, float* os, std::vector<float>& lse2, std::vector<float>& lse2lo,
                 std::vector<float>& delta) {
  const int64_t bs = p.bs, D = p.D, s0 = i * bs, rbase = (b * p.H + h) * p.Sq + s0;
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
  at::parallel_for(0, p.B * p.H * p.nq, 1, [&](int64_t begin, int64_t end) {
    AVec<float> os(p.bs * p.D), dos(p.bs * p.D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task % p.nq, h = (task / p.nq) % p.H, b = task / (p.nq * p.H);
      load_rows(dO, b, h, i * p.bs, p.bs, p.D, 1.f, dos.data());
      block_stats(p, O, dos.data(), p.D, L, b, h, i, os.data(), lse2, lse2lo, delta);
    }
  });
}


// What a product policy is built for: the operand layouts it prepares differ.
enum Mode : int { kForward = 0, kBackwardFused = 1, kBackwardTwoPass = 2 };

// Products on fp32 panels (every element type; fp16/bf16 inputs converted once per call). Layouts
// (Packed): Q, dO, K, V as block rows, and the transposed tiles that q.k^T-style products take as
// their B operand: K^T tiles carry scale * log2(e), so scores are bitwise the same in every pass.
template <typename T>
struct Fp32Products {
  const Problem& p;
  Packed X[4];  // indexed by Operand
  float qmul;
  Bshd<T> qin;   // the query input, for stage_q
  // AVX2 forward: each task's query block is copied (stage) into the forward loop's scratch at padded_ld.
  // Read in place as the A operand of the scores, its rows at the input's power-of-two stride fall into
  // 16 of the 64 L1 sets, so a query block (32 KiB at D = 128) cannot stay in L1 across the key blocks it
  // meets. Copied per task rather than packed up front (as it was): no 18 MiB panel to fault in, write
  // back and read again at S = 8192, H = 4, D = 128; the copy stays in L1/L2 for the task's products.
  bool stage_q;

  Fp32Products(const Problem& p_, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& dout, Mode mode)
      : p(p_), qmul(p_.scale * kLog2e), qin(q, p_.tok), stage_q(mode == kForward && KK_VEC_BITS == 256) {
    const bool bwd = mode != kForward, two = mode == kBackwardTwoPass;
    // B operands of acc_rows: V in the forward; Q (dK), dO (dV) and K (dQ) in the backward.
    X[kQ] = pack<T>(q, p, bwd ? kRowsB : stage_q ? kNoRows : kRowsA, bwd);
    X[kK] = pack<T>(k, p, bwd ? kRowsB : kNoRows, mode != kBackwardFused, qmul);
    X[kV] = pack<T>(v, p, bwd ? kRowsA : kRowsB, two);
    if (bwd) X[kDO] = pack<T>(dout, p, kRowsB, true);
  }

  // Query side: scores S = Q_i K_j^T (log2 domain) and dP = dO_i V_j^T.
  void scores(int64_t b, int64_t h, int64_t i, int64_t j, float* st, int64_t ld) const {
    gemm(p.bs, p.bs, p.D, 1.f, X[kQ].row(b, h, i * p.bs), X[kQ].ld, X[kK].tile(b, h, j), p.bs, false, st, ld);
  }
  void dp(int64_t b, int64_t h, int64_t i, int64_t j, float* out, int64_t ld) const {
    gemm(p.bs, p.bs, p.D, 1.f, X[kDO].row(b, h, i * p.bs), X[kDO].ld, X[kV].tile(b, h, j), p.bs, false, out, ld);
  }
  // acc (bs x D) += alpha * A (bs x n * bs fp32, row stride lda) @ the rows of operand x in blocks js.
  void acc_rows(Operand x, int64_t b, int64_t h, const int32_t* js, int64_t n, float alpha, const float* A,
                int64_t lda, float* acc) const {
    acc_rows_pf(x, b, h, js, n, alpha, A, lda, acc, Prefetch());
  }

  // The same products, bringing pf's ranges into L2 meanwhile (forward_loop).
  // rmax: see gemm_blocks (vector paths; nullptr on the baseline path)
  // qa: the query block staged by stage() (stage_q), else null
  void scores_pf(int64_t b, int64_t h, int64_t i, int64_t j, float* st, int64_t ld, const Prefetch& pf,
                 float* rmax, const float* qa = nullptr) const {
    gemm(p.bs, p.bs, p.D, 1.f, qa ? qa : X[kQ].row(b, h, i * p.bs), qa ? padded_ld(p.D) : X[kQ].ld,
         X[kK].tile(b, h, j), p.bs, false, st, ld, &pf, rmax);
  }
  // stage_q: query block i of (b, h) into dst (bs rows of padded_ld(D) floats), as fp32
  void stage(int64_t b, int64_t h, int64_t i, float* dst) const {
    load_rows(qin, b, h, i * p.bs, p.bs, p.D, 1.f, dst, padded_ld(p.D));
  }
  // Adds query block i's rows (those the next stage() or scores read) to pf.
  void pf_query(Prefetch& pf, int64_t b, int64_t h, int64_t i) const {
    if (!stage_q)
      pf_rows(pf, kQ, b, h, i * p.bs);
    else if (!qin.indexed())
      pf.add(qin.row(b, i * p.bs, h), p.bs, p.D * sizeof(T), qin.ss * sizeof(T));
  }
  void acc_rows_pf(Operand x, int64_t b, int64_t h, const int32_t* js, int64_t n, float alpha, const float* A,
                   int64_t lda, float* acc, const Prefetch& pf) const {
    const float* rows[kMaxChunk];
    for (int64_t c = 0; c < n; ++c) rows[c] = X[x].row(b, h, js[c] * p.bs);
    gemm_multi(p.bs, p.D, n, p.bs, alpha, A, lda, rows, X[x].ld, true, acc, p.D, pf.n ? &pf : nullptr);
  }
  // Adds the tile of key block j / the bs block rows from token s0 of operand x to pf.
  void pf_tile(Prefetch& pf, Operand x, int64_t b, int64_t h, int64_t j) const {
    if (X[x].tiles) pf.add(X[x].tile(b, h, j), 1, X[x].tile_size * sizeof(float), 0);
  }
  void pf_rows(Prefetch& pf, Operand x, int64_t b, int64_t h, int64_t s0) const {
    if (X[x].rows) pf.add(X[x].row(b, h, s0), p.bs, p.D * sizeof(float), X[x].ld * sizeof(float));
  }

  // Key side (rows are the keys of block j): S^T = (K_j * scale * log2(e)) Q_i^T from a scaled copy
  // of the key block made once per key block, and dP^T = V_j dO_i^T.
  struct KeyScratch {
    AVec<float> ks;
  };
  void begin_key(KeyScratch& s, int64_t b, int64_t h, int64_t j) const {
    const int64_t bs = p.bs, D = p.D;
    s.ks.resize(bs * D);
    const float* kr = X[kK].row(b, h, j * bs);
    for (int64_t r = 0; r < bs; ++r)
      for (int64_t d = 0; d < D; ++d) s.ks[r * D + d] = kr[r * X[kK].ld + d] * qmul;
  }
  void scores_t(const KeyScratch& s, int64_t b, int64_t h, int64_t j, int64_t i, float* st, int64_t ld) const {
    gemm(p.bs, p.bs, p.D, 1.f, s.ks.data(), p.D, X[kQ].tile(b, h, i), p.bs, false, st, ld);
  }
  void dp_t(int64_t b, int64_t h, int64_t j, int64_t i, float* out, int64_t ld) const {
    gemm(p.bs, p.bs, p.D, 1.f, X[kV].row(b, h, j * p.bs), X[kV].ld, X[kDO].tile(b, h, i), p.bs, false, out, ld);
  }
};

#if KK_BF16_DOT
// The bf16 products of a path: AVX512-BF16 dot products in the register-blocked kernel.
struct DotEngine {
  static void blocks(int64_t M, int64_t N, int64_t nblk, int64_t kb, float alpha, const uint16_t* A, int64_t lda,
                     const uint16_t* const* Bblk, int64_t ldb, bool accumulate, float* C, int64_t ldc) {
    gemm_blocks<Bf16Dot>(M, N, nblk, kb, alpha, A, lda, Bblk, ldb, accumulate, C, ldc);
  }
  static void tiles(int64_t M, int64_t N, int64_t K, float alpha, const uint16_t* A, int64_t lda, const uint16_t* B,
                    int64_t ldb, bool accumulate, float* C, int64_t ldc) {
    gemm_tiles<Bf16Dot>(M, N, K, alpha, A, lda, B, ldb, accumulate, C, ldc);
  }
};

// Products on bf16 operands (bf16 inputs whose rows hold whole 32-bit pairs): Engine's products
// with fp32 accumulation. Q, dO, K, V are read in place as A operands (row-major, the input's
// strides); per call the policy builds, for its mode, the B operands: pair tiles T[x] (block j
// transposed as D/2 x bs words, each word a (d, d+1) pair of one token: B of Q K^T-style products)
// and pair rows I[x] (word (t, n) = (X[2t][n], X[2t+1][n]) of a block: B of P V-style products).
// Scores are scaled after the product (K cannot carry the scale in bf16 without rounding it); A
// operands that are fp32 scratch (P, dS) are rounded to bf16 first.
template <class Engine>
struct Bf16Products {
  const Problem& p;
  const uint16_t* in[4];      // the inputs, by Operand
  int64_t sb[4], ss[4], sh[4];  // their strides (elements)
  const uint16_t *T[4] = {}, *I[4] = {};
  at::Tensor buf, gathered;
  float qmul;

  // With a token index (p.tok) the inputs' rows are not equally spaced, so the operands this mode reads
  // in place as A (forward: Q; fused backward: K, V; two-pass: all four) get a gathered (B, H, Sf, D)
  // copy (zeros at pad positions), written block by block inside the packing loop below, and the
  // others are gathered one block at a time into per-thread staging that only the packing reads.
  // Without an index none of this runs.
  Bf16Products(const Problem& p_, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& dout, Mode mode)
      : p(p_), qmul(p_.scale * kLog2e) {
    const at::Tensor* xs[4] = {&q, mode == kForward ? &q : &dout, &k, &v};
    const bool indexed = p.tok != nullptr;
    const int64_t bs = p.bs, D = p.D, nb = std::max(p.nq, p.nk), H = p.H;
    bool read_a[4] = {mode != kBackwardFused, mode == kBackwardTwoPass, mode != kForward, mode != kForward};
    int64_t slot[4] = {-1, -1, -1, -1}, ng = 0;
    for (int x = 0; x < 4; ++x)
      if (read_a[x]) slot[x] = ng++;
    if (indexed) {
      gathered = at::empty({ng * p.B * H * p.Sq * D}, q.options());
      for (int x = 0; x < 4; ++x) {
        in[x] = reinterpret_cast<const uint16_t*>(gathered.data_ptr()) + std::max<int64_t>(slot[x], 0) * p.B * H * p.Sq * D;
        sb[x] = H * p.Sq * D, ss[x] = D, sh[x] = p.Sq * D;
      }
    } else {
      for (int x = 0; x < 4; ++x) {
        in[x] = reinterpret_cast<const uint16_t*>(xs[x]->data_ptr());
        sb[x] = xs[x]->stride(0), ss[x] = xs[x]->stride(1), sh[x] = xs[x]->stride(2);
      }
    }
    // (operand, tiles?) pairs each mode reads
    std::vector<std::pair<Operand, bool>> want;
    if (mode == kForward) want = {{kK, true}, {kV, false}};
    if (mode != kForward) want = {{kQ, true}, {kDO, true}, {kQ, false}, {kDO, false}, {kK, false}};
    if (mode == kBackwardTwoPass) want.insert(want.end(), {{kK, true}, {kV, true}});
    // Q and dO have nq blocks, K and V nk: each operand's plane is (B, H, its blocks, bs * D)
    std::vector<int64_t> start(want.size() + 1, 0);
    for (size_t w = 0; w < want.size(); ++w) start[w + 1] = start[w] + p.B * H * nblocks(want[w].first) * bs * D;
    buf = at::empty({start.back()}, q.options().dtype(at::kBFloat16));
    auto* base = reinterpret_cast<uint16_t*>(buf.data_ptr());
    for (size_t w = 0; w < want.size(); ++w) (want[w].second ? T : I)[want[w].first] = base + start[w];
    const Bshd<at::BFloat16> src[4] = {Bshd<at::BFloat16>(q), Bshd<at::BFloat16>(*xs[kDO]), Bshd<at::BFloat16>(k),
                                       Bshd<at::BFloat16>(v)};
    // indexed: the raster inputs through the index, and which operands the packing reads
    const Bshd<at::BFloat16> raw[4] = {Bshd<at::BFloat16>(q, p.tok), Bshd<at::BFloat16>(*xs[kDO], p.tok),
                                       Bshd<at::BFloat16>(k, p.tok), Bshd<at::BFloat16>(v, p.tok)};
    bool packed_from[4] = {};
    for (const auto& w : want) packed_from[w.first] = true;
    at::parallel_for(0, p.B * H * nb, 1, [&](int64_t begin, int64_t end) {
      AVec<uint16_t> stage(indexed ? 4 * bs * D : 0);
      const uint16_t* blk0[4] = {};  // indexed: block j of each operand, rows of D elements
      for (int64_t task = begin; task < end; ++task) {
        const int64_t j = task % nb, h = (task / nb) % H, b = task / (nb * H);
        if (indexed) {  // gather block j of each operand read here (nq == nk with an index)
          for (int x = 0; x < 4; ++x) {
            if (!read_a[x] && !packed_from[x]) continue;
            uint16_t* d0 = read_a[x] ? const_cast<uint16_t*>(rows(static_cast<Operand>(x), b, h, j * bs))
                                     : stage.data() + x * bs * D;
            blk0[x] = d0;
            for (int64_t r = 0; r < bs; ++r) {
              const at::BFloat16* s = raw[x].row(b, j * bs + r, h);
              if (s == nullptr)
                std::memset(static_cast<void*>(d0 + r * D), 0, D * sizeof(uint16_t));
              else
                std::memcpy(static_cast<void*>(d0 + r * D), s, D * sizeof(uint16_t));
            }
          }
        }
        for (size_t w = 0; w < want.size(); ++w) {
          const Operand x = want[w].first;
          if (j >= nblocks(x)) continue;
          const Bshd<at::BFloat16>& X = src[x];
          uint16_t* dst = base + start[w] + blk(x, b, h, j);
          if (want[w].second) {
            if (indexed)
              transpose32<false>(blk0[x], D / 2, bs, D / 2, 1.f, dst, bs);
            else
              transpose32<false>(X.row(b, j * bs, h), X.ss / 2, bs, D / 2, 1.f, dst, bs);
          } else if (indexed) {
            for (int64_t t = 0; t < bs / 2; ++t)
              interleave_rows(blk0[x] + 2 * t * D, blk0[x] + (2 * t + 1) * D, D, dst + 2 * t * D);
          } else {
            for (int64_t t = 0; t < bs / 2; ++t)
              interleave_rows(reinterpret_cast<const uint16_t*>(X.row(b, j * bs + 2 * t, h)),
                              reinterpret_cast<const uint16_t*>(X.row(b, j * bs + 2 * t + 1, h)), D, dst + 2 * t * D);
          }
        }
      }
    });
  }

  int64_t nblocks(Operand x) const { return x == kQ || x == kDO ? p.nq : p.nk; }
  // Offset (elements) of (b, h)'s block j in the per-call arrays of operand x.
  int64_t blk(Operand x, int64_t b, int64_t h, int64_t j) const {
    return ((b * p.H + h) * nblocks(x) + j) * p.bs * p.D;
  }
  const uint16_t* rows(Operand x, int64_t b, int64_t h, int64_t s0) const {
    return in[x] + b * sb[x] + s0 * ss[x] + h * sh[x];
  }

  void scores(int64_t b, int64_t h, int64_t i, int64_t j, float* st, int64_t ld) const {
    Engine::tiles(p.bs, p.bs, p.D / 2, qmul, rows(kQ, b, h, i * p.bs), ss[kQ], T[kK] + blk(kK, b, h, j), p.bs, false,
                  st, ld);
  }
  void dp(int64_t b, int64_t h, int64_t i, int64_t j, float* out, int64_t ld) const {
    Engine::tiles(p.bs, p.bs, p.D / 2, 1.f, rows(kDO, b, h, i * p.bs), ss[kDO], T[kV] + blk(kV, b, h, j), p.bs, false,
                  out, ld);
  }
  void acc_rows(Operand x, int64_t b, int64_t h, const int32_t* js, int64_t n, float alpha, const float* A,
                int64_t lda, float* acc) const {
    thread_local AVec<uint16_t> a16;
    a16.resize(p.bs * lda);
    for (int64_t r = 0; r < p.bs; ++r) to_bf16(A + r * lda, n * p.bs, a16.data() + r * lda);
    acc_rows_bf16(x, b, h, js, n, alpha, a16.data(), lda, acc);
  }
  static float exp2_sum_bf16(const float* x, int64_t n, float sub, uint16_t* y) {
    return row_exp2_sum_bf16(x, n, sub, y);
  }
  // acc_rows with A already in bf16 (the forward's P, see TakesBf16P).
  void acc_rows_bf16(Operand x, int64_t b, int64_t h, const int32_t* js, int64_t n, float alpha, const uint16_t* A16,
                     int64_t lda, float* acc) const {
    const uint16_t* rws[kMaxChunk];
    for (int64_t c = 0; c < n; ++c) rws[c] = I[x] + blk(x, b, h, js[c]);
    Engine::blocks(p.bs, p.D, n, p.bs / 2, alpha, A16, lda, rws, p.D, true, acc, p.D);
  }

  struct KeyScratch {};
  void begin_key(KeyScratch&, int64_t, int64_t, int64_t) const {}
  void scores_t(const KeyScratch&, int64_t b, int64_t h, int64_t j, int64_t i, float* st, int64_t ld) const {
    Engine::tiles(p.bs, p.bs, p.D / 2, qmul, rows(kK, b, h, j * p.bs), ss[kK], T[kQ] + blk(kQ, b, h, i), p.bs, false,
                  st, ld);
  }
  void dp_t(int64_t b, int64_t h, int64_t j, int64_t i, float* out, int64_t ld) const {
    Engine::tiles(p.bs, p.bs, p.D / 2, 1.f, rows(kV, b, h, j * p.bs), ss[kV], T[kDO] + blk(kDO, b, h, i), p.bs, false,
                  out, ld);
  }
};

#if KK_AMX
// The bf16 products on AMX tiles (amx_gemm.h): same operands, same fp32 accumulation.
struct AmxEngine {
  static void blocks(int64_t M, int64_t N, int64_t nblk, int64_t kb, float alpha, const uint16_t* A, int64_t lda,
                     const uint16_t* const* Bblk, int64_t ldb, bool accumulate, float* C, int64_t ldc) {
    amx_gemm_blocks(M, N, nblk, kb, alpha, A, lda, Bblk, 0, ldb, accumulate, C, ldc);
  }
  static void tiles(int64_t M, int64_t N, int64_t K, float alpha, const uint16_t* A, int64_t lda, const uint16_t* B,
                    int64_t ldb, bool accumulate, float* C, int64_t ldc) {
    amx_gemm_tiles(M, N, K, alpha, A, lda, B, ldb, accumulate, C, ldc);
  }
};
#endif

// Whether the bf16 products can read q, k, v (and dout): pairs must be whole 32-bit words in every row.
inline bool bf16_layout_ok(std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts)
    if (t->stride(0) % 2 || t->stride(1) % 2 || t->stride(2) % 2 || reinterpret_cast<uintptr_t>(t->data_ptr()) % 4)
      return false;
  return true;
}
#endif

// dK and dV of key block j of (b, h), walking its query blocks through the transposed mask: S^T and
// dP^T per pair, then dV += P^T dO and dK += scale dS^T Q over a chunk of query blocks at once. With
// dqa (this head's S x D fp32 rows) it also adds dS_ij K_j to dQ_i (the single-pass scheme).
template <class Prod>
struct KeyBlockGrads {
  const Problem& p;
  const Transposed& tr;
  const Prod& prod;
  const std::vector<float> &lse2, &lse2lo, &delta;
  typename Prod::KeyScratch ks;
  AVec<float> dka, dva, st, dp, lb, lbl, db, dsq;
  std::vector<int32_t> blocks;
  std::vector<int8_t> modes;

  KeyBlockGrads(const Problem& p_, const Transposed& tr_, const Prod& prod_, const std::vector<float>& l2,
                const std::vector<float>& l2lo, const std::vector<float>& dl)
      : p(p_), tr(tr_), prod(prod_), lse2(l2), lse2lo(l2lo), delta(dl) {
    const int64_t bs = p.bs, D = p.D, cb = chunk_blocks(bs) * bs;
    for (auto* x : {&dka, &dva}) x->resize(bs * D);
    for (auto* x : {&st, &dp}) x->resize(bs * cb);
    for (auto* x : {&lb, &lbl, &db}) x->resize(cb);
    dsq.resize(bs * bs);
  }

  // Leaves dK_j, dV_j (fp32, bs x D) in dka, dva.
  void run(int64_t b, int64_t h, int64_t j, float* dqa) {
    const int64_t bs = p.bs, S = p.Sq, chunk = chunk_blocks(bs), t0 = j * bs;
    const int64_t n = key_block_pairs(p, tr, b, h, j, blocks, modes);
    const int32_t* kc = p.kcode_of(b) + t0;
    const int32_t jj = static_cast<int32_t>(j);
    if (n > 0) prod.begin_key(ks, b, h, j);
    std::fill(dka.begin(), dka.end(), 0.f);
    std::fill(dva.begin(), dva.end(), 0.f);
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
      const int64_t nc = std::min(chunk, n - c0), cols = nc * bs;
      for (int64_t c = 0; c < nc; ++c) {  // transposed tiles: rows are this block's keys
        const int64_t i = blocks[c0 + c], rbase = (b * p.H + h) * S + i * bs;
        prod.scores_t(ks, b, h, j, i, st.data() + c * bs, cols);
        prod.dp_t(b, h, j, i, dp.data() + c * bs, cols);
        if (modes[c0 + c] == kPartial) mask_tile(st.data() + c * bs, cols, bs, bs, kc, p.qcode.data() + i * bs);
        std::memcpy(lb.data() + c * bs, lse2.data() + rbase, bs * sizeof(float));
        std::memcpy(lbl.data() + c * bs, lse2lo.data() + rbase, bs * sizeof(float));
        std::memcpy(db.data() + c * bs, delta.data() + rbase, bs * sizeof(float));
      }
      for (int64_t r = 0; r < bs; ++r) row_p_cols(st.data() + r * cols, lb.data(), lbl.data(), cols);
      prod.acc_rows(kDO, b, h, blocks.data() + c0, nc, 1.f, st.data(), cols, dva.data());  // dV += P^T dO
      for (int64_t r = 0; r < bs; ++r) {
        float* sr = st.data() + r * cols;
        const float* pr = dp.data() + r * cols;
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) sr[c] *= pr[c] - db[c];
      }
      prod.acc_rows(kQ, b, h, blocks.data() + c0, nc, p.scale, st.data(), cols, dka.data());  // dK
      for (int64_t c = 0; dqa && c < nc; ++c) {  // dQ_i += dS_ij K_j, dS from its transposed tile
        transpose32<false>(st.data() + c * bs, cols, bs, bs, 1.f, dsq.data(), bs);
        prod.acc_rows(kK, b, h, &jj, 1, 1.f, dsq.data(), bs, dqa + blocks[c0 + c] * bs * p.D);
      }
    }
  }
};

// The backward of every element type and both schemes (see the top of this file). Products from
// Prod; softmax, dS and every accumulator in fp32; T is the element type of the outputs.
template <class Prod, typename T>
void backward_with(const Problem& p, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
              const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk,
              at::Tensor& dv) {
  const int64_t bs = p.bs, D = p.D, nb = p.nq, S = p.Sq;
  const bool fused = use_fused_backward(p);
  const Prod prod(p, q, k, v, dout, fused ? kBackwardFused : kBackwardTwoPass);
  const Bshd<T> O(out, p.tok), dO(dout, p.tok), dQ(dq, p.tok), dK(dk, p.tok), dV(dv, p.tok);
  // Per query row: lse in the log2 domain as hi + lo, and Delta = rowsum(dO * O).
  std::vector<float> lse2(p.B * p.H * S), lse2lo(p.B * p.H * S), delta(p.B * p.H * S);
  row_stats(p, O, dO, lse.data_ptr<float>(), lse2, lse2lo, delta);
  if (p.dlse != nullptr)
    for (size_t r = 0; r < delta.size(); ++r) delta[r] -= p.dlse[r];
  const Transposed tr = transpose_mask(p);
  const auto make = [&] { return KeyBlockGrads<Prod>(p, tr, prod, lse2, lse2lo, delta); };
  if (fused) {
    for_heads_by_cost(p, tr, make, [&](KeyBlockGrads<Prod>& kbg, int64_t b, int64_t h, float* dqa) {
      for (int64_t j = 0; j < p.nk; ++j) {
        kbg.run(b, h, j, dqa);
        store_rows(dK, b, h, j * bs, bs, D, 1.f, kbg.dka.data());
        store_rows(dV, b, h, j * bs, bs, D, 1.f, kbg.dva.data());
      }
      store_rows(dQ, b, h, 0, S, D, p.scale, dqa);
    });
    return;
  }
  // pass 1: dQ, one task per (b, h, query block)
  const int64_t chunk = chunk_blocks(bs);
  over_query_blocks(p, [&](int64_t begin, int64_t end) {
    AVec<float> acc(bs * D), st(bs * chunk * bs), dp(bs * chunk * bs);
    std::vector<int32_t> blocks;
    std::vector<int8_t> modes;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task % nb, h = (task / nb) % p.H, b = task / (nb * p.H);
      const int64_t s0 = i * bs, rbase = (b * p.H + h) * S + s0;
      const int64_t n = active_blocks(p, b, h, i, blocks, modes);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t c0 = 0; c0 < n; c0 += chunk) {
        const int64_t nc = std::min(chunk, n - c0), cols = nc * bs;
        for (int64_t c = 0; c < nc; ++c) {
          const int64_t j = blocks[c0 + c];
          prod.scores(b, h, i, j, st.data() + c * bs, cols);
          prod.dp(b, h, i, j, dp.data() + c * bs, cols);
          if (modes[c0 + c] == kPartial)
            mask_tile(st.data() + c * bs, cols, bs, bs, p.qcode.data() + s0, p.kcode_of(b) + j * bs);
        }
        for (int64_t r = 0; r < bs; ++r)
          row_ds(st.data() + r * cols, dp.data() + r * cols, cols, lse2[rbase + r], lse2lo[rbase + r],
                 delta[rbase + r]);
        prod.acc_rows(kK, b, h, blocks.data() + c0, nc, 1.f, st.data(), cols, acc.data());
      }
      store_rows(dQ, b, h, s0, bs, D, p.scale, acc.data());
    }
  });
  // pass 2: dK and dV, one task per (b, h, key block), walking its query blocks
  over_key_blocks(p, tr, make, [&](KeyBlockGrads<Prod>& kbg, int64_t b, int64_t h, int64_t j) {
    kbg.run(b, h, j, nullptr);
    store_rows(dK, b, h, j * bs, bs, D, 1.f, kbg.dka.data());
    store_rows(dV, b, h, j * bs, bs, D, 1.f, kbg.dva.data());
  });
}

template <class Prod, typename T>
void forward_with(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                  at::Tensor& lse) {
  const Prod prod(p, q, k, v, at::Tensor(), kForward);
  forward_loop<T>(p, prod, out, lse);
}

// KANDINSKY_BSA_CPU_BF16_DOT=0: bf16 through the conversion path; read at every call.
inline bool bf16_products_enabled() {
  const char* e = std::getenv("KANDINSKY_BSA_CPU_BF16_DOT");
  return !(e && std::strcmp(e, "0") == 0);
}

#if KK_AMX
using Bf16Engine = AmxEngine;
#elif KK_BF16_DOT
using Bf16Engine = DotEngine;
#endif

// The entry points of this ISA path (declared in dispatch.cpp): outputs allocated by the caller.
void forward(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
             at::Tensor& lse) {
#if KK_BF16_DOT
  if (q.scalar_type() == at::kBFloat16 && bf16_layout_ok({&q, &k, &v}) && bf16_products_enabled())
    return forward_with<Bf16Products<Bf16Engine>, at::BFloat16>(p, q, k, v, out, lse);
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "bsa_fwd",
                                  [&] { forward_with<Fp32Products<scalar_t>, scalar_t>(p, q, k, v, out, lse); });
}

void backward(const Problem& p, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
#if KK_BF16_DOT
  if (q.scalar_type() == at::kBFloat16 && bf16_layout_ok({&q, &k, &v, &dout}) && bf16_products_enabled())
    return backward_with<Bf16Products<Bf16Engine>, at::BFloat16>(p, dout, q, k, v, out, lse, dq, dk, dv);
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "bsa_bwd", [&] {
    backward_with<Fp32Products<scalar_t>, scalar_t>(p, dout, q, k, v, out, lse, dq, dk, dv);
  });
}

#if KK_AMX
bool ready() { return amx_request_permission(); }
#endif
