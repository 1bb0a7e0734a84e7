// The attention ops of the extension and the choice of ISA path per call.
//
// Paths, fastest first: amx (bf16 products on AMX tiles), avx512_bf16 (AVX512-BF16 dot products),
// avx512, avx2 (AVX2 + FMA), baseline (whatever the build's target gives; any CPU). fp32 and fp16
// inputs run the fp32 kernels of the path's vector width, so amx and avx512_bf16 differ from avx512
// only for bf16. A path is available when it was compiled in, the CPU has its instructions (CPUID)
// and the OS saves their registers (XCR0; for AMX also Linux's per-process permission).
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

#include <torch/library.h>

#include "../registration.h"
#include "common.h"
#include "isa.h"

namespace kk::attn {
namespace {

enum class Isa : int { kAmx = 0, kAvx512Bf16, kAvx512, kAvx2, kBaseline, kCount };
constexpr const char* kNames[] = {"amx", "avx512_bf16", "avx512", "avx2", "baseline"};

struct CpuFeatures {
  bool avx2 = false, avx512 = false, avx512_bf16 = false, amx = false;
};

#if KK_X86
uint64_t xcr0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28), f16c = c & (1u << 29);
  if (!osxsave || !avx) return f;
  const uint64_t x = xcr0();
  const bool os_avx = (x & 0x6) == 0x6, os_avx512 = (x & 0xe6) == 0xe6, os_amx = (x & 0x60000) == 0x60000;
  unsigned max_leaf = __get_cpuid_max(0, nullptr);
  if (max_leaf < 7 || !os_avx) return f;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = b & (1u << 5), bmi1 = b & (1u << 3), bmi2 = b & (1u << 8);
  const bool avx512f = b & (1u << 16), avx512dq = b & (1u << 17), avx512cd = b & (1u << 28),
             avx512bw = b & (1u << 30), avx512vl = b & (1u << 31);
  const bool amx_bf16 = d & (1u << 22), amx_tile = d & (1u << 24);
  const unsigned sub_leaves = a;
  bool avx512bf16 = false;
  if (sub_leaves >= 1) {
    unsigned a1, b1, c1, d1;
    __cpuid_count(7, 1, a1, b1, c1, d1);
    avx512bf16 = a1 & (1u << 5);
  }
  f.avx2 = avx2 && fma && f16c && bmi1 && bmi2;
  f.avx512 = f.avx2 && os_avx512 && avx512f && avx512dq && avx512cd && avx512bw && avx512vl;
  f.avx512_bf16 = f.avx512 && avx512bf16;
  f.amx = f.avx512_bf16 && os_amx && amx_tile && amx_bf16;
  return f;
}
#else
CpuFeatures detect() { return {}; }
#endif

// Whether `isa` can run here, or why not ("" when it can).
std::string why_not(Isa isa) {
  static const CpuFeatures f = detect();
  switch (isa) {
    case Isa::kBaseline:
      return "";
    case Isa::kAvx2:
      return !KK_X86 ? "not an x86-64 build" : f.avx2 ? "" : "this CPU lacks AVX2/FMA/BMI2 (or the OS does not enable AVX)";
    case Isa::kAvx512:
      return !KK_X86 ? "not an x86-64 build"
                     : f.avx512 ? "" : "this CPU lacks AVX-512 F/BW/VL/DQ/CD (or the OS does not enable it)";
    case Isa::kAvx512Bf16:
      return !KK_X86 ? "not an x86-64 build" : f.avx512_bf16 ? "" : "this CPU lacks AVX512-BF16";
    case Isa::kAmx: {
#if KK_X86 && KK_AMX_COMPILER
      if (!f.amx) return "this CPU lacks AMX-TILE/AMX-BF16 (or the OS does not enable them)";
      static const bool granted = amx::ready();
      return granted ? "" : "Linux refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)";
#else
      return "this build has no AMX path (compiler without AMX intrinsics, or not x86-64)";
#endif
    }
    default:
      return "unknown ISA path";
  }
}

std::vector<Isa> available() {
  std::vector<Isa> out;
  for (int i = 0; i < static_cast<int>(Isa::kCount); ++i)
    if (why_not(static_cast<Isa>(i)).empty()) out.push_back(static_cast<Isa>(i));
  return out;
}

// The path of this call: KANDINSKY_CPU_ISA (unset, empty or "auto": the fastest available). Read at
// every call, so tests and benchmarks can switch paths within one process.
Isa chosen() {
  const char* e = std::getenv("KANDINSKY_CPU_ISA");
  if (e == nullptr || *e == '\0' || std::strcmp(e, "auto") == 0) return available().front();
  for (int i = 0; i < static_cast<int>(Isa::kCount); ++i) {
    if (std::strcmp(e, kNames[i]) != 0) continue;
    const std::string why = why_not(static_cast<Isa>(i));
    TORCH_CHECK(why.empty(), "KANDINSKY_CPU_ISA=", e, " cannot run here: ", why);
    return static_cast<Isa>(i);
  }
  TORCH_CHECK(false, "KANDINSKY_CPU_ISA=", e, " is not a path; expected auto, amx, avx512_bf16, avx512, avx2 or baseline");
}

#define KK_ON_PATH(CALL)                                        \
  switch (chosen()) {                                           \
    KK_X86_CASES(CALL)                                          \
    default:                                                    \
      baseline::CALL;                                           \
  }
#if KK_X86 && KK_AMX_COMPILER
#define KK_AMX_CASE(CALL) \
  case Isa::kAmx:         \
    amx::CALL;            \
    break;
#else
#define KK_AMX_CASE(CALL)
#endif
#if KK_X86
#define KK_X86_CASES(CALL) \
  KK_AMX_CASE(CALL)        \
  case Isa::kAvx512Bf16:   \
    avx512_bf16::CALL;     \
    break;                 \
  case Isa::kAvx512:       \
    avx512::CALL;          \
    break;                 \
  case Isa::kAvx2:         \
    avx2::CALL;            \
    break;
#else
#define KK_X86_CASES(CALL)
#endif

std::tuple<at::Tensor, at::Tensor> bsa_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& kv_ptr, const at::Tensor& kv_cols,
                                           int64_t block_size, double scale,
                                           const std::optional<at::Tensor>& token_valid,
                                           const std::optional<at::Tensor>& cu_seqlens,
                                           const std::optional<at::Tensor>& token_index) {
  check_qkv(q, k, v, token_index.has_value());
  const Problem p = make_problem(q, k, kv_ptr, kv_cols, block_size, scale, token_valid, cu_seqlens, token_index);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({p.B, p.H, p.Sq}, q.options().dtype(at::kFloat));
  KK_ON_PATH(forward(p, q, k, v, out, lse))
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bsa_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& kv_ptr, const at::Tensor& kv_cols,
    const at::Tensor& q_ptr, const at::Tensor& q_cols, int64_t block_size, double scale,
    const std::optional<at::Tensor>& token_valid, const std::optional<at::Tensor>& cu_seqlens,
    const std::optional<at::Tensor>& dlse, const std::optional<at::Tensor>& token_index) {
  check_qkv(q, k, v, token_index.has_value());
  check_like_q(q, dout, "dout");
  check_like_q(q, out, "out");
  Problem p = make_problem(q, k, kv_ptr, kv_cols, block_size, scale, token_valid, cu_seqlens, token_index);
  set_transposed(p, q_ptr, q_cols);
  KK_CHECK(lse.scalar_type() == at::kFloat && lse.sizes() == at::IntArrayRef({p.B, p.H, p.Sq}) &&
               lse.is_contiguous(),
           "lse must be contiguous fp32 (B, H, Sq) (Sq: positions with token_index), got ", lse.scalar_type(), " ", lse.sizes());
  if (dlse.has_value()) {
    KK_CHECK_CPU(*dlse);
    KK_CHECK(dlse->scalar_type() == at::kFloat && dlse->sizes() == lse.sizes() && dlse->is_contiguous(),
             "dlse must be contiguous fp32 (B, H, S) like lse, got ", dlse->scalar_type(), " ", dlse->sizes());
    p.dlse = dlse->data_ptr<float>();
  }
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  KK_ON_PATH(backward(p, dout, q, k, v, out, lse, dq, dk, dv))
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> bsa_mask_transpose(const at::Tensor& kv_ptr, const at::Tensor& kv_cols,
                                                      int64_t num_kv_blocks) {
  return csr_transpose(kv_ptr, kv_cols, num_kv_blocks);
}

std::string cpu_isa() { return kNames[static_cast<int>(chosen())]; }

std::vector<std::string> cpu_isas() {
  std::vector<std::string> out;
  for (const Isa isa : available()) out.emplace_back(kNames[static_cast<int>(isa)]);
  return out;
}

// Why each path can or cannot run here: "name: ok" or "name: reason" (diagnostics, test skips).
std::vector<std::string> cpu_isa_report() {
  std::vector<std::string> out;
  for (int i = 0; i < static_cast<int>(Isa::kCount); ++i) {
    const std::string why = why_not(static_cast<Isa>(i));
    out.push_back(std::string(kNames[i]) + ": " + (why.empty() ? "ok" : why));
  }
  return out;
}

}  // namespace
}  // namespace kk::attn

TORCH_LIBRARY_FRAGMENT(kandinsky_kernels_C, m) {
  m.def(
      "bsa_fwd(Tensor q, Tensor k, Tensor v, Tensor kv_ptr, Tensor kv_cols, int block_size, "
      "float scale, Tensor? token_valid, Tensor? cu_seqlens, Tensor? token_index=None) -> (Tensor, Tensor)");
  m.def(
      "bsa_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor kv_ptr, "
      "Tensor kv_cols, Tensor q_ptr, Tensor q_cols, int block_size, float scale, Tensor? token_valid, "
      "Tensor? cu_seqlens, "
      "Tensor? dlse=None, Tensor? token_index=None) -> (Tensor, Tensor, Tensor)");
  m.def("bsa_mask_transpose(Tensor kv_ptr, Tensor kv_cols, int num_kv_blocks) -> (Tensor, Tensor)");
  m.def("cpu_isa() -> str", &kk::attn::cpu_isa);
  m.def("cpu_isas() -> str[]", &kk::attn::cpu_isas);
  m.def("cpu_isa_report() -> str[]", &kk::attn::cpu_isa_report);
}

TORCH_LIBRARY_IMPL(kandinsky_kernels_C, CPU, m) {
  m.impl("bsa_fwd", &kk::attn::bsa_fwd);
  m.impl("bsa_bwd", &kk::attn::bsa_bwd);
  m.impl("bsa_mask_transpose", &kk::attn::bsa_mask_transpose);
}
