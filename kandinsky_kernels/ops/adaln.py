"""The DiT's adaptive-LayerNorm "fp32 islands", fused: ``LN(x) * (1 + scale) + shift`` and the gated
residual ``x + gate * out``, each one read of its inputs and one write of x's dtype (fp32, bf16, fp16),
with the math in fp32 exactly as the official forward (see :mod:`kandinsky_kernels.reference.adaln`).

Named dims: ``...`` leading dims, R rows sharing one modulation vector, D features. x, out are
(..., R, D); shift, scale, gate are (..., 1, D) with x's leading dims, fp32 or x's dtype, broadcast over
the R rows. The model passes x viewed as (B, S, D) with (B, 1, D) modulations, or per frame as
(B, T', S / T', D) with (B, T', 1, D) modulations.

Backends: ``cpu`` (csrc/adaln.cpp: per row, the row widened once into an fp32 buffer, a two-pass mean /
variance accumulated in double with the mean split hi + lo, one write; OpenMP over rows), ``triton``
(one program per row holding the whole row in registers, upcast to fp32 in the kernel, statistics
shifted by the row's first element; the gated residual as one elementwise kernel), ``reference`` (torch).

Autograd: the custom ops have no backward. :func:`scale_shift_layer_norm` and :func:`gated_residual` take
the differentiable reference whenever autograd would record the call, so training still gets gradients.
"""
from __future__ import annotations

import contextlib

import torch

from kandinsky_kernels._ext import cpp_op
from kandinsky_kernels._triton import HAS_TRITON, tl, triton
from kandinsky_kernels._validation import check_finite_number, check_same_device, check_tensor
from kandinsky_kernels.backends import select_backend
from kandinsky_kernels.ops._eager import eager
from kandinsky_kernels.reference.adaln import gated_residual_ref, scale_shift_layer_norm_ref

__all__ = ["gated_residual", "scale_shift_layer_norm"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CPP_LN = cpp_op("scale_shift_layer_norm")
_CPP_GATE = cpp_op("gated_residual")

if HAS_TRITON:

    @triton.jit
    def _scale_shift_ln_fwd_kernel(x_ptr, shift_ptr, s1_ptr, y_ptr, R, D, eps, BLOCK_D: tl.constexpr):
        # program = one row of x; its modulation row is row // R. Statistics shifted by the row's first
        # element, so a large common offset does not cancel the variance.
        row = tl.program_id(0).to(tl.int64)
        mod = (row // R) * D
        cols = tl.arange(0, BLOCK_D)
        m = cols < D
        pivot = tl.load(x_ptr + row * D).to(tl.float32)
        x = tl.load(x_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
        xs = tl.where(m, x - pivot, 0.0)
        mean = tl.sum(xs, axis=0) / D
        d = tl.where(m, xs - mean, 0.0)
        var = tl.sum(d * d, axis=0) / D
        rstd = 1.0 / tl.sqrt(var + eps)
        s1 = tl.load(s1_ptr + mod + cols, mask=m, other=0.0)
        sh = tl.load(shift_ptr + mod + cols, mask=m, other=0.0)
        y = d * rstd * s1 + sh
        tl.store(y_ptr + row * D + cols, y.to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _gated_residual_fwd_kernel(x_ptr, o_ptr, g_ptr, y_ptr, numel, RD, D, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < numel
        gi = (offs // RD) * D + offs % D
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        o = tl.load(o_ptr + offs, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + gi, mask=m, other=0.0)
        tl.store(y_ptr + offs, (x + g * o).to(y_ptr.dtype.element_ty), mask=m)


def _device_ctx(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _scale_shift_layer_norm_triton(x, shift, scale, eps):
    """Triton launcher: contiguous x (..., R, D), fp32 modulation rows; returns a new tensor of x's dtype."""
    x = x.contiguous()
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    d, r = x.shape[-1], x.shape[-2]
    sh = shift.float().contiguous()
    s1 = (1.0 + scale).float().contiguous()  # in scale's dtype first, as the reference
    block = triton.next_power_of_2(d)
    with _device_ctx(x):
        _scale_shift_ln_fwd_kernel[(x.numel() // d,)](
            x, sh, s1, y, r, d, eps, BLOCK_D=block, num_warps=4 if block <= 2048 else 8,
        )
    return y


def _gated_residual_triton(x, out, gate):
    """Triton launcher: contiguous x, out (..., R, D), fp32 gate rows; returns a new tensor of x's dtype."""
    x, out = x.contiguous(), out.contiguous()
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    d, r = x.shape[-1], x.shape[-2]
    g = gate.float().contiguous()
    block = 1024
    with _device_ctx(x):
        _gated_residual_fwd_kernel[(triton.cdiv(x.numel(), block),)](x, out, g, y, x.numel(), r * d, d, BLOCK=block)
    return y


def _backend(op: str, device: torch.device, cpp) -> str:
    return select_backend(op, device, {"triton": HAS_TRITON, "cpu": cpp is not None})


def _scale_shift_layer_norm_impl(x, shift, scale, eps):
    backend = _backend("scale_shift_layer_norm", x.device, _CPP_LN)
    if backend == "cpu":
        return _CPP_LN(x, shift, scale, eps)
    if backend == "triton":
        return _scale_shift_layer_norm_triton(x, shift, scale, eps)
    return scale_shift_layer_norm_ref(x, shift, scale, eps).contiguous()


def _gated_residual_impl(x, out, gate):
    backend = _backend("gated_residual", x.device, _CPP_GATE)
    if backend == "cpu":
        return _CPP_GATE(x, out, gate)
    if backend == "triton":
        return _gated_residual_triton(x, out, gate)
    return gated_residual_ref(x, out, gate).contiguous()


@torch.library.custom_op("kandinsky_kernels::scale_shift_layer_norm", mutates_args=())
def _scale_shift_layer_norm_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return _scale_shift_layer_norm_impl(x, shift, scale, eps)


@_scale_shift_layer_norm_op.register_fake
def _(x, shift, scale, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("kandinsky_kernels::gated_residual", mutates_args=())
def _gated_residual_op(x: torch.Tensor, out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return _gated_residual_impl(x, out, gate)


@_gated_residual_op.register_fake
def _(x, out, gate):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _check_x(x: torch.Tensor) -> None:
    check_tensor("x", x, min_ndim=2, dtypes=_DTYPES)


def _check_mod(name: str, m: torch.Tensor, x: torch.Tensor) -> None:
    check_tensor(name, m, dtypes=tuple(dict.fromkeys((torch.float32, x.dtype))))
    want = (*x.shape[:-2], 1, x.shape[-1])
    if tuple(m.shape) != want:
        raise ValueError(f"{name} must have shape {want} (x's leading dims, 1, D) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(m.shape)}")


def scale_shift_layer_norm(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-5,
) -> torch.Tensor:
    """``LN(x) * (1 + scale) + shift`` (non-affine LayerNorm over D) in fp32, one write in x's dtype.

    x: (..., R, D) float32 / bfloat16 / float16. shift, scale: (..., 1, D) with x's leading dims, float32
    or x's dtype, broadcast over the R rows (``1 + scale`` is formed in scale's dtype). eps > 0.
    Returns a new contiguous tensor (..., R, D) of x's dtype.
    Differentiable through the torch reference when autograd records the call."""
    _check_x(x)
    _check_mod("shift", shift, x)
    _check_mod("scale", scale, x)
    check_same_device(x=x, shift=shift, scale=scale)
    eps = check_finite_number("eps", eps, positive=True)
    if torch.is_grad_enabled() and (x.requires_grad or shift.requires_grad or scale.requires_grad):
        return scale_shift_layer_norm_ref(x, shift, scale, eps)
    if eager(x):
        return _scale_shift_layer_norm_impl(x, shift, scale, eps)
    return _scale_shift_layer_norm_op(x, shift, scale, eps)


def gated_residual(x: torch.Tensor, out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Gated residual ``x + gate * out`` in fp32, one write in x's dtype.

    x, out: (..., R, D) of one dtype, float32 / bfloat16 / float16. gate: (..., 1, D) with x's leading
    dims, float32 or x's dtype, broadcast over the R rows. Returns a new contiguous tensor (..., R, D) of
    x's dtype. Differentiable through the torch reference when autograd records the call."""
    _check_x(x)
    check_tensor("out", out)
    if out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"out must match x's shape {tuple(x.shape)} and dtype {x.dtype}, got "
                         f"{tuple(out.shape)} {out.dtype}")
    _check_mod("gate", gate, x)
    check_same_device(x=x, out=out, gate=gate)
    if torch.is_grad_enabled() and (x.requires_grad or out.requires_grad or gate.requires_grad):
        return gated_residual_ref(x, out, gate)
    if eager(x):
        return _gated_residual_impl(x, out, gate)
    return _gated_residual_op(x, out, gate)
