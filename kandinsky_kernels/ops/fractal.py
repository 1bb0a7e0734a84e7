"""Kandinsky 5 fractal token order, for any token grid.

The DiT attends over tokens ordered frame by frame; inside a frame, ``tile x tile`` spatial tiles in
row-major tile order; inside a tile, row-major tokens. With ``tile=8`` every aligned block of 64
tokens is one spatially compact tile, which is what NABLA's 64-token attention blocks rely on. The
official code needs H and W to be multiples of ``tile``; here the grid is zero-padded to the next
multiple and :class:`FractalLayout` tells attention which tokens are padding.

Design: the op is a permutation of whole tokens, so every backend moves bits and never does
arithmetic on values. The Triton kernels view each token as a row of the widest integer type that
divides its byte size: one kernel serves every dtype (bool, complex and bf16 included) and the
interpreter's bf16 arithmetic bug cannot bite. Each program gathers a block of output rows, computing
its source rows by index arithmetic, so stores are coalesced and every load reads a contiguous token.
The C++ kernel (csrc/fractal.cpp) copies one ``tile``-token run per memcpy instead.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Literal, overload

import torch

from kandinsky_kernels._ext import cpp_op
from kandinsky_kernels._triton import HAS_TRITON, tl, triton
from kandinsky_kernels._validation import check_positive_int, check_tensor
from kandinsky_kernels.backends import select_backend
from kandinsky_kernels.reference.fractal import fractal_flatten_ref, fractal_unflatten_ref

__all__ = ["FractalLayout", "fractal_flatten", "fractal_unflatten"]


def _padded(n, tile):
    return -(-n // tile) * tile


def _check_size(what: str, layout: "FractalLayout", batch: int, token_shape) -> None:
    """ValueError when the padded sequence of ``layout`` (``batch`` sequences of tokens shaped
    ``token_shape``) has more elements than an int64 can count (a huge tile or grid)."""
    if isinstance(layout.seq_len, int) and batch * layout.seq_len * math.prod(token_shape) >= 2**63:
        raise ValueError(
            f"{what}: grid (T={layout.t}, H={layout.h}, W={layout.w}) padded to tile {layout.tile} gives "
            f"S={layout.seq_len} tokens, too many for one tensor; use a smaller tile"
        )


def _tracing() -> bool:
    """True while torch.compile traces. Code that would branch on :attr:`FractalLayout.is_padded`
    then takes the padded path for every grid (an all-True ``token_valid`` for an unpadded one):
    branching would guard on ``H % tile`` and ``W % tile`` and recompile, also with ``dynamic=True``,
    for each grid on the other side. (Inside dynamo a dynamic int does not show as a SymInt to
    ``isinstance``, so "traced" is all that can be asked.)"""
    return torch.compiler.is_compiling()


def _is_positive_int(value) -> bool:
    # SymInt: a grid seen while torch.compile traces with dynamic shapes.
    return not isinstance(value, bool) and isinstance(value, (int, torch.SymInt)) and value > 0


@dataclasses.dataclass(frozen=True)
class FractalLayout:
    """Geometry of one fractal-ordered sequence: the original token grid (T, H, W) and the tile edge.

    Frozen and hashable, so it can key caches of masks built from it. ``hp``/``wp`` are H, W padded
    up to multiples of ``tile``; the sequence holds ``seq_len = t * hp * wp`` tokens in
    ``num_blocks`` blocks of ``block_size = tile * tile`` tokens, block ``k`` being tile
    ``(k // (h_tiles * w_tiles), (k // w_tiles) % h_tiles, k % w_tiles)`` as (frame, tile row, tile col).
    """

    t: int
    h: int
    w: int
    tile: int = 8

    def __post_init__(self):
        for name in ("t", "h", "w", "tile"):
            value = getattr(self, name)
            if not _is_positive_int(value):
                raise ValueError(f"FractalLayout.{name} must be a positive int, got {value!r}")

    @property
    def hp(self) -> int:
        return _padded(self.h, self.tile)

    @property
    def wp(self) -> int:
        return _padded(self.w, self.tile)

    @property
    def h_tiles(self) -> int:
        return self.hp // self.tile

    @property
    def w_tiles(self) -> int:
        return self.wp // self.tile

    @property
    def block_size(self) -> int:
        return self.tile * self.tile

    @property
    def num_blocks(self) -> int:
        return self.t * self.h_tiles * self.w_tiles

    @property
    def seq_len(self) -> int:
        return self.t * self.hp * self.wp

    @property
    def is_padded(self) -> bool:
        return self.hp != self.h or self.wp != self.w

    def token_valid(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool (seq_len,): True for real tokens, False for padding, in fractal order.

        This is the valid-token description that masks and attention take (they also accept it
        broadcast to (B, seq_len)). Built with a few vectorised ops on ``device``.
        """
        if not _tracing() and not self.is_padded:
            return torch.ones(self.seq_len, dtype=torch.bool, device=device)
        rows = torch.arange(self.hp, device=device) < self.h
        cols = torch.arange(self.wp, device=device) < self.w
        frame = (rows[:, None] & cols[None, :]).view(self.h_tiles, self.tile, self.w_tiles, self.tile)
        frame = frame.permute(0, 2, 1, 3).reshape(-1)
        return frame.expand(self.t, -1).reshape(-1)

    def token_index(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Int64 (seq_len,): for each position of the fractal sequence, the raster row it holds, -1 for
        padding.

        Raster rows count tokens of one (T, H, W) video frame by frame, row by row: token (t, y, x) is
        row ``(t * H + y) * W + x``. Every row 0 .. T*H*W - 1 appears exactly once. This is the
        ``token_index`` that :func:`kandinsky_kernels.block_sparse_attention` and
        :func:`kandinsky_kernels.nabla_block_mask` take, so that raster-order q, k, v are read (and the
        output written) through it, with no fractal-order copy (``nabla_attention(order="raster")``
        builds it itself).
        """
        ys = torch.arange(self.hp, device=device, dtype=torch.int64)
        xs = torch.arange(self.wp, device=device, dtype=torch.int64)
        real = (ys[:, None] < self.h) & (xs[None, :] < self.w)
        frame = torch.where(real, ys[:, None] * self.w + xs[None, :], -1)
        frame = frame.view(self.h_tiles, self.tile, self.w_tiles, self.tile).permute(0, 2, 1, 3).reshape(-1)
        starts = torch.arange(self.t, device=device, dtype=torch.int64)[:, None] * (self.h * self.w)
        return torch.where(frame >= 0, frame + starts, -1).reshape(-1)

    @property
    def tile_grid(self) -> tuple[int, int, int]:
        """(T, h_tiles, w_tiles): the block grid, the arguments :func:`kandinsky_kernels.sta_block_mask`
        takes."""
        return (self.t, self.h_tiles, self.w_tiles)

    def block_valid_counts(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Int32 (num_blocks,): how many real tokens each ``block_size``-token block holds."""
        rows = (self.h - torch.arange(0, self.hp, self.tile, device=device)).clamp(max=self.tile)
        cols = (self.w - torch.arange(0, self.wp, self.tile, device=device)).clamp(max=self.tile)
        frame = (rows[:, None] * cols[None, :]).reshape(-1).to(torch.int32)
        return frame.expand(self.t, -1).reshape(-1)


def _fmt_grid(grid) -> str:
    return repr(tuple(grid)) if isinstance(grid, (tuple, list, torch.Size)) else repr(grid)


def _layout_arg(grid, *, tile: int = 8, arg: str = "grid") -> FractalLayout:
    """``grid`` (a :class:`FractalLayout`, or the token grid (T, H, W) as three positive ints) as a
    FractalLayout with ``tile`` (a FractalLayout keeps its own tile). ValueError naming ``arg``."""
    if isinstance(grid, FractalLayout):
        return grid
    is_tuple = isinstance(grid, (tuple, list, torch.Size)) and len(grid) == 3
    if not (is_tuple and all(map(_is_positive_int, grid))):
        raise ValueError(
            f"{arg} must be the token grid (T, H, W) as three positive ints (latent frames x height x "
            f"width in tokens, after patching) or a FractalLayout, got {grid!r}"
        )
    check_positive_int("tile", tile)
    return FractalLayout(*grid, tile=tile)


def _bhsd_hint(name: str, shape, seq_len: int) -> str:
    """A hint when ``shape`` looks like (B, H, S, D) passed for (B, S, H, D): dim 2 holds the S
    expected, dim 1 does not (empty string otherwise)."""
    if len(shape) == 4 and shape[2] == seq_len and shape[1] != seq_len:
        return (f"; {name} looks like (B, H, S, D) = {tuple(shape)}: this op takes (B, S, H, D), "
                f"use {name}.transpose(1, 2)")
    return ""


def _layout_for_sequence(grid, seq_len: int, *, tile: int = 8, arg: str = "grid", name: str = "q",
                         shape=None) -> FractalLayout:
    """:func:`_layout_arg`, then ValueError unless the layout holds ``seq_len`` tokens. The message
    says which units a tuple is read in, recognises a (T, h_tiles, w_tiles) tuple in tile units (what
    ``grid`` meant before it took tokens) and (B, H, S, D) input passed for (B, S, H, D)."""
    layout = _layout_arg(grid, tile=tile, arg=arg)
    if layout.seq_len == seq_len:
        return layout
    shape_s = "" if shape is None else f" (shape {tuple(shape)})"
    if isinstance(grid, FractalLayout):
        msg = (f"{arg}={grid!r} holds T*Hp*Wp = {layout.t}*{layout.hp}*{layout.wp} = {layout.seq_len} "
               f"tokens (H, W padded to {layout.tile}x{layout.tile} tiles), but {name} has S={seq_len}"
               f"{shape_s}")
    else:
        t, h, w = (int(x) for x in grid)
        msg = (f"{arg}={_fmt_grid(grid)} is read as the token grid (T, H, W), padded to {tile}x{tile} "
               f"tiles: T*Hp*Wp = {t}*{layout.hp}*{layout.wp} = {layout.seq_len} tokens, but {name} has "
               f"S={seq_len}{shape_s}")
        if t * h * w * tile * tile == seq_len:
            msg += (f". {arg}={_fmt_grid(grid)} fits S as (T, h_tiles, w_tiles) in {tile}x{tile}-token "
                    f"tiles, which {arg} no longer takes: pass the token grid (T, H, W) (e.g. "
                    f"(T, {h * tile}, {w * tile}) if no token is padding) or the FractalLayout from "
                    "fractal_flatten(..., return_layout=True)")
    if shape is not None:
        msg += _bhsd_hint(name, shape, layout.seq_len)
    raise ValueError(msg)


def _grid_token_valid(
    grid, token_valid: torch.Tensor | None, seq_len: int, block_size: int, device, *, name: str = "q",
    shape=None,
) -> tuple[FractalLayout, torch.Tensor | None]:
    """What a mask builder given ``grid`` needs: its layout (a token-grid tuple read with tile
    sqrt(``block_size``), checked to hold ``seq_len`` tokens, see :func:`_layout_for_sequence`) and
    ``token_valid`` (None, bool (S,) or (B, S)) AND the layout's padding flags; None when neither
    marks any token."""
    tile = math.isqrt(block_size)
    if not isinstance(grid, FractalLayout) and tile * tile != block_size:
        raise ValueError(f"grid (a token grid) needs block_size = tile * tile, got block_size={block_size}")
    layout = _layout_for_sequence(grid, seq_len, tile=tile, name=name, shape=shape)
    if layout.block_size != block_size:
        raise ValueError(f"grid has tile {layout.tile} ({layout.block_size}-token blocks) but block_size is "
                         f"{block_size}; fractal_flatten with tile = sqrt(block_size)")
    if token_valid is not None:
        check_tensor("token_valid", token_valid, ndim=(1, 2), dtypes=(torch.bool,))
        if token_valid.shape[-1] != seq_len:
            raise ValueError(f"token_valid must have shape (S,) or (B, S) with S={seq_len}, "
                             f"got {tuple(token_valid.shape)}")
    # An all-True token_valid would only cost time, but a traced call builds it anyway, so that one
    # compiled graph serves padded and unpadded grids (no guard on H % tile, W % tile).
    if not _tracing() and not layout.is_padded:
        return layout, token_valid
    pad = layout.token_valid(device)
    return layout, pad if token_valid is None else token_valid & pad


# ----------------------------------------------------------------------------------------------
# Triton kernels. Rows are tokens, columns are integer words of a token (see the module doc).

if HAS_TRITON:

    @triton.jit
    def _fractal_flatten_kernel(
        x_ptr, y_ptr, n_rows, words, h, w, frame_len, w_tiles,
        TILE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        # y row -> (flattened b*T + t, position in the padded frame) -> (tile, token in tile) -> (h, w)
        frame = rows // frame_len
        pos = rows % frame_len
        block = pos // (TILE * TILE)
        inner = pos % (TILE * TILE)
        hh = (block // w_tiles) * TILE + inner // TILE
        ww = (block % w_tiles) * TILE + inner % TILE
        in_rows = rows < n_rows
        in_cols = cols < words
        real = in_rows & (hh < h) & (ww < w)
        src = ((frame * h + hh) * w + ww) * words
        vals = tl.load(x_ptr + src[:, None] + cols[None, :], mask=real[:, None] & in_cols[None, :], other=0)
        out_mask = in_rows[:, None] & in_cols[None, :]
        tl.store(y_ptr + rows[:, None] * words + cols[None, :], vals, mask=out_mask)

    @triton.jit
    def _fractal_unflatten_kernel(
        y_ptr, x_ptr, n_rows, words, h, w, frame_len, w_tiles,
        TILE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        # x row -> (flattened b*T + t, h, w) -> its position in the fractal sequence
        ww = rows % w
        hh = (rows // w) % h
        frame = rows // (w * h)
        block = (hh // TILE) * w_tiles + ww // TILE
        src = frame * frame_len + block * (TILE * TILE) + (hh % TILE) * TILE + ww % TILE
        mask = (rows < n_rows)[:, None] & (cols < words)[None, :]
        vals = tl.load(y_ptr + src[:, None] * words + cols[None, :], mask=mask)
        tl.store(x_ptr + rows[:, None] * words + cols[None, :], vals, mask=mask)


_INT_OF_WIDTH = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def _launch(
    kernel, src: torch.Tensor, src_lead: int, dst: torch.Tensor, dst_lead: int, layout: FractalLayout
) -> None:
    """Copy tokens of contiguous ``src`` (token dims after ``src_lead``) into ``dst`` with ``kernel``."""
    token_bytes = math.prod(dst.shape[dst_lead:]) * dst.element_size()
    # The widest int that divides a token and both start addresses (src may be a view at any offset).
    width = next(
        n for n in (8, 4, 2, 1)
        if token_bytes % n == 0 and all(t.storage_offset() * t.element_size() % n == 0 for t in (src, dst))
    )
    words = token_bytes // width
    src = src.view(*src.shape[:src_lead], -1).view(_INT_OF_WIDTH[width])
    dst = dst.view(*dst.shape[:dst_lead], -1).view(_INT_OF_WIDTH[width])
    n_rows = dst.numel() // words
    block_c = min(triton.next_power_of_2(words), 256)
    block_r = max(1, min(64, 4096 // block_c))
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(words, block_c))
    # Triton launches on the current CUDA device, which need not be the tensor's.
    with torch.cuda.device(src.device) if src.is_cuda else contextlib.nullcontext():
        kernel[grid](
            src, dst, n_rows, words, layout.h, layout.w, layout.hp * layout.wp, layout.w_tiles,
            TILE=layout.tile, BLOCK_R=block_r, BLOCK_C=block_c,
        )


def _fractal_flatten_triton(x: torch.Tensor, tile: int) -> torch.Tensor:
    """Triton launcher of :func:`fractal_flatten` (no validation)."""
    b, t, h, w, *rest = x.shape
    layout = FractalLayout(t, h, w, tile)
    y = x.new_empty((b, layout.seq_len, *rest))
    if y.numel():
        _launch(_fractal_flatten_kernel, x.contiguous(), 4, y, 2, layout)
    return y


def _fractal_unflatten_triton(y: torch.Tensor, t: int, h: int, w: int, tile: int) -> torch.Tensor:
    """Triton launcher of :func:`fractal_unflatten` (no validation)."""
    b, _, *rest = y.shape
    x = y.new_empty((b, t, h, w, *rest))
    if x.numel():
        _launch(_fractal_unflatten_kernel, y.contiguous(), 2, x, 4, FractalLayout(t, h, w, tile))
    return x


# ----------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile (fake shapes below), backend chosen inside them when they run
# (the rule: kandinsky_kernels.backends). Each backward is the inverse op, which chooses again.

_CPP = {name: cpp_op(name) for name in ("fractal_flatten", "fractal_unflatten")}


def _backend(op: str, device: torch.device) -> str:
    return select_backend(op, device, {"triton": HAS_TRITON, "cpu": _CPP[op] is not None})


def _owned(out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    """A custom op must return fresh, contiguous memory; the reference may return a view of its input."""
    if out.is_contiguous() and out.untyped_storage().data_ptr() != inp.untyped_storage().data_ptr():
        return out
    return out.clone(memory_format=torch.contiguous_format)


@torch.library.custom_op("kandinsky_kernels::fractal_flatten", mutates_args=())
def _fractal_flatten_op(x: torch.Tensor, tile: int) -> torch.Tensor:
    backend = _backend("fractal_flatten", x.device)
    if backend == "cpu":
        return _CPP["fractal_flatten"](x, tile)
    if backend == "triton":
        return _fractal_flatten_triton(x, tile)
    return _owned(fractal_flatten_ref(x, tile), x)


@torch.library.custom_op("kandinsky_kernels::fractal_unflatten", mutates_args=())
def _fractal_unflatten_op(y: torch.Tensor, t: int, h: int, w: int, tile: int) -> torch.Tensor:
    backend = _backend("fractal_unflatten", y.device)
    if backend == "cpu":
        return _CPP["fractal_unflatten"](y, t, h, w, tile)
    if backend == "triton":
        return _fractal_unflatten_triton(y, t, h, w, tile)
    return _owned(fractal_unflatten_ref(y, t, h, w, tile), y)


@_fractal_flatten_op.register_fake
def _(x, tile):
    b, t, h, w, *rest = x.shape
    return x.new_empty((b, t * _padded(h, tile) * _padded(w, tile), *rest))


@_fractal_unflatten_op.register_fake
def _(y, t, h, w, tile):
    return y.new_empty((y.shape[0], t, h, w, *y.shape[2:]))


def _flatten_setup(ctx, inputs, output):
    x, tile = inputs
    ctx.grid = (*x.shape[1:4], tile)


def _flatten_backward(ctx, grad):
    # Pad positions never reached x, so their gradient is dropped.
    return _fractal_unflatten_op(grad, *ctx.grid), None


def _unflatten_setup(ctx, inputs, output):
    ctx.tile = inputs[4]


def _unflatten_backward(ctx, grad):
    # Pad positions of y were dropped, so their gradient is zero, which flatten writes.
    return _fractal_flatten_op(grad, ctx.tile), None, None, None, None


_fractal_flatten_op.register_autograd(_flatten_backward, setup_context=_flatten_setup)
_fractal_unflatten_op.register_autograd(_unflatten_backward, setup_context=_unflatten_setup)


# ----------------------------------------------------------------------------------------------
# Public functions: validation at the boundary, then the custom ops.


@overload
def fractal_flatten(
    x: torch.Tensor,
    tile: int = ...,
    *,
    return_layout: Literal[False] = ...,
    grid: FractalLayout | tuple[int, int, int] | None = ...,
) -> torch.Tensor: ...


@overload
def fractal_flatten(
    x: torch.Tensor,
    tile: int = ...,
    *,
    return_layout: Literal[True],
    grid: FractalLayout | tuple[int, int, int] | None = ...,
) -> tuple[torch.Tensor, FractalLayout]: ...


@overload
def fractal_flatten(
    x: torch.Tensor,
    tile: int = ...,
    *,
    return_layout: bool = ...,
    grid: FractalLayout | tuple[int, int, int] | None = ...,
) -> torch.Tensor | tuple[torch.Tensor, FractalLayout]: ...


def fractal_flatten(
    x: torch.Tensor,
    tile: int = 8,
    *,
    return_layout: bool = False,
    grid: FractalLayout | tuple[int, int, int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, FractalLayout]:
    """Reorder a token grid into the Kandinsky 5 fractal sequence, zero-padding H and W to ``tile``.

    Args:
        x: (B, T, H, W, *rest), any dtype, any strides. ``rest`` is at least one dim: the channels C
            of visual tokens, or several (a RoPE table such as (D/2, 2, 2)).
        tile: edge of the square spatial tile, a positive int (Kandinsky 5 uses 8).
        return_layout: also return the :class:`FractalLayout` of the result.
        grid: optional token grid (T, H, W) that ``x`` is expected to hold (or a
            :class:`FractalLayout`, whose tile then overrides ``tile``). When given, the shape of ``x``
            is checked against it, and a channels-first ``(B, C, T, H, W)`` tensor is refused with a
            hint (``x.permute(0, 2, 3, 4, 1)``) instead of being read as T = C. Without it the shape
            alone cannot tell the two layouts apart, and dims 1-3 are taken as (T, H, W).

    Returns:
        y: (B, S, *rest) with S = T * Hp * Wp, Hp and Wp being H and W rounded up to multiples of
        ``tile``; contiguous, ``x.dtype``. Token ``s`` of y is frame ``s // (Hp*Wp)``; inside the
        frame, tile ``(s % (Hp*Wp)) // tile**2`` in row-major tile order; inside the tile, row-major.
        Padding tokens are zero; ``layout.token_valid()`` marks the real ones, and attention must be
        given it so that no padding token influences a real one.
        layout: only with ``return_layout=True``, ``FractalLayout(T, H, W, tile)``.

    Differentiable: the gradient of x is the gradient of y unflattened (padding gradients dropped).
    """
    check_tensor("x", x)
    expected = None if grid is None else _layout_arg(grid, tile=tile)
    if expected is not None:
        tile = expected.tile
    if x.dim() < 5:
        raise ValueError(f"x must have shape (B, T, H, W, *rest), at least 5 dims, got {tuple(x.shape)}")
    check_positive_int("tile", tile)
    if expected is not None:
        want = (expected.t, expected.h, expected.w)
        if tuple(x.shape[1:4]) != want:
            if tuple(x.shape[2:5]) == want:
                raise ValueError(
                    f"x has shape {tuple(x.shape)}, which holds grid (T, H, W) = {want} at dims 2-4: a "
                    f"channels-first (B, C, T, H, W) tensor; fractal_flatten takes channels last, "
                    f"(B, T, H, W, C): pass x.permute(0, 2, 3, 4, 1)"
                    + ("" if x.dim() == 5 else " (x.movedim(1, -1) for more trailing dims)")
                )
            raise ValueError(
                f"x has shape {tuple(x.shape)}, but grid (T, H, W) = {want} (in tokens) needs x of shape "
                f"(B, {want[0]}, {want[1]}, {want[2]}, *rest)"
            )
    if min(x.shape[1:4]) <= 0:
        raise ValueError(f"x must have a non-empty grid (T, H, W), got shape {tuple(x.shape)}")
    layout = FractalLayout(*x.shape[1:4], tile)
    _check_size("fractal_flatten", layout, x.shape[0], x.shape[4:])
    y = _fractal_flatten_op(x, tile)
    if layout.is_padded and not torch.compiler.is_compiling():
        # Remembered on this very tensor (not on results computed from it), so that
        # fractal_unflatten(y, padded grid) is refused instead of returning the padding as tokens. Plain
        # ints, so that torch.save / torch.load(weights_only=True) of y still work.
        y._kk_fractal_grid = (layout.t, layout.h, layout.w, layout.tile)
    return (y, layout) if return_layout else y


def fractal_unflatten(
    y: torch.Tensor, grid: FractalLayout | tuple[int, int, int], *, tile: int = 8
) -> torch.Tensor:
    """Inverse of :func:`fractal_flatten`: fractal sequence back to the token grid, padding dropped.

    Args:
        y: (B, S, *rest), any dtype, any strides, S = T * Hp * Wp of ``grid``.
        grid: the ORIGINAL (unpadded) token grid, a (T, H, W) tuple of positive ints, or a
            :class:`FractalLayout` (whose tile then overrides ``tile``). When ``y`` itself is the
            output of :func:`fractal_flatten` of a padded grid, a different grid (such as the padded
            one, (T, Hp, Wp), which has the same S) raises ValueError; the grid of a tensor computed
            from it cannot be checked, only its S.
        tile: tile edge used by the flatten, when ``grid`` is a tuple.

    Returns:
        x: (B, T, H, W, *rest), contiguous, ``y.dtype``.

    Differentiable: the gradient of y is the gradient of x flattened, zero at padding tokens.
    """
    given = grid
    grid = _layout_arg(grid, tile=tile)
    check_tensor("y", y)
    if y.dim() < 2:
        raise ValueError(f"y must have shape (B, S, *rest) (at least 2 dims), got shape {tuple(y.shape)}")
    made_from = getattr(y, "_kk_fractal_grid", None)
    made_from = None if made_from is None else FractalLayout(*made_from)
    if made_from is not None and made_from != grid:
        what = "" if isinstance(given, FractalLayout) else " (T, H, W)"
        msg = (f"y was made by fractal_flatten from the token grid (T, H, W) = "
               f"({made_from.t}, {made_from.h}, {made_from.w}) with tile {made_from.tile} (padded to "
               f"{made_from.hp}x{made_from.wp}), but grid{what}={_fmt_grid(given)}")
        if (grid.t, grid.h, grid.w) == (made_from.t, made_from.hp, made_from.wp):
            msg += " is its padded grid"
        raise ValueError(msg + f"; pass the original grid ({made_from.t}, {made_from.h}, {made_from.w}) "
                         "or the FractalLayout that fractal_flatten(..., return_layout=True) returned")
    _check_size("fractal_unflatten", grid, 1, ())
    if y.shape[1] != grid.seq_len:
        raise ValueError(
            f"y has S={y.shape[1]} tokens (shape {tuple(y.shape)}) but grid (T={grid.t}, H={grid.h}, "
            f"W={grid.w}) with tile {grid.tile} needs S = T*Hp*Wp = {grid.seq_len}"
        )
    return _fractal_unflatten_op(y, grid.t, grid.h, grid.w, grid.tile)
