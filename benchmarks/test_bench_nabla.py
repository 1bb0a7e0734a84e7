"""NABLA block mask on CPU: the fused C++ kernel vs the official sort-based algorithm in plain torch.

Shape: Kandinsky 5 Lite's NABLA setting (threshold 0.9, STA window (11, 3, 3), bf16 q/k) on a latent
grid scaled to this machine: 16 frames x 4x4 tiles of 8x8 tokens = 256 blocks, S = 16,384 tokens,
8 heads, head dims 64 and 128. The baseline (``official``) is given q and k as the official model
holds them, (B, H, S, D) views of the (B, S, H, D) projections, and ends with the same compact
(kv_num_blocks, kv_indices) form. Goals: ``ours[cpu]`` >= 3x faster with <= 1/3 of the peak memory.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks._util import SMOKE, run_benchmark
from kandinsky_kernels import _ext, nabla_block_mask, sta_block_mask
from kandinsky_kernels.backends import use_backend
from kandinsky_kernels.reference.nabla import nabla_official

GRID = (2, 2, 2) if SMOKE else (16, 4, 4)  # (frames, tile rows, tile columns)
HEADS = 2 if SMOKE else 8
HEAD_DIMS = [64] if SMOKE else [64, 128]
THRESHOLD = 0.9
WINDOW = (11, 3, 3)


@pytest.mark.parametrize("provider", ["official", "ours[cpu]"])
@pytest.mark.parametrize("d", HEAD_DIMS, ids=[f"D{d}" for d in HEAD_DIMS])
def test_nabla_block_mask(benchmark, provider, d):
    t, h, w = GRID
    s = t * h * w * 64
    g = torch.Generator().manual_seed(d)
    q, k = (torch.randn(1, s, HEADS, d, generator=g).to(torch.bfloat16) for _ in range(2))
    sta = sta_block_mask(t, h, w, WINDOW)
    if provider == "official":
        qt, kt = q.transpose(1, 2), k.transpose(1, 2)

        def fn():
            return nabla_official(qt, kt, THRESHOLD, sta)

    else:
        if _ext.cpp_op("nabla_block_mask") is None:
            pytest.skip(f"compiled nabla_block_mask not available ({_ext.EXT_ERROR})")

        def fn():
            with use_backend("cpu"):
                return nabla_block_mask(q, k, THRESHOLD, sta)

    baseline = provider == "official"
    run_benchmark(
        benchmark,
        fn,
        suite="nabla_block_mask",
        case=f"B=1 S={s} H={HEADS} D={d} bf16 thr={THRESHOLD} sta={WINDOW}",
        provider=provider,
        baseline=baseline,
        goal=None if baseline else ">=3.0x",
        mem_goal=None if baseline else "<=0.333",
        measure_memory=True,
    )
