"""Block-sparse attention speedups on the CPU: ours[cpu] vs dense SDPA (baseline) and compiled
FlexAttention given the identical mask (forward only: Flex has no CPU backward).

Masks: every query block picks key blocks at random at the target density, plus its diagonal block
(the NABLA-like shape: adaptive blocks plus the always-kept local one). ``ideal`` in extra_info is
1 / actual density, the speedup over dense attention that skipping blocks can give at best, so the
report prints the fraction of it reached. Goals (10 % density, fp32): forward >= 6x vs SDPA and >= 2x
vs flex[compiled] (the second goal uses the report's ``vs <provider>`` syntax); forward+backward >= 4x
vs SDPA. ``test_bf16`` adds bf16 rows at 10 % (no goal).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks._util import SMOKE, run_benchmark
from kandinsky_kernels.backends import use_backend
from kandinsky_kernels.mask import BlockSparseMask
from kandinsky_kernels.ops.block_sparse_attention import _backend, block_sparse_attention

B, S, H = (1, 256, 2) if SMOKE else (1, 8192, 4)
HEAD_DIMS = [64] if SMOKE else [64, 128]
DENSITIES = [0.05, 0.10, 0.25, 0.50]
FLEX = "flex[compiled]"
# Medians of 11 rounds for the forward providers (0.05-0.3 s a call): this shared host's memory
# bandwidth moves single runs by +-10 %, and flex[compiled] vs ours[cpu] is a goal.
FWD_ROUNDS = 11
_masks: dict[float, BlockSparseMask] = {}
_flex = {}


def _mask(density: float) -> BlockSparseMask:
    if density not in _masks:
        g = torch.Generator().manual_seed(int(density * 1000))
        nb = S // 64
        dense = torch.rand(B, H, nb, nb, generator=g) < density
        dense |= torch.eye(nb, dtype=torch.bool)
        _masks[density] = BlockSparseMask.from_dense_blocks(dense)
    return _masks[density]


def _inputs(d: int, grad: bool = False):
    g = torch.Generator().manual_seed(d)
    return [torch.randn(B, S, H, d, generator=g).requires_grad_(grad) for _ in range(3)]


def _case(d: int, density: float) -> str:
    return f"S={S} H={H} D={d} fp32 density={density:.0%}"


def _goal(density: float, goal: str) -> str | None:
    return goal if density == 0.10 else None


def _skip_without_cpu():
    if _backend(torch.device("cpu")) != "cpu":
        pytest.skip("the C++ extension with bsa_fwd is not built")


DENS_IDS = [f"{int(x * 100)}pct" for x in DENSITIES]
D_IDS = [f"D{d}" for d in HEAD_DIMS]


# provider is the fastest-varying parameter, so the providers of one case run back to back and a
# drift of this shared host's speed falls less between the times a ratio divides.
@pytest.mark.parametrize("provider", ["sdpa", FLEX, "ours[cpu]"])
@pytest.mark.parametrize("density", DENSITIES, ids=DENS_IDS)
@pytest.mark.parametrize("d", HEAD_DIMS, ids=D_IDS)
def test_forward(benchmark, provider, d, density):
    mask = _mask(density)
    q, k, v = _inputs(d)
    extra = dict(ideal=1.0 / mask.density())
    if provider == "sdpa":
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        fn = lambda: F.scaled_dot_product_attention(qt, kt, vt)  # noqa: E731
        return run_benchmark(benchmark, fn, suite="bsa forward", case=_case(d, density),
                             provider=provider, baseline=True, rounds=3, **extra)
    if provider == FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        if "fn" not in _flex:
            _flex["fn"] = torch.compile(flex_attention, dynamic=False)
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        bm = mask.to_flex_block_mask()
        fn = lambda: _flex["fn"](qt, kt, vt, block_mask=bm)  # noqa: E731
        return run_benchmark(benchmark, fn, suite="bsa forward", case=_case(d, density),
                             provider=provider, rounds=FWD_ROUNDS, **extra)
    _skip_without_cpu()

    def fn():
        with use_backend("cpu"):
            return block_sparse_attention(q, k, v, mask)

    run_benchmark(benchmark, fn, suite="bsa forward", case=_case(d, density), provider=provider,
                  goal=_goal(density, f">=6.0x; >=2.0x vs {FLEX}"), vs=FLEX, rounds=FWD_ROUNDS, **extra)


@pytest.mark.parametrize("provider", ["sdpa", "ours[cpu]"])
@pytest.mark.parametrize("density", DENSITIES, ids=DENS_IDS)
@pytest.mark.parametrize("d", HEAD_DIMS, ids=D_IDS)
def test_forward_backward(benchmark, provider, d, density):
    mask = _mask(density)
    q, k, v = _inputs(d, grad=True)
    dout = torch.randn(B, S, H, d)
    extra = dict(ideal=1.0 / mask.density())
    if provider == "sdpa":
        def fn():
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            out = F.scaled_dot_product_attention(qt, kt, vt)
            return torch.autograd.grad(out, (q, k, v), dout.transpose(1, 2))

        return run_benchmark(benchmark, fn, suite="bsa fwd+bwd", case=_case(d, density),
                             provider=provider, baseline=True, rounds=2, **extra)
    _skip_without_cpu()

    def fn():
        with use_backend("cpu"):
            out = block_sparse_attention(q, k, v, mask)
        return torch.autograd.grad(out, (q, k, v), dout)

    run_benchmark(benchmark, fn, suite="bsa fwd+bwd", case=_case(d, density), provider=provider,
                  goal=_goal(density, ">=4.0x"), **extra)


# bf16 at 10 % density (no goal: the CPU goals are fp32). Shows the AVX512-BF16 dot-product
# kernels, forward and backward, against torch's own bf16 SDPA; providers of a case back to back.
@pytest.mark.parametrize("provider", ["sdpa", "ours[cpu]"])
@pytest.mark.parametrize("mode", ["forward", "fwd+bwd"])
@pytest.mark.parametrize("d", HEAD_DIMS, ids=D_IDS)
def test_bf16(benchmark, provider, mode, d):
    density = 0.10
    mask = _mask(density)
    grad = mode == "fwd+bwd"
    q, k, v = (x.detach().bfloat16().requires_grad_(grad) for x in _inputs(d))
    dout = torch.randn(B, S, H, d).bfloat16()
    if provider == "sdpa":
        def call():
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
    else:
        _skip_without_cpu()

        def call():
            with use_backend("cpu"):
                return block_sparse_attention(q, k, v, mask)

    if grad:
        def fn():
            return torch.autograd.grad(call(), (q, k, v), dout)
    else:
        def fn():
            with torch.no_grad():
                return call()

    case = _case(d, density).replace("fp32", "bf16")
    run_benchmark(benchmark, fn, suite=f"bsa {mode}", case=case, provider=provider,
                  baseline=provider == "sdpa", rounds=3 if provider == "sdpa" else 5,
                  ideal=1.0 / mask.density())
