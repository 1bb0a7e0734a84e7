"""The attention's q/k normalisation in one pass: per-head RMSNorm with a learned weight, then (optionally)
the rotary embedding of adjacent pairs, in fp32, written once in the input's dtype.

The official CrossDiT computes ``apply_rope(RMSNorm(x.float()), cos, sin).to(x.dtype)`` for q and k of
every self-attention (and the RMSNorm alone for cross-attention): in eager torch a cast to fp32, the norm
(square, mean, rsqrt, two multiplies), a complex multiply and a cast back, each a pass over a (B, S, H, Dh)
tensor. This op reads x once and writes the result once.

Backends: ``cpu`` (csrc/qk_norm.cpp: rows of Dh in fp32, OpenMP over rows, a per-ISA clone of the row
arithmetic), ``triton`` (a block of rows per program; even and odd elements loaded apart, so the rotation
is elementwise), ``reference`` (torch in fp32, :func:`kandinsky_kernels.reference.qk_norm.rms_norm_rope_ref`).

Autograd: the custom op carries a backward (``register_autograd``), itself a custom op with a fake
implementation, so training runs the fused forward, eagerly and under ``torch.compile(fullgraph=True)``.
Saved: the inputs only; the backward recomputes each row's rstd from x (a sum of Dh squares: cheaper than
keeping a (B, S, H) fp32 tensor alive from forward to backward, and x is needed anyway for x_hat). dx and
dweight come from one pass (cpu: csrc/qk_norm.cpp; dweight summed over all B * S * H rows in fp32 per fixed
block of rows, the blocks added in order in double: deterministic, no atomics), dweight returned in weight's
dtype. On ``triton`` and ``reference`` the backward is the plain-torch formula in fp32
(:func:`_rms_norm_rope_bwd_torch`). Gradients of cos / sin (the model's angles are buffers, so rarely
wanted) are formed in torch when asked for. The backward custom op chooses its backend again when it runs
(it needs nothing the forward's kernel produced). No double backward.
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
_CPP_BWD = cpp_op("rms_norm_rope_backward")
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


def _unrotate(dz, cos, sin):
    """The gradient of the rotation's input from its output's: each pair rotated back by the angle."""
    z0, z1 = dz[..., 0::2], dz[..., 1::2]
    c, s = cos.float(), sin.float()
    return torch.stack((z0 * c + z1 * s, z1 * c - z0 * s), -1).flatten(-2)


def _rms_norm_rope_bwd_torch(dz, x, weight, cos, sin, eps):
    """The backward in plain torch, fp32: (dx in x's dtype, dweight fp32 (Dh,))."""
    xf = x.float()
    rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    xhat = xf * rstd
    dy = dz.float() if cos is None else _unrotate(dz.float(), cos, sin)
    g = dy * weight.float()
    dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    return dx.to(x.dtype), (dy * xhat).sum((0, 1, 2))


def _rms_norm_rope_bwd_impl(dz, x, weight, cos, sin, eps):
    if _backend_bwd(x.device) == "cpu":
        return _CPP_BWD(dz, x, weight, cos, sin, eps)
    dx, dw = _rms_norm_rope_bwd_torch(dz, x, weight, cos, sin, eps)
    return dx.contiguous(), dw


def _backend_bwd(device: torch.device) -> str:
    return select_backend("rms_norm_rope", device, {"triton": HAS_TRITON, "cpu": _CPP_BWD is not None})


@torch.library.custom_op("kandinsky_kernels::rms_norm_rope_backward", mutates_args=())
def _rms_norm_rope_bwd_op(
    dz: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rms_norm_rope_bwd_impl(dz, x, weight, cos, sin, eps)


@_rms_norm_rope_bwd_op.register_fake
def _(dz, x, weight, cos, sin, eps):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    return dx, x.new_empty((x.shape[-1],), dtype=torch.float32)


def _angle_grads(dz, x, weight, cos, sin, eps):
    """d cos, d sin (in their dtypes) from the normalised rows before the rotation, summed over heads (and
    over the batch for angles shared by it)."""
    y = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps)
    y0, y1 = y[..., 0::2], y[..., 1::2]
    z0, z1 = dz.float()[..., 0::2], dz.float()[..., 1::2]
    dc = (z0 * y0 + z1 * y1).sum(2, keepdim=True)
    ds = (z1 * y0 - z0 * y1).sum(2, keepdim=True)
    if cos.shape[0] != x.shape[0]:
        dc, ds = dc.sum(0, keepdim=True), ds.sum(0, keepdim=True)
    return dc.to(cos.dtype), ds.to(sin.dtype)


def _rms_norm_rope_setup(ctx, inputs, output):
    x, weight, cos, sin, eps = inputs
    ctx.save_for_backward(x, weight, cos, sin)  # rstd is recomputed from x: see the module doc
    ctx.eps = eps


def _rms_norm_rope_backward(ctx, dz):
    x, weight, cos, sin = ctx.saved_tensors
    need_x, need_w, need_cos, need_sin, _ = ctx.needs_input_grad
    dx = dw = dcos = dsin = None
    if need_x or need_w:
        args = (dz, x, weight, cos, sin, ctx.eps)
        dx, dw = _rms_norm_rope_bwd_impl(*args) if eager(dz) else _rms_norm_rope_bwd_op(*args)
    if need_cos or need_sin:
        dcos, dsin = _angle_grads(dz, x, weight, cos, sin, ctx.eps)
    return (dx if need_x else None, dw.to(weight.dtype) if need_w else None,
            dcos if need_cos else None, dsin if need_sin else None, None)


_rms_norm_rope_op.register_autograd(_rms_norm_rope_backward, setup_context=_rms_norm_rope_setup)


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
    (y[2j], y[2j + 1]) -> (y0 cos - y1 sin, y0 sin + y1 cos). Differentiable (the fused backward: see the
    module doc)."""
    _check(x, weight, cos, sin, eps)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, cos, sin))
    if eager(x) and not needs_grad:
        return _rms_norm_rope_impl(x, weight, cos, sin, float(eps))
    return _rms_norm_rope_op(x, weight, cos, sin, float(eps))
