"""Block-sparse attention on the GPU, as a pytest-benchmark suite (``make bench`` on a CUDA machine):
ours[triton] against dense SDPA on the flash backend (baseline), dense flash-attn where installed, and
``torch.compile(flex_attention)`` given the identical mask, in bf16 at Kandinsky shapes:
Lite 10 s 512x768 (S = 93,696, H = 28, D = 64) and Pro (S = 93,696, H = 32, D = 128), B = 1, block
densities 5 / 10 / 25 / 50 % (random per head, plus the diagonal block, as in the CPU suite).

Goals at 10 % density (H200, bf16):
  * forward >= 1.3x faster than compiled Flex, and >= 75 % of the ideal speedup over SDPA: a
    speedup >= 0.75 / density (density as measured on the mask), both on the ``bsa forward (GPU)`` rows;
  * backward <= 3x the forward: the ``bsa backward vs forward (GPU)`` suite times our backward alone
    against our forward (forward / backward >= 1/3), with both Triton backward schemes (the default
    two-pass one and ``KANDINSKY_BSA_TRITON_BWD=atomic``).
The report prints the fraction of ideal (speedup x density) on every ours row.

Timing: each call ends with ``torch.cuda.synchronize()``; the warm-up round absorbs compilation and
autotuning. ``scripts/gpu_check.sh`` runs this file in smoke mode (toy shapes) to check that it runs,
and times the full shapes under a time budget with ``benchmarks/gpu_timing.py``.

Without CUDA the suite is skipped, except in smoke mode (``make test``): there it runs at a toy shape
on the CPU (Triton interpreter, fp32, Flex uncompiled) to test this file's own code.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks._util import SMOKE, run_benchmark
from kandinsky_kernels.backends import use_backend
from kandinsky_kernels.mask import BlockSparseMask
from kandinsky_kernels.ops.block_sparse_attention import block_sparse_attention

CUDA = torch.cuda.is_available()
if not CUDA and not SMOKE:
    pytest.skip("GPU suite: needs CUDA (runs at a toy shape on the CPU only in smoke mode)",
                allow_module_level=True)

DEVICE = "cuda" if CUDA else "cpu"
BS = 64
if SMOKE:
    MODELS = {"toy": (256, 2, 64)}
    DENSITIES = [0.10]
    DTYPE = torch.bfloat16 if CUDA else torch.float32  # the interpreter computes bf16 wrongly
else:
    MODELS = {"lite": (93_696, 28, 64), "pro": (93_696, 32, 128)}
    DENSITIES = [0.05, 0.10, 0.25, 0.50]
    DTYPE = torch.bfloat16
DT = {torch.bfloat16: "bf16", torch.float32: "fp32"}[DTYPE]
FLEX = "flex[compiled]" if CUDA else "flex[eager]"
OURS = "ours[triton]"
_cache: dict = {}  # one model's inputs and masks at a time (Pro's four inputs are ~3 GB)
_flex_compiled: dict = {}


def _need_triton():
    from kandinsky_kernels import _triton

    if not _triton.triton_runs_on(DEVICE):
        pytest.skip(_triton.why_not(DEVICE))


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _timed(fn):
    def call():
        out = fn()
        _sync()
        return out

    return call


def _inputs(model: str):
    """q, k, v, dout (B, H, S, D) in DTYPE: SDPA's and Flex's layout; ours reads BSHD views of them."""
    if ("x", model) not in _cache:
        _cache.clear()
        s, h, d = MODELS[model]
        g = torch.Generator(device=DEVICE).manual_seed(d)
        _cache[("x", model)] = [torch.randn(1, h, s, d, device=DEVICE, dtype=DTYPE, generator=g) for _ in range(4)]
    return _cache[("x", model)]


def _mask(model: str, density: float) -> BlockSparseMask:
    key = ("mask", model, density)
    if key not in _cache:
        s, h, _ = MODELS[model]
        nb = s // BS
        g = torch.Generator(device=DEVICE).manual_seed(int(density * 1000))
        keep = torch.rand(1, h, nb, nb, device=DEVICE, generator=g) < density
        keep |= torch.eye(nb, dtype=torch.bool, device=DEVICE)
        _cache[key] = BlockSparseMask.from_dense_blocks(keep, BS)
    return _cache[key]


def _flex_fn():
    from torch.nn.attention.flex_attention import flex_attention

    if "fn" not in _flex_compiled:
        _flex_compiled["fn"] = torch.compile(flex_attention, dynamic=False) if CUDA else flex_attention
    return _flex_compiled["fn"]


def _flex(q, k, v, bm, scale):
    """Flex with tiles that divide 64-token blocks (its sm90 default of 128 raises on them)."""
    if not CUDA:
        return _flex_fn()(q, k, v, block_mask=bm, scale=scale)
    from benchmarks.gpu_timing import _flex_call

    d = q.shape[-1]
    return _flex_call(("bench", d, q.requires_grad),
                      lambda o: _flex_fn()(q, k, v, block_mask=bm, scale=scale, kernel_options=o))


def _sdpa(q, k, v):
    if not CUDA:
        return F.scaled_dot_product_attention(q, k, v)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def _flash_attn():
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func if CUDA else None


def _case(model: str, density: float) -> str:
    s, h, d = MODELS[model]
    return f"{model} S={s} H={h} D={d} {DT} density={density:.0%}"


PROVIDERS = ["sdpa[flash]", "flash-attn", FLEX, OURS]
M_IDS = list(MODELS)
D_IDS = [f"{int(x * 100)}pct" for x in DENSITIES]


# Order, slowest-varying first: model (one model's inputs cached at a time), density, mode, provider
# (the providers of one case run back to back).
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["forward", "fwd+bwd"])
@pytest.mark.parametrize("density", DENSITIES, ids=D_IDS)
@pytest.mark.parametrize("model", M_IDS)
def test_gpu_attention(benchmark, provider, mode, model, density):
    q, k, v, do = _inputs(model)
    mask = _mask(model, density)
    real = mask.density()
    scale = 1.0 / math.sqrt(q.shape[-1])
    grad = mode == "fwd+bwd"
    qg, kg, vg = (t.detach().requires_grad_(grad) for t in (q, k, v))
    dense = provider in ("sdpa[flash]", "flash-attn")
    if provider == "sdpa[flash]":
        call = lambda: _sdpa(qg, kg, vg)  # noqa: E731
    elif provider == "flash-attn":
        fa = _flash_attn()
        if fa is None:
            pytest.skip("flash-attn is not installed (or no CUDA)")
        qs, ks, vs = (t.transpose(1, 2) for t in (qg, kg, vg))
        call = lambda: fa(qs, ks, vs).transpose(1, 2)  # noqa: E731
    elif provider == FLEX:
        if grad and not CUDA:
            pytest.skip("FlexAttention has no CPU backward")
        if ("bm", model, density) not in _cache:
            _cache[("bm", model, density)] = mask.to_flex_block_mask()
        bm = _cache[("bm", model, density)]
        call = lambda: _flex(qg, kg, vg, bm, scale)  # noqa: E731
    else:
        _need_triton()
        qs, ks, vs = (t.transpose(1, 2) for t in (qg, kg, vg))

        def call():
            with use_backend("triton"):
                return block_sparse_attention(qs, ks, vs, mask, scale=scale).transpose(1, 2)

    if grad:
        def fn():
            return torch.autograd.grad(call(), (qg, kg, vg), do)
    else:
        def fn():
            with torch.no_grad():
                return call()

    suite = f"bsa {mode} (GPU)"
    goal = None
    if provider == OURS and mode == "forward" and density == 0.10:
        goal = f">={0.75 / real:.2f}x; >=1.3x vs {FLEX}"
    # dense providers are timed in every case (each case needs its baseline in the same run)
    run_benchmark(benchmark, _timed(fn), suite=suite, case=_case(model, density), provider=provider,
                  baseline=provider == "sdpa[flash]", goal=goal, rounds=5, warmup_rounds=2,
                  **({} if dense else {"ideal": 1.0 / real}))


@pytest.mark.parametrize("model", M_IDS)
@pytest.mark.parametrize("part", ["forward", "backward", "backward-atomic"])
def test_gpu_backward_vs_forward(benchmark, part, model, monkeypatch):
    """Our backward alone (each Triton scheme) against our forward at 10 % density: goal backward <= 3x
    forward."""
    _need_triton()
    monkeypatch.setenv("KANDINSKY_BSA_TRITON_BWD", "atomic" if part == "backward-atomic" else "two_pass")
    q, k, v, do = _inputs(model)
    density = 0.10 if 0.10 in DENSITIES else DENSITIES[0]
    mask = _mask(model, density)
    qs, ks, vs = (t.detach().transpose(1, 2).requires_grad_(part != "forward") for t in (q, k, v))
    dos = do.transpose(1, 2)
    if part == "forward":
        def fn():
            with torch.no_grad(), use_backend("triton"):
                return block_sparse_attention(qs, ks, vs, mask)
    else:
        with use_backend("triton"):
            out = block_sparse_attention(qs, ks, vs, mask)

        def fn():
            return torch.autograd.grad(out, (qs, ks, vs), dos, retain_graph=True)

    run_benchmark(benchmark, _timed(fn), suite="bsa backward vs forward (GPU)", case=_case(model, density),
                  provider=f"{OURS} {part}", baseline=part == "forward",
                  goal=">=0.333x" if part != "forward" else None, rounds=5, warmup_rounds=2)
