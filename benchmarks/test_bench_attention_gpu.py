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

Timing: one test per case; its providers run interleaved, round by round (``run_case``), each call
followed by ``torch.cuda.synchronize()`` inside its timing; the two warm-up rounds absorb compilation
and autotuning. A provider that cannot run here (flash-attn not installed, Flex's backward on the
CPU, Triton unavailable) is listed as skipped with the reason.

Profiles: ``gpu`` (``python -m benchmarks --profile gpu``; ``scripts/gpu_check.sh`` runs it under a
time limit, 10 % density first so the goals' rows come first) runs the shapes above; ``quick`` and
``default`` skip this file; ``smoke`` (``make test``) runs a toy shape, on the CPU without CUDA
(Triton interpreter, fp32, Flex uncompiled) to test this file's own code.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from benchmarks._util import PROFILE, SMOKE, Provider, run_case
from kandinsky_kernels.backends import use_backend
from kandinsky_kernels.mask import BlockSparseMask
from kandinsky_kernels.ops.block_sparse_attention import block_sparse_attention

CUDA = torch.cuda.is_available()
if not CUDA and not SMOKE:
    pytest.skip("GPU suite: needs CUDA (runs at a toy shape on the CPU only in smoke mode)",
                allow_module_level=True)
if PROFILE in ("quick", "default"):
    pytest.skip(f"GPU suite: Kandinsky-scale shapes run in the gpu profile only (this is {PROFILE}; "
                "python -m benchmarks --profile gpu)", allow_module_level=True)

DEVICE = "cuda" if CUDA else "cpu"
BS = 64
if SMOKE:
    MODELS = {"toy": (256, 2, 64)}
    DENSITIES = [0.10]
    DTYPE = torch.bfloat16 if CUDA else torch.float32  # the interpreter computes bf16 wrongly
else:
    MODELS = {"lite": (93_696, 28, 64), "pro": (93_696, 32, 128)}
    DENSITIES = [0.10, 0.05, 0.25, 0.50]  # the goals' density first: a time-limited run measures it
    DTYPE = torch.bfloat16
DT = {torch.bfloat16: "bf16", torch.float32: "fp32"}[DTYPE]
FLEX = "flex[compiled]" if CUDA else "flex[eager]"
OURS = "ours[triton]"
_cache: dict = {}  # one model's inputs and masks at a time (Pro's four inputs are ~3 GB)
_flex_compiled: dict = {}


def _sync():
    if CUDA:
        torch.cuda.synchronize()


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


SDPA = "sdpa[flash]"
M_IDS = list(MODELS)
D_IDS = [f"{int(x * 100)}pct" for x in DENSITIES]


def _why_no_triton() -> str | None:
    from kandinsky_kernels import _triton

    return None if _triton.triton_runs_on(DEVICE) else _triton.why_not(DEVICE)


# Order, slowest-varying first: model (one model's inputs cached at a time), density, mode; the
# providers of one case run interleaved, round by round.
@pytest.mark.parametrize("mode", ["forward", "fwd+bwd"])
@pytest.mark.parametrize("density", DENSITIES, ids=D_IDS)
@pytest.mark.parametrize("model", M_IDS)
def test_gpu_attention(benchmark, mode, model, density):
    q, k, v, do = _inputs(model)
    mask = _mask(model, density)
    real = mask.density
    scale = 1.0 / math.sqrt(q.shape[-1])
    grad = mode == "fwd+bwd"
    qg, kg, vg = (t.detach().requires_grad_(grad) for t in (q, k, v))

    def timed(call):
        if grad:
            return lambda: torch.autograd.grad(call(), (qg, kg, vg), do)

        def fn():
            with torch.no_grad():
                return call()
        return fn

    providers = [Provider(SDPA, timed(lambda: _sdpa(qg, kg, vg)))]
    fa = _flash_attn()
    if fa is None:
        providers.append(Provider("flash-attn", skip="flash-attn is not installed (or no CUDA)"))
    else:
        qs, ks, vs = (t.transpose(1, 2) for t in (qg, kg, vg))
        providers.append(Provider("flash-attn", timed(lambda: fa(qs, ks, vs).transpose(1, 2))))
    if grad and not CUDA:
        providers.append(Provider(FLEX, skip="FlexAttention has no CPU backward"))
    else:
        if ("bm", model, density) not in _cache:
            _cache[("bm", model, density)] = mask.to_flex_block_mask()
        bm = _cache[("bm", model, density)]
        providers.append(Provider(FLEX, timed(lambda: _flex(qg, kg, vg, bm, scale))))
    qs, ks, vs = (t.transpose(1, 2) for t in (qg, kg, vg))

    def ours():
        with use_backend("triton"):
            return block_sparse_attention(qs, ks, vs, mask, scale=scale).transpose(1, 2)

    providers.append(Provider(OURS, timed(ours), skip=_why_no_triton()))
    goals = []
    if mode == "forward" and density == 0.10:
        goals = [{"provider": OURS, "vs": SDPA, "min_speedup": round(0.75 / real, 3)},
                 {"provider": OURS, "vs": FLEX, "min_speedup": 1.3}]
    s, h, d = MODELS[model]
    run_case(benchmark, suite=f"bsa {mode} (GPU)", op="block_sparse_attention", case=_case(model, density),
             baseline=SDPA, providers=providers,
             params={"model": model, "density": density, "measured_density": round(real, 5), "head_dim": d,
                     "seq_len": s, "heads": h, "pass": mode, "dtype": DT},
             ideal=1.0 / real, goals=goals, rounds=5, warmup_rounds=2, sync=_sync)


def _scheme(scheme: str, fn):
    """Run ``fn`` with KANDINSKY_BSA_TRITON_BWD=scheme (read when the backward launches)."""
    def call():
        old = os.environ.get("KANDINSKY_BSA_TRITON_BWD")
        os.environ["KANDINSKY_BSA_TRITON_BWD"] = scheme
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["KANDINSKY_BSA_TRITON_BWD"]
            else:
                os.environ["KANDINSKY_BSA_TRITON_BWD"] = old
    return call


@pytest.mark.parametrize("model", M_IDS)
def test_gpu_backward_vs_forward(benchmark, model):
    """Our backward alone (each Triton scheme) against our forward at 10 % density: goal backward <= 3x
    forward (forward / backward >= 1/3)."""
    why = _why_no_triton()
    if why is not None:
        pytest.skip(why)
    q, k, v, do = _inputs(model)
    density = 0.10 if 0.10 in DENSITIES else DENSITIES[0]
    mask = _mask(model, density)
    fwd = f"{OURS} forward"
    qf, kf, vf = (t.detach().transpose(1, 2) for t in (q, k, v))
    qs, ks, vs = (t.detach().transpose(1, 2).requires_grad_(True) for t in (q, k, v))
    dos = do.transpose(1, 2)

    def forward():
        with torch.no_grad(), use_backend("triton"):
            return block_sparse_attention(qf, kf, vf, mask)

    with use_backend("triton"):
        out = block_sparse_attention(qs, ks, vs, mask)

    def backward():
        return torch.autograd.grad(out, (qs, ks, vs), dos, retain_graph=True)

    providers = [Provider(fwd, forward),
                 Provider(f"{OURS} backward", _scheme("two_pass", backward)),
                 Provider(f"{OURS} backward-atomic", _scheme("atomic", backward))]
    s, h, d = MODELS[model]
    run_case(benchmark, suite="bsa backward vs forward (GPU)", op="block_sparse_attention",
             case=_case(model, density), baseline=fwd, providers=providers,
             params={"model": model, "density": density, "head_dim": d, "seq_len": s, "heads": h,
                     "pass": "backward vs forward", "dtype": DT},
             goals=[{"provider": p.name, "vs": fwd, "min_speedup": 0.333} for p in providers[1:]],
             rounds=5, warmup_rounds=2, sync=_sync)
