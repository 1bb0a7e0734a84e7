"""kandinsky_kernels.ops.qk_norm (rms_norm_rope: per-head RMSNorm + rotary embedding in one pass): every
backend against a float64 evaluation of the same math under the project's tolerance rule (conftest.py),
with plain torch at the input's dtype (the model's unfused code) as the yardstick; odd head dims and row
counts, per-batch and broadcast angles, large and small input scales; the fused backward (every gradient
against the fp64 reference's autograd, a finite-difference check, determinism, torch.compile of forward +
backward); the custom op under opcheck and torch.compile; the boundary's errors.

Triton runs on CUDA when present, else through the interpreter on CPU tensors, there too at every dtype
(tests/conftest.py makes the interpreter round fp32 -> bf16 as a GPU does); the ``gpu`` test runs every
dtype on CUDA."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import (
    assert_close_to_reference, assert_same_bits_across_threads, backend_and_device, capturing_aot_backend,
    skip_interpreted_bf16,
)
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
    if backend == "triton":
        skip_interpreted_bf16(device, dtype)
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


def test_autograd_matches_the_reference():
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


# ---- backward ---------------------------------------------------------------------------------------
GRAD_CASES = [  # (B, S, H, Dh, cos batch or None for no rotation)
    (1, 1, 1, 64, 1),  # one row
    (2, 7, 3, 128, 2),  # per-batch angles
    (2, 5, 3, 10, 1),  # Dh not a multiple of 16, angles shared by the batch
    (1, 4, 2, 7, None),  # odd head dim: RMSNorm only
    (1, 33, 28, 64, 1),  # the model's heads; the cpu backward sums dweight over several row blocks
]


def _grads(fn, inputs, dy):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    return torch.autograd.grad(fn(*leaves), leaves, dy)


def _grad_inputs(case, dtype, device, scale=1.0, mean=0.0, w_dtype=torch.float32):
    b, s, h, dh, cb = case
    x = (torch.randn(b, s, h, dh) * scale + mean).to(device=device, dtype=dtype)
    w = (torch.rand(dh) + 0.5).to(device=device, dtype=w_dtype)
    return (x, w, *(_angles(cb, s, dh // 2, device) if cb else (None, None)))


def _check_grads(x, w, cos, sin, eps=EPS):
    """x's and weight's gradients (and cos / sin's, when rotating) against the fp64 reference's autograd;
    the baseline is the fp32 reference's autograd at the inputs' dtypes."""
    dy = torch.randn(x.shape).to(x)
    rope = cos is not None
    inputs = (x, w, cos, sin) if rope else (x, w)

    def fused(x, w, c=None, s=None):
        return rms_norm_rope(x, w, c, s, eps)

    def ref(x, w, c=None, s=None):
        return rms_norm_rope_ref(x, w, c, s, eps)

    def ref64(x, w, c=None, s=None):
        return _double(x, w, c, s, eps)

    got = _grads(fused, inputs, dy)
    want = _grads(ref64, [t.double() for t in inputs], dy.double())
    base = _grads(ref, inputs, dy)
    for name, g, wt, b, t in zip(("x", "weight", "cos", "sin"), got, want, base, inputs):
        assert g.dtype == t.dtype and g.shape == t.shape, (name, g.dtype, g.shape)
        assert_close_to_reference(g, wt, b, grad=True, name=f"grad of {name}")


@pytest.mark.parametrize("case", range(len(GRAD_CASES)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward(backend_device, case, dtype):
    backend, device = backend_device
    if backend == "triton":
        skip_interpreted_bf16(device, dtype)
    with use_backend(backend):  # around the backward too: it chooses its backend when it runs
        _check_grads(*_grad_inputs(GRAD_CASES[case], dtype, device))


@pytest.mark.parametrize("scale,mean", [(1e-3, 0.0), (1e3, 0.0), (1.0, 300.0)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_input_scales(dtype, scale, mean):
    _check_grads(*_grad_inputs((1, 6, 2, 64, 1), dtype, "cpu", scale, mean))


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_backward_weight_in_x_dtype(dtype):
    _check_grads(*_grad_inputs((2, 5, 3, 64, 1), dtype, "cpu", w_dtype=dtype))


def test_backward_strided_input_and_eps():
    x = torch.randn(1, 5, 6, 64)[:, :, ::2]
    w = torch.rand(64) + 0.5
    cos, sin = _angles(1, 5, 32, "cpu")
    _check_grads(x, w, cos, sin, eps=0.5)


def test_backward_only_some_inputs():
    """Inputs that need no gradient get None (the model's angles are buffers); the others are unchanged."""
    x, w, cos, sin = _grad_inputs((1, 6, 2, 16, 1), torch.bfloat16, "cpu")
    dy = torch.randn(x.shape).bfloat16()
    full = _grads(lambda *a: rms_norm_rope(*a), (x, w, cos, sin), dy)
    for i in range(4):
        leaves = [t.detach().clone().requires_grad_(j == i) for j, t in enumerate((x, w, cos, sin))]
        rms_norm_rope(*leaves).backward(dy)
        for j, t in enumerate(leaves):
            assert (t.grad is None) == (j != i)
        assert torch.equal(leaves[i].grad, full[i])


def test_backward_reference_backend_matches_cpu():
    from kandinsky_kernels import _ext

    if _ext.cpp_op("rms_norm_rope_backward") is None:
        pytest.skip("compiled backward not available")
    x, w, cos, sin = _grad_inputs((2, 9, 4, 64, 1), torch.bfloat16, "cpu")
    dy = torch.randn(x.shape).bfloat16()
    out = {}
    for name in ("cpu", "reference"):
        with use_backend(name):
            out[name] = _grads(lambda a, b: rms_norm_rope(a, b, cos, sin), (x, w), dy)
    (ax, aw), (bx, bw) = out["cpu"], out["reference"]
    assert ((ax.float() - bx.float()).abs() <= bx.float().abs() * 2**-7 + 1e-6).all()  # one bf16 step
    torch.testing.assert_close(aw, bw, rtol=1e-5, atol=1e-5)


def test_backward_finite_differences():
    """The fused gradients predict the fused forward's change along a random direction (central
    differences in fp32): a wrong backward fails here whatever the reference says."""
    x, w, cos, sin = _grad_inputs((1, 5, 3, 16, 1), torch.float32, "cpu")
    dy = torch.randn(x.shape)
    inputs = (x, w, cos, sin)
    grads = _grads(lambda *a: rms_norm_rope(*a), inputs, dy)
    h = 1e-2
    for i, (t, g) in enumerate(zip(inputs, grads)):
        v = torch.randn_like(t)

        def loss(d, i=i, v=v):
            args = [a + d * v if j == i else a for j, a in enumerate(inputs)]
            with torch.no_grad():
                return (rms_norm_rope(*args) * dy).double().sum().item()

        fd = (loss(h) - loss(-h)) / (2 * h)
        directional = (g.double() * v.double()).sum().item()
        assert abs(directional - fd) <= 2e-2 * max(1.0, abs(fd)), (i, directional, fd)


def test_backward_deterministic_across_threads():
    x, w, cos, sin = _grad_inputs((1, 64, 28, 64, 1), torch.bfloat16, "cpu")
    dy = torch.randn(x.shape).bfloat16()
    assert_same_bits_across_threads(lambda: _grads(lambda a, b: rms_norm_rope(a, b, cos, sin), (x, w), dy))


def test_backward_opcheck():
    x, dy = torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8)
    w = torch.rand(8)
    cos, sin = _angles(1, 5, 4, "cpu")
    op = torch.ops.kandinsky_kernels.rms_norm_rope_backward.default
    for args in ((dy, x, w, cos, sin, EPS), (dy, x, w, None, None, 1e-6),
                 (dy.bfloat16(), x.bfloat16(), w, cos, sin, EPS)):
        torch.library.opcheck(op, args)
    # the forward op with inputs that require grad: opcheck's autograd-registration check
    torch.library.opcheck(torch.ops.kandinsky_kernels.rms_norm_rope.default,
                          (x.clone().requires_grad_(), w.clone().requires_grad_(), cos, sin, EPS))


def test_compile_fullgraph_backward():
    """Forward + backward compile with 0 graph breaks, the backward graph holds the backward custom op,
    and the gradients equal eager's."""
    from torch._dynamo.utils import counters

    backend, graphs = capturing_aot_backend()

    def f(x, w, cos, sin):
        return rms_norm_rope(x, w, cos, sin) * 2 + rms_norm_rope(x, w)

    x, w, cos, sin = _grad_inputs((1, 6, 2, 16, 1), torch.bfloat16, "cpu")
    dy = torch.randn(x.shape).bfloat16()
    want = _grads(lambda a, b: f(a, b, cos, sin), (x, w), dy)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    got = _grads(lambda a, b: compiled(a, b, cos, sin), (x, w), dy)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert len(graphs["fw"]) == 1 and len(graphs["bw"]) == 1
    assert "kandinsky_kernels.rms_norm_rope.default" in graphs["fw"][0]
    assert graphs["bw"][0].count("kandinsky_kernels.rms_norm_rope_backward") == 2
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
