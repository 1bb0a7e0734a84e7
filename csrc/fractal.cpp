// Kandinsky 5 fractal token order on CPU: (B, T, H, W, *rest) <-> (B, T*Hp*Wp, *rest).
//
// The op is a pure permutation of whole tokens, so it moves bytes and never looks at the dtype. A
// padded row hh of one frame splits into Wp/tile runs of `tile` tokens, one per tile column; each run
// is contiguous in both layouts (tile * prod(rest) elements), so every run is one straight copy and
// the op runs at memory bandwidth. Rows are independent, so (frame, row) is the parallel loop, run by
// at::parallel_for (OpenMP in torch's CPU builds) so that torch.set_num_threads applies.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "registration.h"

namespace {

// n rounded up to a multiple of tile, or a ValueError when that leaves int64 (a huge tile).
int64_t padded(int64_t n, int64_t tile) {
  KK_CHECK(tile > 0 && n >= 0 && n <= INT64_MAX - (tile - 1), "fractal: grid size ", n, " padded to tile ",
           tile, " overflows int64");
  return kk::checked_product("fractal: padded grid size", {(n + tile - 1) / tile, tile});
}

// Bytes of a (frames, hp, wp) token grid, checked: every offset the kernels compute is below it.
int64_t grid_bytes(int64_t frames, int64_t hp, int64_t wp, int64_t token_bytes) {
  return kk::checked_product("fractal: output size in bytes", {frames, hp, wp, token_bytes});
}

struct Geometry {
  int64_t frames;       // B * T
  int64_t h, w, tile;   // original grid rows/cols and tile edge
  int64_t hp, wp;       // padded grid
  int64_t token_bytes;  // prod(rest) * element size
};

// At least ~64 KiB of rows per thread, so that small inputs are not split across threads.
int64_t grain(const Geometry& g) {
  return std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, g.wp * g.token_bytes));
}

// Byte offset, in the fractal sequence, of the run holding padded row hh, tile column 0 of frame f.
int64_t fractal_run(const Geometry& g, int64_t f, int64_t hh) {
  const int64_t token = f * g.hp * g.wp + (hh / g.tile) * g.tile * g.wp + (hh % g.tile) * g.tile;
  return token * g.token_bytes;
}

// Tokens of run `tw` that exist in the original grid (the rest of the run is padding).
int64_t real_tokens(const Geometry& g, int64_t tw) {
  return std::clamp<int64_t>(g.w - tw * g.tile, 0, g.tile);
}

// Fixed 256-byte chunks that the compiler inlines as vector moves: on the AMD EPYC dev machine this
// copies runs of tens of KiB ~20% faster than a memcpy call per run, matching torch.clone.
void copy_run(char* dst, const char* src, int64_t n) {
  for (; n >= 256; n -= 256, dst += 256, src += 256) __builtin_memcpy(dst, src, 256);
  std::memcpy(dst, src, n);
}

void flatten_rows(const char* src, char* dst, const Geometry& g) {
  const int64_t run_bytes = g.tile * g.token_bytes;
  const int64_t next_block = g.tile * g.tile * g.token_bytes;
  at::parallel_for(0, g.frames * g.hp, grain(g), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t f = r / g.hp, hh = r % g.hp;
      char* d = dst + fractal_run(g, f, hh);
      if (hh >= g.h) {  // a whole padding row
        for (int64_t tw = 0; tw < g.wp / g.tile; ++tw, d += next_block) std::memset(d, 0, run_bytes);
        continue;
      }
      const char* s = src + (f * g.h + hh) * g.w * g.token_bytes;
      for (int64_t tw = 0; tw < g.wp / g.tile; ++tw, d += next_block, s += run_bytes) {
        const int64_t n = real_tokens(g, tw) * g.token_bytes;
        copy_run(d, s, n);
        std::memset(d + n, 0, run_bytes - n);
      }
    }
  });
}

void unflatten_rows(const char* src, char* dst, const Geometry& g) {
  const int64_t run_bytes = g.tile * g.token_bytes;
  const int64_t next_block = g.tile * g.tile * g.token_bytes;
  at::parallel_for(0, g.frames * g.h, grain(g), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t f = r / g.h, hh = r % g.h;
      const char* s = src + fractal_run(g, f, hh);
      char* d = dst + r * g.w * g.token_bytes;
      for (int64_t tw = 0; tw < g.wp / g.tile; ++tw, s += next_block, d += run_bytes) {
        copy_run(d, s, real_tokens(g, tw) * g.token_bytes);
      }
    }
  });
}

int64_t trailing_numel(at::IntArrayRef sizes, int64_t from) {
  int64_t n = 1;
  for (int64_t i = from; i < static_cast<int64_t>(sizes.size()); ++i) n *= sizes[i];
  return n;
}

at::Tensor fractal_flatten(const at::Tensor& x, int64_t tile) {
  KK_CHECK_CPU(x);
  KK_CHECK(x.dim() >= 5, "fractal_flatten: x must have shape (B, T, H, W, *rest), got ", x.sizes());
  KK_CHECK(tile > 0, "fractal_flatten: tile must be positive, got ", tile);
  KK_CHECK(x.size(1) > 0 && x.size(2) > 0 && x.size(3) > 0,
           "fractal_flatten: the grid (T, H, W) must be non-empty, got x of shape ", x.sizes());
  const int64_t t = x.size(1), h = x.size(2), w = x.size(3);
  const Geometry g{x.size(0) * t, h, w, tile, padded(h, tile), padded(w, tile),
                   trailing_numel(x.sizes(), 4) * static_cast<int64_t>(x.element_size())};
  grid_bytes(g.frames, g.hp, g.wp, g.token_bytes);
  const at::Tensor xc = x.contiguous();
  std::vector<int64_t> shape{x.size(0), t * g.hp * g.wp};
  shape.insert(shape.end(), x.sizes().begin() + 4, x.sizes().end());
  at::Tensor y = at::empty(shape, xc.options());
  if (y.numel() > 0) {
    flatten_rows(static_cast<const char*>(xc.const_data_ptr()), static_cast<char*>(y.data_ptr()), g);
  }
  return y;
}

at::Tensor fractal_unflatten(const at::Tensor& y, int64_t t, int64_t h, int64_t w, int64_t tile) {
  KK_CHECK_CPU(y);
  KK_CHECK(y.dim() >= 2, "fractal_unflatten: y must have shape (B, S, *rest), got ", y.sizes());
  KK_CHECK(t > 0 && h > 0 && w > 0 && tile > 0,
           "fractal_unflatten: t, h, w and tile must be positive, got t=", t, " h=", h, " w=", w,
           " tile=", tile);
  const Geometry g{kk::checked_product("fractal_unflatten: B * T", {y.size(0), t}), h, w, tile, padded(h, tile),
                   padded(w, tile), trailing_numel(y.sizes(), 2) * static_cast<int64_t>(y.element_size())};
  grid_bytes(g.frames, g.hp, g.wp, g.token_bytes);
  KK_CHECK(y.size(1) == t * g.hp * g.wp, "fractal_unflatten: y has S=", y.size(1), " tokens but the grid (T=",
           t, ", H=", h, ", W=", w, ") with tile ", tile, " needs S=T*Hp*Wp=", t * g.hp * g.wp);
  const at::Tensor yc = y.contiguous();
  std::vector<int64_t> shape{y.size(0), t, h, w};
  shape.insert(shape.end(), y.sizes().begin() + 2, y.sizes().end());
  at::Tensor x = at::empty(shape, yc.options());
  if (x.numel() > 0) {
    unflatten_rows(static_cast<const char*>(yc.const_data_ptr()), static_cast<char*>(x.data_ptr()), g);
  }
  return x;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kandinsky_kernels_C, m) {
  m.def("fractal_flatten(Tensor x, int tile) -> Tensor");
  m.def("fractal_unflatten(Tensor y, int t, int h, int w, int tile) -> Tensor");
}

TORCH_LIBRARY_IMPL(kandinsky_kernels_C, CPU, m) {
  m.impl("fractal_flatten", &fractal_flatten);
  m.impl("fractal_unflatten", &fractal_unflatten);
}
