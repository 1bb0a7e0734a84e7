"""The DiT's adaptive-LayerNorm kernels (kandinsky_kernels.ops.adaln): every backend against the fp64
reference under the project's tolerance rule (conftest.py), plain torch at the input dtype (the model's
former fp32-island code) as the baseline; odd D, odd row counts, per-frame modulation, input scales and
rows with large means; the fused backward (every gradient against the fp64 reference's autograd, mixed
modulation dtypes, a finite-difference check, determinism, torch.compile of forward + backward), boundary
validation, the custom ops under opcheck and torch.compile(fullgraph=True).

Triton runs on CUDA when present, else through the interpreter on CPU tensors, there too at every dtype:
the interpreter itself rounds fp32 -> bf16 by truncation (measured: every bf16 store equals the truncated
fp32 value), twice the rounding error the rule allows, and tests/conftest.py replaces that conversion by
round-to-nearest-even, as a GPU does; the ``gpu`` test runs every dtype on CUDA."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import (
    HAS_CUDA, assert_close_to_reference, assert_same_bits_across_threads, backend_and_device, capturing_aot_backend,
    skip_interpreted_bf16,
)
from kandinsky_kernels.backends import use_backend
from kandinsky_kernels.ops.adaln import gated_residual, scale_shift_layer_norm
from kandinsky_kernels.reference.adaln import gated_residual_ref, scale_shift_layer_norm_ref

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CASES = [  # (x shape, modulation shape)
    ((1, 5, 1), (1, 1, 1)),  # D = 1: the normalised value is 0, y = shift
    ((2, 3, 7), (2, 1, 7)),  # odd D and rows, batch 2
    ((1, 13, 96), (1, 1, 96)),
    ((1, 9, 1792), (1, 1, 1792)),  # the model's D
    ((2, 3, 5, 96), (2, 3, 1, 96)),  # per frame: (B, T', R, D) with (B, T', 1, D)
    ((2, 15, 96), (2, 3, 1, 96)),  # per group: (B, S, D) with (B, G, 1, D), the model's packed videos
    ((1, 21, 7), (1, 7, 1, 7)),  # per group, 3 rows a group, odd D
    ((11, 33), (1, 33)),  # no leading dims
    ((12, 33), (4, 1, 33)),  # per group, no leading dims
]
# (scale of x's spread, per-row offset scale): small, unit, large inputs, and rows with large means.
SCALES = [(1e-3, 0.0), (1.0, 0.0), (1e3, 0.0), (1.0, 1e3)]


@pytest.fixture(params=["cpu", "reference", "triton"])
def backend(request):
    return backend_and_device(request, "scale_shift_layer_norm")


def _x(shape, spread, offset, dtype, device):
    x = torch.randn(shape) * spread
    if offset:
        x = x + torch.randn(*shape[:-1], 1) * offset  # a different large mean per row
    return x.to(device=device, dtype=dtype)


def _mods(shape, device, dtype=torch.float32):
    return torch.randn(shape).to(device=device, dtype=dtype), (torch.randn(shape) * 0.5).to(device=device, dtype=dtype)


def _check_ln(x, shift, scale):
    out = scale_shift_layer_norm(x, shift, scale)
    assert out.dtype == x.dtype and out.shape == x.shape and out.is_contiguous()
    ref = scale_shift_layer_norm_ref(x.double(), shift, scale)
    assert_close_to_reference(out, ref, scale_shift_layer_norm_ref(x, shift, scale), name="scale_shift_layer_norm")


def _check_gate(x, o, gate):
    out = gated_residual(x, o, gate)
    assert out.dtype == x.dtype and out.shape == x.shape and out.is_contiguous()
    ref = gated_residual_ref(x.double(), o.double(), gate)
    assert_close_to_reference(out, ref, gated_residual_ref(x, o, gate), name="gated_residual")


@pytest.mark.parametrize("scales", SCALES, ids=["1e-3", "1", "1e3", "mean1e3"])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_shift_layer_norm(backend, dtype, case, scales):
    name, device = backend
    if name == "triton":
        skip_interpreted_bf16(device, dtype)
    xs, ms = CASES[case]
    x = _x(xs, *scales, dtype, device)
    shift, scale = _mods(ms, device)
    with use_backend(name), torch.no_grad():
        _check_ln(x, shift, scale)


@pytest.mark.parametrize("scales", SCALES, ids=["1e-3", "1", "1e3", "mean1e3"])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_residual(backend, dtype, case, scales):
    name, device = backend
    if name == "triton":
        skip_interpreted_bf16(device, dtype)
    xs, ms = CASES[case]
    x, o = _x(xs, *scales, dtype, device), _x(xs, *scales, dtype, device)
    gate, _ = _mods(ms, device)
    with use_backend(name), torch.no_grad():
        _check_gate(x, o, gate)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_modulation_in_x_dtype(backend, dtype):
    """shift / scale / gate may come in x's dtype (``1 + scale`` then rounds in that dtype, as the reference)."""
    name, device = backend
    if name == "triton":
        skip_interpreted_bf16(device, dtype)
    x, o = _x((2, 3, 5, 96), 1.0, 0.0, dtype, device), _x((2, 3, 5, 96), 1.0, 0.0, dtype, device)
    shift, scale = _mods((2, 3, 1, 96), device, dtype)
    with use_backend(name), torch.no_grad():
        _check_ln(x, shift, scale)
        _check_gate(x, o, scale)


def test_non_contiguous_x(backend):
    name, device = backend
    x = torch.randn(3, 40, 2).to(device).transpose(1, 2)  # (3, 2, 40), strided
    o = torch.randn(3, 2, 40).to(device)
    shift, scale = _mods((3, 1, 40), device)
    with use_backend(name), torch.no_grad():
        _check_ln(x, shift, scale)
        _check_gate(x, o, shift)
        _check_gate(o, x, shift)


def test_empty_rows(backend):
    name, device = backend
    x = torch.randn(2, 0, 8).to(device)
    shift, scale = _mods((2, 1, 8), device)
    with use_backend(name), torch.no_grad():
        assert scale_shift_layer_norm(x, shift, scale).shape == (2, 0, 8)
        assert gated_residual(x, x, shift).shape == (2, 0, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_triton_gpu(case, dtype):
    xs, ms = CASES[case]
    for scales in SCALES:
        x, o = _x(xs, *scales, dtype, "cuda"), _x(xs, *scales, dtype, "cuda")
        shift, scale = _mods(ms, "cuda")
        with use_backend("triton"), torch.no_grad():
            _check_ln(x, shift, scale)
            _check_gate(x, o, shift)


def test_model_numerics_are_the_reference():
    """The references are the model's former fp32 islands, op for op (bit-identical)."""
    x = torch.randn(2, 3, 5, 96).bfloat16()
    o = torch.randn(2, 3, 5, 96).bfloat16()
    shift, scale = _mods((2, 3, 1, 96), "cpu")
    former_ln = torch.addcmul(shift, F.layer_norm(x.float(), (96,), eps=1e-5), 1.0 + scale).to(x.dtype)
    former_gate = torch.addcmul(x.float(), shift, o.float()).to(x.dtype)
    assert torch.equal(scale_shift_layer_norm_ref(x, shift, scale), former_ln)
    assert torch.equal(gated_residual_ref(x, o, shift), former_gate)


def test_autograd_matches_the_formula():
    """With inputs that require grad the public functions return a graph (the fused backward) whose
    gradients equal the plain-torch formula's."""
    x = torch.randn(2, 7, 24, requires_grad=True)
    o = torch.randn(2, 7, 24, requires_grad=True)
    shift = torch.randn(2, 1, 24, requires_grad=True)
    scale = torch.randn(2, 1, 24, requires_grad=True)
    gate = torch.randn(2, 1, 24, requires_grad=True)
    w = torch.randn(2, 7, 24)
    (gated_residual(x, o, gate) * w + scale_shift_layer_norm(x, shift, scale) * w.flip(1)).sum().backward()
    leaves = (x, o, shift, scale, gate)
    got = [t.grad for t in leaves]
    for t in leaves:
        t.grad = None
    formula = (x + gate * o) * w + (F.layer_norm(x, (24,), eps=1e-5) * (1 + scale) + shift) * w.flip(1)
    formula.sum().backward()
    for name, g, t in zip(("x", "out", "shift", "scale", "gate"), got, leaves):
        assert g is not None, name
        torch.testing.assert_close(g, t.grad, msg=lambda m: f"grad of {name}: {m}")


def test_no_grad_calls_run_the_kernel():
    """Under no_grad (or with inputs that need no grad) the result is not part of a graph."""
    x = torch.randn(2, 7, 24, requires_grad=True)
    shift, scale = _mods((2, 1, 24), "cpu")
    with torch.no_grad():
        assert scale_shift_layer_norm(x, shift, scale).grad_fn is None
    assert scale_shift_layer_norm(x.detach(), shift, scale).grad_fn is None
    assert scale_shift_layer_norm(x, shift, scale).grad_fn is not None


_X = torch.randn(2, 5, 8)
_M = torch.randn(2, 1, 8)


@pytest.mark.parametrize("kw, match", [
    (dict(x=torch.randn(8)), r"x must have at least 2 dims, got shape \(8,\)"),
    (dict(x=_X.double()), "x must have dtype in .*got float64"),
    (dict(x=_X.int()), "x must have dtype"),
    (dict(shift=torch.randn(2, 5, 8)), r"shift must have shape \(2, 1, 8\).*got \(2, 5, 8\)"),
    (dict(scale=torch.randn(1, 1, 8)), r"scale must have shape \(2, 1, 8\).*got \(1, 1, 8\)"),
    (dict(scale=torch.randn(2, 1, 7)), r"scale must have shape \(2, 1, 8\).*got \(2, 1, 7\)"),
    (dict(shift=torch.randn(2, 1, 1, 8)), r"shift and scale must have one shape"),  # G = 1 vs (2, 1, 8)
    (dict(shift=torch.randn(2, 2, 1, 8), scale=torch.randn(2, 2, 1, 8)),
     r"shift \(\.\.\., G, 1, D\) of shape \(2, 2, 1, 8\): G must divide x's R = 5"),
    (dict(shift=torch.randn(2, 5, 1, 8), scale=torch.randn(2, 1, 1, 8)),
     r"shift and scale must have one shape, got \(2, 5, 1, 8\) and \(2, 1, 1, 8\)"),
    (dict(shift=torch.randn(2, 5, 2, 8), scale=torch.randn(2, 5, 2, 8)), r"shift must have shape \(2, 5, 1, 8\)"),
    (dict(shift=torch.randn(1, 5, 1, 8), scale=torch.randn(1, 5, 1, 8)), r"shift must have shape \(2, 5, 1, 8\)"),
    (dict(shift=_M.double()), "shift must have dtype in .*got float64"),
    (dict(x=_X.half(), scale=_M.bfloat16()), "scale must have dtype in .*got bfloat16"),
    (dict(shift=_M.to("meta")), "one device"),
    (dict(eps=0.0), "eps must be a finite positive number, got 0.0"),
    (dict(eps=float("nan")), "eps must be"),
    (dict(shift=[0.0] * 8), "shift must be a torch.Tensor"),
])
def test_scale_shift_layer_norm_bad_arguments(kw, match):
    args = dict(x=_X, shift=_M, scale=_M, eps=1e-5)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        scale_shift_layer_norm(**args)


@pytest.mark.parametrize("kw, match", [
    (dict(x=torch.randn(8), out=torch.randn(8)), "x must have at least 2 dims"),
    (dict(out=torch.randn(2, 5, 9)), r"out must match x's shape \(2, 5, 8\).*got \(2, 5, 9\)"),
    (dict(out=_X.bfloat16()), "out must match x's .*dtype torch.float32.*bfloat16"),
    (dict(gate=torch.randn(2, 5, 8)), r"gate must have shape \(2, 1, 8\)"),
    (dict(gate=torch.randn(2, 3, 1, 8)), r"gate \(\.\.\., G, 1, D\) of shape \(2, 3, 1, 8\): G must divide"),
    (dict(gate=torch.randn(2, 0, 1, 8)), r"G must divide x's R = 5 .*got G = 0"),
    (dict(gate=_M.half()), "gate must have dtype in .*got float16"),
    (dict(out=_X.to("meta")), "one device"),
])
def test_gated_residual_bad_arguments(kw, match):
    args = dict(x=_X, out=_X, gate=_M)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        gated_residual(**args)


def test_custom_ops_opcheck():
    x, o = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5, 16)
    m = torch.randn(2, 3, 1, 16)
    torch.library.opcheck(torch.ops.kandinsky_kernels.scale_shift_layer_norm.default, (x, m, m, 1e-5))
    torch.library.opcheck(torch.ops.kandinsky_kernels.gated_residual.default, (x, o, m))
    torch.library.opcheck(torch.ops.kandinsky_kernels.gated_residual.default, (x.bfloat16(), o.bfloat16(), m))
    xg, og = x.reshape(2, 15, 16), o.reshape(2, 15, 16)  # per group: (B, S, D) with (B, G, 1, D)
    torch.library.opcheck(torch.ops.kandinsky_kernels.scale_shift_layer_norm.default, (xg, m, m, 1e-5))
    torch.library.opcheck(torch.ops.kandinsky_kernels.gated_residual.default, (xg, og, m))


def test_compile_fullgraph_no_graph_breaks():
    """A function calling both ops compiles into one graph holding both custom ops, with 0 graph breaks,
    and matches eager."""
    from torch._dynamo.utils import counters

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    def block(x, h, shift, scale, gate):
        y = scale_shift_layer_norm(x, shift, scale)
        return gated_residual(x, y * h, gate)

    x, h = torch.randn(2, 9, 32).bfloat16(), torch.randn(2, 9, 32).bfloat16()
    shift, scale = _mods((2, 1, 32), "cpu")
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        want = block(x, h, shift, scale, shift)
        got = torch.compile(block, backend=backend, fullgraph=True)(x, h, shift, scale, shift)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert len(graphs) == 1
    assert "kandinsky_kernels.scale_shift_layer_norm" in graphs[0] and "kandinsky_kernels.gated_residual" in graphs[0]
    assert torch.equal(got, want)


# ---- backward ---------------------------------------------------------------------------------------
GRAD_CASES = [  # (x shape, modulation shape)
    ((1, 1, 40), (1, 1, 40)),  # R = 1
    ((2, 7, 37), (2, 1, 37)),  # odd D and rows, batch 2
    ((1, 64, 1792), (1, 1, 1792)),  # the model's D; the cpu backward sums these rows in two blocks
    ((1, 2100, 40), (1, 1, 40)),  # two row blocks of a narrow row
    ((2, 3, 5, 96), (2, 3, 1, 96)),  # per frame: (B, T', S / T', D) with (B, T', 1, D)
    ((2, 15, 96), (2, 3, 1, 96)),  # per group: (B, S, D) with (B, G, 1, D), the model's packed videos
    ((1, 2100, 40), (1, 3, 1, 40)),  # per group of 700 rows: the cpu backward's row blocks inside groups
    ((2, 2, 3, 4, 24), (2, 2, 3, 1, 24)),  # several leading dims
    ((2, 2, 12, 24), (2, 2, 3, 1, 24)),  # several leading dims, per group
    ((11, 33), (1, 33)),  # no leading dims
]


def _grads(fn, inputs, dy):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    return torch.autograd.grad(fn(*leaves), leaves, dy)


def _check_grads(fn, ref, inputs, dy, names):
    """Every input's gradient through ``fn`` against the fp64 reference's autograd (the baseline: the fp32
    reference's autograd at the inputs' dtypes)."""
    got = _grads(fn, inputs, dy)
    want = _grads(ref, [t.double() for t in inputs], dy.double())
    base = _grads(ref, inputs, dy)
    for name, g, w, b, t in zip(names, got, want, base, inputs):
        assert g.dtype == t.dtype and g.shape == t.shape, (name, g.dtype, g.shape)
        assert_close_to_reference(g, w, b, grad=True, name=f"grad of {name}")


def _ln_ref(x, shift, scale):
    return scale_shift_layer_norm_ref(x, shift, scale, 1e-5)


def _check_ln_grads(x, shift, scale):
    dy = torch.randn(x.shape).to(x)
    _check_grads(scale_shift_layer_norm, _ln_ref, (x, shift, scale), dy, ("x", "shift", "scale"))


def _check_gate_grads(x, o, gate):
    dy = torch.randn(x.shape).to(x)
    _check_grads(gated_residual, gated_residual_ref, (x, o, gate), dy, ("x", "out", "gate"))


@pytest.mark.parametrize("case", range(len(GRAD_CASES)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward(backend, dtype, case):
    """bf16 / fp16 x here come with fp32 modulations (the model's mixed case)."""
    name, device = backend
    if name == "triton":
        skip_interpreted_bf16(device, dtype)
    xs, ms = GRAD_CASES[case]
    x, o = _x(xs, 1.0, 0.0, dtype, device), _x(xs, 1.0, 0.0, dtype, device)
    shift, scale = _mods(ms, device)
    with use_backend(name):  # around the backward too: it chooses its backend when it runs
        _check_ln_grads(x, shift, scale)
        _check_gate_grads(x, o, shift)


@pytest.mark.parametrize("scales", SCALES, ids=["1e-3", "1", "1e3", "mean1e3"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_input_scales(dtype, scales):
    x, o = _x((2, 9, 96), *scales, dtype, "cpu"), _x((2, 9, 96), *scales, dtype, "cpu")
    shift, scale = _mods((2, 1, 96), "cpu")
    _check_ln_grads(x, shift, scale)
    _check_gate_grads(x, o, scale)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_backward_modulation_in_x_dtype(backend, dtype):
    name, device = backend
    if name == "triton":
        skip_interpreted_bf16(device, dtype)
    x, o = _x((2, 3, 5, 96), 1.0, 0.0, dtype, device), _x((2, 3, 5, 96), 1.0, 0.0, dtype, device)
    shift, scale = _mods((2, 3, 1, 96), device, dtype)
    with use_backend(name):
        _check_ln_grads(x, shift, scale)
        _check_gate_grads(x, o, scale)


def test_backward_partial_requires_grad(backend):
    """Inputs that need no gradient get None; the others are unchanged by which ones are asked for."""
    name, device = backend
    x, o = _x((2, 5, 24), 1.0, 0.0, torch.float32, device), _x((2, 5, 24), 1.0, 0.0, torch.float32, device)
    shift, scale = _mods((2, 1, 24), device)
    dy = torch.randn(2, 5, 24).to(device)
    with use_backend(name):
        full = _grads(scale_shift_layer_norm, (x, shift, scale), dy)
        for i in range(3):
            leaves = [t.detach().clone().requires_grad_(j == i) for j, t in enumerate((x, shift, scale))]
            y = scale_shift_layer_norm(*leaves)
            y.backward(dy)
            for j, t in enumerate(leaves):
                assert (t.grad is None) == (j != i)
            torch.testing.assert_close(leaves[i].grad, full[i], rtol=0, atol=0)
        full = _grads(gated_residual, (x, o, shift), dy)
        for i in range(3):
            leaves = [t.detach().clone().requires_grad_(j == i) for j, t in enumerate((x, o, shift))]
            gated_residual(*leaves).backward(dy)
            for j, t in enumerate(leaves):
                assert (t.grad is None) == (j != i)
            torch.testing.assert_close(leaves[i].grad, full[i], rtol=0, atol=0)


def test_backward_reference_backend_matches_cpu():
    """The reference backend's backward (the torch formula) and the cpu kernel give the same gradients to
    fp32 rounding, bf16 x with fp32 modulations."""
    if _ext_op("scale_shift_layer_norm_backward") is None:
        pytest.skip("compiled backward not available")
    x, o = _x((2, 3, 5, 96), 1.0, 2.0, torch.bfloat16, "cpu"), _x((2, 3, 5, 96), 1.0, 0.0, torch.bfloat16, "cpu")
    shift, scale = _mods((2, 3, 1, 96), "cpu")
    dy = torch.randn(x.shape).bfloat16()
    out = {}
    for name in ("cpu", "reference"):
        with use_backend(name):
            out[name] = (_grads(scale_shift_layer_norm, (x, shift, scale), dy)
                         + _grads(gated_residual, (x, o, shift), dy))
    for a, b in zip(out["cpu"], out["reference"]):
        assert a.dtype == b.dtype
        if a.dtype == torch.bfloat16:  # at most one bf16 rounding step apart
            assert ((a.float() - b.float()).abs() <= b.float().abs() * 2**-7 + 1e-6).all()
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _ext_op(name):
    from kandinsky_kernels import _ext

    return _ext.cpp_op(name)


def test_backward_finite_differences():
    """The fused gradients predict the fused forward's change along a random direction (fp32, central
    differences): a wrong backward fails here whatever the reference says."""
    x, o = torch.randn(2, 6, 40), torch.randn(2, 6, 40)
    shift, scale = _mods((2, 1, 40), "cpu")
    w = torch.randn(2, 6, 40)
    for fn, inputs in ((scale_shift_layer_norm, (x, shift, scale)), (gated_residual, (x, o, shift))):
        grads = _grads(fn, inputs, w)
        for i, (t, g) in enumerate(zip(inputs, grads)):
            v = torch.randn_like(t)
            h = 1e-2

            def loss(d, i=i, inputs=inputs, v=v):
                args = [a.double() for a in inputs]
                args[i] = args[i] + d * v.double()
                ref = _ln_ref if fn is scale_shift_layer_norm else gated_residual_ref
                return (ref(*args) * w.double()).sum().item()

            fd = (loss(h) - loss(-h)) / (2 * h)
            with torch.no_grad():
                fd32 = ((fn(*[a + h * v if j == i else a for j, a in enumerate(inputs)]) * w).double().sum()
                        - (fn(*[a - h * v if j == i else a for j, a in enumerate(inputs)]) * w).double().sum()
                        ).item() / (2 * h)
            directional = (g.double() * v.double()).sum().item()
            assert abs(directional - fd) <= 1e-3 * max(1.0, abs(fd)), (fn.__name__, i, directional, fd)
            assert abs(directional - fd32) <= 2e-2 * max(1.0, abs(fd)), (fn.__name__, i, directional, fd32)


def test_backward_deterministic_across_threads():
    """The modulation gradients are reduced in a fixed order: the same bits with 1 and 2 threads."""
    x = _x((1, 300, 1792), 1.0, 0.0, torch.bfloat16, "cpu")
    shift, scale = _mods((1, 1, 1792), "cpu")
    dy = torch.randn(x.shape).bfloat16()
    assert_same_bits_across_threads(lambda: _grads(scale_shift_layer_norm, (x, shift, scale), dy)
                                    + _grads(gated_residual, (x, x, shift), dy))


def test_backward_ops_opcheck():
    x, dy = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5, 16)
    m = torch.randn(2, 3, 1, 16)
    torch.library.opcheck(torch.ops.kandinsky_kernels.scale_shift_layer_norm_backward.default, (dy, x, m, 1e-5))
    torch.library.opcheck(torch.ops.kandinsky_kernels.gated_residual_backward.default, (dy, x, m))
    xb, dyb = x.bfloat16(), dy.bfloat16()
    torch.library.opcheck(torch.ops.kandinsky_kernels.scale_shift_layer_norm_backward.default, (dyb, xb, m, 1e-5))
    torch.library.opcheck(torch.ops.kandinsky_kernels.gated_residual_backward.default, (dyb, xb, m))
    # the forward ops with inputs that require grad: opcheck's autograd-registration check
    xr, mr = x.clone().requires_grad_(), m.clone().requires_grad_()
    torch.library.opcheck(torch.ops.kandinsky_kernels.scale_shift_layer_norm.default, (xr, mr, mr, 1e-5))
    xr2 = x.clone().requires_grad_()
    torch.library.opcheck(torch.ops.kandinsky_kernels.gated_residual.default, (xr, xr2, mr))


def test_compile_fullgraph_backward():
    """Forward + backward of a block using both ops compile with 0 graph breaks; the forward graph holds
    the forward custom ops, the backward graph the backward custom ops, and the gradients equal eager's."""
    from torch._dynamo.utils import counters

    backend, graphs = capturing_aot_backend()

    def block(x, h, shift, scale, gate):
        y = scale_shift_layer_norm(x, shift, scale)
        return gated_residual(x, y * h, gate)

    x, h = torch.randn(2, 9, 32).bfloat16(), torch.randn(2, 9, 32).bfloat16()
    shift, scale = _mods((2, 1, 32), "cpu")
    gate = torch.randn(2, 1, 32)
    dy = torch.randn(2, 9, 32).bfloat16()
    inputs = (x, h, shift, scale, gate)
    want = _grads(block, inputs, dy)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(block, backend=backend, fullgraph=True)
    got = _grads(compiled, inputs, dy)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert len(graphs["fw"]) == 1 and len(graphs["bw"]) == 1
    assert "kandinsky_kernels.scale_shift_layer_norm.default" in graphs["fw"][0]
    assert "kandinsky_kernels.gated_residual.default" in graphs["fw"][0]
    assert "kandinsky_kernels.scale_shift_layer_norm_backward" in graphs["bw"][0]
    assert "kandinsky_kernels.gated_residual_backward" in graphs["bw"][0]
    for a, b in zip(got, want):
        assert torch.equal(a, b)
