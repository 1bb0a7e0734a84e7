#pragma once
// AMX (tile) bf16 block products for the CPU attention kernels.
//
// Provides (all inline; include inside the per-ISA namespace of a TU compiled with
// #pragma GCC target("...,amx-tile,amx-bf16"), after <immintrin.h>, <cstdint>, <cstring>, <algorithm>):
//   bool amx_request_permission()   asks Linux for the AMX tile-data permission (once per process,
//                                   cached); false when the CPU (no AMX-TILE / AMX-BF16), the kernel
//                                   (< 5.16) or the process (a too-small sigaltstack) cannot use AMX.
//                                   Call it before any amx_gemm_* and keep the AVX-512 kernels when it
//                                   returns false: a tile instruction without the permission is SIGILL.
//   void amx_gemm_blocks(M, N, nblk, kb, alpha, A, lda, Bblk, boff, ldb, accumulate, C, ldc)
//   void amx_gemm_tiles(M, N, K, alpha, A, lda, B, ldb, accumulate, C, ldc)
//   void amx_release()              tilerelease: the thread's tile state back to INIT (optional, e.g.
//                                   at the end of a parallel task, so context switches skip the 8 KiB
//                                   of tile data; the next amx_gemm_* call reconfigures by itself).
// Semantics (those of gemm_blocks<Bf16Dot>):
//   C (M x N fp32, row stride ldc) = alpha * sum_{blk < nblk} A_blk @ B_blk  (+ C when accumulate), where
//   A is bf16 bits row-major (row stride lda elements) and A_blk its columns [2 kb blk, 2 kb (blk + 1));
//   B_blk is kb rows of N pair words starting at Bblk[blk] + boff (boff in uint16 elements, even), row
//   stride ldb words; word (k, n) = (B[2k][n], B[2k+1][n]), i.e. AMX's VNNI layout for the B tile.
//   amx_gemm_tiles is the same with one block of K steps (B row stride ldb words).
//   Preconditions (not checked): M, N multiples of 16; kb (K) a multiple of 8 (a K tail of 8 steps,
//   half a tile, takes half-K tiles at half speed). Only the M x N x K operands are read.
//   fp32 accumulation by tdpbf16ps (round to nearest even; denormals, bf16 inputs and fp32 sums alike,
//   flush to zero, as in vdpbf16ps). alpha is applied once at the end. With alpha == 1 the tiles are
//   stored straight into C, and with accumulate they start from C (C + p1 + p2 + ... rather than
//   C + (p1 + p2 + ...), the same fp32 error level); otherwise each 16 x 16 result goes through a stack
//   buffer, C = alpha * buf (+ C): the only O(M N) extra work.
//   Speed wants 64-byte aligned rows: base pointers (and Bblk[blk] + boff) 64-byte aligned, lda and boff
//   multiples of 32, ldb and ldc multiples of 16. Measured cost of a misaligned operand: A -22 %,
//   B -40..-50 %, C -9..-20 % (every tile row then spans two cache lines).
// Design: C stays in tile registers tmm0-3 (a 32 x 32 block as 2 x 2 tiles; 1 x 2 / 2 x 1 / 1 x 1 at
//   M or N edges) across all K steps of all blocks; A and B tiles are loaded straight from the strided
//   operands (no packing). One tile configuration serves every shape: tmm4 / tmm5 are a full A tile
//   (16 rows x 16 steps) and a full B tile (16 steps x 16 words), tmm6 / tmm7 their half-K versions for
//   the K tail; the 2 x 2 block reuses tmm4 / tmm5 (5 tile loads per 4 tdpbf16ps), measured as fast as
//   two A plus two B registers (and the single configuration never needs reloading between shapes).
//   Tried and not kept (paired runs of the forward at S = 8192, H = 4, D = 128, 10 %, one thread): the
//   fp32 paths' L2 prefetch of the next K^T tile and the V blocks, spread over the K steps, made it
//   16-45 % slower (at AMX speed the prefetches crowd the tile loads' line fill buffers; the hardware
//   streamer already follows each contiguous tile), and the row maxima from the tiles' epilogue, without
//   prefetch, 8-16 % slower. The same pairs with hot key blocks run ~20 % faster: that is the L3 cost.
// Tile configuration: each call reads the thread's current one (sttilecfg, ~20 cycles, compared as one
//   zmm) and runs ldtilecfg (~300 cycles; it also zeroes the tiles) only when it differs. sttilecfg
//   reads zeros in the INIT state (never configured, or after tilerelease), so a foreign ldtilecfg or
//   tilerelease in the same thread between calls (oneDNN / torch matmuls in the same OpenMP thread)
//   is safe. A thread_local "configured" flag alone is not: tested, it dies with SIGILL after a
//   tilerelease. Measured per call: the sttilecfg check is within noise of a thread_local flag, and
//   ldtilecfg on every call costs 200-370 cycles (-16..-19 % on 64 x 64 x 32-step scores, -3..-5 % on P@V).
// Permission (Linux, Documentation/arch/x86/xstate.rst): "Permission, when granted, is valid per
//   process"; the first tile instruction of each thread traps, the kernel checks the process's
//   permission and allocates that thread's larger xstate buffer. So threads created before the request
//   (an OpenMP pool already running) may use tiles after it (tested). Inherited by fork(), cleared by
//   exec(). The request fails if a thread's installed sigaltstack is smaller than the AMX signal frame
//   (AT_MINSIGSTKSZ: 11952 bytes here).
// Measured (lscpu: "Intel(R) Xeon(R) Processor", family 6 model 167 as the hypervisor reports it, with
//   AMX-BF16/INT8 and AVX512-FP16 but no AMX-FP16: Sapphire / Emerald Rapids class; KVM guest, core
//   clock ~2.39 GHz; one thread, gcc 12.2 -O2; minimum over short bursts on a shared machine), GFLOP/s:
//   peak _mm512_fmadd_ps 146-153 (61-64 FLOP/cycle: 2 per cycle); _mm512_dpbf16_ps 76.5 (32 FLOP/cycle:
//   one per 2 cycles, i.e. half the fp32 FMA rate); _tile_dpbf16ps 2247 (~940-980 FLOP/cycle: one per
//   ~16 cycles). amx_gemm_blocks, 64-byte aligned operands hot in cache (AVX512-BF16 gemm_blocks: 78-79):
//     scores 64 x 64, K = 32 steps (D = 64): 917 (alpha != 1), 1262 (alpha = 1)
//     scores 64 x 64, K = 64 (D = 128): 1260;  128 x 128, K = 32: 653;  128 x 128, K = 64: 910
//     P@V 64 x 64, 4 blocks of 32 steps, accumulate: 1202;  64 x 128, 4 blocks: 1227;  8 blocks: 1218
//     dK-like 64 x 64, 4 blocks, alpha != 1, accumulate: 1169;  128 x 128, 4 blocks of 64: 1219
//     K tail: 64 x 64, K = 24: 668;  64 x 64, 4 blocks of 24 steps: 996

namespace amx_detail {

// Tile configuration (palette 1): 64 bytes, tile t is rows[t] rows of colsb[t] bytes.
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
static_assert(sizeof(TileConfig) == 64, "AMX tile configuration is 64 bytes");

// Tile registers: C blocks (row, col), full A / B tiles, half-K A / B tiles.
constexpr int kC00 = 0, kC01 = 1, kC10 = 2, kC11 = 3, kA = 4, kB = 5, kAh = 6, kBh = 7;

inline const TileConfig& config() {
  // C: 16 x 16 fp32; A: 16 rows x 32 bf16 (16 steps); B: 16 steps x 16 words; half-K: 8 steps.
  static constexpr TileConfig cfg = {
      1, 0, {}, {64, 64, 64, 64, 64, 64, 32, 64, 0, 0, 0, 0, 0, 0, 0, 0}, {16, 16, 16, 16, 16, 16, 16, 8, 0, 0, 0, 0, 0, 0, 0, 0}};
  return cfg;
}

// Loads config() unless it is the thread's current tile configuration. sttilecfg writes zeros when
// the tile state is INIT (never configured, or after tilerelease), so this also covers those cases.
inline void ensure_config() {
  const TileConfig& want = config();
  alignas(64) unsigned char cur[64];
  __asm__ volatile("sttilecfg %0" : "=m"(*reinterpret_cast<unsigned char(*)[64]>(cur)));
  const __m512i a = _mm512_load_si512(reinterpret_cast<const void*>(cur));
  const __m512i b = _mm512_load_si512(reinterpret_cast<const void*>(&want));
  if (_mm512_cmpneq_epi64_mask(a, b))
    __asm__ volatile("ldtilecfg %0" ::"m"(*reinterpret_cast<const unsigned char(*)[64]>(&want)));
}

// Tile instructions as inline asm with the register number a template constant. Loads carry a memory
// clobber so the compiler keeps earlier stores of the operands before them (the <immintrin.h> macros
// declare no memory input).
template <int T>
inline void tile_load(const void* p, int64_t stride_bytes) {
  __asm__ volatile("{tileloadd (%0,%1,1), %%tmm%c2|tileloadd %%tmm%c2, [%0+%1*1]}" ::"r"(p), "r"(stride_bytes),
                   "i"(T)
                   : "memory");
}
template <int T>
inline void tile_store(void* p, int64_t stride_bytes) {
  __asm__ volatile("{tilestored %%tmm%c2, (%0,%1,1)|tilestored [%0+%1*1], %%tmm%c2}" ::"r"(p), "r"(stride_bytes),
                   "i"(T)
                   : "memory");
}
template <int T>
inline void tile_zero() {
  __asm__ volatile("tilezero %%tmm%c0" ::"i"(T));
}
template <int Cr, int Ar, int Br>
inline void tile_dp() {
  __asm__ volatile("{tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0|tdpbf16ps %%tmm%c0, %%tmm%c1, %%tmm%c2}" ::"i"(Cr), "i"(Ar),
                   "i"(Br));
}

// One K step of TA / TB tiles (16 or 8 steps) into the MR x NR C tiles: a is A at (row 0, this step),
// b is B at (this step, word 0); sa / sb are the row strides in bytes.
template <int MR, int NR, int TA, int TB>
inline void k_step(const uint16_t* a, int64_t sa, const uint16_t* b, int64_t sb) {
  tile_load<TA>(a, sa);
  tile_load<TB>(b, sb);
  tile_dp<kC00, TA, TB>();
  if (NR == 2) {
    tile_load<TB>(b + 32, sb);  // 16 words right
    tile_dp<kC01, TA, TB>();
  }
  if (MR == 2) {
    tile_load<TA>(reinterpret_cast<const char*>(a) + 16 * sa, sa);  // 16 rows down
    if (NR == 2) {
      tile_dp<kC11, TA, TB>();
      tile_load<TB>(b, sb);
    }
    tile_dp<kC10, TA, TB>();
  }
}

// Starts C tile T from C (alpha == 1 with accumulate) or from zero.
template <int T>
inline void start_c(bool load, const float* c, int64_t sc) {
  if (load)
    tile_load<T>(c, sc);
  else
    tile_zero<T>();
}

// C = alpha * buf (+ C) for one 16 x 16 tile stored in buf (row stride 16).
inline void scale_out(const float* buf, float alpha, bool accumulate, float* C, int64_t ldc) {
  const __m512 va = _mm512_set1_ps(alpha);
  for (int i = 0; i < 16; ++i) {
    const __m512 x = _mm512_mul_ps(_mm512_load_ps(buf + 16 * i), va);
    float* c = C + i * ldc;
    _mm512_storeu_ps(c, accumulate ? _mm512_add_ps(x, _mm512_loadu_ps(c)) : x);
  }
}

// One (16 MR) x (16 NR) block of C over all K steps of all blocks. A, Bblk[*] + boff and C point at the
// block's origin.
template <int MR, int NR>
inline void block(int64_t nblk, int64_t kb, float alpha, const uint16_t* A, int64_t lda, const uint16_t* const* Bblk,
                  int64_t boff, int64_t ldb, bool accumulate, float* C, int64_t ldc) {
  const int64_t sa = 2 * lda, sb = 4 * ldb, sc = 4 * ldc;
  const bool direct = alpha == 1.f;
  const bool load_c = direct && accumulate;
  start_c<kC00>(load_c, C, sc);
  if (NR == 2) start_c<kC01>(load_c, C + 16, sc);
  if (MR == 2) start_c<kC10>(load_c, C + 16 * ldc, sc);
  if (MR == 2 && NR == 2) start_c<kC11>(load_c, C + 16 * ldc + 16, sc);
  const int64_t kfull = kb & ~int64_t{15};
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const uint16_t* b = Bblk[blk] + boff;
    const uint16_t* a = A + 2 * kb * blk;
    for (int64_t k = 0; k < kfull; k += 16) k_step<MR, NR, kA, kB>(a + 2 * k, sa, b + 2 * k * ldb, sb);
    if (kfull < kb) k_step<MR, NR, kAh, kBh>(a + 2 * kfull, sa, b + 2 * kfull * ldb, sb);
  }
  if (direct) {
    tile_store<kC00>(C, sc);
    if (NR == 2) tile_store<kC01>(C + 16, sc);
    if (MR == 2) tile_store<kC10>(C + 16 * ldc, sc);
    if (MR == 2 && NR == 2) tile_store<kC11>(C + 16 * ldc + 16, sc);
    return;
  }
  alignas(64) float buf[4][256];
  tile_store<kC00>(buf[0], 64);
  if (NR == 2) tile_store<kC01>(buf[1], 64);
  if (MR == 2) tile_store<kC10>(buf[2], 64);
  if (MR == 2 && NR == 2) tile_store<kC11>(buf[3], 64);
  scale_out(buf[0], alpha, accumulate, C, ldc);
  if (NR == 2) scale_out(buf[1], alpha, accumulate, C + 16, ldc);
  if (MR == 2) scale_out(buf[2], alpha, accumulate, C + 16 * ldc, ldc);
  if (MR == 2 && NR == 2) scale_out(buf[3], alpha, accumulate, C + 16 * ldc + 16, ldc);
}

}  // namespace amx_detail

// Asks Linux for permission to use AMX tile data (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA));
// true when granted now or earlier. Also requires AMX-TILE and AMX-BF16 in CPUID. Cached per process.
inline bool amx_request_permission() {
  static const bool granted = [] {
    unsigned int eax = 0, ebx, ecx = 0, edx;
    __asm__("cpuid" : "+a"(eax), "=b"(ebx), "+c"(ecx), "=d"(edx));
    if (eax < 7) return false;
    eax = 7;
    ecx = 0;
    __asm__("cpuid" : "+a"(eax), "=b"(ebx), "+c"(ecx), "=d"(edx));
    if (!((edx >> 22) & 1u) || !((edx >> 24) & 1u)) return false;  // AMX-BF16, AMX-TILE
    // Raw syscall (no libc declarations in this header): arch_prctl is 158 on x86-64;
    // ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18. Returns 0 or -errno.
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "0"(158L), "D"(0x1023L), "S"(18L) : "rcx", "r11", "memory");
    return ret == 0;
  }();
  return granted;
}

// C (M x N) = alpha * sum_blk A[:, 2 kb blk : 2 kb (blk + 1)] @ B_blk (+ C); see the top of this file.
inline void amx_gemm_blocks(int64_t M, int64_t N, int64_t nblk, int64_t kb, float alpha, const uint16_t* A,
                            int64_t lda, const uint16_t* const* Bblk, int64_t boff, int64_t ldb, bool accumulate,
                            float* C, int64_t ldc) {
  amx_detail::ensure_config();
  for (int64_t m0 = 0; m0 < M; m0 += 32) {
    const bool m2 = M - m0 >= 32;
    const uint16_t* a = A + m0 * lda;
    for (int64_t n0 = 0; n0 < N; n0 += 32) {
      const bool n2 = N - n0 >= 32;
      float* c = C + m0 * ldc + n0;
      const int64_t bo = boff + 2 * n0;
      if (m2 && n2)
        amx_detail::block<2, 2>(nblk, kb, alpha, a, lda, Bblk, bo, ldb, accumulate, c, ldc);
      else if (m2)
        amx_detail::block<2, 1>(nblk, kb, alpha, a, lda, Bblk, bo, ldb, accumulate, c, ldc);
      else if (n2)
        amx_detail::block<1, 2>(nblk, kb, alpha, a, lda, Bblk, bo, ldb, accumulate, c, ldc);
      else
        amx_detail::block<1, 1>(nblk, kb, alpha, a, lda, Bblk, bo, ldb, accumulate, c, ldc);
    }
  }
}

// C (M x N) = alpha * A @ B (+ C): A row-major bf16 (M x 2K), B K x N pair words (row stride ldb words).
inline void amx_gemm_tiles(int64_t M, int64_t N, int64_t K, float alpha, const uint16_t* A, int64_t lda,
                           const uint16_t* B, int64_t ldb, bool accumulate, float* C, int64_t ldc) {
  amx_gemm_blocks(M, N, 1, K, alpha, A, lda, &B, 0, ldb, accumulate, C, ldc);
}

// Returns the thread's tile state to INIT (frees nothing; the next amx_gemm_* reconfigures).
inline void amx_release() { __asm__ volatile("tilerelease" ::: "memory"); }
