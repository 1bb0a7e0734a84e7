"""kandinsky_kernels.ops.qk_norm (rms_norm_rope: per-head RMSNorm + rotary embedding in one pass): every
backend against a float64 evaluation of the same math under the project's tolerance rule (conftest.py),
with plain torch at the input's dtype (the model's unfused code) as the yardstick; odd head dims and row
counts, per-batch and broadcast angles, large and small input scales; the autograd path; the custom op
under opcheck and torch.compile; the boundary's errors.

Triton runs on CUDA when present, else through the interpreter on CPU tensors (fp32 only there); the
``gpu`` test runs every dtype on CUDA."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_close_to_reference, backend_and_device
from kandinsky_kernels.backends import use_backend
from kandinsky_kernels.ops.qk_norm import rms_norm_rope
from kandinsky_kernels.reference.qk_norm import rms_norm_rope_ref

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EPS = torch.finfo(torch.float32).eps


@pytest.fixture(params=["reference", "cpu", "triton"])
def backend_device(request):
    return backend_and_device(request, "rms_norm_rope")


def _double(x, w, cos, sin, eps=EPS):
    """The op's math in float64 (the tolerance rule's high-precision reference)."""
    xd = x.double()
    y = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    if cos is not None:
        y0, y1 = y[..., 0::2], y[..., 1::2]
        c, s = cos.double(), sin.double()
        y = torch.stack((y0 * c - y1 * s, y0 * s + y1 * c), -1).flatten(-2)
    return y


def _angles(bc, s, half, device):
    theta = torch.rand(bc, s, 1, half) * 2 * math.pi
    return theta.cos().to(device), theta.sin().to(device)


CASES = [  # (B, S, H, Dh, cos batch or None for no rotation)
    (1, 5, 3, 64, 1),
    (2, 7, 2, 128, 2),
    (2, 3, 1, 2, 1),
    (1, 9, 5, 96, 1),
    (1, 4, 2, 7, None),  # odd head dim: RMSNorm only
    (1, 33, 28, 64, None),
]


def _check(device, dtype, case, scale=1.0, mean=0.0):
    b, s, h, dh, cb = case
    x = (torch.randn(b, s, h, dh) * scale + mean).to(device=device, dtype=dtype)
    w = (torch.rand(dh) + 0.5).to(device)
    cos, sin = _angles(cb, s, dh // 2, device) if cb else (None, None)
    out = rms_norm_rope(x, w, cos, sin)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    # the yardstick: the unfused torch path (fp32 islands, one rounding to dtype at the end)
    assert_close_to_reference(out, _double(x, w, cos, sin), rms_norm_rope_ref(x, w, cos, sin, EPS))


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(backend_device, case, dtype):
    backend, device = backend_device
    if backend == "triton" and device == "cpu" and dtype != torch.float32:
        pytest.skip("the Triton interpreter's half arithmetic is not trusted; bf16/fp16 on a GPU")
    with use_backend(backend):
        _check(device, dtype, CASES[case])


@pytest.mark.parametrize("scale,mean", [(1e-3, 0.0), (1e3, 0.0), (1.0, 300.0), (0.0, 0.0)])
def test_input_scales(backend_device, scale, mean):
    backend, device = backend_device
    with use_backend(backend):
        _check(device, torch.float32, (1, 6, 2, 64, 1), scale, mean)


def test_strided_input_and_eps(backend_device):
    """A non-contiguous x (a head slice of a wider tensor) and a large eps, which must be used."""
    backend, device = backend_device
    x = torch.randn(1, 5, 6, 64, device=device)[:, :, ::2]
    w = torch.rand(64, device=device) + 0.5
    cos, sin = _angles(1, 5, 32, device)
    with use_backend(backend):
        out = rms_norm_rope(x, w, cos, sin, eps=0.5)
    assert_close_to_reference(out, _double(x, w, cos, sin, 0.5))
    assert (out - rms_norm_rope(x, w, cos, sin)).abs().max() > 1e-3  # eps changed the result


def test_model_numerics_cpu():
    """The op equals the model's unfused code on bf16 q at Kandinsky's head dim to a bf16 rounding step."""
    from kandinsky_model.rope import apply_rope

    x = torch.randn(1, 64, 4, 64).bfloat16()
    w = torch.rand(64) + 0.5
    cos, sin = _angles(1, 64, 32, "cpu")
    unfused = apply_rope(torch.nn.functional.rms_norm(x.float(), (64,), w, EPS), cos, sin).to(x.dtype)
    fused = rms_norm_rope(x, w, cos, sin)
    diff = (fused.float() - unfused.float()).abs()
    ulp = unfused.float().abs().clamp(min=1e-3) * 2**-7
    assert (diff <= ulp).all(), f"more than one bf16 step apart: {(diff / ulp).max():.2f} steps"


def test_autograd_takes_the_reference():
    x = torch.randn(1, 4, 2, 8, requires_grad=True)
    w = torch.rand(8, requires_grad=True)
    cos, sin = _angles(1, 4, 4, "cpu")
    out = rms_norm_rope(x, w, cos, sin)
    gx, gw = torch.autograd.grad(out.square().sum(), (x, w))
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = rms_norm_rope_ref(x2, w2, cos, sin, EPS)
    rx, rw = torch.autograd.grad(ref.square().sum(), (x2, w2))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)


def test_opcheck():
    x = torch.randn(1, 5, 2, 8)
    w = torch.rand(8)
    cos, sin = _angles(1, 5, 4, "cpu")
    for args in ((x, w, cos, sin, EPS), (x, w, None, None, 1e-6)):
        torch.library.opcheck(torch.ops.kandinsky_kernels.rms_norm_rope.default, args)


def test_compile_fullgraph():
    def f(x, w, cos, sin):
        return rms_norm_rope(x, w, cos, sin) + rms_norm_rope(x, w).sum()

    x, w = torch.randn(1, 6, 2, 16), torch.rand(16)
    cos, sin = _angles(1, 6, 8, "cpu")
    with torch.no_grad():
        eager = f(x, w, cos, sin)
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(x, w, cos, sin)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("args,match", [
    (lambda: (torch.randn(2, 3, 8), torch.rand(8), None, None), "x must have 4 dims"),
    (lambda: (torch.randn(1, 3, 2, 8).int(), torch.rand(8), None, None), "x must have dtype"),
    (lambda: (torch.randn(1, 3, 2, 8), torch.rand(6), None, None), r"weight must be \(8,\)"),
    (lambda: (torch.randn(1, 3, 2, 8), torch.rand(8), torch.rand(1, 3, 1, 4), None), "together"),
    (lambda: (torch.randn(1, 3, 2, 7), torch.rand(7), torch.rand(1, 3, 1, 3), torch.rand(1, 3, 1, 3)), "even"),
    (lambda: (torch.randn(2, 3, 2, 8), torch.rand(8), torch.rand(3, 3, 1, 4), torch.rand(3, 3, 1, 4)),
     r"cos must be \(1 or 2, 3, 1, 4\)"),
    (lambda: (torch.randn(1, 3, 2, 8), torch.rand(8), torch.rand(1, 3, 1, 8), torch.rand(1, 3, 1, 8)),
     r"cos must be \(1 or 1, 3, 1, 4\)"),
    (lambda: (torch.randn(1, 3, 2, 8), torch.rand(8), torch.rand(1, 3, 1, 4, device="meta"),
              torch.rand(1, 3, 1, 4, device="meta")), "one device"),
])
def test_errors(args, match):
    with pytest.raises(ValueError, match=match):
        rms_norm_rope(*args())


@pytest.mark.parametrize("eps", [-1.0, float("nan"), float("inf"), True])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps must be"):
        rms_norm_rope(torch.randn(1, 2, 1, 4), torch.rand(4), eps=eps)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_triton_gpu(case, dtype):
    with use_backend("triton"):
        _check("cuda", dtype, CASES[case])
        _check("cuda", dtype, (2, 4096, 28, 64, 1))  # Video Lite's q: many row blocks
