"""The model's Linear layers: fp32 products on x86 CPUs other than Intel's run through oneDNN.

Why: torch's fp32 ``F.linear`` on the CPU calls MKL's sgemm, and MKL takes its generic (AVX2-class)
code on CPUs that do not report ``GenuineIntel``. On the AMD EPYC (Zen 5, AVX-512) of our machines
that is about 90 GFLOP/s per core for the CrossDiT's widths, while oneDNN's fp32 inner product, the
library torch already ships and uses for bf16, runs the same products at 160-180 GFLOP/s per core
(``benchmarks/RESULTS.md``): the fp32 CrossDiT block forward takes ~1.7x less time. On Intel CPUs MKL
is fast and nothing changes; bf16 and fp16 already go to oneDNN inside torch.

:class:`Linear` is ``nn.Linear`` (same parameters, same ``state_dict`` keys, ``isinstance`` still
holds) whose forward calls :func:`linear`. :func:`linear` takes the oneDNN path when all of these
hold, else it is ``F.linear``:

- ``x``, ``weight`` and ``bias`` are plain fp32 CPU tensors (no tensor subclass such as DTensor);
- the product is not empty and the shapes agree (else ``F.linear`` gives its own result or message);
- the mode allows it: ``KANDINSKY_CPU_LINEAR=auto`` (default: on x86-64 CPUs whose vendor is not
  Intel, where torch was built with oneDNN, for products of at least 2**22 multiply-adds: smaller
  ones measured as fast or faster in MKL), ``onednn`` (every product, where torch has the op; for
  tests and measurements) or ``torch`` (never). Read at every eager call; a compiled graph holds the
  choice made when it was traced.

Under ``torch.compile`` the oneDNN product is the custom op ``kandinsky_model::onednn_linear`` (with
a fake implementation and a backward custom op), opaque to inductor, whose own lowering of the oneDNN
op takes only the prepacked weights of its freezing pass: a compiled model runs the same library as
the eager one (a compiled fp32 Video Lite block forward 1.30x faster than with MKL on the AMD CPU).

Numerics: an fp32 product either way; the two libraries sum in different orders, so results differ
in the last bits (about 6e-7 relative L2 at K = 1,792 for oneDNN, 3e-7 for MKL, against fp64).
Autograd: the input and weight gradients are oneDNN products too, the bias gradient a sum over rows.
The oneDNN path is differentiable once: a double backward through it raises, so run such code with
``KANDINSKY_CPU_LINEAR=torch``.

The op used, ``torch.ops.mkldnn._linear_pointwise``, is the one inductor's freezing pass emits for CPU
Linears; it is private to torch, so it is looked up once and, where a torch build lacks it, ``auto``
falls back to ``F.linear`` and ``onednn`` raises.
"""
from __future__ import annotations

import os
import platform

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ENV_VAR", "Linear", "fp32_library", "is_plain_linear", "linear", "linear_gelu", "linear_path"]

ENV_VAR = "KANDINSKY_CPU_LINEAR"
MODES = ("auto", "onednn", "torch")
# Below this many multiply-adds (auto mode) MKL was as fast or faster (2 cores, AMD EPYC Zen 5): 16 x 128 x 256
# ran 11 us in MKL and 18 us in oneDNN, 64 x 256 x 256 (2**22) 50 us and 36 us.
MIN_MACS = 1 << 22


def _lookup_onednn_op():
    if not torch.backends.mkldnn.is_available():
        return None, "torch was built without oneDNN (torch.backends.mkldnn.is_available() is False)"
    try:
        return torch.ops.mkldnn._linear_pointwise.default, None
    except (AttributeError, RuntimeError) as e:
        return None, f"this torch has no torch.ops.mkldnn._linear_pointwise ({e})"


def _read_cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


# Looked up once at import (no CUDA, a few microseconds and one small file read), so that the path
# choice below is plain Python over constants that torch.compile can trace.
_ONEDNN = _lookup_onednn_op()
_VENDOR = _read_cpu_vendor()
_MACHINE = platform.machine().lower()


def _onednn_op():
    """torch's oneDNN inner product, or ``None`` with why it is missing."""
    return _ONEDNN


def _cpu_vendor() -> str:
    """The CPU vendor string (``GenuineIntel``, ``AuthenticAMD``, ...), or ``""`` where unknown."""
    return _VENDOR


def _machine() -> str:
    return _MACHINE


def _mode() -> str:
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={mode!r} is not a mode; expected one of {', '.join(MODES)}")
    return mode


def _auto_uses_onednn() -> bool:
    return (_machine() in ("x86_64", "amd64") and _cpu_vendor() not in ("", "GenuineIntel")
            and _onednn_op()[0] is not None)


def _plain_fp32_cpu(t: torch.Tensor | None) -> bool:
    return t is None or (type(t) in (torch.Tensor, nn.Parameter) and t.dtype == torch.float32
                         and t.device.type == "cpu")


def linear_path(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> str:
    """``"onednn"`` or ``"torch"``: the path :func:`linear` takes for these arguments (see the module doc).

    Raises ``ValueError`` for a bad ``KANDINSKY_CPU_LINEAR`` and ``RuntimeError`` where ``onednn`` is
    forced but this torch lacks the op."""
    mode = _mode()
    if mode == "torch":
        return "torch"
    if mode == "onednn" and _onednn_op()[0] is None:
        raise RuntimeError(f"{ENV_VAR}=onednn, but {_onednn_op()[1]}")
    if not (_plain_fp32_cpu(x) and _plain_fp32_cpu(weight) and _plain_fp32_cpu(bias)):
        return "torch"
    if x.dim() < 1 or weight.dim() != 2:
        return "torch"
    k, n = x.shape[-1], weight.shape[0]
    rows = x.numel() // k if k else 0
    if rows == 0 or n == 0 or k != weight.shape[1]:
        return "torch"  # empty or mismatched: F.linear's own result, checks and messages
    if mode == "auto" and (rows * n * k < MIN_MACS or not _auto_uses_onednn()):
        return "torch"
    return "onednn"


def fp32_library() -> str:
    """``"onednn"`` or ``"torch"`` (MKL): what the model's large fp32 CPU products run on here under the
    current ``KANDINSKY_CPU_LINEAR`` (for benchmark metadata). Never raises: an error is returned as
    ``"error: ..."``."""
    try:
        return linear_path(torch.empty(256, 256), torch.empty(256, 256))
    except (ValueError, RuntimeError) as e:
        return f"error: {e}"


def _product(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, *,
             gelu: bool = False) -> torch.Tensor:
    """a (M, K) @ b (N, K)^T (+ bias) through oneDNN, then the exact (erf) GELU if ``gelu``; a and b
    may be strided views."""
    return _onednn_op()[0](a, b, bias, "gelu" if gelu else "none", [], "none" if gelu else "")


def _product_nd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    """:func:`_product` for x (..., K) -> (..., N)."""
    return _product(x.reshape(-1, x.shape[-1]), weight, bias, gelu=gelu).view(*x.shape[:-1], weight.shape[0])


def _records_grad(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))


# Under torch.compile the product is this custom op, opaque to inductor (whose own lowering of the
# oneDNN op takes only the prepacked weights of its freezing pass): a compiled model then runs the
# same library as the eager one. Eager calls skip it (the autograd Function below): a custom op's
# first call imports torch._dynamo (seconds), see kandinsky_kernels/ops/_eager.py.
@torch.library.custom_op("kandinsky_model::onednn_linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    return _product_nd(x, weight, bias, gelu)


@_linear_op.register_fake
def _(x, weight, bias, gelu):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("kandinsky_model::onednn_linear_backward", mutates_args=())
def _linear_bwd_op(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_x: bool,
                   need_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gx, gw = _grads(g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1]), weight, need_x, need_weight)
    # the op must return tensors: an unneeded gradient is an empty one
    return (gx.view(x.shape) if gx is not None else x.new_empty(0),
            gw if gw is not None else weight.new_empty(0))


@_linear_bwd_op.register_fake
def _(g, x, weight, need_x, need_weight):
    return (x.new_empty(x.shape) if need_x else x.new_empty(0),
            weight.new_empty(weight.shape) if need_weight else weight.new_empty(0))


def _linear_op_setup(ctx, inputs, output):
    x, weight, bias, gelu = inputs
    if gelu:
        raise RuntimeError("kandinsky_model::onednn_linear with gelu=True has no backward")
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _linear_op_backward(ctx, g):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b, _ = ctx.needs_input_grad
    gx, gw = _linear_bwd_op(g, x, weight, need_x, need_w)
    gb = g.reshape(-1, g.shape[-1]).sum(0) if ctx.has_bias and need_b else None
    return gx if need_x else None, gw if need_w else None, gb, None


_linear_op.register_autograd(_linear_op_backward, setup_context=_linear_op_setup)


def _grads(g2, x2, weight, need_x, need_weight):
    """(grad of x2, grad of weight) of ``x2 @ weight^T`` for the output gradient g2 (M, N), each None
    where not needed."""
    gx = gw = None
    if need_x:
        # a contiguous W^T (K x N) made the product ~10 % faster than the strided view; the copy is one
        # weight's size
        gx = _product(g2, weight.t().contiguous())
    if need_weight:
        # transposed views: the op makes g^T (rows x out) contiguous itself and reads x^T strided
        gw = _product(g2.t(), x2.t())
    return gx, gw


class _OneDnnLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias):
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        return _product(x2, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x2, weight = ctx.saved_tensors
        gx, gw = _grads(g, x2, weight, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        gb = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x (..., K), weight (N, K), bias (N,) or None -> (..., N) in x's
    dtype; fp32 CPU products through oneDNN where :func:`linear_path` says so (see the module doc)."""
    if linear_path(x, weight, bias) == "torch":
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():
        return _linear_op(x, weight, bias, False)
    if not _records_grad(x, weight, bias):
        return _product_nd(x, weight, bias, False)
    return _OneDnnLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.gelu(F.linear(x, weight, bias))`` (exact GELU), shapes as :func:`linear`. On the oneDNN path
    without autograd recording, the GELU is applied as the product's output is written (a post-op: one
    pass over the (..., N) result less; ~10 % of the CrossDiT's first MLP product)."""
    if linear_path(x, weight, bias) == "torch" or _records_grad(x, weight, bias):
        return F.gelu(linear(x, weight, bias))
    if torch.compiler.is_compiling():
        return _linear_op(x, weight, bias, True)
    return _product_nd(x, weight, bias, True)


def is_plain_linear(module: nn.Module) -> bool:
    """Whether calling :func:`linear` / :func:`linear_gelu` on ``module``'s parameters is the same as
    calling ``module``: it is exactly :class:`Linear` (not a subclass or a replacement such as a LoRA
    layer) and no forward hook, its own or global, would be skipped."""
    from torch.nn.modules import module as module_mod

    return (type(module) is Linear and not module._forward_hooks and not module._forward_pre_hooks
            and not module_mod._global_forward_hooks and not module_mod._global_forward_pre_hooks)


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`linear` (same parameters and ``state_dict`` keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
