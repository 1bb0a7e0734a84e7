"""Fused GroupNorm + SiLU of the causal video VAE (and the plain GroupNorm its attention uses), with an
optional causal replicate-padded output that the next causal convolution reads with padding 0.

x (B, C, ...) is normalised per (batch, group) over (C / groups, ...) with fp32 statistics, scaled and
shifted per channel, passed through SiLU when ``silu``, and written once in x's dtype (fp32, bf16, fp16).
With ``pad = (pt, ph, pw)`` (5-D x only) the output is (B, C, T + pt, H + 2 ph, W + 2 pw): frame 0
repeated ``pt`` times in front, border rows and columns replicated. That is exactly the input a causal
Conv3d with kernel (pt + 1, 2 ph + 1, 2 pw + 1) pads its input to, so in the VAE no padded copy of a
normalised activation is ever made: the padding is index arithmetic inside the kernel's single write.

Backends: ``cpu`` (csrc/vae.cpp: statistics per (b, group) from fp32 chunk sums accumulated in double,
then one pass computing and writing each output row, SiLU with a vectorisable exp; OpenMP; a
channels-last-3d x is read and written in that layout: per-channel shifted sums combined per group by
Chan's formula, then one pass over rows of channel vectors), ``triton``
(partial sums over a (B*G, splits) grid, combined in fp64 on the device; then one elementwise kernel over
the padded output that gathers its source element by index arithmetic), ``reference`` (torch in fp32).

Autograd: the custom op has no backward (the VAE is not trained here). :func:`group_norm_silu` takes the
differentiable reference whenever autograd would record the call, so gradients still flow (slowly).
"""
from __future__ import annotations

import contextlib

import torch

from kandinsky_kernels._ext import cpp_op
from kandinsky_kernels._triton import HAS_TRITON, tl, triton
from kandinsky_kernels._validation import check_tensor
from kandinsky_kernels.backends import select_backend
from kandinsky_kernels.ops._eager import eager
from kandinsky_kernels.reference.vae import group_norm_silu_ref

__all__ = ["group_norm", "group_norm_silu"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CPP = cpp_op("group_norm_silu")

if HAS_TRITON:

    @triton.jit
    def _gn_partial_sums_kernel(x_ptr, pivot_ptr, part_ptr, n, chunk, splits, BLOCK: tl.constexpr):
        # program (group, split): fp32 sums of (x - pivot) and (x - pivot)^2 over its chunk of the group
        grp = tl.program_id(0).to(tl.int64)
        sp = tl.program_id(1).to(tl.int64)
        base = x_ptr + grp * n
        pivot = tl.load(pivot_ptr + grp)
        lo = sp * chunk
        s = tl.zeros([BLOCK], dtype=tl.float32)
        ss = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, chunk, BLOCK):
            offs = lo + i + tl.arange(0, BLOCK)
            m = (offs < n) & (offs < lo + chunk)
            v = tl.load(base + offs, mask=m, other=0.0).to(tl.float32)
            d = tl.where(m, v - pivot, 0.0)
            s += d
            ss += d * d
        tl.store(part_ptr + (grp * splits + sp) * 2, tl.sum(s, axis=0))
        tl.store(part_ptr + (grp * splits + sp) * 2 + 1, tl.sum(ss, axis=0))

    @triton.jit
    def _gn_apply_kernel(
        x_ptr, y_ptr, scale_ptr, shift_ptr, n_out, T, H, W, To, Ho, Wo, PT, PH, PW,
        SILU: tl.constexpr, BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n_out
        wo = offs % Wo
        r = offs // Wo
        ho = r % Ho
        r = r // Ho
        to = r % To
        bc = r // To
        w = tl.minimum(tl.maximum(wo - PW, 0), W - 1)
        h = tl.minimum(tl.maximum(ho - PH, 0), H - 1)
        t = tl.maximum(to - PT, 0)
        v = tl.load(x_ptr + ((bc * T + t) * H + h) * W + w, mask=m, other=0.0).to(tl.float32)
        a = tl.load(scale_ptr + bc, mask=m, other=0.0)
        b = tl.load(shift_ptr + bc, mask=m, other=0.0)
        y = v * a + b
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)


def _group_norm_silu_triton(x, weight, bias, groups, eps, silu, pt, ph, pw):
    x = x.contiguous()
    b, c = x.shape[:2]
    padded = bool(pt or ph or pw)
    t, h, w = x.shape[2:] if padded else (1, 1, x[0, 0].numel())
    shape = list(x.shape)
    if padded:
        shape[2:] = [t + pt, h + 2 * ph, w + 2 * pw]
    y = x.new_empty(shape)
    if y.numel() == 0:
        return y
    n = (c // groups) * t * h * w
    xg = x.view(b * groups, n)
    pivot = xg[:, 0].float().contiguous()
    block = 1024
    chunk = max(block, triton.cdiv(triton.cdiv(n, 64), block) * block)  # at most 64 splits per group
    splits = triton.cdiv(n, chunk)
    part = torch.empty(b * groups, splits, 2, device=x.device, dtype=torch.float32)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _gn_partial_sums_kernel[(b * groups, splits)](x, pivot, part, n, chunk, splits, BLOCK=block)
        sums = part.double().sum(1)
        mu = sums[:, 0] / n
        var = (sums[:, 1] / n - mu * mu).clamp(min=0)
        mean = (mu + pivot.double()).float()
        rstd = (var + eps).rsqrt().float()
        a = rstd.view(b, groups, 1).expand(b, groups, c // groups).reshape(b, c)
        if weight is not None:
            a = a * weight.float()
        shift = -mean.view(b, groups, 1).expand(b, groups, c // groups).reshape(b, c) * a
        if bias is not None:
            shift = shift + bias.float()
        a, shift = a.contiguous(), shift.contiguous()
        _gn_apply_kernel[(triton.cdiv(y.numel(), 1024),)](
            x, y, a, shift, y.numel(), t, h, w, t + pt, h + 2 * ph, w + 2 * pw, pt, ph, pw, SILU=silu, BLOCK=1024,
        )
    return y


def _backend(device: torch.device) -> str:
    return select_backend("group_norm_silu", device, {"triton": HAS_TRITON, "cpu": _CPP is not None})


def _group_norm_silu_impl(x, weight, bias, groups, eps, silu, pad_t, pad_h, pad_w):
    backend = _backend(x.device)
    if backend == "cpu":
        return _CPP(x, weight, bias, groups, eps, silu, pad_t, pad_h, pad_w)
    if backend == "triton":
        return _group_norm_silu_triton(x, weight, bias, groups, eps, silu, pad_t, pad_h, pad_w)
    return group_norm_silu_ref(x, weight, bias, groups, eps, silu, (pad_t, pad_h, pad_w)).contiguous()


@torch.library.custom_op("kandinsky_kernels::group_norm_silu", mutates_args=())
def _group_norm_silu_op(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int, eps: float, silu: bool,
    pad_t: int, pad_h: int, pad_w: int,
) -> torch.Tensor:
    return _group_norm_silu_impl(x, weight, bias, groups, eps, silu, pad_t, pad_h, pad_w)


@_group_norm_silu_op.register_fake
def _(x, weight, bias, groups, eps, silu, pad_t, pad_h, pad_w):
    shape = list(x.shape)
    if pad_t or pad_h or pad_w:
        shape[2:] = [shape[2] + pad_t, shape[3] + 2 * pad_h, shape[4] + 2 * pad_w]
    return x.new_empty(shape)


def group_norm_silu(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int, eps: float = 1e-6,
    *, silu: bool = True, pad: tuple[int, int, int] = (0, 0, 0),
) -> torch.Tensor:
    """``silu(group_norm(x))`` (plain GroupNorm with ``silu=False``) in one pass over x, fp32 statistics.

    x: (B, C, ...) float32 / bfloat16 / float16; weight, bias: (C,) or None; ``groups`` divides C.
    ``pad = (pt, ph, pw)`` (x must then be (B, C, T, H, W)) writes the causal replicate-padded result
    (B, C, T + pt, H + 2 ph, W + 2 pw), see the module doc. Returns a new tensor of x's dtype, contiguous
    (channels-last-3d for a channels-last-3d x on the cpu backend).
    Differentiable through the torch reference when autograd records the call."""
    check_tensor("x", x, min_ndim=2, dtypes=_DTYPES)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or x.shape[1] % groups:
        raise ValueError(f"groups must be a positive int dividing C={x.shape[1]}, got {groups!r}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_tensor(name, p, ndim=1)
            if p.shape[0] != x.shape[1] or p.device != x.device:
                raise ValueError(f"{name} must be ({x.shape[1]},) on {x.device}, got {tuple(p.shape)} on {p.device}")
    pt, ph, pw = (int(v) for v in pad)
    if min(pt, ph, pw) < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if (pt or ph or pw) and x.dim() != 5:
        raise ValueError(f"a padded output needs x of shape (B, C, T, H, W), got {tuple(x.shape)}")
    if torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in (x, weight, bias)):
        return group_norm_silu_ref(x, weight, bias, groups, eps, silu, (pt, ph, pw))
    if eager(x):
        return _group_norm_silu_impl(x, weight, bias, groups, float(eps), bool(silu), pt, ph, pw)
    return _group_norm_silu_op(x, weight, bias, groups, float(eps), bool(silu), pt, ph, pw)


def group_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int, eps: float = 1e-6,
) -> torch.Tensor:
    """Plain GroupNorm (fp32 statistics, one write): :func:`group_norm_silu` with ``silu=False``."""
    return group_norm_silu(x, weight, bias, groups, eps, silu=False)
