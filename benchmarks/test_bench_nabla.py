"""NABLA block mask on CPU: the fused C++ kernel vs the official sort-based algorithm in plain torch,
time and peak memory of both, over a sequence-length sweep.

Setting: Kandinsky 5 Lite's NABLA (threshold 0.9, STA window (11, 3, 3), bf16 q/k, 8 heads) on latent
grids of T frames x 4x4 tiles of 8x8 tokens (64-token blocks): S = 4,096 / 8,192 / 16,384 tokens
(T = 4 / 8 / 16) at head dim 64, plus head dim 128 at the largest S. The baseline (``official``) is
given q and k as the official model holds them, (B, H, S, D) views of the (B, S, H, D) projections,
and ends with its dense (kv_num_blocks, kv_indices) table; ours with the mask's compressed rows. Goals, at S = 16,384 (the reference
shape): ``ours[cpu]`` >= 3x faster with <= 1/3 of the peak memory. The smaller S are plot points.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks._util import Provider, by_profile, run_case, skip_cpu_suite_in_gpu_profile
from kandinsky_kernels import _ext, nabla_block_mask, sta_block_mask
from kandinsky_kernels.backends import use_backend
from kandinsky_kernels.reference.nabla import nabla_official

skip_cpu_suite_in_gpu_profile()

HEADS = by_profile(smoke=2, quick=8, default=8)
# (frames, tile rows, tile columns, head dim)
CASES = by_profile(
    smoke=[(2, 2, 2, 64)],
    quick=[(4, 4, 4, 64), (8, 4, 4, 64), (16, 4, 4, 64)],
    default=[(4, 4, 4, 64), (8, 4, 4, 64), (16, 4, 4, 64), (16, 4, 4, 128)],
)
GOAL_FRAMES = 16  # the reference shape, S = 16,384
ROUNDS = by_profile(smoke=1, quick=5, default=9)  # calls take 2-40 ms
THRESHOLD = 0.9
WINDOW = (11, 3, 3)


def _id(case) -> str:
    t, h, w, d = case
    return f"S{t * h * w * 64}-D{d}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_nabla_block_mask(benchmark, case):
    t, h, w, d = case
    s = t * h * w * 64
    g = torch.Generator().manual_seed(d)
    q, k = (torch.randn(1, s, HEADS, d, generator=g).to(torch.bfloat16) for _ in range(2))
    sta = sta_block_mask(t, h, w, WINDOW)
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)

    def official():
        return nabla_official(qt, kt, THRESHOLD, sta)

    def ours():
        with use_backend("cpu"):
            return nabla_block_mask(q, k, THRESHOLD, sta)

    why = None
    if _ext.cpp_op("nabla_block_mask") is None:
        why = f"compiled nabla_block_mask not available ({_ext.EXT_ERROR})"
    at_goal = t == GOAL_FRAMES
    run_case(
        benchmark, suite="nabla_block_mask", op="nabla_block_mask",
        case=f"B=1 S={s} H={HEADS} D={d} bf16 thr={THRESHOLD} sta={WINDOW}", baseline="official",
        providers=[Provider("official", official, memory=True),
                   Provider("ours[cpu]", ours, skip=why, memory=True)],
        params={"seq_len": s, "head_dim": d, "dtype": "bf16", "heads": HEADS, "grid": f"{t}x{h}x{w}"},
        goals=[{"provider": "ours[cpu]", "vs": "official", "min_speedup": 3.0}] if at_goal else [],
        mem_goal={"provider": "ours[cpu]", "vs": "official", "max_ratio": 0.333} if at_goal else None,
        rounds=ROUNDS,
    )


# ------------------------------------------------------------ raster-order tokens: index vs copies
# A raster-order model (Wan, HunyuanVideo) runs NABLA attention either through the fractal index
# (``nabla_attention(order="raster")``: the kernels read q, k, v and write the output through it) or
# by copying: fractal_flatten of q, k, v, the fractal-order call, fractal_unflatten of the output
# (and in the backward the same copies of dout, dq, dk, dv). Both compute the same bits; the case
# measures what the copies cost. Lite-like heads (D = 64) at about 8,192 tokens, fp32, threshold 0.1
# with the STA window (1, 3, 3) (~10-15 % of the blocks on random inputs, a trained model's density).
# A padded grid (30 x 34 tokens a frame: 32 x 40 in the fractal order), where the copies also pad.
# ~25 s of the default profile (at 8x32x32 unpadded the index measured 1.12x forward, 1.04x fwd+bwd).
RASTER_GRIDS = by_profile(smoke=[(2, 9, 10)], quick=[(2, 30, 34)], default=[(8, 30, 34)])
RASTER_HEADS = by_profile(smoke=2, quick=4, default=4)
RASTER_ROUNDS = by_profile(smoke=1, quick=3, default=5)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("grid", RASTER_GRIDS, ids=lambda g: "x".join(map(str, g)))
def test_nabla_attention_raster_order(benchmark, grid, backward):
    from kandinsky_kernels import FractalLayout, fractal_flatten, fractal_unflatten, nabla_attention

    t, h, w = grid
    layout = FractalLayout(t, h, w)
    s, d = t * h * w, 64
    g = torch.Generator().manual_seed(s)
    q, k, v = (torch.randn(1, s, RASTER_HEADS, d, generator=g).requires_grad_(backward) for _ in range(3))
    dout = torch.randn(1, s, RASTER_HEADS, d, generator=g)

    def run(attend):
        def fn():
            with use_backend("cpu"), torch.set_grad_enabled(backward):
                out = attend()
                if backward:
                    torch.autograd.grad(out, (q, k, v), dout)
            return out
        return fn

    def copies():
        flat = [fractal_flatten(x.reshape(1, t, h, w, RASTER_HEADS, d)) for x in (q, k, v)]
        out = nabla_attention(*flat, 0.1, (1, 3, 3), grid=layout)
        return fractal_unflatten(out, layout).reshape(q.shape)

    def index():
        return nabla_attention(q, k, v, 0.1, (1, 3, 3), grid=layout, order="raster")

    why = None if _ext.cpp_op("bsa_fwd") is not None else f"compiled kernels not available ({_ext.EXT_ERROR})"
    run_case(
        benchmark, suite="nabla_attention raster order", op="nabla_attention(order='raster')",
        case=f"grid {t}x{h}x{w} S={s} H={RASTER_HEADS} D={d} fp32 {'fwd+bwd' if backward else 'fwd'}",
        baseline="fractal copies",
        providers=[Provider("fractal copies", run(copies), skip=why), Provider("ours[cpu] index", run(index), skip=why)],
        params={"seq_len": s, "grid": f"{t}x{h}x{w}", "pass": "forward+backward" if backward else "forward",
                "padded": layout.is_padded, "dtype": "fp32"},
        no_goal="measures what the fractal copies cost; both providers compute the same bits",
        rounds=RASTER_ROUNDS,
    )
