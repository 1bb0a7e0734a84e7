// The attention problem from the op's arguments, checked before any kernel reads it; the schedule
// choices every ISA path shares.
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "../registration.h"
#include "common.h"

namespace kk::attn {

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& kv_num_blocks,
                     const at::Tensor& kv_indices, int64_t block_size, double scale,
                     const std::optional<at::Tensor>& token_valid, const std::optional<at::Tensor>& cu_seqlens) {
  Problem p;
  p.B = q.size(0);
  p.Sq = q.size(1);
  p.Sk = k.size(1);
  p.H = q.size(2);
  p.D = q.size(3);
  p.bs = block_size;
  KK_CHECK(block_size > 0 && p.Sq % block_size == 0 && p.Sk % block_size == 0, "Sq=", p.Sq, " and Sk=", p.Sk,
           " must be multiples of block_size=", block_size);
  p.nq = p.Sq / block_size;
  p.nk = p.Sk / block_size;
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
  KK_CHECK((p.Bm == 1 || p.Bm == p.B) && (p.Hm == 1 || p.Hm == p.H) && kv_indices.size(2) == p.nq &&
               kv_indices.size(3) == p.nk && kv_num_blocks.sizes() == kv_indices.sizes().slice(0, 3),
           "mask shape ", kv_indices.sizes(), " does not fit B=", p.B, " H=", p.H, " query blocks=", p.nq,
           " key blocks=", p.nk);
  KK_CHECK(kv_num_blocks.is_contiguous() && kv_indices.is_contiguous(), "mask tensors must be contiguous");
  p.kv_num = kv_num_blocks.data_ptr<int32_t>();
  p.kv_idx = kv_indices.data_ptr<int32_t>();
  // Every index is read by the kernels, so the whole active part is checked first, in O(active
  // blocks): counts in range, ids in range and no id twice in a row (a repeat would count its block
  // twice). `seen[j] == row + 1` marks id j as used in this row without clearing between rows.
  {
    std::vector<int64_t> seen(p.nk, 0);
    for (int64_t row = 0; row < p.Bm * p.Hm * p.nq; ++row) {
      const int32_t n = p.kv_num[row];
      KK_CHECK(n >= 0 && n <= p.nk, "kv_num_blocks must lie in [0, Nk=", p.nk, "], got ", n,
               " at flat index ", row);
      for (int32_t t = 0; t < n; ++t) {
        const int32_t j = p.kv_idx[row * p.nk + t];
        KK_CHECK(j >= 0 && j < p.nk, "kv_indices must lie in [0, Nk=", p.nk, ") in the first kv_num_blocks "
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
    KK_CHECK(tv.scalar_type() == at::kBool && tv.dim() == 2 && tv.size(1) == p.Sk &&
                 (tv.size(0) == 1 || tv.size(0) == p.B),
             "token_valid must be bool (1 or B, Sk), got ", tv.scalar_type(), " ", tv.sizes());
  }
  p.Bt = has_tv ? tv.size(0) : 1;
  p.qcode.assign(p.Sq, 0);
  std::vector<int32_t> kseg(p.Sk, 0);  // segment of each key token (all 0 without cu_seqlens)
  if (has_cu) {
    // (n+1,): queries and keys packed alike (Sq == Sk); (2, n+1): query offsets, then key offsets
    const at::Tensor& all = *cu_seqlens;
    const bool pair = all.dim() == 2;
    KK_CHECK(!pair || (all.size(0) == 2 && all.size(1) >= 2), "per-side cu_seqlens must be int32 (2, n+1), got ",
             all.sizes());
    KK_CHECK(pair || p.Sq == p.Sk, "cu_seqlens packs self-attention and needs Sq == Sk, got Sq=", p.Sq, " Sk=",
             p.Sk);
    auto segments = [&](const at::Tensor& offsets, int64_t S, std::vector<int32_t>& code) {
      const at::Tensor cu = kk::checked_cu_seqlens(offsets, p.B, S);
      const int32_t* c = cu.data_ptr<int32_t>();
      std::fill(code.begin(), code.end(), -4);
      for (int64_t seg = 0; seg + 1 < cu.size(0); ++seg)
        for (int64_t t = c[seg]; t < c[seg + 1]; ++t) code[t] = static_cast<int32_t>(seg);
    };
    segments(pair ? all[0] : all, p.Sq, p.qcode);
    segments(pair ? all[1] : all, p.Sk, kseg);
  }
  p.kcode.resize(p.Bt * p.Sk);
  for (int64_t b = 0; b < p.Bt; ++b) {
    const bool* v = has_tv ? tv.data_ptr<bool>() + b * p.Sk : nullptr;
    for (int64_t t = 0; t < p.Sk; ++t) {
      const int32_t c = kseg[t];
      p.kcode[b * p.Sk + t] = (c < 0 || (v && !v[t])) ? -3 : c;
    }
  }
  auto block_code = [&](const int32_t* codes, int64_t j) {
    const int32_t c0 = codes[j * p.bs];
    for (int64_t t = 1; t < p.bs; ++t)
      if (codes[j * p.bs + t] != c0) return -2;
    return c0;
  };
  p.qblk.resize(p.nq);
  p.kblk.resize(p.Bt * p.nk);
  for (int64_t i = 0; i < p.nq; ++i) p.qblk[i] = block_code(p.qcode.data(), i);
  for (int64_t b = 0; b < p.Bt; ++b)
    for (int64_t j = 0; j < p.nk; ++j) p.kblk[b * p.nk + j] = block_code(p.kcode.data() + b * p.Sk, j);
  return p;
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    KK_CHECK_CPU(*t);
    KK_CHECK_DIM(*t, 4);
    KK_CHECK(t->scalar_type() == q.scalar_type(), "q, k, v must share one dtype");
    KK_CHECK(t->stride(3) == 1, "the head dim of q, k, v must have unit stride");
  }
  KK_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3),
           "q must be (B, Sq, H, D) and k, v (B, Sk, H, D), got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
}

void check_like_q(const at::Tensor& q, const at::Tensor& t, const char* name) {
  KK_CHECK_CPU(t);
  KK_CHECK(t.sizes() == q.sizes() && t.scalar_type() == q.scalar_type() && t.stride(3) == 1, name,
           " must have q's shape ", q.sizes(), " and dtype with unit stride on D, got ", t.sizes());
}



Transposed transpose_mask(const Problem& p) {
  Transposed t;
  const int64_t rows = p.Bm * p.Hm * p.nk;
  std::vector<int32_t> count(rows, 0);
  for (int64_t bh = 0; bh < p.Bm * p.Hm; ++bh)
    for (int64_t i = 0; i < p.nq; ++i) {
      const int64_t row = bh * p.nq + i;
      for (int32_t s = 0; s < p.kv_num[row]; ++s) ++count[bh * p.nk + p.kv_idx[row * p.nk + s]];
    }
  t.off.assign(rows + 1, 0);
  for (int64_t r = 0; r < rows; ++r) t.off[r + 1] = t.off[r] + count[r];
  t.idx.resize(t.off[rows]);
  std::vector<int32_t> fill(t.off.begin(), t.off.end() - 1);
  for (int64_t bh = 0; bh < p.Bm * p.Hm; ++bh)
    for (int64_t i = 0; i < p.nq; ++i) {
      const int64_t row = bh * p.nq + i;
      for (int32_t s = 0; s < p.kv_num[row]; ++s)
        t.idx[fill[bh * p.nk + p.kv_idx[row * p.nk + s]]++] = static_cast<int32_t>(i);
    }
  return t;
}

// The two-pass scheme's dK/dV pass: the (b, h, key block) tasks shared out by their number of query

bool use_fused_backward(const Problem& p) {
  if (const char* e = std::getenv("KANDINSKY_BSA_CPU_BWD")) {
    if (std::strcmp(e, "fused") == 0) return true;
    if (std::strcmp(e, "two_pass") == 0) return false;
  }
  const int64_t n = p.B * p.H, t = at::get_num_threads();
  return n >= t && 4 * ((n + t - 1) / t) * t <= 5 * n;
}

}  // namespace kk::attn
