"""Causal Conv3d of the video VAE, with the causal replicate padding done by index arithmetic.

A causal conv with kernel (kt, kh, kw) sees ``kt - 1`` copies of frame 0 in front of the clip (nothing
behind) and ``kh // 2`` / ``kw // 2`` replicated border rows / columns. The peers build that padded
input with ``F.pad(mode="replicate")`` and then convolve; here the padded layout is written directly
by the op that produces the conv's input:

- :func:`kandinsky_kernels.group_norm_silu` with ``pad=`` (every resnet conv and both ``conv_out``):
  the normalised activation only ever exists padded, so no padded copy of it is made;
- :func:`causal_pad3d` with ``up=`` (the upsamplers): the nearest upsampling and the padding are one
  gather, so the unpadded upsampled activation is never made;
- :func:`causal_pad3d` alone (the downsamplers, both ``conv_in``): one read and one write by index
  arithmetic, replacing F.pad.

The convolution itself stays on oneDNN (CPU) / cuDNN (GPU) via ``F.conv3d(..., padding=0)``. On CPU the
VAE runs channels-last-3d end to end (``kandinsky_model.vae.CHANNELS_LAST``): oneDNN then convolves
without reordering activations to and from its blocked layout, 1.2-1.5x faster at the VAE's 32-128
channel layers on this project's CPU; the cpu kernels here read and write that layout natively (the
output keeps the input's layout).

Backends of :func:`causal_pad3d`: ``cpu`` (csrc/vae.cpp, one memcpy per row when not upsampling in W;
channels-last-3d input: one memcpy per row, or per channel vector when upsampling in W),
``triton`` (one gather kernel over the output, elements moved as raw integers), ``reference``.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from kandinsky_kernels._ext import cpp_op
from kandinsky_kernels._triton import HAS_TRITON, tl, triton
from kandinsky_kernels._validation import check_tensor
from kandinsky_kernels.backends import select_backend
from kandinsky_kernels.ops._eager import eager
from kandinsky_kernels.reference.vae import causal_pad3d_ref

__all__ = ["causal_conv3d", "causal_pad3d"]

_CPP = cpp_op("causal_pad3d")
_INT_OF_SIZE = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}

if HAS_TRITON:

    @triton.jit
    def _causal_pad_kernel(
        x_ptr, y_ptr, n_out, T, H, W, Tu, Hu, Wu, To, Ho, Wo, PT, PH, PW, UT, UH, UW, BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n_out
        wo = offs % Wo
        r = offs // Wo
        ho = r % Ho
        r = r // Ho
        to = r % To
        bc = r // To
        u = tl.minimum(tl.maximum(to - PT, 0), Tu - 1)
        t = tl.where((UT == 1) | (u == 0), u, (u - 1) // UT + 1)
        h = tl.minimum(tl.maximum(ho - PH, 0), Hu - 1) // UH
        w = tl.minimum(tl.maximum(wo - PW, 0), Wu - 1) // UW
        v = tl.load(x_ptr + ((bc * T + t) * H + h) * W + w, mask=m)
        tl.store(y_ptr + offs, v, mask=m)


def _out_shape(shape, pad, up):
    b, c, t, h, w = shape
    (pt, ph, pw), (ut, uh, uw) = pad, up
    tu = t if ut == 1 else 1 + (t - 1) * ut
    return [b, c, tu + pt, h * uh + 2 * ph, w * uw + 2 * pw]


def _causal_pad3d_triton(x, pt, ph, pw, ut, uh, uw):
    x = x.contiguous()
    shape = _out_shape(x.shape, (pt, ph, pw), (ut, uh, uw))
    y = x.new_empty(shape)
    if y.numel() == 0 or x.numel() == 0:
        return y
    ints = _INT_OF_SIZE[x.element_size()]
    t, h, w = x.shape[2:]
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _causal_pad_kernel[(triton.cdiv(y.numel(), 1024),)](
            x.view(ints), y.view(ints), y.numel(), t, h, w, shape[2] - pt, shape[3] - 2 * ph, shape[4] - 2 * pw,
            shape[2], shape[3], shape[4], pt, ph, pw, ut, uh, uw, BLOCK=1024,
        )
    return y


def _causal_pad3d_impl(x, pad_t, pad_h, pad_w, up_t, up_h, up_w):
    backend = select_backend("causal_pad3d", x.device, {"triton": HAS_TRITON, "cpu": _CPP is not None})
    if backend == "cpu":
        return _CPP(x, pad_t, pad_h, pad_w, up_t, up_h, up_w)
    if backend == "triton":
        return _causal_pad3d_triton(x, pad_t, pad_h, pad_w, up_t, up_h, up_w)
    return causal_pad3d_ref(x, (pad_t, pad_h, pad_w), (up_t, up_h, up_w)).contiguous().clone()


@torch.library.custom_op("kandinsky_kernels::causal_pad3d", mutates_args=())
def _causal_pad3d_op(x: torch.Tensor, pad_t: int, pad_h: int, pad_w: int, up_t: int, up_h: int,
                     up_w: int) -> torch.Tensor:
    return _causal_pad3d_impl(x, pad_t, pad_h, pad_w, up_t, up_h, up_w)


@_causal_pad3d_op.register_fake
def _(x, pad_t, pad_h, pad_w, up_t, up_h, up_w):
    return x.new_empty(_out_shape(x.shape, (pad_t, pad_h, pad_w), (up_t, up_h, up_w)))


def _triple(name: str, v, lo: int) -> tuple[int, int, int]:
    v = (v,) * 3 if isinstance(v, int) else tuple(v)
    if len(v) != 3 or not all(isinstance(i, int) and not isinstance(i, bool) and i >= lo for i in v):
        raise ValueError(f"{name} must be an int >= {lo} or three of them, got {v!r}")
    return v


def causal_pad3d(x: torch.Tensor, pad: tuple[int, int, int], up: tuple[int, int, int] = (1, 1, 1)) -> torch.Tensor:
    """(B, C, T, H, W) -> the VAE's nearest upsampling by ``up`` = (ut, uh, uw) (frame 0 only in space:
    T = 1 + k becomes 1 + ut k), then ``pad`` = (pt, ph, pw): pt copies of frame 0 in front, ph / pw
    replicated rows / columns on each side. One gather; any dtype. Differentiable through the torch
    reference when autograd records the call."""
    check_tensor("x", x, ndim=5)
    pad, up = _triple("pad", pad, 0), _triple("up", up, 1)
    if torch.is_grad_enabled() and x.requires_grad:
        return causal_pad3d_ref(x, pad, up)
    if eager(x):
        return _causal_pad3d_impl(x, *pad, *up)
    return _causal_pad3d_op(x, *pad, *up)


def causal_conv3d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
    stride: int | tuple[int, int, int] = 1, *, up: tuple[int, int, int] = (1, 1, 1),
) -> torch.Tensor:
    """Causal Conv3d of (B, C_in, T, H, W) with ``weight`` (C_out, C_in, kt, kh, kw): output frame i sees
    input frames <= i * stride_T only. ``up`` first applies the VAE's causal nearest upsampling (fused
    into the padding gather). The padding is :func:`causal_pad3d`; the conv is ``F.conv3d`` with padding 0."""
    check_tensor("weight", weight, ndim=5)
    kt, kh, kw = weight.shape[2:]
    pad = (kt - 1, kh // 2, kw // 2)
    if any(pad) or tuple(up) != (1, 1, 1):
        x = causal_pad3d(x, pad, up)
    return F.conv3d(x, weight, bias, stride)
