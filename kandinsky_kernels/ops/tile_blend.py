"""Fused tile blend of the tiled VAE: write one tile into the stitched output, blending the overlap.

``tile_blend_(out, tile, dim, start, prev_stop)`` writes ``tile`` into ``out`` at ``start`` along ``dim``
in place; the first ``e = prev_stop - start`` positions (clipped to [0, tile length]), which the
previous tile already wrote, become ``lerp(out, tile, i / e)`` for i = 0..e-1 (the linear ramp of
HunyuanVideo / diffusers; fp32 arithmetic for half types, torch.lerp's formula). The peers do this as
a Python loop of small kernels per overlap position; the plain-torch path of this project as a ramp
tensor, a lerp into a temporary and two copies. Here it is one pass: every element of the tile is
read once and every element of out's target range written once (blended ones read once).

``out`` must be contiguous; ``tile`` may be a slice along ``dim`` (as the tiler's ``y[:, :, 1:]``).
Backends: ``cpu`` (csrc/vae.cpp), ``triton`` (one elementwise kernel), ``reference`` (torch).
Autograd: none; :func:`tile_blend_` takes the reference when autograd records the call.
"""
from __future__ import annotations

import contextlib

import torch

from kandinsky_kernels._ext import cpp_op
from kandinsky_kernels._triton import HAS_TRITON, tl, triton
from kandinsky_kernels._validation import check_tensor
from kandinsky_kernels.backends import select_backend
from kandinsky_kernels.ops._eager import eager
from kandinsky_kernels.reference.vae import tile_blend_ref

__all__ = ["tile_blend_"]

_CPP = cpp_op("tile_blend_")

if HAS_TRITON:

    @triton.jit
    def _tile_blend_kernel(
        out_ptr, tile_ptr, n_el, n, inner, L, so, sn, start, e,
        ACC: tl.constexpr, BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n_el
        k = offs % inner
        r = offs // inner
        i = r % n
        o = r // n
        new = tl.load(tile_ptr + o * so + i * sn + k, mask=m, other=0.0)
        dst = (o * L + start + i) * inner + k
        blend = m & (i < e)
        old = tl.load(out_ptr + dst, mask=blend, other=0.0).to(ACC)
        if ACC == tl.float64:
            # div_rn takes fp32 only; an fp64 `/` already compiles to the IEEE division (div.rn.f64)
            w = i.to(ACC) / tl.maximum(e, 1).to(ACC)
        else:
            w = tl.math.div_rn(i.to(ACC), tl.full([BLOCK], 1, ACC) * tl.maximum(e, 1))
        nw = new.to(ACC)
        lerped = tl.where(w < 0.5, old + w * (nw - old), nw - (nw - old) * (1.0 - w))
        val = tl.where(i < e, lerped.to(out_ptr.dtype.element_ty), new)
        tl.store(out_ptr + dst, val, mask=m)


def _tile_blend_triton(out, tile, dim, start, prev_stop):
    n = tile.shape[dim]
    e = max(0, min(prev_stop - start, n))
    outer = 1
    for s in tile.shape[:dim]:
        outer *= s
    inner = 1
    for s in tile.shape[dim + 1:]:
        inner *= s
    if outer * n * inner == 0:
        return
    tile3 = tile.reshape(outer, n, inner)
    if tile3.stride(2) != 1:
        tile3 = tile3.contiguous()
    acc = tl.float64 if out.dtype == torch.float64 else tl.float32
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        _tile_blend_kernel[(triton.cdiv(tile3.numel(), 1024),)](
            out, tile3, tile3.numel(), n, inner, out.shape[dim], tile3.stride(0), tile3.stride(1), start, e,
            ACC=acc, BLOCK=1024,
        )


def _tile_blend_impl(out, tile, dim, start, prev_stop):
    backend = select_backend("tile_blend_", out.device, {"triton": HAS_TRITON, "cpu": _CPP is not None})
    if backend == "cpu":
        _CPP(out, tile, dim, start, prev_stop)
    elif backend == "triton":
        _tile_blend_triton(out, tile, dim, start, prev_stop)
    else:
        tile_blend_ref(out, tile, dim, start, prev_stop)


@torch.library.custom_op("kandinsky_kernels::tile_blend_", mutates_args=("out",))
def _tile_blend_op(out: torch.Tensor, tile: torch.Tensor, dim: int, start: int, prev_stop: int) -> None:
    _tile_blend_impl(out, tile, dim, start, prev_stop)


@_tile_blend_op.register_fake
def _(out, tile, dim, start, prev_stop):
    return None


def tile_blend_(out: torch.Tensor, tile: torch.Tensor, dim: int, start: int, prev_stop: int) -> None:
    """Write ``tile`` into contiguous ``out`` at ``start`` along ``dim``, linearly blending the positions
    ``[start, prev_stop)`` that the previous tile already wrote (see the module doc). In place."""
    check_tensor("out", out)
    check_tensor("tile", tile, ndim=out.dim())
    if tile.dtype != out.dtype or tile.device != out.device:
        raise ValueError(f"tile must match out's dtype and device, got {tile.dtype} on {tile.device} vs "
                         f"{out.dtype} on {out.device}")
    if not out.is_floating_point():
        raise ValueError(f"out must be floating point, got {out.dtype}")
    dim = dim % out.dim()
    if any(a != b for d, (a, b) in enumerate(zip(out.shape, tile.shape)) if d != dim):
        raise ValueError(f"out {tuple(out.shape)} and tile {tuple(tile.shape)} must agree except on dim {dim}")
    if start < 0 or start + tile.shape[dim] > out.shape[dim]:
        raise ValueError(f"the tile [{start}, {start + tile.shape[dim]}) must lie inside out's {out.shape[dim]}")
    if not out.is_contiguous() or (torch.is_grad_enabled() and (out.requires_grad or tile.requires_grad)):
        tile_blend_ref(out, tile, dim, start, prev_stop)
        return
    if eager(out) and eager(tile):
        _tile_blend_impl(out, tile, dim, start, prev_stop)
        return
    _tile_blend_op(out, tile, dim, start, prev_stop)
