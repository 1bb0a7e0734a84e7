// Fused NABLA block mask on CPU: pool -> block softmax -> CDF threshold -> STA union -> compressed rows (ptr, ids).
//
// Phase 1 mean-pools q and k over each block of `block_size` tokens into fp32, streaming every token's
// contiguous H*D row once (the memory-bound part). q lands in (B, H, N, D); k lands transposed in
// (B, H, D, N) so that the logits of a query block against all key blocks vectorise over keys.
// Phase 2 takes a tile of query blocks of one (b, h) per task: logits (sequential fp32 FMA over D, like
// a GEMM micro-kernel), softmax in fp32, then the official "stable sort ascending, cumsum, keep prefix
// >= fp32(1 - thr)" rule without sorting the row: torch's CPU cumsum accumulates in double and rounds
// each prefix to fp32, so a radix select over the fp32 bit pattern with double mass per bin finds the
// first kept entry of the stable order exactly (see topcdf_row). Then the STA row is OR-ed in and the
// compact form (actives ascending, then inactives ascending) is written directly.
// With cu_seqlens (packed videos of whole blocks), key blocks of other videos are masked to -inf before the
// softmax and AND-ed out at the end, so each video's rows equal that video computed alone.
// With token_index (raster-order callers, see attention/common.h) q and k are raster (B, Sr, H, D) and the
// blocks are of positions: block n pools rows token_index[n*bs .. n*bs+bs-1], skipping pads (-1).
// Scratch is thread-local and O(Nk); nothing O(Nq*Nk) is allocated besides the int32 output.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "attention/common.h"
#include "registration.h"

namespace {

constexpr int64_t kRowTile = 8;  // query blocks per task: the k tile read from L2 is reused 8 times

// logits (rows x N) = qrows (rows x D) @ kt (D x N), summed over d in order. The x86-64-v3/v4 clones
// contract each step into one FMA (-ffp-contract=fast), as std::fma did in the -march=native build;
// the baseline clone rounds the product and the sum apart.
KK_CLONES void tile_logits(const float* qrows, const float* kt, int64_t rows, int64_t D, int64_t N, float* logits) {
  std::fill(logits, logits + rows * N, 0.f);
  for (int64_t d = 0; d < D; ++d) {
    const float* kd = kt + d * N;
    for (int64_t r = 0; r < rows; ++r) {
      const float qv = qrows[r * D + d];
      float* l = logits + r * N;
      for (int64_t j = 0; j < N; ++j) l[j] += qv * kd[j];
    }
  }
}

// q and k (B, S, H, D), each token's (H, D) row contiguous -> fp32 means over the valid tokens of each
// block, q into qp (B, H, N, D) and k into kt (B, H, D, N); a block without valid tokens pools to zero.
// One parallel region over (tensor, b, block) tasks. With a token index (S positions), position s reads
// row index[s] of q and k (raster (B, Sr, H, D)); a pad position (-1) is skipped like an invalid token.
template <typename scalar_t>
void pool_blocks(const at::Tensor& q, const at::Tensor& k, const bool* valid, const int64_t* index, int64_t S,
                 int64_t block_size, float* qp, float* kt) {
  const int64_t B = q.size(0), H = q.size(2), D = q.size(3);
  const int64_t N = S / block_size, HD = H * D;
  at::parallel_for(0, 2 * B * N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(HD);
    for (int64_t task = begin; task < end; ++task) {
      const bool is_k = task >= B * N;
      const at::Tensor& x = is_k ? k : q;
      const int64_t b = (task % (B * N)) / N, n = task % N;
      const scalar_t* xb = x.data_ptr<scalar_t>() + b * x.stride(0);
      std::fill(acc.begin(), acc.end(), 0.f);
      int64_t count = 0;
      for (int64_t t = 0; t < block_size; ++t) {
        const int64_t s = n * block_size + t;
        if (valid != nullptr && !valid[b * S + s]) continue;
        const int64_t src = index != nullptr ? index[s] : s;
        if (src < 0) continue;
        ++count;
        const scalar_t* row = xb + src * x.stride(1);
        float* a = acc.data();
        for (int64_t i = 0; i < HD; ++i) a[i] += static_cast<float>(row[i]);
      }
      const float denom = static_cast<float>(std::max<int64_t>(count, 1));
      for (int64_t h = 0; h < H; ++h) {
        const float* a = acc.data() + h * D;
        if (is_k) {
          float* o = kt + (b * H + h) * D * N + n;  // (B, H, D, N)
          for (int64_t d = 0; d < D; ++d) o[d * N] = a[d] / denom;
        } else {
          float* o = qp + ((b * H + h) * N + n) * D;  // (B, H, N, D)
          for (int64_t d = 0; d < D; ++d) o[d] = a[d] / denom;
        }
      }
    }
  });
}

inline uint32_t float_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return u;
}

inline float bits_float(uint32_t u) {
  float v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

// keep[j] = the official CDF rule on one probability row p[0:nk] (non-negative fp32), c = fp32(1 - thr).
// The stable ascending order is the order of (fp32 bits, index); the kept entries are those from the
// first one whose prefix (double sum, rounded to fp32) reaches c. Radix select finds it without sorting:
// 8 bits of the pattern per level, a 256-bin histogram of double mass over the candidates still tied on
// the higher bits, descend into the bin where the rounded prefix crosses c. After the last level the
// candidates share one value and are walked in index order (ties: lower index dropped first).
// `cand` has room for nk indices.
void topcdf_row(const float* p, int64_t nk, float c, uint8_t* keep, int32_t* cand) {
  if (!(c > 0.f)) {  // threshold 1: every prefix is >= 0 >= c
    std::fill(keep, keep + nk, uint8_t{1});
    return;
  }
  int64_t m = nk;
  for (int64_t j = 0; j < nk; ++j) cand[j] = static_cast<int32_t>(j);
  double below = 0.0;  // mass of all entries ordered before the current candidates; fp32(below) < c
  uint32_t value = 0;  // bit pattern of the boundary entry, fixed 8 bits per level
  for (const int shift : {23, 15, 7, 0}) {
    double mass[256] = {0.0};
    int last = -1;  // highest non-empty bin
    for (int64_t i = 0; i < m; ++i) {
      const int bin = (float_bits(p[cand[i]]) >> shift) & 0xFF;
      mass[bin] += p[cand[i]];
      last = std::max(last, bin);
    }
    int bin = 0;
    while (bin < last && static_cast<float>(below + mass[bin]) < c) below += mass[bin++];
    if (shift == 23 && static_cast<float>(below + mass[bin]) < c) {  // total mass rounds below c: none kept
      std::fill(keep, keep + nk, uint8_t{0});
      return;
    }
    // (At deeper levels the last bin is taken even if its rounded prefix falls short: the bins re-sum the
    // parent bin in another order, so this only absorbs a last-bit double-rounding difference.)
    int64_t kept_m = 0;
    for (int64_t i = 0; i < m; ++i) {
      if (static_cast<int>((float_bits(p[cand[i]]) >> shift) & 0xFF) == bin) cand[kept_m++] = cand[i];
    }
    m = kept_m;
    value |= static_cast<uint32_t>(bin) << shift;
  }
  // All candidates equal bits_float(value), in ascending index order.
  const float v = bits_float(value);
  int64_t first = m - 1;
  for (int64_t i = 0; i < m; ++i) {
    below += v;
    if (static_cast<float>(below) >= c) {
      first = i;
      break;
    }
  }
  const int32_t first_index = cand[first];
  for (int64_t j = 0; j < nk; ++j) {
    const uint32_t u = float_bits(p[j]);
    keep[j] = u > value || (u == value && j >= first_index);
  }
}

std::tuple<at::Tensor, at::Tensor> nabla_block_mask_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        double threshold,
                                                        const c10::optional<at::Tensor>& sta,
                                                        int64_t block_size,
                                                        const c10::optional<at::Tensor>& token_valid,
                                                        const c10::optional<at::Tensor>& cu_seqlens,
                                                        const c10::optional<at::Tensor>& token_index) {
  KK_CHECK_CPU(q_in);
  KK_CHECK_CPU(k_in);
  KK_CHECK_DIM(q_in, 4);
  KK_CHECK(q_in.sizes() == k_in.sizes(), "q and k must have the same shape (B, S, H, D), got q ",
           q_in.sizes(), " and k ", k_in.sizes());
  KK_CHECK(q_in.scalar_type() == k_in.scalar_type(), "q and k must have the same dtype, got ",
           q_in.scalar_type(), " and ", k_in.scalar_type());
  const auto dtype = q_in.scalar_type();
  KK_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
           "q and k must be float32, float16 or bfloat16, got ", dtype);
  KK_CHECK(block_size > 0, "block_size must be positive, got ", block_size);
  const int64_t B = q_in.size(0), H = q_in.size(2), D = q_in.size(3);
  // S: the positions pooled into blocks (with token_index its length Sf; q and k then hold Sr raster rows)
  const bool has_index = token_index.has_value() && token_index->defined();
  const int64_t* index = has_index ? kk::attn::checked_token_index(*token_index, q_in.size(1), block_size,
                                                                    q_in.device(), "nabla_block_mask")
                                   : nullptr;
  const int64_t S = has_index ? token_index->numel() : q_in.size(1);
  KK_CHECK(S % block_size == 0, "sequence length S=", S, " must be a multiple of block_size=", block_size);
  KK_CHECK(B > 0 && S > 0 && H > 0 && D > 0, "q and k must be non-empty, got shape ", q_in.sizes());
  KK_CHECK(threshold > 0.0 && threshold <= 1.0, "threshold must lie in (0, 1], got ", threshold);
  const int64_t N = S / block_size;
  at::Tensor sta_c;
  if (sta.has_value()) {
    KK_CHECK_CPU(*sta);
    KK_CHECK(sta->scalar_type() == at::kBool && sta->dim() == 2 && sta->size(0) == N && sta->size(1) == N,
             "sta must be a bool (", N, ", ", N, ") block mask, got ", sta->scalar_type(), " ", sta->sizes());
    sta_c = sta->contiguous();
  }
  at::Tensor valid_c;
  if (token_valid.has_value()) {
    KK_CHECK_CPU(*token_valid);
    const at::Tensor& tv = *token_valid;
    KK_CHECK(tv.scalar_type() == at::kBool && tv.dim() == 2 && tv.size(0) == B && tv.size(1) == S,
             "token_valid must be a bool (B, S) = (", B, ", ", S, ") tensor, got ", tv.scalar_type(), " ",
             tv.sizes());
    valid_c = token_valid->contiguous();
  }
  // Packed videos: every offset is checked before any is used. seg[n] is the video of block n, -1 past the
  // end; pooling never crosses a video (offsets are whole blocks), the softmax and the CDF rule see only
  // the row's own video and the final mask is AND-ed with "same video".
  std::vector<int32_t> seg;
  if (cu_seqlens.has_value() && cu_seqlens->defined()) {
    const at::Tensor cu = kk::checked_cu_seqlens(*cu_seqlens, B, S);
    const int32_t* c = cu.data_ptr<int32_t>();
    const int64_t n = cu.size(0) - 1;
    for (int64_t v = 0; v <= n; ++v)
      KK_CHECK(c[v] % block_size == 0, "cu_seqlens[", v, "]=", c[v], " is not a multiple of block_size=",
               block_size, ": nabla_block_mask needs videos of whole blocks");
    seg.assign(N, -1);
    for (int64_t v = 0; v < n; ++v) {
      for (int64_t blk = c[v] / block_size; blk < c[v + 1] / block_size; ++blk) {
        seg[blk] = static_cast<int32_t>(v);
      }
    }
  }
  const int32_t* seg_p = seg.empty() ? nullptr : seg.data();
  // Pooling reads each token's (H, D) row as one contiguous run; other layouts are copied once.
  const auto rows_contiguous = [&](const at::Tensor& x) { return x.stride(3) == 1 && x.stride(2) == D; };
  const at::Tensor q = rows_contiguous(q_in) ? q_in : q_in.contiguous();
  const at::Tensor k = rows_contiguous(k_in) ? k_in : k_in.contiguous();

  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor qp = at::empty({B, H, N, D}, f32);
  at::Tensor kt = at::empty({B, H, D, N}, f32);
  const bool* valid = valid_c.defined() ? valid_c.data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nabla_pool", [&] {
    pool_blocks<scalar_t>(q, k, valid, index, S, block_size, qp.data_ptr<float>(), kt.data_ptr<float>());
  });

  kk::checked_product("nabla_block_mask: mask size B * H * N * N", {B, H, N, N});
  // Compressed rows: each task keeps its rows' active ids, then they are laid out in row order, so the
  // mask takes memory in proportion to its active blocks (no (N, N) table).
  std::vector<int64_t> count(B * H * N, 0);
  const float c = static_cast<float>(1.0 - threshold);  // torch compares the fp32 prefix with fp32(1 - thr)
  const float sqrt_d = static_cast<float>(std::sqrt(static_cast<double>(D)));
  const bool* sta_p = sta_c.defined() ? sta_c.data_ptr<bool>() : nullptr;
  const float* qp_p = qp.data_ptr<float>();
  const float* kt_p = kt.data_ptr<float>();
  const int64_t tiles = (N + kRowTile - 1) / kRowTile;
  std::vector<std::vector<int32_t>> task_ids(B * H * tiles);
  // The first (b, h, query block) whose block logits are not finite (NaN / inf in q or k, or means so
  // large that q.k overflows fp32): the CDF rule has no meaning there, so the op raises.
  std::atomic<int64_t> bad_row{-1};

  at::parallel_for(0, B * H * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> logits(kRowTile * N);
    std::vector<int32_t> cand(N);
    std::vector<uint8_t> keep(N);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / tiles, i0 = (task % tiles) * kRowTile, rows = std::min(kRowTile, N - i0);
      const float* qrows = qp_p + (bh * N + i0) * D;
      const float* kbh = kt_p + bh * D * N;
      tile_logits(qrows, kbh, rows, D, N, logits.data());
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        float* p = logits.data() + r * N;
        const int32_t si = seg_p != nullptr ? seg_p[i] : 0;
        if (si < 0) continue;  // a query block past cu_seqlens[-1] belongs to no video: no active block
        // softmax(logits / sqrt(D)) in fp32, normalised as exp * (1 / sum) like torch's CPU softmax.
        float mx = -std::numeric_limits<float>::infinity();
        if (seg_p == nullptr) {
          for (int64_t j = 0; j < N; ++j) {
            p[j] /= sqrt_d;
            mx = std::max(mx, p[j]);
          }
        } else {  // key blocks of other videos get probability exactly 0 (exp(-inf)), as if absent
          for (int64_t j = 0; j < N; ++j) {
            p[j] = seg_p[j] == si ? p[j] / sqrt_d : -std::numeric_limits<float>::infinity();
            mx = std::max(mx, p[j]);
          }
        }
        float sum = 0.f;
        for (int64_t j = 0; j < N; ++j) {
          p[j] = std::exp(p[j] - mx);
          sum += p[j];
        }
        if (!std::isfinite(sum)) {  // a NaN logit or an inf one (inf - inf) makes the sum NaN
          int64_t none = -1;
          bad_row.compare_exchange_strong(none, bh * N + i);
          continue;
        }
        const float inv = 1.f / sum;
        for (int64_t j = 0; j < N; ++j) p[j] *= inv;
        topcdf_row(p, N, c, keep.data(), cand.data());
        if (sta_p != nullptr) {
          const bool* srow = sta_p + i * N;
          for (int64_t j = 0; j < N; ++j) keep[j] |= static_cast<uint8_t>(srow[j]);
        }
        if (seg_p != nullptr) {  // never a block of another video (threshold 1 and the STA would add them)
          for (int64_t j = 0; j < N; ++j) keep[j] &= static_cast<uint8_t>(seg_p[j] == si);
        }
        std::vector<int32_t>& ids = task_ids[task];
        const size_t before = ids.size();
        for (int64_t j = 0; j < N; ++j)
          if (keep[j]) ids.push_back(static_cast<int32_t>(j));
        count[bh * N + i] = static_cast<int64_t>(ids.size() - before);
      }
    }
  });
  const int64_t bad = bad_row.load();
  KK_CHECK(bad < 0, "nabla_block_mask needs finite block logits, but query block ", bad % N, " of (b=", bad / N / H,
           ", h=", bad / N % H, ") has a NaN or inf logit: q or k holds NaN/inf, or values so large that "
           "the pooled q.k overflows fp32");
  at::Tensor ptr = at::empty({B, H, N + 1}, q.options().dtype(at::kLong));
  int64_t* pp = ptr.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t bh = 0; bh < B * H; ++bh) {
    for (int64_t i = 0; i < N; ++i) {
      pp[bh * (N + 1) + i] = total;
      total += count[bh * N + i];
    }
    pp[bh * (N + 1) + N] = total;
  }
  const bool ids16 = N <= 32768;
  at::Tensor cols = at::empty({total}, q.options().dtype(ids16 ? at::kShort : at::kInt));
  at::parallel_for(0, B * H * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / tiles, i0 = (task % tiles) * kRowTile;
      const std::vector<int32_t>& ids = task_ids[task];
      const int64_t at0 = pp[bh * (N + 1) + i0];
      if (ids16) {
        int16_t* o = cols.data_ptr<int16_t>() + at0;
        for (size_t t = 0; t < ids.size(); ++t) o[t] = static_cast<int16_t>(ids[t]);
      } else {
        std::copy(ids.begin(), ids.end(), cols.data_ptr<int32_t>() + at0);
      }
    }
  });
  return {ptr, cols};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kandinsky_kernels_C, m) {
  m.def(
      "nabla_block_mask(Tensor q, Tensor k, float threshold, Tensor? sta, int block_size, "
      "Tensor? token_valid, Tensor? cu_seqlens=None, Tensor? token_index=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kandinsky_kernels_C, CPU, m) { m.impl("nabla_block_mask", &nabla_block_mask_cpu); }
