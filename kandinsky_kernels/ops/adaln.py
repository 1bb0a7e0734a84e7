"""The DiT's adaptive-LayerNorm "fp32 islands", fused: ``LN(x) * (1 + scale) + shift`` and the gated
residual ``x + gate * out``, each one read of its inputs and one write of x's dtype (fp32, bf16, fp16),
with the math in fp32 exactly as the official forward (see :mod:`kandinsky_kernels.reference.adaln`).

Named dims: ``...`` leading dims, R rows, D features. x, out are (..., R, D); shift, scale, gate are
(..., 1, D) with x's leading dims, broadcast over the R rows, or per group (..., G, 1, D) with G dividing
R (rows [g R/G, (g+1) R/G) take modulation row g); fp32 or x's dtype. The model passes x (B, S, D) with
(B, 1, D) modulations, or for packed videos with per-frame (B, T', 1, D) ones: the result is then
(B, S, D) itself, not a view of a (B, T', S/T', D) tensor (FSDP2 warns about blocks returning views).

Backends: ``cpu`` (csrc/adaln.cpp: per row, the row widened once into an fp32 buffer, a two-pass mean /
variance accumulated in double with the mean split hi + lo, one write; OpenMP over rows), ``triton``
(one program per row holding the whole row in registers, upcast to fp32 in the kernel, statistics
shifted by the row's first element; the gated residual as one elementwise kernel), ``reference`` (torch).

Autograd: both custom ops carry a backward (``register_autograd``), itself a custom op with a fake
implementation, so training runs the fused forward, eagerly and under ``torch.compile(fullgraph=True)``.
Saved: the inputs only. The LayerNorm backward recomputes the row's statistics from x instead of saving
per-row mean / rstd: x must be saved anyway (for x_hat), the row is in cache while dx is formed, and the
recompute (the forward's own statistics code on the cpu backend) costs a few flops per element, while
saved statistics would be one more tensor per call kept alive until the backward. The gated residual saves
out and gate; dx is dy itself. The modulation gradients are sums over the R rows, accumulated in fp32 per
fixed block of rows and the blocks added in order in double (cpu: csrc/adaln.cpp; no atomics, the same bits
for any thread count), returned in each modulation's dtype. On ``triton`` and ``reference`` the backward is
the plain-torch formula (:func:`_scale_shift_layer_norm_bwd_torch`, :func:`_gated_residual_bwd_torch`) in
fp32. The backward custom op chooses its backend again when it runs (it needs nothing the forward's kernel
produced), so wrap ``backward()`` in the same ``use_backend`` block to force one for both. No double
backward.
"""
from __future__ import annotations

import contextlib

import torch

from kandinsky_kernels._ext import cpp_op
from kandinsky_kernels._triton import HAS_TRITON, tl, triton
from kandinsky_kernels._validation import check_finite_number, check_same_device, check_tensor
from kandinsky_kernels.backends import select_backend
from kandinsky_kernels.ops._eager import eager
from kandinsky_kernels.reference.adaln import gated_residual_ref, grouped, scale_shift_layer_norm_ref, ungrouped

__all__ = ["gated_residual", "scale_shift_layer_norm"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CPP_LN = cpp_op("scale_shift_layer_norm")
_CPP_GATE = cpp_op("gated_residual")
_CPP_LN_BWD = cpp_op("scale_shift_layer_norm_backward")
_CPP_GATE_BWD = cpp_op("gated_residual_backward")

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


def _rows_per_mod(x: torch.Tensor, mod: torch.Tensor) -> int:
    """How many consecutive rows of x (..., R, D) share one modulation row: R, or R / G per group."""
    return x.shape[-2] // mod.shape[-3] if mod.dim() == x.dim() + 1 else x.shape[-2]


def _device_ctx(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _scale_shift_layer_norm_triton(x, shift, scale, eps):
    """Triton launcher: contiguous x (..., R, D), fp32 modulation rows; returns a new tensor of x's dtype."""
    x = x.contiguous()
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    d, r = x.shape[-1], _rows_per_mod(x, shift)
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
    d, r = x.shape[-1], _rows_per_mod(x, gate)
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


def _scale_shift_layer_norm_bwd_torch(dy, x, scale, eps):
    """The LayerNorm backward in plain torch, fp32: (dx in x's dtype, dshift, dscale fp32 in scale's shape)."""
    xf, dyf = grouped(x, scale).float(), grouped(dy, scale).float()
    var, mean = torch.var_mean(xf, -1, correction=0, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    xhat = (xf - mean) * rstd
    g = dyf * (1.0 + scale).float()
    dx = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    return ungrouped(dx.to(x.dtype), x), dyf.sum(-2, keepdim=True), (dyf * xhat).sum(-2, keepdim=True)


def _gated_residual_bwd_torch(dy, out, gate):
    """The gated residual's backward in plain torch, fp32: (dout in out's dtype, dgate fp32 in gate's shape)."""
    dyf, of = grouped(dy, gate).float(), grouped(out, gate).float()
    return ungrouped((dyf * gate.float()).to(out.dtype), out), (dyf * of).sum(-2, keepdim=True)


def _scale_shift_layer_norm_bwd_impl(dy, x, scale, eps):
    if _backend("scale_shift_layer_norm", x.device, _CPP_LN_BWD) == "cpu":
        return _CPP_LN_BWD(dy, x, scale, eps)
    dx, dshift, dscale = _scale_shift_layer_norm_bwd_torch(dy, x, scale, eps)
    return dx.contiguous(), dshift, dscale


def _gated_residual_bwd_impl(dy, out, gate):
    if _backend("gated_residual", out.device, _CPP_GATE_BWD) == "cpu":
        return _CPP_GATE_BWD(dy, out, gate)
    dout, dgate = _gated_residual_bwd_torch(dy, out, gate)
    return dout.contiguous(), dgate


@torch.library.custom_op("kandinsky_kernels::scale_shift_layer_norm_backward", mutates_args=())
def _scale_shift_layer_norm_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _scale_shift_layer_norm_bwd_impl(dy, x, scale, eps)


@_scale_shift_layer_norm_bwd_op.register_fake
def _(dy, x, scale, eps):
    m = scale.shape
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(m, dtype=torch.float32), x.new_empty(m, dtype=torch.float32))


@torch.library.custom_op("kandinsky_kernels::gated_residual_backward", mutates_args=())
def _gated_residual_bwd_op(
    dy: torch.Tensor, out: torch.Tensor, gate: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _gated_residual_bwd_impl(dy, out, gate)


@_gated_residual_bwd_op.register_fake
def _(dy, out, gate):
    return torch.empty_like(out, memory_format=torch.contiguous_format), out.new_empty(gate.shape,
                                                                                        dtype=torch.float32)


def _scale_shift_layer_norm_setup(ctx, inputs, output):
    x, shift, scale, eps = inputs
    ctx.save_for_backward(x, scale)  # the statistics are recomputed from x: see the module doc
    ctx.eps = eps
    ctx.shift_dtype = shift.dtype


def _scale_shift_layer_norm_backward(ctx, dy):
    x, scale = ctx.saved_tensors
    need_x, need_shift, need_scale, _ = ctx.needs_input_grad
    args = (dy, x, scale, ctx.eps)
    dx, dshift, dscale = (_scale_shift_layer_norm_bwd_impl(*args) if eager(dy)
                          else _scale_shift_layer_norm_bwd_op(*args))
    return (dx if need_x else None, dshift.to(ctx.shift_dtype) if need_shift else None,
            dscale.to(scale.dtype) if need_scale else None, None)


def _gated_residual_setup(ctx, inputs, output):
    x, out, gate = inputs
    ctx.save_for_backward(out, gate)  # dx is dy: x itself is not needed


def _gated_residual_backward(ctx, dy):
    out, gate = ctx.saved_tensors
    need_x, need_out, need_gate = ctx.needs_input_grad
    dout = dgate = None
    if need_out or need_gate:
        bwd = _gated_residual_bwd_impl if eager(dy) else _gated_residual_bwd_op
        dout, dgate = bwd(dy, out, gate)
    return (dy if need_x else None, dout if need_out else None,
            dgate.to(gate.dtype) if need_gate else None)


_scale_shift_layer_norm_op.register_autograd(_scale_shift_layer_norm_backward,
                                             setup_context=_scale_shift_layer_norm_setup)
_gated_residual_op.register_autograd(_gated_residual_backward, setup_context=_gated_residual_setup)


def _needs_grad(*ts: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _check_x(x: torch.Tensor) -> None:
    check_tensor("x", x, min_ndim=2, dtypes=_DTYPES)


def _check_mod(name: str, m: torch.Tensor, x: torch.Tensor) -> None:
    check_tensor(name, m, dtypes=tuple(dict.fromkeys((torch.float32, x.dtype))))
    want = (*x.shape[:-2], 1, x.shape[-1])
    if m.dim() == x.dim() + 1:  # per group: (..., G, 1, D), G dividing R
        g = m.shape[-3]
        if g < 1 or x.shape[-2] % g:
            raise ValueError(f"{name} (..., G, 1, D) of shape {tuple(m.shape)}: G must divide x's R = {x.shape[-2]} "
                             f"(x of shape {tuple(x.shape)}), got G = {g}")
        want = (*x.shape[:-2], g, 1, x.shape[-1])
    if tuple(m.shape) != want:
        raise ValueError(f"{name} must have shape {want} ((x's leading dims, 1, D), or (x's leading dims, G, 1, D) "
                         f"with G dividing R) for x of shape {tuple(x.shape)}, got {tuple(m.shape)}")


def scale_shift_layer_norm(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-5,
) -> torch.Tensor:
    """``LN(x) * (1 + scale) + shift`` (non-affine LayerNorm over D) in fp32, one write in x's dtype.

    x: (..., R, D) float32 / bfloat16 / float16. shift, scale (one shape): (..., 1, D) with x's leading
    dims, broadcast over the R rows, or per group (..., G, 1, D) with G dividing R (rows
    [g R/G, (g+1) R/G) take row g); float32 or x's dtype (``1 + scale`` is formed in scale's dtype). eps > 0.
    Returns a new contiguous tensor (..., R, D) of x's dtype.
    Differentiable (the fused backward: see the module doc)."""
    _check_x(x)
    _check_mod("shift", shift, x)
    _check_mod("scale", scale, x)
    if shift.shape != scale.shape:
        raise ValueError(f"shift and scale must have one shape, got {tuple(shift.shape)} and {tuple(scale.shape)}")
    check_same_device(x=x, shift=shift, scale=scale)
    eps = check_finite_number("eps", eps, positive=True)
    if eager(x) and not _needs_grad(x, shift, scale):
        return _scale_shift_layer_norm_impl(x, shift, scale, eps)
    return _scale_shift_layer_norm_op(x, shift, scale, eps)


def gated_residual(x: torch.Tensor, out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Gated residual ``x + gate * out`` in fp32, one write in x's dtype.

    x, out: (..., R, D) of one dtype, float32 / bfloat16 / float16. gate: (..., 1, D) with x's leading
    dims, broadcast over the R rows, or per group (..., G, 1, D) with G dividing R; float32 or x's dtype.
    Returns a new contiguous tensor (..., R, D) of x's dtype. Differentiable (the fused backward: see the
    module doc)."""
    _check_x(x)
    check_tensor("out", out)
    if out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"out must match x's shape {tuple(x.shape)} and dtype {x.dtype}, got "
                         f"{tuple(out.shape)} {out.dtype}")
    _check_mod("gate", gate, x)
    check_same_device(x=x, out=out, gate=gate)
    if eager(x) and not _needs_grad(x, out, gate):
        return _gated_residual_impl(x, out, gate)
    return _gated_residual_op(x, out, gate)
