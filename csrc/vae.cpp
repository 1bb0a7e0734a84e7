// CPU kernels of the causal video VAE: fused GroupNorm (+ SiLU) with an optional causal replicate-padded
// output, the causal replicate pad (optionally fused with the VAE's nearest upsampling), and the tile blend.
//
// group_norm_silu: pass 1 reads x once per (b, group) for the statistics (fp32 lanes over runs of kRun
// vectors, shifted by the group's first element against cancellation, added into double); pass 2 reads
// x once more and writes y = silu?(x * a_c + b_c) once, a_c = rstd * gamma_c (double, applied as two
// floats), b_c = beta_c - mean * a_c (double, rounded once). With pad (pt, ph, pw) the output is
// (B, C, T + pt, H + 2 ph, W + 2 pw):
// frame 0 repeated pt times in front, border rows/columns replicated; so the causal conv that follows
// runs with padding 0 and no padded copy of the activation is ever made.
// causal_pad3d: the same padded layout from an existing tensor by index arithmetic (one read, one
// write), with nearest upsampling by (ut, uh, uw) folded in (frame 0 only upsampled in space).
// tile_blend_: out[..., start + i, ...] = lerp(out, tile, i / e) for i < e = prev_stop - start, then copies
// the rest of the tile, in one pass (torch.lerp's formula, fp32 for half types).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "registration.h"

namespace {

constexpr int64_t kChunk = 4096;

// Work below this many elements runs on the calling thread: a parallel region costs microseconds on an idle
// CPU but up to a scheduler time slice (~12 ms measured) per region on a loaded one, 50x the work of a
// 3 x 20 x 20 x 128 GroupNorm. grain_for(elements per task): parallel_for's grain reaching that size.
constexpr int64_t kSerialElems = 1 << 18;
inline int64_t grain_for(int64_t per_task) { return std::max<int64_t>(1, kSerialElems / std::max<int64_t>(per_task, 1)); }

// Sums of (x - pivot) and (x - pivot)^2 in fp32 lanes, written with GCC vector types:
// the build has no -ffast-math, so the compiler may not reassociate (vectorise) a plain reduction loop, and
// an array of independent lanes got outer-loop vectorised with permutes. 32-byte vectors: one ymm on the
// x86-64-v3/v4 clones, two xmm on the baseline one; two accumulators each hide the add latency.
typedef float v8f __attribute__((vector_size(32)));
typedef double v8d __attribute__((vector_size(64)));
// Adds the 16 floats at x, less the pivots (pa, pb), to the sums (sa, sb) and their squares to (qa, qb).
inline void add_shifted16(const float* x, v8f pa, v8f pb, v8f& sa, v8f& sb, v8f& qa, v8f& qb) {
  v8f a, b;
  std::memcpy(&a, x, sizeof(a));
  std::memcpy(&b, x + 8, sizeof(b));
  a -= pa;
  b -= pb;
  sa += a;
  sb += b;
  qa += a * a;
  qb += b * b;
}

// The fp32 lanes run over kRun vectors at most, then are added into double: each group's mean and
// variance scale every element of the group, so their error is one every element shares (and the next
// convolution sums coherently). fp32 runs of 256 floats per lane left ~1e-7 relative error in a group's
// variance; runs of 16 leave ~1e-9, for 1/8 more adds in a memory-bound pass.
constexpr int64_t kRun = 16;

// Adds the sums of (x - pivot) and (x - pivot)^2 over n floats to *s_out and *ss_out.
KK_CLONES void shifted_sums(const float* x, int64_t n, float pivot, double* s_out, double* ss_out) {
  const v8f pv = v8f{} + pivot;
  v8d ds = {}, dq = {};
  int64_t i = 0;
  while (i + 16 <= n) {
    v8f s0 = {}, s1 = {}, q0 = {}, q1 = {};
    const int64_t stop = std::min(n - 15, i + 16 * kRun);
    for (; i < stop; i += 16) add_shifted16(x + i, pv, pv, s0, s1, q0, q1);
    ds += __builtin_convertvector(s0, v8d) + __builtin_convertvector(s1, v8d);
    dq += __builtin_convertvector(q0, v8d) + __builtin_convertvector(q1, v8d);
  }
  double ts = 0.0, tss = 0.0;
  for (int j = 0; j < 8; ++j) {
    ts += ds[j];
    tss += dq[j];
  }
  for (; i < n; ++i) {
    const double d = x[i] - pivot;
    ts += d;
    tss += d * d;
  }
  *s_out += ts;
  *ss_out += tss;
}

// exp(x) for the SiLU, branch-free so that it vectorises (Cephes' expf polynomial; ~1 ulp on [-87, 88]).
static inline float fast_exp(float x) {
  x = std::min(88.3762626647949f, std::max(-87.3365478515625f, x));
  // round to nearest by the 1.5 * 2^23 trick (not folded away: no -ffast-math), vectorisable at every ISA
  const float fx = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  float r = x - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.f;
  const int32_t n = static_cast<int32_t>(fx);
  int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// y = x * (a + a_lo) + b, then SiLU (y / (1 + exp(-y))) when silu. The scale is carried as two floats
// (a + a_lo, from the double rstd * gamma): a scale rounded to one float errs by up to half an ulp for a
// whole group, an error every element shares, which the next convolution sums coherently (see
// shifted_sums). One more FMA per element.
KK_CLONES void affine_row(const float* x, int64_t n, float a, float a_lo, float b, bool silu, float* y) {
  if (silu) {
    for (int64_t i = 0; i < n; ++i) {
      const float v = x[i] * a + (x[i] * a_lo + b);
      y[i] = v / (1.f + fast_exp(-v));
    }
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] = x[i] * a + (x[i] * a_lo + b);
  }
}

// The per-channel affine of a group norm, y = x * scale + shift, from the double statistics: scale as
// hi + lo floats (see affine_row), shift rounded once.
struct ChannelAffine {
  float a, a_lo, b;
};

inline ChannelAffine channel_affine(double mean, double rstd, const float* gamma, const float* beta, int64_t c) {
  const double a = rstd * (gamma ? gamma[c] : 1.f);
  const float hi = static_cast<float>(a);
  return {hi, static_cast<float>(a - hi), static_cast<float>((beta ? beta[c] : 0.f) - mean * a)};
}

#include "f32_rows.h"  // inside the anonymous namespace: this file's own clones

template <typename E>
void group_norm_silu_kernel(const at::Tensor& x, const float* gamma, const float* beta, int64_t G, double eps,
                            bool silu, int64_t pt, int64_t ph, int64_t pw, at::Tensor& y) {
  const int64_t B = x.size(0), C = x.size(1);
  const bool padded = pt || ph || pw;
  // Spatial layout: padded outputs are 5-D (T, H, W); otherwise everything after C is one row.
  const int64_t T = padded ? x.size(2) : 1;
  const int64_t H = padded ? x.size(3) : 1;
  const int64_t W = padded ? x.size(4) : x.numel() / std::max<int64_t>(B * C, 1);
  const int64_t S = T * H * W, cpg = C / G;
  const int64_t To = T + pt, Ho = H + 2 * ph, Wo = W + 2 * pw;
  const E* xp = x.data_ptr<E>();
  E* yp = y.data_ptr<E>();
  std::vector<double> mean(B * G), rstd(B * G);

  at::parallel_for(0, B * G, grain_for(cpg * S), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(std::is_same<E, float>::value ? 0 : kChunk);
    for (int64_t bg = begin; bg < end; ++bg) {
      const E* g = xp + bg * cpg * S;
      const int64_t n = cpg * S;
      const float pivot = static_cast<float>(g[0]);
      double s = 0.0, ss = 0.0;
      for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
        const int64_t m = std::min(kChunk, n - i0);
        const float* f;
        if constexpr (std::is_same<E, float>::value) {
          f = g + i0;
        } else {
          load_f32(g + i0, m, buf.data());
          f = buf.data();
        }
        shifted_sums(f, m, pivot, &s, &ss);
      }
      const double mu = s / n;
      const double var = std::max(ss / n - mu * mu, 0.0);
      mean[bg] = mu + pivot;
      rstd[bg] = 1.0 / std::sqrt(var + eps);
    }
  });

  // Pass 2 over (b, c, t) source frames; each writes output frame t + pt (and frames < pt for t == 0).
  at::parallel_for(0, B * C * T, grain_for(H * W), [&](int64_t begin, int64_t end) {
    std::vector<float> in(W), out(W);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task % T, bc = task / T, c = bc % C, b = bc / C;
      const int64_t bg = b * G + c / cpg;
      const ChannelAffine af = channel_affine(mean[bg], rstd[bg], gamma, beta, c);
      const E* src = xp + (bc * T + t) * H * W;
      E* frame = yp + (bc * To + t + pt) * Ho * Wo;
      for (int64_t h = 0; h < H; ++h) {
        E* row = frame + (h + ph) * Wo;
        const float* fin;
        if constexpr (std::is_same<E, float>::value) {
          fin = src + h * W;
        } else {
          load_f32(src + h * W, W, in.data());
          fin = in.data();
        }
        if constexpr (std::is_same<E, float>::value) {
          affine_row(fin, W, af.a, af.a_lo, af.b, silu, row + pw);
        } else {
          affine_row(fin, W, af.a, af.a_lo, af.b, silu, out.data());
          store_from_f32(out.data(), W, row + pw);
        }
        for (int64_t i = 0; i < pw; ++i) {
          row[i] = row[pw];
          row[pw + W + i] = row[pw + W - 1];
        }
      }
      for (int64_t i = 0; i < ph; ++i) {
        std::memcpy(frame + i * Wo, frame + ph * Wo, Wo * sizeof(E));
        std::memcpy(frame + (ph + H + i) * Wo, frame + (ph + H - 1) * Wo, Wo * sizeof(E));
      }
      if (t == 0)
        for (int64_t i = 0; i < pt; ++i)
          std::memcpy(yp + (bc * To + i) * Ho * Wo, frame, Ho * Wo * sizeof(E));
    }
  });
}

// ---- channels-last-3d (B, T, H, W, C in memory): the same ops with the channel vector as the inner unit.
// Per-channel sums of (x - p_c) and (x - p_c)^2 over n rows of C channels, into s and q (fp32 lanes over
// runs of kRun rows, added into double; independent lanes, so the loop vectorises over c without
// reassociation).
KK_CLONES void cl_shifted_sums(const float* x, int64_t n, int64_t C, const float* p, double* s, double* q) {
  for (int64_t c = 0; c < C; ++c) s[c] = q[c] = 0.0;
  int64_t c0 = 0;
  // 16 channels at a time with the accumulators in registers (one zmm, or two ymm / four xmm), rows strided
  for (; c0 + 16 <= C; c0 += 16) {
    v8f pa, pb;
    std::memcpy(&pa, p + c0, sizeof(pa));
    std::memcpy(&pb, p + c0 + 8, sizeof(pb));
    v8d dsa = {}, dsb = {}, dqa = {}, dqb = {};
    for (int64_t r0 = 0; r0 < n; r0 += kRun) {
      v8f sa = {}, sb = {}, qa = {}, qb = {};
      for (int64_t r = r0; r < std::min(n, r0 + kRun); ++r) add_shifted16(x + r * C + c0, pa, pb, sa, sb, qa, qb);
      dsa += __builtin_convertvector(sa, v8d);
      dsb += __builtin_convertvector(sb, v8d);
      dqa += __builtin_convertvector(qa, v8d);
      dqb += __builtin_convertvector(qb, v8d);
    }
    std::memcpy(s + c0, &dsa, sizeof(dsa));
    std::memcpy(s + c0 + 8, &dsb, sizeof(dsb));
    std::memcpy(q + c0, &dqa, sizeof(dqa));
    std::memcpy(q + c0 + 8, &dqb, sizeof(dqb));
  }
  if (c0 < C) {
    for (int64_t r = 0; r < n; ++r) {
      const float* row = x + r * C;
      for (int64_t c = c0; c < C; ++c) {
        const double d = row[c] - p[c];
        s[c] += d;
        q[c] += d * d;
      }
    }
  }
}

// y[w, c] = silu?(x[w, c] * (a[c] + a_lo[c]) + b[c]) for n consecutive channel vectors (see affine_row).
KK_CLONES void cl_affine(const float* x, int64_t n, int64_t C, const float* a, const float* a_lo, const float* b,
                         bool silu, float* y) {
  for (int64_t w = 0; w < n; ++w) {
    const float* xr = x + w * C;
    float* yr = y + w * C;
    if (silu) {
      for (int64_t c = 0; c < C; ++c) {
        const float v = xr[c] * a[c] + (xr[c] * a_lo[c] + b[c]);
        yr[c] = v / (1.f + fast_exp(-v));
      }
    } else {
      for (int64_t c = 0; c < C; ++c) yr[c] = xr[c] * a[c] + (xr[c] * a_lo[c] + b[c]);
    }
  }
}

constexpr int64_t kClRows = 256;  // rows (positions) per fp32 partial sum of the statistics

template <typename E>
void group_norm_silu_cl_kernel(const at::Tensor& x, const float* gamma, const float* beta, int64_t G, double eps,
                               bool silu, int64_t pt, int64_t ph, int64_t pw, at::Tensor& y) {
  const int64_t B = x.size(0), C = x.size(1), T = x.size(2), H = x.size(3), W = x.size(4);
  const int64_t S = T * H * W, cpg = C / G;
  const int64_t To = T + pt, Ho = H + 2 * ph, Wo = W + 2 * pw;
  const E* xp = x.data_ptr<E>();
  E* yp = y.data_ptr<E>();
  const int64_t nchunk = (S + kClRows - 1) / kClRows;
  std::vector<float> scale(B * C), scale_lo(B * C), shift(B * C);
  std::vector<double> ps(nchunk * C), pq(nchunk * C);
  std::vector<float> pivot(C);
  for (int64_t b = 0; b < B; ++b) {
    const E* xb = xp + b * S * C;
    for (int64_t c = 0; c < C; ++c) pivot[c] = static_cast<float>(xb[c]);
    at::parallel_for(0, nchunk, grain_for(kClRows * C), [&](int64_t begin, int64_t end) {
      std::vector<double> s(C), q(C);
      std::vector<float> buf(std::is_same<E, float>::value ? 0 : kClRows * C);
      for (int64_t k = begin; k < end; ++k) {
        const int64_t r0 = k * kClRows, n = std::min(kClRows, S - r0);
        const float* f;
        if constexpr (std::is_same<E, float>::value) {
          f = xb + r0 * C;
        } else {
          load_f32(xb + r0 * C, n * C, buf.data());
          f = buf.data();
        }
        cl_shifted_sums(f, n, C, pivot.data(), s.data(), q.data());
        for (int64_t c = 0; c < C; ++c) {
          ps[k * C + c] = s[c];
          pq[k * C + c] = q[c];
        }
      }
    });
    // Per channel: mean and M2 from the shifted sums; per group: Chan's combination of the channels.
    for (int64_t g = 0; g < G; ++g) {
      std::vector<double> mc(cpg), m2c(cpg);
      double mg = 0.0;
      for (int64_t j = 0; j < cpg; ++j) {
        const int64_t c = g * cpg + j;
        double s = 0.0, q = 0.0;
        for (int64_t k = 0; k < nchunk; ++k) {
          s += ps[k * C + c];
          q += pq[k * C + c];
        }
        const double d = s / S;
        mc[j] = pivot[c] + d;
        m2c[j] = std::max(q - s * d, 0.0);
        mg += mc[j];
      }
      mg /= cpg;
      double m2 = 0.0;
      for (int64_t j = 0; j < cpg; ++j) m2 += m2c[j] + S * (mc[j] - mg) * (mc[j] - mg);
      const double var = m2 / (static_cast<double>(S) * cpg);
      const double rstd = 1.0 / std::sqrt(var + eps);
      for (int64_t j = 0; j < cpg; ++j) {
        const int64_t c = g * cpg + j;
        const ChannelAffine af = channel_affine(mg, rstd, gamma, beta, c);
        scale[b * C + c] = af.a;
        scale_lo[b * C + c] = af.a_lo;
        shift[b * C + c] = af.b;
      }
    }
  }
  // Pass 2 over (b, t, h) source rows; each writes output row (t + pt, h + ph) with its W borders, the H
  // border rows next to it, and for t == 0 the pt front frames' copies of those rows.
  at::parallel_for(0, B * T * H, grain_for(W * C), [&](int64_t begin, int64_t end) {
    std::vector<float> in(std::is_same<E, float>::value ? 0 : W * C), out(std::is_same<E, float>::value ? 0 : W * C);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task % H, bt = task / H, t = bt % T, b = bt / T;
      const float* a = scale.data() + b * C;
      const float* a_lo = scale_lo.data() + b * C;
      const float* sh = shift.data() + b * C;
      const E* src = xp + ((b * T + t) * H + h) * W * C;
      E* frame = yp + (b * To + t + pt) * Ho * Wo * C;
      E* row = frame + (h + ph) * Wo * C;
      if constexpr (std::is_same<E, float>::value) {
        cl_affine(src, W, C, a, a_lo, sh, silu, row + pw * C);
      } else {
        load_f32(src, W * C, in.data());
        cl_affine(in.data(), W, C, a, a_lo, sh, silu, out.data());
        store_from_f32(out.data(), W * C, row + pw * C);
      }
      for (int64_t i = 0; i < pw; ++i) {
        std::memcpy(row + i * C, row + pw * C, C * sizeof(E));
        std::memcpy(row + (pw + W + i) * C, row + (pw + W - 1) * C, C * sizeof(E));
      }
      if (h == 0)
        for (int64_t i = 0; i < ph; ++i) std::memcpy(frame + i * Wo * C, row, Wo * C * sizeof(E));
      if (h == H - 1)
        for (int64_t i = 0; i < ph; ++i) std::memcpy(frame + (ph + H + i) * Wo * C, row, Wo * C * sizeof(E));
      if (t == 0) {
        for (int64_t i = 0; i < pt; ++i) {
          E* f = yp + (b * To + i) * Ho * Wo * C;
          std::memcpy(f + (h + ph) * Wo * C, row, Wo * C * sizeof(E));
          if (h == 0)
            for (int64_t j = 0; j < ph; ++j) std::memcpy(f + j * Wo * C, row, Wo * C * sizeof(E));
          if (h == H - 1)
            for (int64_t j = 0; j < ph; ++j) std::memcpy(f + (ph + H + j) * Wo * C, row, Wo * C * sizeof(E));
        }
      }
    }
  });
}

// A 5-D tensor stored channels-last-3d (and not also plainly contiguous, where the NCDHW path serves).
bool is_cl3d(const at::Tensor& x) {
  return x.dim() == 5 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast3d);
}

void check_pad(int64_t pt, int64_t ph, int64_t pw) {
  KK_CHECK(pt >= 0 && ph >= 0 && pw >= 0, "padding must be >= 0, got (", pt, ", ", ph, ", ", pw, ")");
}

at::Tensor group_norm_silu_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, int64_t groups, double eps, bool silu,
                               int64_t pt, int64_t ph, int64_t pw) {
  KK_CHECK_CPU(x);
  KK_CHECK(x.dim() >= 2, "x must be (B, C, ...), got shape ", x.sizes());
  const int64_t C = x.size(1);
  KK_CHECK(groups > 0 && C % groups == 0, "groups must divide C=", C, ", got ", groups);
  KK_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
           "x must be float32, bfloat16 or float16, got ", x.scalar_type());
  check_pad(pt, ph, pw);
  const bool padded = pt || ph || pw;
  KK_CHECK(!padded || x.dim() == 5, "a padded output needs x of shape (B, C, T, H, W), got ", x.sizes());
  const bool cl = is_cl3d(x);
  at::Tensor xc = cl ? x : x.contiguous();
  at::Tensor g, b;
  for (auto* p : {&weight, &bias}) {
    if (p->has_value()) {
      KK_CHECK((*p)->dim() == 1 && (*p)->size(0) == C, "weight and bias must be (C,) with C=", C);
      KK_CHECK_CPU(**p);
    }
  }
  if (weight.has_value()) g = weight->to(at::kFloat).contiguous();
  if (bias.has_value()) b = bias->to(at::kFloat).contiguous();
  std::vector<int64_t> shape = x.sizes().vec();
  if (padded) {
    shape[2] += pt;
    shape[3] += 2 * ph;
    shape[4] += 2 * pw;
  }
  at::Tensor y = at::empty(shape, xc.options().memory_format(cl ? at::MemoryFormat::ChannelsLast3d
                                                                    : at::MemoryFormat::Contiguous));
  if (xc.numel() == 0) return y;
  const float* gp = g.defined() ? g.data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "group_norm_silu", [&] {
    if (cl)
      group_norm_silu_cl_kernel<scalar_t>(xc, gp, bp, groups, eps, silu, pt, ph, pw, y);
    else
      group_norm_silu_kernel<scalar_t>(xc, gp, bp, groups, eps, silu, pt, ph, pw, y);
  });
  return y;
}

template <typename U>
void causal_pad_kernel(const at::Tensor& x, int64_t pt, int64_t ph, int64_t pw, int64_t ut, int64_t uh,
                       int64_t uw, at::Tensor& y) {
  const int64_t BC = x.size(0) * x.size(1), T = x.size(2), H = x.size(3), W = x.size(4);
  const int64_t Tu = ut == 1 ? T : 1 + (T - 1) * ut, Hu = H * uh, Wu = W * uw;
  const int64_t To = y.size(2), Ho = y.size(3), Wo = y.size(4);
  const U* xp = reinterpret_cast<const U*>(x.data_ptr());
  U* yp = reinterpret_cast<U*>(y.data_ptr());
  std::vector<int64_t> col(Wo);
  for (int64_t j = 0; j < Wo; ++j) col[j] = std::min(std::max(j - pw, int64_t(0)), Wu - 1) / uw;
  at::parallel_for(0, BC * To, grain_for(Ho * Wo), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tp = task % To, bc = task / To;
      const int64_t u = std::min(std::max(tp - pt, int64_t(0)), Tu - 1);
      const int64_t t = (ut == 1 || u == 0) ? u : (u - 1) / ut + 1;
      const U* src = xp + (bc * T + t) * H * W;
      U* frame = yp + task * Ho * Wo;
      for (int64_t hp = 0; hp < Ho; ++hp) {
        const int64_t h = std::min(std::max(hp - ph, int64_t(0)), Hu - 1) / uh;
        const U* s = src + h * W;
        U* row = frame + hp * Wo;
        if (uw == 1) {
          std::memcpy(row + pw, s, W * sizeof(U));
          for (int64_t i = 0; i < pw; ++i) {
            row[i] = s[0];
            row[pw + W + i] = s[W - 1];
          }
        } else {
          for (int64_t j = 0; j < Wo; ++j) row[j] = s[col[j]];
        }
      }
    }
  });
}

// Channels-last-3d: the same gather with the channel vector (C elements) as the unit.
template <typename U>
void causal_pad_cl_kernel(const at::Tensor& x, int64_t pt, int64_t ph, int64_t pw, int64_t ut, int64_t uh,
                          int64_t uw, at::Tensor& y) {
  const int64_t B = x.size(0), C = x.size(1), T = x.size(2), H = x.size(3), W = x.size(4);
  const int64_t Tu = ut == 1 ? T : 1 + (T - 1) * ut, Hu = H * uh, Wu = W * uw;
  const int64_t To = y.size(2), Ho = y.size(3), Wo = y.size(4);
  const U* xp = reinterpret_cast<const U*>(x.data_ptr());
  U* yp = reinterpret_cast<U*>(y.data_ptr());
  std::vector<int64_t> col(Wo);
  for (int64_t j = 0; j < Wo; ++j) col[j] = std::min(std::max(j - pw, int64_t(0)), Wu - 1) / uw;
  at::parallel_for(0, B * To * Ho, grain_for(Wo * C), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t hp = task % Ho, btp = task / Ho, tp = btp % To, b = btp / To;
      const int64_t u = std::min(std::max(tp - pt, int64_t(0)), Tu - 1);
      const int64_t t = (ut == 1 || u == 0) ? u : (u - 1) / ut + 1;
      const int64_t h = std::min(std::max(hp - ph, int64_t(0)), Hu - 1) / uh;
      const U* s = xp + ((b * T + t) * H + h) * W * C;
      U* row = yp + task * Wo * C;
      if (uw == 1) {
        std::memcpy(row + pw * C, s, W * C * sizeof(U));
        for (int64_t i = 0; i < pw; ++i) {
          std::memcpy(row + i * C, s, C * sizeof(U));
          std::memcpy(row + (pw + W + i) * C, s + (W - 1) * C, C * sizeof(U));
        }
      } else {
        for (int64_t j = 0; j < Wo; ++j) std::memcpy(row + j * C, s + col[j] * C, C * sizeof(U));
      }
    }
  });
}

at::Tensor causal_pad3d_cpu(const at::Tensor& x, int64_t pt, int64_t ph, int64_t pw, int64_t ut, int64_t uh,
                            int64_t uw) {
  KK_CHECK_CPU(x);
  KK_CHECK_DIM(x, 5);
  check_pad(pt, ph, pw);
  KK_CHECK(ut >= 1 && uh >= 1 && uw >= 1, "upsampling factors must be >= 1, got (", ut, ", ", uh, ", ", uw, ")");
  const bool cl = is_cl3d(x);
  at::Tensor xc = cl ? x : x.contiguous();
  const int64_t T = x.size(2), H = x.size(3), W = x.size(4);
  const int64_t Tu = ut == 1 ? T : 1 + (T - 1) * ut;
  at::Tensor y = at::empty({x.size(0), x.size(1), Tu + pt, H * uh + 2 * ph, W * uw + 2 * pw},
                           xc.options().memory_format(cl ? at::MemoryFormat::ChannelsLast3d
                                                         : at::MemoryFormat::Contiguous));
  if (y.numel() == 0 || xc.numel() == 0) return y;
  // the padding only moves bytes: one kernel per element size, whatever the dtype
  const auto run = [&](auto bits) {
    using U = decltype(bits);
    if (cl)
      causal_pad_cl_kernel<U>(xc, pt, ph, pw, ut, uh, uw, y);
    else
      causal_pad_kernel<U>(xc, pt, ph, pw, ut, uh, uw, y);
  };
  switch (xc.element_size()) {
    case 1: run(uint8_t{}); break;
    case 2: run(uint16_t{}); break;
    case 4: run(uint32_t{}); break;
    case 8: run(uint64_t{}); break;
    default: KK_CHECK(false, "unsupported element size ", xc.element_size());
  }
  return y;
}

// lerp(a, b, w) exactly as torch computes it.
template <typename A>
inline A lerp(A a, A b, A w) {
  return w < A(0.5) ? a + w * (b - a) : b - (b - a) * (A(1) - w);
}

template <typename T>
void tile_blend_kernel(at::Tensor& out, const at::Tensor& tile3, int64_t start, int64_t e) {
  using acc = typename std::conditional<std::is_same<T, double>::value, double, float>::type;
  const int64_t outer = tile3.size(0), n = tile3.size(1), inner = tile3.size(2);
  const int64_t L = out.numel() / std::max<int64_t>(outer * inner, 1);
  const int64_t so = tile3.stride(0), sn = tile3.stride(1);
  T* op = out.data_ptr<T>();
  const T* tp = tile3.data_ptr<T>();
  // Positions i of one outer index o: blend the first e, copy the rest (one memcpy when contiguous).
  auto rows = [&](int64_t o, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < std::min(i1, e); ++i) {
      const T* src = tp + o * so + i * sn;
      T* dst = op + (o * L + start + i) * inner;
      const acc w = static_cast<acc>(i) / static_cast<acc>(e);
      for (int64_t k = 0; k < inner; ++k)
        dst[k] = static_cast<T>(lerp<acc>(static_cast<acc>(dst[k]), static_cast<acc>(src[k]), w));
    }
    const int64_t c0 = std::max(i0, e);
    if (c0 >= i1) return;
    if (sn == inner) {
      std::memcpy(op + (o * L + start + c0) * inner, tp + o * so + c0 * sn, (i1 - c0) * inner * sizeof(T));
    } else {
      for (int64_t i = c0; i < i1; ++i)
        std::memcpy(op + (o * L + start + i) * inner, tp + o * so + i * sn, inner * sizeof(T));
    }
  };
  if (inner >= 4096) {  // few long rows (a temporal or H blend): one task per position
    at::parallel_for(0, outer * n, grain_for(inner), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) rows(task / n, task % n, task % n + 1);
    });
  } else {  // many short rows (a W blend): one task per outer index
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n * inner, 1));
    at::parallel_for(0, outer, grain, [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o) rows(o, 0, n);
    });
  }
}

void tile_blend_cpu(at::Tensor& out, const at::Tensor& tile, int64_t dim, int64_t start, int64_t prev_stop) {
  KK_CHECK_CPU(out);
  KK_CHECK_CPU(tile);
  KK_CHECK(out.is_contiguous(), "out must be contiguous");
  KK_CHECK(out.dim() == tile.dim() && dim >= 0 && dim < out.dim(), "out and tile must have the same rank and 0 <= dim < rank");
  KK_CHECK(out.scalar_type() == tile.scalar_type(), "out and tile must have the same dtype");
  for (int64_t d = 0; d < out.dim(); ++d)
    KK_CHECK(d == dim || out.size(d) == tile.size(d), "out ", out.sizes(), " and tile ", tile.sizes(),
             " must agree except on dim ", dim);
  const int64_t n = tile.size(dim), L = out.size(dim);
  KK_CHECK(start >= 0 && start + n <= L, "the tile [", start, ", ", start + n, ") must lie inside out's ", L);
  const int64_t e = std::max<int64_t>(0, std::min(prev_stop - start, n));
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= tile.size(d);
  for (int64_t d = dim + 1; d < tile.dim(); ++d) inner *= tile.size(d);
  if (outer * n * inner == 0) return;
  // A view when tile's inner dims are contiguous and its outer dims collapse (a slice along dim is).
  at::Tensor tile3 = tile.reshape({outer, n, inner});
  if (tile3.stride(2) != 1) tile3 = tile3.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "tile_blend", [&] {
    tile_blend_kernel<scalar_t>(out, tile3, start, e);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kandinsky_kernels_C, m) {
  m.def("group_norm_silu(Tensor x, Tensor? weight, Tensor? bias, int groups, float eps, bool silu, int pad_t, "
        "int pad_h, int pad_w) -> Tensor");
  m.def("causal_pad3d(Tensor x, int pad_t, int pad_h, int pad_w, int up_t, int up_h, int up_w) -> Tensor");
  m.def("tile_blend_(Tensor(a!) out, Tensor tile, int dim, int start, int prev_stop) -> ()");
}

TORCH_LIBRARY_IMPL(kandinsky_kernels_C, CPU, m) {
  m.impl("group_norm_silu", &group_norm_silu_cpu);
  m.impl("causal_pad3d", &causal_pad3d_cpu);
  m.impl("tile_blend_", &tile_blend_cpu);
}
