// The attention problem from the op's arguments, checked before any kernel reads it; the schedule
// choices every ISA path shares; the packed-panel buffer cache.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../registration.h"
#include "common.h"

namespace kk::attn {

namespace {
struct PanelCache {
  std::mutex mu;
  std::deque<std::pair<void*, size_t>> free;  // oldest first
  size_t held = 0;
  size_t limit = [] {
    const char* env = std::getenv("KANDINSKY_CPU_PANEL_CACHE_MB");
    return (env && *env ? static_cast<size_t>(std::strtoull(env, nullptr, 10)) : size_t(256)) << 20;
  }();
};

PanelCache& panel_cache() {
  static PanelCache* cache = new PanelCache;  // never destroyed: buffers may be released at exit
  return *cache;
}

constexpr size_t kHugePage = size_t(2) << 20;
}  // namespace

void* panel_acquire(size_t bytes, size_t* capacity) {
  PanelCache& c = panel_cache();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    auto best = c.free.end();
    for (auto it = c.free.begin(); it != c.free.end(); ++it)
      if (it->second >= bytes && it->second / 2 <= bytes && (best == c.free.end() || it->second < best->second))
        best = it;
    if (best != c.free.end()) {
      void* ptr = best->first;
      *capacity = best->second;
      c.held -= best->second;
      c.free.erase(best);
      return ptr;
    }
  }
  const size_t len = (std::max<size_t>(bytes, 1) + kHugePage - 1) / kHugePage * kHugePage;
  void* ptr = std::aligned_alloc(kHugePage, len);
  if (!ptr) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  madvise(ptr, len, MADV_HUGEPAGE);  // THP "madvise" mode; a no-op where THP is off
#endif
  *capacity = len;
  return ptr;
}

void panel_release(void* ptr, size_t capacity) {
  PanelCache& c = panel_cache();
  std::vector<void*> drop;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    if (capacity > c.limit) {
      drop.push_back(ptr);
    } else {
      c.free.emplace_back(ptr, capacity);
      c.held += capacity;
      while (c.held > c.limit) {
        drop.push_back(c.free.front().first);
        c.held -= c.free.front().second;
        c.free.pop_front();
      }
    }
  }
  for (void* q : drop) std::free(q);
}

namespace {
template <typename T>
void check_csr_cols(const int64_t* ptr, const T* cols, int64_t heads, int64_t rows, int64_t ncols, const char* name) {
  // `seen[j] == r + 1` marks id j as used in row r without clearing between rows.
  std::vector<int64_t> seen(ncols, 0);
  for (int64_t hd = 0; hd < heads; ++hd)
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t r = hd * (rows + 1) + i;
      for (int64_t s = ptr[r]; s < ptr[r + 1]; ++s) {
        const int64_t j = cols[s];
        KK_CHECK(j >= 0 && j < ncols, name, ": block ids must lie in [0, ", ncols, "), got ", j, " in row ", i,
                 " of head ", hd);
        KK_CHECK(seen[j] != r + 1, name, ": block ", j, " appears twice in row ", i, " of head ", hd,
                 " (each block may appear once a row)");
        seen[j] = r + 1;
      }
    }
}

const char* kCsrLayout = "int64 (Bm, Hm, rows + 1) row pointers and int16/int32 (nnz,) block ids";
}  // namespace

void check_csr(const at::Tensor& ptr, const at::Tensor& cols, int64_t rows, int64_t ncols, const char* name) {
  KK_CHECK(ptr.device().is_cpu() && cols.device().is_cpu(), name, " must be on the CPU, got ", ptr.device(),
           " and ", cols.device());
  KK_CHECK(ptr.scalar_type() == at::kLong && ptr.dim() == 3 && ptr.size(2) == rows + 1 && ptr.is_contiguous(),
           name, " must be ", kCsrLayout, " with rows = ", rows, ": got pointers ", ptr.scalar_type(), " ",
           ptr.sizes(), ptr.is_contiguous() ? "" : " (not contiguous)");
  KK_CHECK((cols.scalar_type() == at::kShort || cols.scalar_type() == at::kInt) && cols.dim() == 1 &&
               cols.is_contiguous(),
           name, " must be ", kCsrLayout, ": got block ids ", cols.scalar_type(), " ", cols.sizes());
  KK_CHECK(cols.scalar_type() == at::kInt || ncols <= 32768, name, " has ", ncols,
           " blocks a row, too many for int16 block ids: use int32");
  const int64_t heads = ptr.size(0) * ptr.size(1);
  const int64_t* p = ptr.data_ptr<int64_t>();
  int64_t prev = 0;
  for (int64_t hd = 0; hd < heads; ++hd)
    for (int64_t i = 0; i <= rows; ++i) {
      const int64_t x = p[hd * (rows + 1) + i];
      // the first pointer of a head repeats the last of the one before
      KK_CHECK(i == 0 ? x == prev : (x >= prev && x - prev <= ncols), name, ": row pointers must start at 0, "
               "each head's first equal the previous head's last, and grow by 0..", ncols, " a row; got ", x,
               " after ", prev, " at (head ", hd, ", ", i, ")");
      prev = x;
    }
  // ids past the last pointer are unused capacity (a compiled graph's fixed-size mask carries some)
  KK_CHECK(prev <= cols.numel(), name, ": row pointers end at ", prev, " but there are only ", cols.numel(),
           " block ids");
  if (cols.scalar_type() == at::kShort)
    check_csr_cols(p, cols.data_ptr<int16_t>(), heads, rows, ncols, name);
  else
    check_csr_cols(p, cols.data_ptr<int32_t>(), heads, rows, ncols, name);
}

namespace {
template <typename In, typename Out>
void transpose_into(const int64_t* ptr, const In* cols, int64_t heads, int64_t rows, int64_t ncols, int64_t* tptr,
                    Out* tcols) {
  // counting sort, head by head: counts per column, prefix sums, then rows in ascending order
  for (int64_t hd = 0; hd < heads; ++hd) {
    const int64_t* hp = ptr + hd * (rows + 1);
    int64_t* tp = tptr + hd * (ncols + 1);
    std::fill(tp, tp + ncols + 1, 0);
    for (int64_t s = hp[0]; s < hp[rows]; ++s) ++tp[cols[s] + 1];
    tp[0] = hp[0];
    for (int64_t j = 0; j < ncols; ++j) tp[j + 1] += tp[j];
    std::vector<int64_t> fill(tp, tp + ncols);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t s = hp[i]; s < hp[i + 1]; ++s) tcols[fill[cols[s]]++] = static_cast<Out>(i);
  }
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> csr_transpose(const at::Tensor& ptr, const at::Tensor& cols, int64_t ncols) {
  KK_CHECK(ptr.dim() == 3, "the mask's row pointers must be (Bm, Hm, rows + 1), got ", ptr.sizes());
  KK_CHECK(ncols >= 0, "the number of key blocks must be >= 0, got ", ncols);
  const int64_t rows = ptr.size(2) - 1;
  check_csr(ptr, cols, rows, ncols, "the mask");
  const int64_t heads = ptr.size(0) * ptr.size(1);
  at::Tensor tptr = at::empty({ptr.size(0), ptr.size(1), ncols + 1}, ptr.options());
  const bool out16 = rows <= 32768;
  // the same length as the input (capacity included), so its size is known before it runs
  at::Tensor tcols = at::zeros({cols.numel()}, cols.options().dtype(out16 ? at::kShort : at::kInt));
  const int64_t* p = ptr.data_ptr<int64_t>();
  int64_t* tp = tptr.data_ptr<int64_t>();
  const auto run = [&](auto* out) {
    if (cols.scalar_type() == at::kShort)
      transpose_into(p, cols.data_ptr<int16_t>(), heads, rows, ncols, tp, out);
    else
      transpose_into(p, cols.data_ptr<int32_t>(), heads, rows, ncols, tp, out);
  };
  if (out16)
    run(tcols.data_ptr<int16_t>());
  else
    run(tcols.data_ptr<int32_t>());
  return {tptr, tcols};
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& kv_ptr,
                     const at::Tensor& kv_cols, int64_t block_size, double scale,
                     const std::optional<at::Tensor>& token_valid, const std::optional<at::Tensor>& cu_seqlens,
                     const std::optional<at::Tensor>& token_index) {
  Problem p;
  p.B = q.size(0);
  p.Sq = q.size(1);
  p.Sk = k.size(1);
  p.Sr = p.Sq;
  const bool has_index = token_index.has_value() && token_index->defined();
  int64_t index_pads = 0;
  if (has_index) {  // raster rows (Sr) read through the index: the kernels see Sf positions on both sides
    KK_CHECK(block_size > 0, "block_size must be positive, got ", block_size);
    p.tok = checked_token_index(*token_index, p.Sr, block_size, q.device(), "bsa");
    p.Sq = p.Sk = token_index->numel();
    index_pads = p.Sq - p.Sr;
  }
  p.H = q.size(2);
  p.D = q.size(3);
  p.bs = block_size;
  KK_CHECK(block_size > 0 && p.Sq % block_size == 0 && p.Sk % block_size == 0, "Sq=", p.Sq, " and Sk=", p.Sk,
           " must be multiples of block_size=", block_size);
  p.nq = p.Sq / block_size;
  p.nk = p.Sk / block_size;
  KK_CHECK(p.D > 0 && p.D % 16 == 0 && block_size % 16 == 0, "head dim D=", p.D, " and block_size=",
           block_size, " must be positive multiples of 16");
  if (token_valid.has_value() && token_valid->defined()) KK_CHECK_CPU(*token_valid);
  if (cu_seqlens.has_value() && cu_seqlens->defined()) KK_CHECK_CPU(*cu_seqlens);
  KK_CHECK(kv_ptr.dim() == 3, "the mask's row pointers must be (Bm, Hm, Nq + 1), got ", kv_ptr.sizes());
  p.Bm = kv_ptr.size(0);
  p.Hm = kv_ptr.size(1);
  KK_CHECK((p.Bm == 1 || p.Bm == p.B) && (p.Hm == 1 || p.Hm == p.H) && kv_ptr.size(2) == p.nq + 1,
           "mask row pointers ", kv_ptr.sizes(), " do not fit B=", p.B, " H=", p.H, " query blocks=", p.nq);
  // Every index is read by the kernels, so the whole mask is checked first, in O(active blocks).
  check_csr(kv_ptr, kv_cols, p.nq, p.nk, "the mask");
  p.kv_ptr = kv_ptr.data_ptr<int64_t>();
  p.kv_cols = kv_cols.data_ptr();
  p.kv_cols16 = kv_cols.scalar_type() == at::kShort;
  KK_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  p.scale = static_cast<float>(scale);

  const bool has_tv = token_valid.has_value() && token_valid->defined();
  const bool has_cu = cu_seqlens.has_value() && cu_seqlens->defined();
  // pad positions of the index are pad keys: per-element tests, as with token_valid
  p.per_element = has_tv || has_cu || index_pads > 0;
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
      p.kcode[b * p.Sk + t] = (c < 0 || (v && !v[t]) || (p.tok && p.tok[t] < 0)) ? -3 : c;
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

const int64_t* checked_token_index(const at::Tensor& idx, int64_t Sr, int64_t block_size, const at::Device& device,
                                   const char* op) {
  KK_CHECK(idx.device() == device, op, ": token_index must be on q's device ", device, ", got ", idx.device());
  KK_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 1 && idx.is_contiguous(), op,
           ": token_index must be a contiguous int64 (Sf,) tensor, got ", idx.scalar_type(), " ", idx.sizes(),
           idx.is_contiguous() ? "" : " (not contiguous)");
  const int64_t Sf = idx.numel();
  KK_CHECK(Sf % block_size == 0 && Sf >= Sr, op, ": token_index has ", Sf, " positions; expected a multiple of "
           "block_size=", block_size, " holding every one of the ", Sr, " rows of q");
  const int64_t* t = idx.data_ptr<int64_t>();
  std::vector<int64_t> at_pos(Sr, -1);  // the position holding each row
  int64_t rows = 0;
  for (int64_t s = 0; s < Sf; ++s) {
    const int64_t r = t[s];
    if (r == -1) continue;
    KK_CHECK(r >= 0 && r < Sr, op, ": token_index[", s, "]=", r, " is out of range; expected -1 (pad) or a row "
             "in [0, ", Sr, ")");
    KK_CHECK(at_pos[r] < 0, op, ": token_index holds row ", r, " twice (positions ", at_pos[r], " and ", s,
             "); expected every row of q exactly once");
    at_pos[r] = s;
    ++rows;
  }
  if (rows != Sr) {
    const int64_t missing = std::find(at_pos.begin(), at_pos.end(), int64_t{-1}) - at_pos.begin();
    KK_CHECK(false, op, ": token_index misses row ", missing, " (", Sr - rows, " of the ", Sr,
             " rows of q missing); expected every row exactly once");
  }
  return t;
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool raster) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    KK_CHECK_CPU(*t);
    KK_CHECK_DIM(*t, 4);
    KK_CHECK(t->scalar_type() == q.scalar_type(), "q, k, v must share one dtype");
    KK_CHECK(t->stride(3) == 1, "the head dim of q, k, v must have unit stride");
  }
  KK_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3),
           "q must be (B, Sq, H, D) and k, v (B, Sk, H, D), got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  KK_CHECK(!raster || k.size(1) == q.size(1), "with token_index (self-attention on raster rows) q, k, v must "
           "have the same number of rows Sr, got q ", q.sizes(), " and k, v ", k.sizes());
}

void check_like_q(const at::Tensor& q, const at::Tensor& t, const char* name) {
  KK_CHECK_CPU(t);
  KK_CHECK(t.sizes() == q.sizes() && t.scalar_type() == q.scalar_type() && t.stride(3) == 1, name,
           " must have q's shape ", q.sizes(), " and dtype with unit stride on D, got ", t.sizes());
}



void set_transposed(Problem& p, const at::Tensor& q_ptr, const at::Tensor& q_cols) {
  KK_CHECK(q_ptr.dim() == 3 && q_ptr.size(0) == p.Bm && q_ptr.size(1) == p.Hm && q_ptr.size(2) == p.nk + 1,
           "the transposed mask's row pointers must be (Bm, Hm, Nk + 1) = (", p.Bm, ", ", p.Hm, ", ", p.nk + 1,
           "), got ", q_ptr.sizes());
  check_csr(q_ptr, q_cols, p.nk, p.nq, "the transposed mask");
  const int64_t nnz = p.kv_ptr[p.Bm * p.Hm * (p.nq + 1) - 1];
  const int64_t tnnz = q_ptr.data_ptr<int64_t>()[p.Bm * p.Hm * (p.nk + 1) - 1];
  KK_CHECK(tnnz == nnz, "the transposed mask holds ", tnnz, " blocks, the mask ", nnz);
  // Each key block's count must match the mask's (O(nnz)); the transpose comes from bsa_mask_transpose.
  std::vector<int64_t> count(p.nk);
  const int64_t* tp = q_ptr.data_ptr<int64_t>();
  for (int64_t hd = 0; hd < p.Bm * p.Hm; ++hd) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t s = p.kv_ptr[hd * (p.nq + 1)]; s < p.kv_ptr[hd * (p.nq + 1) + p.nq]; ++s) ++count[p.kv_col(s)];
    for (int64_t j = 0; j < p.nk; ++j)
      KK_CHECK(tp[hd * (p.nk + 1) + j + 1] - tp[hd * (p.nk + 1) + j] == count[j], "the transposed mask is not the "
               "transpose of the mask (key block ", j, " of head ", hd, ")");
  }
  p.q_ptr = tp;
  p.q_cols = q_cols.data_ptr();
  p.q_cols16 = q_cols.scalar_type() == at::kShort;
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
