// rms_norm_rope: the attention's q/k normalisation in one pass over x (B, S, H, Dh): per row of Dh, the
// fp32 sum of squares, then y = x * rsqrt(mean + eps) * weight and, with cos / sin, the rotation of each
// adjacent pair (y0 c - y1 s, y0 s + y1 c), written once in x's dtype. The unfused model code made five
// passes over fp32 copies of q and k (cast, RMSNorm, complex multiply, cast back).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "registration.h"

namespace {

#include "f32_rows.h"  // inside the anonymous namespace: this file's own clones

// One row in fp32: out = v * rsqrt(mean(v^2) + eps) * w, then (with c) each pair rotated by (c[j], s[j]).
KK_CLONES void norm_rope_row(const float* v, const float* w, const float* c, const float* s, int64_t Dh, float eps,
                             float* out) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t d = 0; d < Dh; ++d) ss += v[d] * v[d];
  const float rstd = 1.f / std::sqrt(ss / static_cast<float>(Dh) + eps);
  if (c == nullptr) {
#pragma omp simd
    for (int64_t d = 0; d < Dh; ++d) out[d] = v[d] * rstd * w[d];
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < Dh / 2; ++j) {
    const float y0 = v[2 * j] * rstd * w[2 * j], y1 = v[2 * j + 1] * rstd * w[2 * j + 1];
    out[2 * j] = y0 * c[j] - y1 * s[j];
    out[2 * j + 1] = y0 * s[j] + y1 * c[j];
  }
}

// Backward of one row: dz (the gradient of the output) rotated back by -angle gives dy, the gradient of
// y = x_hat * w; then dw partial += dy * x_hat and dx = rstd * (dy * w - x_hat * mean(dy * w * x_hat)).
// rstd is recomputed as the forward computes it.
KK_CLONES void norm_rope_bwd_row(const float* v, const float* dz, const float* w, const float* c, const float* s,
                                 int64_t Dh, float eps, float* dy, float* dx, float* p_w) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t d = 0; d < Dh; ++d) ss += v[d] * v[d];
  const float rstd = 1.f / std::sqrt(ss / static_cast<float>(Dh) + eps);
  if (c == nullptr) {
    std::memcpy(dy, dz, sizeof(float) * Dh);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < Dh / 2; ++j) {
      const float z0 = dz[2 * j], z1 = dz[2 * j + 1];
      dy[2 * j] = z0 * c[j] + z1 * s[j];
      dy[2 * j + 1] = z1 * c[j] - z0 * s[j];
    }
  }
  float sgx = 0.f;
#pragma omp simd reduction(+ : sgx)
  for (int64_t d = 0; d < Dh; ++d) {
    const float xh = v[d] * rstd;
    p_w[d] += dy[d] * xh;
    sgx += dy[d] * w[d] * xh;
  }
  const float m = sgx / static_cast<float>(Dh);
#pragma omp simd
  for (int64_t d = 0; d < Dh; ++d) dx[d] = rstd * (dy[d] * w[d] - (v[d] * rstd) * m);
}

// Rows [begin, end) of x viewed as (B * S * H, Dh); cos / sin rows are (b % cos_b, s).
template <typename T>
void rows_kernel(const T* x, const float* w, const float* cs, const float* sn, int64_t S, int64_t H, int64_t Dh,
                 int64_t cos_b, float eps, T* y, int64_t begin, int64_t end) {
  std::vector<float> v(Dh), o(Dh);
  const int64_t half = Dh / 2;
  for (int64_t r = begin; r < end; ++r) {
    const T* xr = x + r * Dh;
    load_f32(xr, Dh, v.data());
    const float *c = nullptr, *si = nullptr;
    if (cs != nullptr) {
      const int64_t s = (r / H) % S, b = r / (S * H);
      c = cs + ((b % cos_b) * S + s) * half;
      si = sn + ((b % cos_b) * S + s) * half;
    }
    norm_rope_row(v.data(), w, c, si, Dh, eps, o.data());
    store_from_f32(o.data(), Dh, y + r * Dh);
  }
}

// Backward of rows [begin, end); p_w: this block's partial of dweight (Dh floats, zeroed here).
template <typename T>
void bwd_rows_kernel(const T* dz, const T* x, const float* w, const float* cs, const float* sn, int64_t S, int64_t H,
                     int64_t Dh, int64_t cos_b, float eps, T* dx, float* p_w, int64_t begin, int64_t end) {
  std::vector<float> v(Dh), g(Dh), dy(Dh), o(Dh);
  std::fill(p_w, p_w + Dh, 0.f);
  const int64_t half = Dh / 2;
  for (int64_t r = begin; r < end; ++r) {
    load_f32(x + r * Dh, Dh, v.data());
    load_f32(dz + r * Dh, Dh, g.data());
    const float *c = nullptr, *si = nullptr;
    if (cs != nullptr) {
      const int64_t s = (r / H) % S, b = r / (S * H);
      c = cs + ((b % cos_b) * S + s) * half;
      si = sn + ((b % cos_b) * S + s) * half;
    }
    norm_rope_bwd_row(v.data(), g.data(), w, c, si, Dh, eps, dy.data(), o.data(), p_w);
    store_from_f32(o.data(), Dh, dx + r * Dh);
  }
}

// cos / sin checked ((1 or B), S, 1, Dh / 2, one shape) and widened to contiguous fp32; with their batch size.
std::tuple<at::Tensor, at::Tensor, int64_t> angles_f32(const at::Tensor& cos, const at::Tensor& sin, int64_t B,
                                                      int64_t S, int64_t Dh) {
  KK_CHECK(Dh % 2 == 0, "the rotation needs an even head dim, got ", Dh);
  for (const at::Tensor* t : {&cos, &sin}) {
    KK_CHECK_CPU(*t);
    KK_CHECK(t->dim() == 4 && (t->size(0) == 1 || t->size(0) == B) && t->size(1) == S && t->size(2) == 1 &&
                 t->size(3) == Dh / 2,
             "cos and sin must be (1 or ", B, ", ", S, ", 1, ", Dh / 2, "), got shape ", t->sizes());
  }
  KK_CHECK(cos.sizes() == sin.sizes(), "cos and sin must have one shape, got ", cos.sizes(), " and ", sin.sizes());
  at::Tensor c = cos.to(at::kFloat).contiguous();
  return {c, sin.to(at::kFloat).contiguous(), c.size(0)};
}

at::Tensor rms_norm_rope_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& cos,
                             const c10::optional<at::Tensor>& sin, double eps) {
  KK_CHECK_CPU(x);
  KK_CHECK_CPU(weight);
  KK_CHECK_DIM(x, 4);
  KK_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
           "x must be float32, bfloat16 or float16, got ", x.scalar_type());
  const int64_t B = x.size(0), S = x.size(1), H = x.size(2), Dh = x.size(3);
  KK_CHECK(weight.dim() == 1 && weight.size(0) == Dh, "weight must be (", Dh, ",), got shape ", weight.sizes());
  KK_CHECK(cos.has_value() == sin.has_value(), "cos and sin must be given together");
  KK_CHECK(eps >= 0 && std::isfinite(eps), "eps must be finite and >= 0, got ", eps);
  at::Tensor c, s;
  int64_t cos_b = 1;
  if (cos.has_value()) std::tie(c, s, cos_b) = angles_f32(*cos, *sin, B, S, Dh);
  const at::Tensor xc = x.contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t rows = B * S * H;
  if (rows == 0 || Dh == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "rms_norm_rope", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const float* wp = w.data_ptr<float>();
    const float* cp = c.defined() ? c.data_ptr<float>() : nullptr;
    const float* sp = s.defined() ? s.data_ptr<float>() : nullptr;
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(Dh, 1)), [&](int64_t b0, int64_t b1) {
      rows_kernel<scalar_t>(xp, wp, cp, sp, S, H, Dh, cos_b, static_cast<float>(eps), yp, b0, b1);
    });
  });
  return y;
}

// Returns (dx in x's dtype, dweight fp32 (Dh,)); the caller casts dweight to weight's dtype. The gradients of
// cos / sin are not computed here (the model's angles are buffers; ops/qk_norm.py forms them in torch).
// dweight sums over all rows: fixed blocks of rows (sized from the shapes only) each sum in fp32 into a
// partial, the partials are added in block order in double, so the result does not depend on the threads.
std::tuple<at::Tensor, at::Tensor> rms_norm_rope_backward_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                              const at::Tensor& weight,
                                                              const c10::optional<at::Tensor>& cos,
                                                              const c10::optional<at::Tensor>& sin, double eps) {
  KK_CHECK_CPU(x);
  KK_CHECK_CPU(dy);
  KK_CHECK_CPU(weight);
  KK_CHECK_DIM(x, 4);
  KK_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
           "x must be float32, bfloat16 or float16, got ", x.scalar_type());
  KK_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "dy must match x ", x.sizes(), " ",
           x.scalar_type(), ", got ", dy.sizes(), " ", dy.scalar_type());
  const int64_t B = x.size(0), S = x.size(1), H = x.size(2), Dh = x.size(3);
  KK_CHECK(weight.dim() == 1 && weight.size(0) == Dh, "weight must be (", Dh, ",), got shape ", weight.sizes());
  KK_CHECK(cos.has_value() == sin.has_value(), "cos and sin must be given together");
  at::Tensor c, s;
  int64_t cos_b = 1;
  if (cos.has_value()) std::tie(c, s, cos_b) = angles_f32(*cos, *sin, B, S, Dh);
  const at::Tensor xc = x.contiguous(), dyc = dy.contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor dx = at::empty_like(xc);
  at::Tensor dw = at::zeros({Dh}, xc.options().dtype(at::kFloat));
  const int64_t rows = B * S * H;
  if (rows == 0 || Dh == 0) return {dx, dw};
  const int64_t rpb = std::max<int64_t>(1, 16384 / std::max<int64_t>(Dh, 1)), nblk = (rows + rpb - 1) / rpb;
  at::Tensor part = at::empty({nblk, Dh}, xc.options().dtype(at::kFloat));
  float* pp = part.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "rms_norm_rope_backward", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* dp = dyc.data_ptr<scalar_t>();
    scalar_t* op = dx.data_ptr<scalar_t>();
    const float* wp = w.data_ptr<float>();
    const float* cp = c.defined() ? c.data_ptr<float>() : nullptr;
    const float* sp = s.defined() ? s.data_ptr<float>() : nullptr;
    at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        bwd_rows_kernel<scalar_t>(dp, xp, wp, cp, sp, S, H, Dh, cos_b, static_cast<float>(eps), op, pp + b * Dh,
                                  b * rpb, std::min(rows, (b + 1) * rpb));
      }
    });
  });
  float* dwp = dw.data_ptr<float>();
  for (int64_t d = 0; d < Dh; ++d) {
    double acc = 0.0;
    for (int64_t b = 0; b < nblk; ++b) acc += pp[b * Dh + d];
    dwp[d] = static_cast<float>(acc);
  }
  return {dx, dw};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kandinsky_kernels_C, m) {
  m.def("rms_norm_rope(Tensor x, Tensor weight, Tensor? cos, Tensor? sin, float eps) -> Tensor");
  m.def(
      "rms_norm_rope_backward(Tensor dy, Tensor x, Tensor weight, Tensor? cos, Tensor? sin, float eps) -> (Tensor, "
      "Tensor)");
}

TORCH_LIBRARY_IMPL(kandinsky_kernels_C, CPU, m) {
  m.impl("rms_norm_rope", &rms_norm_rope_cpu);
  m.impl("rms_norm_rope_backward", &rms_norm_rope_backward_cpu);
}
