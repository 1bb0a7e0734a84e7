"""The attention's q/k normalisation in one pass: per-head RMSNorm with a learned weight, then (optionally)
the rotary embedding of adjacent pairs, in fp32, written once in the input's dtype.

The official CrossDiT computes ``apply_rope(RMSNorm(x.float()), cos, sin).to(x.dtype)`` for q and k of
every self-attention (and the RMSNorm alone for cross-attention): in eager torch a cast to fp32, the norm
(square, mean, rsqrt, two multiplies), a complex multiply and a cast back, each a pass over a (B, S, H, Dh)
tensor. This op reads x once and writes the result once.

Backends: ``cpu`` (csrc/qk_norm.cpp: rows of Dh in fp32, OpenMP over rows, a per-ISA clone of the row
arithmetic), ``triton`` (a block of rows per program; even and odd elements loaded apart, so the rotation
is elementwise), ``reference`` (torch in fp32, :func:`kandinsky_kernels.reference.qk_norm.rms_norm_rope_ref`).

Autograd: the custom op has no backward; :func:`rms_norm_rope` takes the differentiable reference when
autograd would record the call, so training still gets gradients (through the unfused ops).
"""
from __future__ import annotations

import contextlib

import torch

from kandinsky_kernels._ext import cpp_op
from kandinsky_kernels._triton import HAS_TRITON, tl, triton
from kandinsky_kernels._validation import check_finite_number, check_same_device, check_tensor
from kandinsky_kernels.backends import select_backend
from kandinsky_kernels.ops._eager import eager
from kandinsky_kernels.reference.qk_norm import rms_norm_rope_ref

__all__ = ["rms_norm_rope"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CPP = cpp_op("rms_norm_rope")
_FP32_EPS = torch.finfo(torch.float32).eps

if HAS_TRITON:

    @triton.jit
    def _rms_norm_rope_kernel(
        x_ptr, w_ptr, cos_ptr, sin_ptr, y_ptr, rows, S, H, DH, COS_B, eps,
        ROPE: tl.constexpr, ROWS: tl.constexpr, HALF: tl.constexpr,
    ):
        # rows of x (B * S * H, DH); with ROPE the row's pairs (2j, 2j + 1), else its elements as (j, j + HALF)
        r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        j = tl.arange(0, HALF)
        rm = r < rows
        if ROPE:
            i0 = 2 * j
            i1 = 2 * j + 1
        else:
            i0 = j
            i1 = j + HALF
        m0 = rm[:, None] & (i0 < DH)[None, :]
        m1 = rm[:, None] & (i1 < DH)[None, :]
        base = x_ptr + r[:, None] * DH
        x0 = tl.load(base + i0[None, :], mask=m0, other=0.0).to(tl.float32)
        x1 = tl.load(base + i1[None, :], mask=m1, other=0.0).to(tl.float32)
        ss = tl.sum(x0 * x0, axis=1) + tl.sum(x1 * x1, axis=1)
        rstd = 1.0 / tl.sqrt(ss / DH + eps)
        w0 = tl.load(w_ptr + i0, mask=i0 < DH, other=0.0)
        w1 = tl.load(w_ptr + i1, mask=i1 < DH, other=0.0)
        y0 = x0 * rstd[:, None] * w0[None, :]
        y1 = x1 * rstd[:, None] * w1[None, :]
        if ROPE:
            s = (r // H) % S
            b = r // (S * H)
            crow = ((b % COS_B) * S + s)[:, None] * (DH // 2) + j[None, :]
            c = tl.load(cos_ptr + crow, mask=m0, other=0.0)
            sn = tl.load(sin_ptr + crow, mask=m0, other=0.0)
            z0 = y0 * c - y1 * sn
            z1 = y0 * sn + y1 * c
            y0 = z0
            y1 = z1
        out = y_ptr + r[:, None] * DH
        tl.store(out + i0[None, :], y0.to(y_ptr.dtype.element_ty), mask=m0)
        tl.store(out + i1[None, :], y1.to(y_ptr.dtype.element_ty), mask=m1)


def _rms_norm_rope_triton(x, weight, cos, sin, eps):
    x = x.contiguous()
    b, s, h, dh = x.shape
    y = torch.empty_like(x)
    rows = b * s * h
    if rows == 0 or dh == 0:
        return y
    w = weight.float().contiguous()
    rope = cos is not None
    c = cos.float().contiguous() if rope else w
    sn = sin.float().contiguous() if rope else w
    half = triton.next_power_of_2(max(1, (dh + 1) // 2))
    block_rows = max(1, min(64, 4096 // (2 * half)))
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _rms_norm_rope_kernel[(triton.cdiv(rows, block_rows),)](
            x, w, c, sn, y, rows, s, h, dh, c.shape[0] if rope else 1, float(eps),
            ROPE=rope, ROWS=block_rows, HALF=half,
        )
    return y


def _backend(device: torch.device) -> str:
    return select_backend("rms_norm_rope", device, {"triton": HAS_TRITON, "cpu": _CPP is not None})


def _rms_norm_rope_impl(x, weight, cos, sin, eps):
    backend = _backend(x.device)
    if backend == "cpu":
        return _CPP(x, weight, cos, sin, eps)
    if backend == "triton":
        return _rms_norm_rope_triton(x, weight, cos, sin, eps)
    return rms_norm_rope_ref(x, weight, cos, sin, eps).contiguous()


@torch.library.custom_op("kandinsky_kernels::rms_norm_rope", mutates_args=())
def _rms_norm_rope_op(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, eps: float,
) -> torch.Tensor:
    return _rms_norm_rope_impl(x, weight, cos, sin, eps)


@_rms_norm_rope_op.register_fake
def _(x, weight, cos, sin, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _check(x, weight, cos, sin, eps) -> None:
    check_tensor("x", x, ndim=4, dtypes=_DTYPES)
    b, s, _, dh = x.shape
    check_tensor("weight", weight, ndim=1, dtypes=_DTYPES)
    if weight.shape[0] != dh:
        raise ValueError(f"weight must be ({dh},) (the head dim of x (B, S, H, Dh) = {tuple(x.shape)}), "
                         f"got {tuple(weight.shape)}")
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must be given together (both None: no rotation)")
    if cos is not None:
        if dh % 2:
            raise ValueError(f"the rotation pairs adjacent elements, so the head dim must be even, got Dh={dh}")
        for name, t in (("cos", cos), ("sin", sin)):
            check_tensor(name, t, ndim=4, dtypes=_DTYPES)
            if t.shape[0] not in (1, b) or tuple(t.shape[1:]) != (s, 1, dh // 2):
                raise ValueError(f"{name} must be (1 or {b}, {s}, 1, {dh // 2}) for x (B, S, H, Dh) = "
                                 f"{tuple(x.shape)}, got {tuple(t.shape)}")
        if cos.shape != sin.shape:
            raise ValueError(f"cos and sin must have one shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    check_same_device(x=x, weight=weight, cos=cos, sin=sin)
    if check_finite_number("eps", eps) < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")


def rms_norm_rope(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
    eps: float = _FP32_EPS,
) -> torch.Tensor:
    """Per-head RMSNorm of x, then the rotary embedding, in fp32; one read of x, one write.

    x: (B, S, H, Dh) float32 / bfloat16 / float16 (any strides); weight: (Dh,); cos, sin: (B or 1, S, 1, Dh / 2)
    (the angles of each token's pairs; fp32 recommended), or both None for the RMSNorm alone. eps defaults to
    the fp32 machine epsilon (the official module's ``eps=None``). Returns a new contiguous (B, S, H, Dh)
    tensor of x's dtype: ``y = x / sqrt(mean(x^2) + eps) * weight`` over Dh, then each pair
    (y[2j], y[2j + 1]) -> (y0 cos - y1 sin, y0 sin + y1 cos). Differentiable through the torch reference
    when autograd records the call."""
    _check(x, weight, cos, sin, eps)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, cos, sin)):
        return rms_norm_rope_ref(x, weight, cos, sin, float(eps))
    if eager(x):
        return _rms_norm_rope_impl(x, weight, cos, sin, float(eps))
    return _rms_norm_rope_op(x, weight, cos, sin, float(eps))
