"""kandinsky_model.linear: the model's Linear layers, fp32 CPU products through oneDNN off Intel CPUs.

The oneDNN path is forced (``KANDINSKY_CPU_LINEAR=onednn``) so it runs on every CPU; values and
gradients are held to the project tolerance policy against fp64, with plain torch's fp32 error as the
yardstick; the path choice itself is checked with the CPU vendor faked.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kandinsky_model
from kandinsky_model import linear as lin
from tests.conftest import assert_close_to_reference

pytestmark = pytest.mark.skipif(lin._onednn_op()[0] is None, reason=str(lin._onednn_op()[1]))


@pytest.fixture
def onednn(monkeypatch):
    monkeypatch.setenv(lin.ENV_VAR, "onednn")


def _spy(monkeypatch):
    calls = []
    real = lin._product

    def spy(*args, **kwargs):
        calls.append((tuple(a.shape for a in args if a is not None), kwargs.get("gelu", False)))
        return real(*args, **kwargs)

    monkeypatch.setattr(lin, "_product", spy)
    return calls


# (leading dims of x, K, N): odd sizes, all above MIN_MACS
SHAPES = [((300,), 131, 257), ((2, 97), 256, 193), ((1, 4, 75), 640, 129), ((4097,), 33, 65)]


@pytest.mark.parametrize("lead,k,n", SHAPES)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_fp64(onednn, monkeypatch, lead, k, n, scale, bias):
    g = torch.Generator().manual_seed(n * k)
    x = torch.randn(*lead, k, generator=g) * scale
    w = torch.randn(n, k, generator=g) / k ** 0.5
    b = torch.randn(n, generator=g) if bias else None
    calls = _spy(monkeypatch)
    assert lin.linear_path(x, w, b) == "onednn"
    out = lin.linear(x, w, b)
    assert calls, "the oneDNN product did not run"
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert out.dtype == torch.float32 and out.shape == (*lead, n)
    assert_close_to_reference(out, ref, F.linear(x, w, b))


def test_strided_input(onednn):
    x = torch.randn(257, 300)[:, 7:263]  # rows of 256 at a stride of 300
    xt = torch.randn(256, 300).t()  # a transposed view
    w = torch.randn(200, 256) / 16
    for inp in (x, xt):
        assert not inp.is_contiguous()
        assert_close_to_reference(lin.linear(inp, w), F.linear(inp.double(), w.double()), F.linear(inp, w))


@pytest.mark.parametrize("needs", ["all", "input", "weight", "bias"])
def test_gradients_match_fp64(onednn, monkeypatch, needs):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, 111, 160, generator=g)
    w0 = torch.randn(250, 160, generator=g) / 13
    b0 = torch.randn(250, generator=g)
    go = torch.randn(3, 111, 250, generator=g)

    def grads(dtype, fn):
        x, w, b = (t.detach().to(dtype, copy=True).requires_grad_(needs in ("all", name))
                   for t, name in ((x0, "input"), (w0, "weight"), (b0, "bias")))
        fn(x, w, b).backward(go.to(dtype))
        return x.grad, w.grad, b.grad

    calls = _spy(monkeypatch)
    ours = grads(torch.float32, lin.linear)
    assert len(calls) == 1 + (needs in ("all", "input")) + (needs in ("all", "weight"))
    ref = grads(torch.float64, F.linear)
    plain = grads(torch.float32, F.linear)
    for name, o, r, p in zip(("x", "weight", "bias"), ours, ref, plain):
        if r is None:
            assert o is None, f"{name} got a gradient it does not need"
        else:
            assert_close_to_reference(o, r, p, grad=True, name=f"grad {name}")


def test_no_grad_and_inference_mode(onednn):
    layer = lin.Linear(300, 200)
    x = torch.randn(100, 300)
    ref = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    with torch.no_grad():
        assert_close_to_reference(layer(x), ref, F.linear(x, layer.weight, layer.bias))
    with torch.inference_mode():
        y = layer(x)
    assert_close_to_reference(y, ref, F.linear(x, layer.weight, layer.bias))


def test_double_backward_raises(onednn):
    x = torch.randn(100, 300, requires_grad=True)
    w = torch.randn(200, 300, requires_grad=True)
    (gx,) = torch.autograd.grad(lin.linear(x, w).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()


@pytest.mark.parametrize("vendor,expected", [("AuthenticAMD", "onednn"), ("HygonGenuine", "onednn"),
                                             ("GenuineIntel", "torch"), ("", "torch")])
def test_auto_chooses_by_vendor(monkeypatch, vendor, expected):
    monkeypatch.delenv(lin.ENV_VAR, raising=False)
    monkeypatch.setattr(lin, "_cpu_vendor", lambda: vendor)
    monkeypatch.setattr(lin, "_machine", lambda: "x86_64")
    x, w = torch.randn(512, 256), torch.randn(256, 256)
    assert lin.linear_path(x, w) == expected
    assert lin.linear_path(torch.randn(8, 64), torch.randn(64, 64)) == "torch"  # below MIN_MACS
    monkeypatch.setattr(lin, "_machine", lambda: "aarch64")
    assert lin.linear_path(x, w) == "torch"


def test_path_rules(onednn, monkeypatch):
    big = torch.randn(512, 256), torch.randn(256, 256)
    assert lin.linear_path(*big) == "onednn"
    small = torch.randn(8, 64), torch.randn(64, 64)
    assert lin.linear_path(*small) == "onednn"  # forced: every size
    assert_close_to_reference(lin.linear(*small), F.linear(small[0].double(), small[1].double()), F.linear(*small))
    for empty in ((torch.randn(0, 64), small[1]), (torch.randn(8, 0), torch.randn(64, 0)),
                  (small[0], torch.randn(0, 64))):
        assert lin.linear_path(*empty) == "torch"
        assert lin.linear(*empty).shape == F.linear(*empty).shape
    assert lin.linear_path(big[0].bfloat16(), big[1].bfloat16()) == "torch"
    assert lin.linear_path(big[0], big[1], torch.randn(256, dtype=torch.float64)) == "torch"
    assert lin.linear_path(big[0].double(), big[1].double()) == "torch"
    assert lin.linear_path(torch.randn(512, 255), big[1]) == "torch"  # F.linear reports the mismatch
    with pytest.raises(RuntimeError):
        lin.linear(torch.randn(512, 255), big[1])
    monkeypatch.setenv(lin.ENV_VAR, "torch")
    assert lin.linear_path(*big) == "torch"
    monkeypatch.setenv(lin.ENV_VAR, "mkl")
    with pytest.raises(ValueError, match="KANDINSKY_CPU_LINEAR='mkl'.*auto, onednn, torch"):
        lin.linear(*big)


def test_forced_onednn_without_the_op_raises(onednn, monkeypatch):
    monkeypatch.setattr(lin, "_onednn_op", lambda: (None, "no oneDNN here"))
    with pytest.raises(RuntimeError, match="KANDINSKY_CPU_LINEAR=onednn, but no oneDNN here"):
        lin.linear(torch.randn(512, 256), torch.randn(256, 256))


def test_compile_has_no_graph_break(onednn):
    """Compiled, the product is the custom op (one graph, no break) and gives eager's bits."""
    from torch._dynamo.utils import counters

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    layer = lin.Linear(256, 256)
    x = torch.randn(2, 256, 256)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        got = torch.compile(layer, fullgraph=True, backend=backend)(x)
    assert sum(counters["graph_break"].values()) == 0 and len(graphs) == 1
    assert "kandinsky_model.onednn_linear" in graphs[0], graphs[0]
    with torch.no_grad():
        assert torch.equal(got, layer(x))
    assert_close_to_reference(got, F.linear(x.double(), layer.weight.double(), layer.bias.double()),
                              F.linear(x, layer.weight, layer.bias))


def test_inductor_forward_and_backward_match_eager(onednn):
    """Under inductor (which cannot lower the oneDNN op itself with plain weights) the custom op runs:
    values and the input / weight gradients are eager's bits, the bias gradient inductor's own sum."""
    layer = lin.Linear(160, 192)
    x = torch.randn(3, 70, 160)
    torch._dynamo.reset()
    g = torch.randn(3, 70, 192)

    def loss(t):
        return (layer(t) * g).sum()  # d loss / d output = g: no other op's numerics in the gradients

    def run(f):
        layer.zero_grad()
        xg = x.clone().requires_grad_(True)
        f(xg).backward()
        return xg.grad, layer.weight.grad.clone(), layer.bias.grad.clone()

    eager = run(loss)
    compiled = run(torch.compile(loss, fullgraph=True))
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])
    torch.testing.assert_close(compiled[2], eager[2])
    with torch.no_grad():
        y = torch.compile(lambda t: lin.linear_gelu(t, layer.weight, layer.bias), fullgraph=True)(x)
        assert torch.equal(y, lin.linear_gelu(x, layer.weight, layer.bias))


def test_custom_ops_opcheck():
    x, w, b = torch.randn(3, 5, 16), torch.randn(24, 16), torch.randn(24)
    torch.library.opcheck(torch.ops.kandinsky_model.onednn_linear.default, (x, w, b, False))
    torch.library.opcheck(torch.ops.kandinsky_model.onednn_linear.default, (x, w, None, True),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    g = torch.randn(3, 5, 24)
    torch.library.opcheck(torch.ops.kandinsky_model.onednn_linear_backward.default, (g, x, w, True, True))
    torch.library.opcheck(torch.ops.kandinsky_model.onednn_linear_backward.default, (g, x, w, False, True))


def test_linear_is_an_nn_linear():
    layer = lin.Linear(16, 8)
    plain = nn.Linear(16, 8)
    assert isinstance(layer, nn.Linear)
    assert layer.state_dict().keys() == plain.state_dict().keys()
    layer.load_state_dict(plain.state_dict())
    x = torch.randn(4, 16)
    torch.testing.assert_close(layer(x), plain(x), rtol=0, atol=0)


def test_model_uses_it():
    """Every Linear of the CrossDiT and the VAE is ours: a plain ``nn.Linear`` added later would take
    MKL's slow path on AMD without anyone noticing."""
    from kandinsky_model.vae import CausalVAEConfig, CausalVideoVAE

    dit = kandinsky_model.CrossDiT(kandinsky_model.tiny())
    vae = CausalVideoVAE(CausalVAEConfig(block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                                         norm_num_groups=4))
    for model in (dit, vae):
        layers = [(n, type(m)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        assert layers, "no Linear found"
        assert all(t is lin.Linear for _, t in layers), [n for n, t in layers if t is not lin.Linear]


@pytest.mark.parametrize("bias", [True, False])
def test_linear_gelu_fused(onednn, monkeypatch, bias):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 150, 192, generator=g) * 2
    w = torch.randn(320, 192, generator=g) / 14
    b = torch.randn(320, generator=g) if bias else None
    calls = _spy(monkeypatch)
    with torch.no_grad():
        out = lin.linear_gelu(x, w, b)
    assert [c[1] for c in calls] == [True], "the GELU was not fused into the oneDNN product"
    ref = F.gelu(F.linear(x.double(), w.double(), None if b is None else b.double()))
    assert_close_to_reference(out, ref, F.gelu(F.linear(x, w, b)))
    # recording autograd: the unfused path, gradients as F.linear's
    xg = x.clone().requires_grad_(True)
    calls.clear()
    lin.linear_gelu(xg, w, b).sum().backward()
    assert [c[1] for c in calls] == [False, False]
    xr = x.double().requires_grad_(True)
    F.gelu(F.linear(xr, w.double(), None if b is None else b.double())).sum().backward()
    xp = x.clone().requires_grad_(True)
    F.gelu(F.linear(xp, w, b)).sum().backward()
    assert_close_to_reference(xg.grad, xr.grad, xp.grad, grad=True)


def test_feed_forward_fuses_only_a_plain_linear(onednn, monkeypatch):
    from kandinsky_model.nn import FeedForward

    ff = FeedForward(128, 512)
    x = torch.randn(1, 100, 128)
    with torch.no_grad():
        expected = ff.out_layer(F.gelu(F.linear(x, ff.in_layer.weight)))
        calls = _spy(monkeypatch)
        torch.testing.assert_close(ff(x), expected, rtol=1e-5, atol=1e-5)
        assert [c[1] for c in calls] == [True, False]

        seen = []
        handle = ff.in_layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        calls.clear()
        ff(x)
        handle.remove()
        assert seen == [(1, 100, 512)] and [c[1] for c in calls] == [False, False]

        class Scaled(lin.Linear):  # stands for an adapter (LoRA) that replaces the layer
            def forward(self, x):
                return 2 * super().forward(x)

        sub = Scaled(128, 512, bias=False)
        sub.load_state_dict(ff.in_layer.state_dict())
        ff.in_layer = sub
        expected = ff.out_layer(F.gelu(2 * F.linear(x, sub.weight)))
        torch.testing.assert_close(ff(x), expected, rtol=1e-5, atol=1e-5)


def test_ab_script_runs(tmp_path):
    """scripts/cpu_linear_ab.py (the RESULTS.md figures) at toy sizes, so it does not rot."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "KANDINSKY_BENCH_PROFILE": "smoke"}
    proc = subprocess.run([sys.executable, "scripts/cpu_linear_ab.py", "--rounds", "1", "--tokens", "64",
                           "--no-compile", "--json", str(tmp_path / "ab.json")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "ab.json").read_text())
    assert [r["case"].split(" ")[0] for r in rows] == ["forward", "forward+backward", "CrossDiT", "CrossDiT"]
    assert all(r["ms"]["torch"] > 0 and r["ms"]["onednn"] > 0 for r in rows)


def test_fp32_library_for_the_bench_metadata(monkeypatch):
    monkeypatch.setenv(lin.ENV_VAR, "torch")
    assert lin.fp32_library() == "torch"
    monkeypatch.setenv(lin.ENV_VAR, "onednn")
    assert lin.fp32_library() == "onednn"
    monkeypatch.setenv(lin.ENV_VAR, "auto")
    monkeypatch.setattr(lin, "_cpu_vendor", lambda: "GenuineIntel")
    assert lin.fp32_library() == "torch"
    monkeypatch.setenv(lin.ENV_VAR, "fast")
    assert lin.fp32_library().startswith("error: KANDINSKY_CPU_LINEAR='fast'")
