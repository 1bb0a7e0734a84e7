// Block-sparse attention on the CPU: what every ISA path shares (compiled once, no ISA flags).
//
// Layout: q, k, v, out (B, S, H, D) with any strides except a unit stride on D; lse (B, H, S) fp32,
// natural log, -inf for a query row that sees no key. Mask (BlockSparseMask), compressed rows: kv_ptr
// int64 (Bm, Hm, Nq + 1), row i of (bm, hm) holding the key-block ids kv_cols[kv_ptr[bm, hm, i] ..
// kv_ptr[bm, hm, i + 1]) of kv_cols int16 or int32 (nnz,), with Bm in {1, B}, Hm in {1, H} (broadcast);
// the backward also takes its transpose (q_ptr (Bm, Hm, Nk + 1), q_cols: query-block ids). Optional token_valid
// (Bt, S) bool with Bt in {1, B} (False = pad key) and cu_seqlens int32 (n+1,) (packed videos, B == 1).
// Optional token_index int64 (Sf,) (raster-order callers): position s of the sequence the kernels walk
// reads row token_index[s] of q, k, v (dout, out) and writes out (dq, dk, dv) there; -1 is a pad position
// (reads zeros, written nowhere, a pad key). Then q, k, v, out, ... are raster (B, Sr, H, D) and every
// other argument (mask, token_valid, cu_seqlens, lse) is in positions: S = Sf. Rows are looked up in
// Bshd (kernels.h), so only the packing copies see the index; the kernels read packed blocks.
//
// Files: common.h / problem.cpp (this: the problem, its checks, the schedules), dispatch.cpp (the ops
// and the choice of ISA path), kernels.h (forward and backward over a product policy), simd.h (vector
// row kernels, transposes), gemm.h (register-blocked block products), amx_gemm.h (AMX tiles), and
// one isa_<name>.cpp per ISA path, which compiles kernels.h for that ISA in its own namespace.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "../registration.h"

namespace kk::attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr double kLn2d = 0.6931471805599453, kLog2ed = 1.4426950408889634;
constexpr float kInf = std::numeric_limits<float>::infinity();

// Key (or query) blocks whose scores are softmaxed together: ~512 columns, few online rescales.
inline int64_t chunk_blocks(int64_t bs) { return std::max<int64_t>(1, 512 / bs); }
constexpr int64_t kMaxChunk = 32;  // chunk_blocks() for the smallest block size (16)

enum PairMode : int8_t { kSkip = 0, kFull = 1, kPartial = 2 };

// Everything about the problem except the data pointers.
struct Problem {
  int64_t B, Sq, Sk, H, D, bs, nq, nk;  // query / key tokens and blocks (Sq = nq * bs, Sk = nk * bs)
  // token_index (checked, Sq = Sk = Sf entries) or null; Sr: the raster rows of q, k, v (= Sq without it)
  const int64_t* tok = nullptr;
  int64_t Sr = 0;
  int64_t Bm, Hm, Bt;          // mask batch/heads and token_valid batch (1 = broadcast)
  float scale;
  // The mask, compressed rows (checked by make_problem): row r = mask_row(b, h, i) spans
  // [kv_ptr[r], kv_ptr[r + 1]) of kv_cols (int16 where kv_cols16, else int32).
  const int64_t* kv_ptr;
  const void* kv_cols;
  bool kv_cols16;
  // Backward only: its transpose (rows mask_row_t), set by set_transposed.
  const int64_t* q_ptr = nullptr;
  const void* q_cols = nullptr;
  bool q_cols16 = false;
  // Per-token codes: a query row attends key column only where qcode == kcode. qcode: segment id, or
  // -4 beyond cu_seqlens[-1]; kcode (Bt, Sk): segment id, or -3 for a pad / beyond-the-end key.
  std::vector<int32_t> qcode, kcode;
  // Per-block codes: the common token code of the block, or -2 when its tokens differ.
  std::vector<int32_t> qblk, kblk;  // (nq), (Bt, nk)
  bool per_element;                 // false: no cu_seqlens and no token_valid, every pair is full
  // Backward only: the gradient of the returned lse, fp32 (B, H, Sq), or null. d lse_i / d s_ij = P_ij,
  // so it enters as Delta_i - dlse_i in dS = P * (dP - Delta).
  const float* dlse = nullptr;

  // Index into kv_ptr of query block i's row: its entries are [kv_ptr[r], kv_ptr[r + 1]).
  int64_t mask_row(int64_t b, int64_t h, int64_t i) const {
    return ((Bm == 1 ? 0 : b) * Hm + (Hm == 1 ? 0 : h)) * (nq + 1) + i;
  }
  // Index into q_ptr of key block j's row in the transposed mask.
  int64_t mask_row_t(int64_t b, int64_t h, int64_t j) const {
    return ((Bm == 1 ? 0 : b) * Hm + (Hm == 1 ? 0 : h)) * (nk + 1) + j;
  }
  int64_t kv_count(int64_t row) const { return kv_ptr[row + 1] - kv_ptr[row]; }
  int32_t kv_col(int64_t s) const {
    return kv_cols16 ? static_cast<const int16_t*>(kv_cols)[s] : static_cast<const int32_t*>(kv_cols)[s];
  }
  int64_t tb(int64_t b) const { return Bt == 1 ? 0 : b; }
  const int32_t* kcode_of(int64_t b) const { return kcode.data() + tb(b) * Sk; }

  PairMode pair(int64_t b, int64_t qi, int64_t kj) const {
    if (!per_element) return kFull;
    const int32_t qc = qblk[qi], kc = kblk[tb(b) * nk + kj];
    if (qc == -4 || kc == -3) return kSkip;
    if (qc >= 0 && kc >= 0) return qc == kc ? kFull : kSkip;
    return kPartial;
  }
};


// cu_seqlens: int32 (n+1,) offsets of both sides (Sq == Sk), or (2, n+1): query offsets, key offsets.
Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& kv_ptr,
                     const at::Tensor& kv_cols, int64_t block_size, double scale,
                     const std::optional<at::Tensor>& token_valid, const std::optional<at::Tensor>& cu_seqlens,
                     const std::optional<at::Tensor>& token_index = std::nullopt);

// token_index checked against Sr raster rows (int64 (Sf,) contiguous on `device`, Sf % block_size == 0,
// values in [-1, Sr), every row 0..Sr-1 exactly once; O(Sf)); raises naming token_index otherwise.
// `op` prefixes the messages. Shared with nabla_block_mask.
const int64_t* checked_token_index(const at::Tensor& token_index, int64_t Sr, int64_t block_size,
                                   const at::Device& device, const char* op);

// Checks the transposed mask (what bsa_mask_transpose returns for the problem's mask) and points p at it.
void set_transposed(Problem& p, const at::Tensor& q_ptr, const at::Tensor& q_cols);

// A compressed-row block mask, every entry checked: CPU, ptr int64 contiguous (Bm, Hm, rows + 1) with
// rows following each other (ptr[0] = 0, non-decreasing, each head's last pointer the next head's first,
// the last <= cols.numel(): ids past it are unused capacity), at most `ncols` entries a row, cols int16 /
// int32 contiguous, the ids of the rows in [0, ncols) and no id twice in a row. O(nnz).
void check_csr(const at::Tensor& ptr, const at::Tensor& cols, int64_t rows, int64_t ncols, const char* name);

// The transpose of a checked mask (counting sort, O(nnz)): (ptr (Bm, Hm, ncols + 1), cols) with each
// row's ids ascending; cols int16 where rows <= 32767.
std::tuple<at::Tensor, at::Tensor> csr_transpose(const at::Tensor& ptr, const at::Tensor& cols, int64_t ncols);

// q (B, Sq, H, D), k and v (B, Sk, H, D): CPU, 4-D, one dtype, unit stride on D. With a token index
// (`raster`), self-attention on raster rows: Sk == Sq (= Sr).
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool raster = false);
// t (dout, out) exactly like q.
void check_like_q(const at::Tensor& q, const at::Tensor& t, const char* name);

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
  out.clear();
  mode.clear();
  for (int64_t s = p.kv_ptr[row]; s < p.kv_ptr[row + 1]; ++s) {
    const int32_t j = p.kv_col(s);
    const PairMode m = p.pair(b, i, j);
    if (m == kSkip) continue;
    out.push_back(j);
    mode.push_back(m);
  }
  return static_cast<int64_t>(out.size());
}

// at::parallel_for splits a range evenly by count, but NABLA rows differ a lot in active blocks
// (dense heads next to sparse ones), and on a shared machine one thread may get less CPU time. So
// the tasks are cut into `per_thread` (8) contiguous pieces per thread of about equal cost (cost(task) =
// active blocks + 1; contiguous pieces keep K/V in cache) which the threads take from a shared counter.
template <typename Cost, typename Body>
void parallel_balanced(int64_t n, const Cost& cost, const Body& body, int64_t per_thread = 8) {
  std::vector<int64_t> prefix(n + 1, 0);
  for (int64_t t = 0; t < n; ++t) prefix[t + 1] = prefix[t] + cost(t) + 1;
  const int64_t threads = at::get_num_threads();
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(n, per_thread * threads));
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
void over_query_blocks(const Problem& p, const Body& body, int64_t per_thread = 8) {
  const int64_t nb = p.nq, H = p.H;
  const auto cost = [&](int64_t task) {
    return p.kv_count(p.mask_row(task / (nb * H), (task / nb) % H, task % nb));
  };
  parallel_balanced(p.B * H * nb, cost, body, per_thread);
}

// One (B, S, H, D) input in the two fp32 layouts gemm() wants, so the inner loops never gather or
// convert. `row(b, h, s)`: a block is a row-major (bs x D) matrix with leading dimension `ld`; for
// fp32 inputs this is the input itself (no copy), otherwise an fp32 copy (B, H, S, D). `tile(b, h,
// j)`: block j transposed (D x bs, ld bs) and multiplied by `tile_mul`, the B operand of q.k^T;


// The mask seen from the key side (the problem's q_ptr / q_cols, rows mask_row_t): row j of (b, h)
// lists the query blocks that attend to key block j, ascending.
struct Transposed {
  const int64_t* off;
  const void* idx;
  bool idx16;
  int32_t at(int64_t s) const {
    return idx16 ? static_cast<const int16_t*>(idx)[s] : static_cast<const int32_t*>(idx)[s];
  }
};

inline Transposed transpose_mask(const Problem& p) {
  KK_CHECK(p.q_ptr != nullptr, "the backward needs the transposed mask (set_transposed)");
  return Transposed{p.q_ptr, p.q_cols, p.q_cols16};
}

// blocks; each thread makes one worker (make()) and calls run(worker, b, h, j) per task.
template <class Make, class Run>
void over_key_blocks(const Problem& p, const Transposed& tr, const Make& make, const Run& run) {
  const int64_t nb = p.nk, H = p.H;
  const auto cost = [&](int64_t task) {
    const int64_t row = p.mask_row_t(task / (nb * H), (task / nb) % H, task % nb);
    return static_cast<int64_t>(tr.off[row + 1] - tr.off[row]);
  };
  parallel_balanced(p.B * H * nb, cost, [&](int64_t begin, int64_t end) {
    auto worker = make();
    for (int64_t task = begin; task < end; ++task) run(worker, task / (nb * H), (task / nb) % H, task % nb);
  });
}

// Per query row of block i of (b, h): lse in the log2 domain as hi + lo (hi = +inf for a row that sees
// nothing, so every P is 0) and Delta = rowsum(dO * O). dos: the block's dO rows in fp32 (row stride

// The query blocks that key block j of (b, h) meets (ascending), without the skipped pairs.
inline int64_t key_block_pairs(const Problem& p, const Transposed& tr, int64_t b, int64_t h, int64_t j,
                               std::vector<int32_t>& blocks, std::vector<int8_t>& modes) {
  const int64_t row = p.mask_row_t(b, h, j);
  blocks.clear();
  modes.clear();
  for (int64_t s = tr.off[row]; s < tr.off[row + 1]; ++s) {
    const int32_t i = tr.at(s);
    const PairMode md = p.pair(b, i, j);
    if (md == kSkip) continue;
    blocks.push_back(i);
    modes.push_back(md);
  }
  return static_cast<int64_t>(blocks.size());
}

// dK and dV of key block j of (b, h), walking its query blocks through the transposed mask: S^T and

template <class Make, class Run>
void for_heads_by_cost(const Problem& p, const Transposed& tr, const Make& make, const Run& run) {
  std::vector<int64_t> heads(p.B * p.H), cost(p.B * p.H, 0);
  for (int64_t bh = 0; bh < p.B * p.H; ++bh) {
    heads[bh] = bh;
    for (int64_t j = 0; j < p.nk; ++j) {
      const int64_t row = p.mask_row_t(bh / p.H, bh % p.H, j);
      cost[bh] += tr.off[row + 1] - tr.off[row] + 1;
    }
  }
  std::stable_sort(heads.begin(), heads.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    auto worker = make();
    std::vector<float> dqa;
    for (int64_t t = next++; t < p.B * p.H; t = next++) {
      dqa.assign(p.Sq * p.D, 0.f);
      run(worker, heads[t] / p.H, heads[t] % p.H, dqa.data());
    }
  });
}

// Single-pass backward: one task per (b, h), walking its key blocks; each pair adds to dK_j and dV_j
// (owned by the task) and to dQ_i (in the task's own fp32 head buffer), so the scores and dP are
// computed once per pair: 5 products instead of the two-pass scheme's 7. Whole heads per thread, so it


// The single pass needs whole heads per thread. It does ~1.3x less work, so it pays while the heads'
// rounds leave at most ~20 % of the thread time idle: n heads on t threads take ceil(n / t) rounds
// (4 heads on 2 threads, 28 on 16 or 8: yes; 3 on 2, 28 on 32: no). KANDINSKY_BSA_CPU_BWD=fused|two_pass
// forces a scheme (tests, A/B measurements).
bool use_fused_backward(const Problem& p);

// Packed-panel buffers (the K^T tiles and block rows the kernels pack their operands into, tens of MiB
// at S = 8192), kept for the next call instead of handed back: a fresh buffer is faulted in and zeroed
// by the OS page by page at its first write, and the allocator hands such sizes back to the OS whenever
// the heap is trimmed, which the model's other ops between two attention calls do. Buffers are 2 MiB
// aligned and advised onto transparent huge pages. At most KANDINSKY_CPU_PANEL_CACHE_MB (default 256;
// 0: no cache; read at the first call) stay cached between calls, oldest dropped first; a buffer is
// reused for a request of at least half its size.
// panel_acquire returns at least `bytes` (its capacity in *capacity); panel_release takes it back.
void* panel_acquire(size_t bytes, size_t* capacity);
void panel_release(void* ptr, size_t capacity);

}  // namespace kk::attn
