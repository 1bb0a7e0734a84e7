// CPU kernels of the DiT's adaptive LayerNorm "fp32 islands" (kandinsky_model/nn.py scale_shift_norm and
// gate_sum), one read of each input and one write of the output instead of several full fp32 copies.
//
// scale_shift_layer_norm: x (N, R, D) with shift, scale (N, D) (the modulation of the R rows of group n):
//   y = LN(x) * (1 + scale) + shift, non-affine LayerNorm over D, all in fp32, one write in x's dtype.
//   Per row: the row is widened once into an fp32 buffer (L1-resident), then two passes over it for the
//   statistics: the mean from fp32 lanes of (x - x[0]) summed in double; the variance from fp32 lanes of
//   d^2, d = (x - mean_hi) - mean_lo, where mean_hi + mean_lo is the double mean split into two floats
//   (so a large common offset neither cancels the variance nor leaks its rounding into d), summed in
//   double; rstd = 1 / sqrt(var + eps) in double. A third pass writes d * rstd * (1 + scale) + shift.
//   (1 + scale) is formed in scale's dtype, as the reference's `1.0 + scale` does.
// gated_residual: y = x + gate * out in fp32 per element, one write in x's dtype (gate (N, D), fp32).
//
// Backward (the custom ops' autograd, kandinsky_kernels/ops/adaln.py): the LayerNorm statistics are
// recomputed from x per row (the row is already in L1 for dx, and saving them would cost a tensor per
// call for a few flops), dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) with g = dy * (1 + scale);
// dshift, dscale, dgate are sums over the R rows, by fixed row blocks (deterministic, see reduce_blocks).
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

// Work below this many elements runs on the calling thread (see vae.cpp: a parallel region on a loaded
// host costs up to a scheduler slice). grain_for(elements per row): rows per task reaching that size.
constexpr int64_t kSerialElems = 1 << 16;
inline int64_t grain_for(int64_t per_row) { return std::max<int64_t>(1, kSerialElems / std::max<int64_t>(per_row, 1)); }

// fp32 reductions with GCC vector types (no -ffast-math: a plain reduction loop would stay scalar).
typedef float v8f __attribute__((vector_size(32)));

// Sum of (x[i] - pivot) over n floats, fp32 lanes, returned in double.
KK_CLONES double shifted_sum(const float* x, int64_t n, float pivot) {
  v8f s0 = {}, s1 = {};
  const v8f pv = v8f{} + pivot;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    v8f a, b;
    std::memcpy(&a, x + i, sizeof(a));
    std::memcpy(&b, x + i + 8, sizeof(b));
    s0 += a - pv;
    s1 += b - pv;
  }
  double s = 0.0;
  for (; i < n; ++i) s += static_cast<double>(x[i] - pivot);
  for (int j = 0; j < 8; ++j) s += static_cast<double>(s0[j]) + static_cast<double>(s1[j]);
  return s;
}

// Sum of ((x[i] - hi) - lo)^2 over n floats, fp32 lanes, returned in double.
KK_CLONES double centered_sq_sum(const float* x, int64_t n, float hi, float lo) {
  v8f q0 = {}, q1 = {};
  const v8f h = v8f{} + hi, l = v8f{} + lo;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    v8f a, b;
    std::memcpy(&a, x + i, sizeof(a));
    std::memcpy(&b, x + i + 8, sizeof(b));
    a = (a - h) - l;
    b = (b - h) - l;
    q0 += a * a;
    q1 += b * b;
  }
  double q = 0.0;
  for (; i < n; ++i) {
    const float d = (x[i] - hi) - lo;
    q += static_cast<double>(d * d);
  }
  for (int j = 0; j < 8; ++j) q += static_cast<double>(q0[j]) + static_cast<double>(q1[j]);
  return q;
}

// y = ((x - hi) - lo) * rstd * s1 + shift
KK_CLONES void norm_modulate_row(const float* x, int64_t n, float hi, float lo, float rstd, const float* s1,
                                 const float* shift, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = (((x[i] - hi) - lo) * rstd) * s1[i] + shift[i];
}

// y = x + g * o
KK_CLONES void gated_row(const float* x, const float* o, const float* g, int64_t n, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] + g[i] * o[i];
}

#include "f32_rows.h"  // inside the anonymous namespace: this file's own clones

// The row's LayerNorm statistics (see the file comment). The backward recomputes them with this same
// function, so its x_hat is bit-for-bit the forward's.
struct RowStats {
  float hi, lo, rstd;
};
inline RowStats row_stats(const float* f, int64_t D, double eps) {
  const float pivot = f[0];
  const double mean = pivot + shifted_sum(f, D, pivot) / D;
  const float hi = static_cast<float>(mean);
  const float lo = static_cast<float>(mean - hi);
  const double var = centered_sq_sum(f, D, hi, lo) / D;
  return {hi, lo, static_cast<float>(1.0 / std::sqrt(var + eps))};
}

// ---- backward ----------------------------------------------------------------------------------------
// The modulation gradients are sums over the R rows of a group. Rows are cut into blocks whose size depends
// on the shapes only; each block sums its rows in fp32 into its own partial vector and the partials are
// added in block order in double: the same bits for any thread count, no atomics.
inline int64_t rows_per_block(int64_t R, int64_t D) { return std::min<int64_t>(std::max<int64_t>(R, 1), grain_for(D)); }

// ln backward, first pass over one row: x_hat and g = dy * s1 into buffers, dy and dy * x_hat added to the
// block's partials; returns sum(g) and sum(g * x_hat).
KK_CLONES void ln_bwd_row(const float* x, const float* dy, const float* s1, int64_t n, float hi, float lo, float rstd,
                          float* xhat, float* g, float* p_shift, float* p_scale, float* sum_g, float* sum_gx) {
  float a = 0.f, b = 0.f;
#pragma omp simd reduction(+ : a, b)
  for (int64_t i = 0; i < n; ++i) {
    const float xh = ((x[i] - hi) - lo) * rstd;
    const float gi = dy[i] * s1[i];
    xhat[i] = xh;
    g[i] = gi;
    p_shift[i] += dy[i];
    p_scale[i] += dy[i] * xh;
    a += gi;
    b += gi * xh;
  }
  *sum_g = a;
  *sum_gx = b;
}

// dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))
KK_CLONES void ln_dx_row(const float* xhat, const float* g, int64_t n, float rstd, float mg, float mgx, float* dx) {
  for (int64_t i = 0; i < n; ++i) dx[i] = rstd * ((g[i] - mg) - xhat[i] * mgx);
}

// dout = dy * gate; the block's partial of dgate += dy * out.
KK_CLONES void gated_bwd_row(const float* dy, const float* o, const float* g, int64_t n, float* dout, float* p_gate) {
  for (int64_t i = 0; i < n; ++i) {
    dout[i] = dy[i] * g[i];
    p_gate[i] += dy[i] * o[i];
  }
}

// out[n, :] = sum over blocks b of part[n, b, :] in double, in block order.
void reduce_blocks(const float* part, int64_t N, int64_t nblk, int64_t D, float* out) {
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<double> acc(D);
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t b = 0; b < nblk; ++b) {
        const float* p = part + (n * nblk + b) * D;
        for (int64_t i = 0; i < D; ++i) acc[i] += p[i];
      }
      for (int64_t i = 0; i < D; ++i) out[n * D + i] = static_cast<float>(acc[i]);
    }
  });
}

template <typename E>
void scale_shift_ln_kernel(const E* xp, const float* shift, const float* s1, int64_t N, int64_t R, int64_t D,
                           double eps, E* yp) {
  constexpr bool kF32 = std::is_same<E, float>::value;
  at::parallel_for(0, N * R, grain_for(D), [&](int64_t begin, int64_t end) {
    std::vector<float> in(kF32 ? 0 : D), out(kF32 ? 0 : D);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / R;
      const float* f;
      if constexpr (kF32) {
        f = xp + row * D;
      } else {
        load_f32(xp + row * D, D, in.data());
        f = in.data();
      }
      const RowStats st = row_stats(f, D, eps);
      float* dst = kF32 ? reinterpret_cast<float*>(yp + row * D) : out.data();
      norm_modulate_row(f, D, st.hi, st.lo, st.rstd, s1 + n * D, shift + n * D, dst);
      if constexpr (!kF32) store_from_f32(out.data(), D, yp + row * D);
    }
  });
}

template <typename E>
void gated_residual_kernel(const E* xp, const E* op, const float* gate, int64_t N, int64_t R, int64_t D, E* yp) {
  constexpr bool kF32 = std::is_same<E, float>::value;
  at::parallel_for(0, N * R, grain_for(D), [&](int64_t begin, int64_t end) {
    std::vector<float> xb(kF32 ? 0 : D), ob(kF32 ? 0 : D), yb(kF32 ? 0 : D);
    for (int64_t row = begin; row < end; ++row) {
      const float* g = gate + (row / R) * D;
      if constexpr (kF32) {
        gated_row(xp + row * D, op + row * D, g, D, yp + row * D);
      } else {
        load_f32(xp + row * D, D, xb.data());
        load_f32(op + row * D, D, ob.data());
        gated_row(xb.data(), ob.data(), g, D, yb.data());
        store_from_f32(yb.data(), D, yp + row * D);
      }
    }
  });
}

template <typename E>
void scale_shift_ln_bwd_kernel(const E* dyp, const E* xp, const float* s1, int64_t N, int64_t R, int64_t D,
                               double eps, E* dxp, float* part_shift, float* part_scale, int64_t rpb, int64_t nblk) {
  const int64_t tasks = N * nblk;
  at::parallel_for(0, tasks, std::max<int64_t>(1, grain_for(D) / rpb), [&](int64_t begin, int64_t end) {
    std::vector<float> xb(D), dyb(D), xhat(D), g(D), dxb(D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / nblk, r0 = (t % nblk) * rpb, r1 = std::min(R, r0 + rpb);
      float* psh = part_shift + t * D;
      float* psc = part_scale + t * D;
      std::fill(psh, psh + D, 0.f);
      std::fill(psc, psc + D, 0.f);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t row = n * R + r;
        load_f32(xp + row * D, D, xb.data());
        load_f32(dyp + row * D, D, dyb.data());
        const RowStats st = row_stats(xb.data(), D, eps);
        float sg, sgx;
        ln_bwd_row(xb.data(), dyb.data(), s1 + n * D, D, st.hi, st.lo, st.rstd, xhat.data(), g.data(), psh, psc, &sg,
                   &sgx);
        const float mg = sg / static_cast<float>(D), mgx = sgx / static_cast<float>(D);
        ln_dx_row(xhat.data(), g.data(), D, st.rstd, mg, mgx, dxb.data());
        store_from_f32(dxb.data(), D, dxp + row * D);
      }
    }
  });
}

template <typename E>
void gated_residual_bwd_kernel(const E* dyp, const E* op, const float* gate, int64_t N, int64_t R, int64_t D, E* doutp,
                               float* part_gate, int64_t rpb, int64_t nblk) {
  const int64_t tasks = N * nblk;
  at::parallel_for(0, tasks, std::max<int64_t>(1, grain_for(D) / rpb), [&](int64_t begin, int64_t end) {
    std::vector<float> dyb(D), ob(D), db(D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / nblk, r0 = (t % nblk) * rpb, r1 = std::min(R, r0 + rpb);
      float* pg = part_gate + t * D;
      std::fill(pg, pg + D, 0.f);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t row = n * R + r;
        load_f32(dyp + row * D, D, dyb.data());
        load_f32(op + row * D, D, ob.data());
        gated_bwd_row(dyb.data(), ob.data(), gate + n * D, D, db.data(), pg);
        store_from_f32(db.data(), D, doutp + row * D);
      }
    }
  });
}

void check_x(const at::Tensor& x) {
  KK_CHECK_CPU(x);
  KK_CHECK(x.dim() >= 2, "x must be (..., R, D), got shape ", x.sizes());
  KK_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
           "x must be float32, bfloat16 or float16, got ", x.scalar_type());
}

// How many modulation rows each (...) index of x (..., R, D) has: 1 for (..., 1, D) with x's leading dims,
// G for per-group modulation (..., G, 1, D) with G dividing R (rows [g R/G, (g+1) R/G) take row g: the
// model's per-frame modulation of packed videos, so the result is (..., R, D) itself, not a view of a
// (..., G, R/G, D) one). Either way the kernels see N * G modulation rows of R / G x rows each.
int64_t mod_groups(const char* name, const at::Tensor& m, const at::Tensor& x) {
  KK_CHECK_CPU(m);
  std::vector<int64_t> want = x.sizes().vec();
  want[want.size() - 2] = 1;
  int64_t groups = 1;
  if (m.dim() == x.dim() + 1) {
    groups = m.size(-3);
    want.insert(want.end() - 2, groups);
    KK_CHECK(groups >= 1 && x.size(-2) % groups == 0, name, " (..., G, 1, D): G must divide x's R = ", x.size(-2),
             ", got G = ", groups);
  }
  KK_CHECK(m.sizes().vec() == want, name, " must have shape ", at::IntArrayRef(want),
           " ((x's leading dims, 1, D), or (x's leading dims, G, 1, D) with G dividing R), got ", m.sizes());
  KK_CHECK(m.scalar_type() == at::kFloat || m.scalar_type() == x.scalar_type(), name,
           " must be float32 or x's dtype, got ", m.scalar_type());
  return groups;
}

// A modulation of x (see mod_groups) as a contiguous fp32 (N * G, D) tensor; G into *groups when given.
at::Tensor mod_f32(const char* name, const at::Tensor& m, const at::Tensor& x, int64_t* groups = nullptr) {
  const int64_t g = mod_groups(name, m, x);
  if (groups != nullptr) *groups = g;
  return m.to(at::kFloat).contiguous();
}

at::Tensor scale_shift_layer_norm_cpu(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
                                      double eps) {
  check_x(x);
  KK_CHECK(eps > 0, "eps must be > 0, got ", eps);
  int64_t G = 1;
  const at::Tensor sh = mod_f32("shift", shift, x, &G);
  mod_groups("scale", scale, x);
  KK_CHECK(shift.sizes() == scale.sizes(), "shift and scale must have one shape, got ", shift.sizes(), " and ",
           scale.sizes());
  const at::Tensor s1 = (scale + 1).to(at::kFloat).contiguous();  // 1 + scale in scale's dtype, as the reference
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(x.sizes(), xc.options());
  if (xc.numel() == 0) return y;
  const int64_t D = x.size(-1), R = x.size(-2) / G, N = xc.numel() / (D * R);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "scale_shift_layer_norm", [&] {
    scale_shift_ln_kernel<scalar_t>(xc.data_ptr<scalar_t>(), sh.data_ptr<float>(), s1.data_ptr<float>(), N, R, D,
                                    eps, y.data_ptr<scalar_t>());
  });
  return y;
}

at::Tensor gated_residual_cpu(const at::Tensor& x, const at::Tensor& out, const at::Tensor& gate) {
  check_x(x);
  KK_CHECK_CPU(out);
  KK_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(), "out must match x ", x.sizes(), " ",
           x.scalar_type(), ", got ", out.sizes(), " ", out.scalar_type());
  int64_t G = 1;
  const at::Tensor g = mod_f32("gate", gate, x, &G);
  const at::Tensor xc = x.contiguous(), oc = out.contiguous();
  at::Tensor y = at::empty(x.sizes(), xc.options());
  if (xc.numel() == 0) return y;
  const int64_t D = x.size(-1), R = x.size(-2) / G, N = xc.numel() / (D * R);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "gated_residual", [&] {
    gated_residual_kernel<scalar_t>(xc.data_ptr<scalar_t>(), oc.data_ptr<scalar_t>(), g.data_ptr<float>(), N, R, D,
                                    y.data_ptr<scalar_t>());
  });
  return y;
}

void check_grad(const at::Tensor& dy, const at::Tensor& x) {
  KK_CHECK_CPU(dy);
  KK_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "dy must match x ", x.sizes(), " ",
           x.scalar_type(), ", got ", dy.sizes(), " ", dy.scalar_type());
}

// Returns (dx in x's dtype, dshift, dscale as fp32 in scale's shape, which the forward made shift's too); the
// caller casts them to the modulations' dtypes.
std::tuple<at::Tensor, at::Tensor, at::Tensor> scale_shift_layer_norm_backward_cpu(const at::Tensor& dy,
                                                                                    const at::Tensor& x,
                                                                                    const at::Tensor& scale,
                                                                                    double eps) {
  check_x(x);
  check_grad(dy, x);
  KK_CHECK(eps > 0, "eps must be > 0, got ", eps);
  const int64_t G = mod_groups("scale", scale, x);
  const at::Tensor s1 = (scale + 1).to(at::kFloat).contiguous();  // as the forward
  const at::Tensor xc = x.contiguous(), dyc = dy.contiguous();
  at::Tensor dx = at::empty(x.sizes(), xc.options());
  const auto fopt = xc.options().dtype(at::kFloat);
  at::Tensor dshift = at::zeros(scale.sizes(), fopt), dscale = at::zeros(scale.sizes(), fopt);
  if (xc.numel() == 0) return {dx, dshift, dscale};
  const int64_t D = x.size(-1), R = x.size(-2) / G, N = xc.numel() / (D * R);
  const int64_t rpb = rows_per_block(R, D), nblk = (R + rpb - 1) / rpb;
  at::Tensor part = at::empty({2, N * nblk, D}, fopt);
  float* p_shift = part.data_ptr<float>();
  float* p_scale = p_shift + N * nblk * D;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "scale_shift_layer_norm_backward", [&] {
    scale_shift_ln_bwd_kernel<scalar_t>(dyc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), s1.data_ptr<float>(), N, R,
                                        D, eps, dx.data_ptr<scalar_t>(), p_shift, p_scale, rpb, nblk);
  });
  reduce_blocks(p_shift, N, nblk, D, dshift.data_ptr<float>());
  reduce_blocks(p_scale, N, nblk, D, dscale.data_ptr<float>());
  return {dx, dshift, dscale};
}

// Returns (dout in x's dtype, dgate as fp32 in gate's shape); dx is dy itself, which the caller passes on.
std::tuple<at::Tensor, at::Tensor> gated_residual_backward_cpu(const at::Tensor& dy, const at::Tensor& out,
                                                               const at::Tensor& gate) {
  check_x(out);
  check_grad(dy, out);
  int64_t G = 1;
  const at::Tensor g = mod_f32("gate", gate, out, &G);
  const at::Tensor oc = out.contiguous(), dyc = dy.contiguous();
  at::Tensor dout = at::empty(out.sizes(), oc.options());
  at::Tensor dgate = at::zeros(gate.sizes(), oc.options().dtype(at::kFloat));
  if (oc.numel() == 0) return {dout, dgate};
  const int64_t D = out.size(-1), R = out.size(-2) / G, N = oc.numel() / (D * R);
  const int64_t rpb = rows_per_block(R, D), nblk = (R + rpb - 1) / rpb;
  at::Tensor part = at::empty({N * nblk, D}, oc.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, oc.scalar_type(), "gated_residual_backward", [&] {
    gated_residual_bwd_kernel<scalar_t>(dyc.data_ptr<scalar_t>(), oc.data_ptr<scalar_t>(), g.data_ptr<float>(), N, R,
                                        D, dout.data_ptr<scalar_t>(), part.data_ptr<float>(), rpb, nblk);
  });
  reduce_blocks(part.data_ptr<float>(), N, nblk, D, dgate.data_ptr<float>());
  return {dout, dgate};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kandinsky_kernels_C, m) {
  m.def("scale_shift_layer_norm(Tensor x, Tensor shift, Tensor scale, float eps) -> Tensor");
  m.def("gated_residual(Tensor x, Tensor out, Tensor gate) -> Tensor");
  m.def("scale_shift_layer_norm_backward(Tensor dy, Tensor x, Tensor scale, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("gated_residual_backward(Tensor dy, Tensor out, Tensor gate) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kandinsky_kernels_C, CPU, m) {
  m.impl("scale_shift_layer_norm", &scale_shift_layer_norm_cpu);
  m.impl("gated_residual", &gated_residual_cpu);
  m.impl("scale_shift_layer_norm_backward", &scale_shift_layer_norm_backward_cpu);
  m.impl("gated_residual_backward", &gated_residual_backward_cpu);
}
