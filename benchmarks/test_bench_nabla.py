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
