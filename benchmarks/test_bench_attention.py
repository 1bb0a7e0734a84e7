"""Block-sparse attention speedups on the CPU: ours[cpu] vs dense SDPA (baseline) and compiled
FlexAttention given the identical mask. One test per case; its providers run interleaved, round by
round (``run_case``), with equal rounds.

Masks: every query block picks key blocks at random at the target density, plus its diagonal block
(the NABLA-like shape: adaptive blocks plus the always-kept local one). ``ideal`` is 1 / actual
density, the speedup over dense attention that skipping blocks can give at best, so the report can
print the fraction of it reached. Goals (10 % density, fp32): forward >= 6x vs SDPA and >= 2x vs
flex[compiled]; forward+backward >= 4x vs SDPA. Compiled Flex has no CPU backward: in the fwd+bwd
cases it is listed as skipped with that reason. bf16 cases at 10 % (no goal; the issue's CPU goals
are fp32) show the AVX512-BF16 dot-product kernels against torch's own bf16 SDPA; Flex is timed in
fp32 only (one compile per head dim is what this suite can afford).

Shapes per profile: smoke S=256 H=2 D=64; quick S=4096 H=4 D=64; default S=8192 H=4 D=64 and 128.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks._util import Provider, by_profile, run_case, skip_cpu_suite_in_gpu_profile
from kandinsky_kernels.backends import use_backend
from kandinsky_kernels.mask import BlockSparseMask
from kandinsky_kernels.ops.block_sparse_attention import _backend, block_sparse_attention

skip_cpu_suite_in_gpu_profile()

B, S, H = by_profile(smoke=(1, 256, 2), quick=(1, 4096, 4), default=(1, 8192, 4))
HEAD_DIMS = by_profile(smoke=[64], quick=[64], default=[64, 128])
DENSITIES = by_profile(smoke=[0.10], quick=[0.05, 0.10, 0.25, 0.50], default=[0.05, 0.10, 0.25, 0.50])
# Rounds (all providers of a case run every round). Forward calls take 0.03-0.9 s and Flex vs ours is a
# goal, so the forward gets the most rounds; an fp32 fwd+bwd round costs ~2-4 s of dense SDPA.
FWD_ROUNDS = by_profile(smoke=1, quick=5, default=5)
BWD_ROUNDS = by_profile(smoke=1, quick=3, default=3)
BF16_ROUNDS = by_profile(smoke=1, quick=3, default=3)
FLEX = "flex[compiled]"
OURS = "ours[cpu]"
OP = "block_sparse_attention"
_masks: dict[float, BlockSparseMask] = {}
_flex = {}
_warmed: set = set()


def _warmup(*key) -> int:
    """One warm-up round for the first case of each (pass, dtype, head dim): it absorbs Flex's compile
    for that head dim and the kernels' first-call costs; the later cases (other densities) reuse them, so
    their rounds are all recorded (a dense fp32 fwd+bwd call costs 2-3 s a round here)."""
    if key in _warmed:
        return 0
    _warmed.add(key)
    return 1


def _mask(density: float) -> BlockSparseMask:
    if density not in _masks:
        g = torch.Generator().manual_seed(int(density * 1000))
        nb = S // 64
        dense = torch.rand(B, H, nb, nb, generator=g) < density
        dense |= torch.eye(nb, dtype=torch.bool)
        _masks[density] = BlockSparseMask.from_dense_blocks(dense)
    return _masks[density]


def _inputs(d: int, dtype=torch.float32, grad: bool = False):
    g = torch.Generator().manual_seed(d)
    return [torch.randn(B, S, H, d, generator=g).to(dtype).requires_grad_(grad) for _ in range(3)]


def _case(d: int, density: float, dt: str) -> str:
    return f"S={S} H={H} D={d} {dt} density={density:.0%}"


def _params(d: int, density: float, mask: BlockSparseMask, mode: str, dt: str) -> dict:
    return {"density": density, "measured_density": round(mask.density(), 5), "head_dim": d,
            "seq_len": S, "heads": H, "pass": mode, "dtype": dt}


def _why_no_ours() -> str | None:
    if _backend(torch.device("cpu")) != "cpu":
        return "the C++ extension with bsa_fwd is not built"
    return None


def _ours(q, k, v, mask, grad_out=None):
    """ours[cpu]: forward (no_grad) or forward+backward when ``grad_out`` is given."""
    if grad_out is None:
        def fn():
            with torch.no_grad(), use_backend("cpu"):
                return block_sparse_attention(q, k, v, mask)
    else:
        def fn():
            with use_backend("cpu"):
                out = block_sparse_attention(q, k, v, mask)
            return torch.autograd.grad(out, (q, k, v), grad_out)
    return Provider(OURS, fn, skip=_why_no_ours())


def _sdpa(q, k, v, grad_out=None):
    """Dense SDPA on (B, H, S, D) views of the same (B, S, H, D) tensors."""
    if grad_out is None:
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

        def fn():
            with torch.no_grad():
                return F.scaled_dot_product_attention(qt, kt, vt)
    else:
        def fn():
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            out = F.scaled_dot_product_attention(qt, kt, vt)
            return torch.autograd.grad(out, (q, k, v), grad_out.transpose(1, 2))
    return Provider("sdpa", fn)


def _flex_fwd(q, k, v, mask):
    from torch.nn.attention.flex_attention import flex_attention

    if "fn" not in _flex:
        _flex["fn"] = torch.compile(flex_attention, dynamic=False)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    bm = mask.to_flex_block_mask()

    def fn():
        with torch.no_grad():
            return _flex["fn"](qt, kt, vt, block_mask=bm)

    return Provider(FLEX, fn)


def _goals(density: float, mode: str) -> list[dict]:
    if density != 0.10:
        return []
    if mode == "forward":
        return [{"provider": OURS, "vs": "sdpa", "min_speedup": 6.0},
                {"provider": OURS, "vs": FLEX, "min_speedup": 2.0}]
    return [{"provider": OURS, "vs": "sdpa", "min_speedup": 4.0}]


DENS_IDS = [f"{int(x * 100)}pct" for x in DENSITIES]
D_IDS = [f"D{d}" for d in HEAD_DIMS]


@pytest.mark.parametrize("density", DENSITIES, ids=DENS_IDS)
@pytest.mark.parametrize("d", HEAD_DIMS, ids=D_IDS)
def test_forward(benchmark, d, density):
    mask = _mask(density)
    q, k, v = _inputs(d)
    run_case(benchmark, suite="bsa forward", op=OP, case=_case(d, density, "fp32"), baseline="sdpa",
             providers=[_sdpa(q, k, v), _flex_fwd(q, k, v, mask), _ours(q, k, v, mask)],
             params=_params(d, density, mask, "forward", "fp32"), ideal=1.0 / mask.density(),
             goals=_goals(density, "forward"), rounds=FWD_ROUNDS,
             warmup_rounds=_warmup("forward", "fp32", d))


@pytest.mark.parametrize("density", DENSITIES, ids=DENS_IDS)
@pytest.mark.parametrize("d", HEAD_DIMS, ids=D_IDS)
def test_forward_backward(benchmark, d, density):
    mask = _mask(density)
    q, k, v = _inputs(d, grad=True)
    dout = torch.randn(B, S, H, d, generator=torch.Generator().manual_seed(d + 1))
    run_case(benchmark, suite="bsa fwd+bwd", op=OP, case=_case(d, density, "fp32"), baseline="sdpa",
             providers=[_sdpa(q, k, v, dout), Provider(FLEX, skip="FlexAttention has no CPU backward"),
                        _ours(q, k, v, mask, dout)],
             params=_params(d, density, mask, "fwd+bwd", "fp32"), ideal=1.0 / mask.density(),
             goals=_goals(density, "fwd+bwd"), rounds=BWD_ROUNDS,
             warmup_rounds=_warmup("fwd+bwd", "fp32", d))


@pytest.mark.parametrize("mode", ["forward", "fwd+bwd"])
@pytest.mark.parametrize("d", HEAD_DIMS, ids=D_IDS)
def test_bf16(benchmark, mode, d):
    """bf16 at 10 % density, no goal."""
    density = 0.10
    mask = _mask(density)
    grad = mode == "fwd+bwd"
    q, k, v = _inputs(d, torch.bfloat16, grad)
    dout = None
    if grad:
        dout = torch.randn(B, S, H, d, generator=torch.Generator().manual_seed(d + 1)).bfloat16()
    run_case(benchmark, suite=f"bsa {mode}", op=OP, case=_case(d, density, "bf16"), baseline="sdpa",
             providers=[_sdpa(q, k, v, dout), _ours(q, k, v, mask, dout)],
             params=_params(d, density, mask, mode, "bf16"), ideal=1.0 / mask.density(),
             rounds=BF16_ROUNDS, warmup_rounds=_warmup(mode, "bf16", d))
