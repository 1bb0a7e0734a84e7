"""Speedup suite of the fractal token reorder on CPU.

The reorder moves every byte once, so its limit is a plain copy of the same tensor: the baseline is
``torch.clone`` of the op's input, and the goal is ``ours[cpu]`` at >= 0.7x of its throughput.
Shapes are Kandinsky 5 Lite (model dim 1792) with the token grid scaled down to fit this machine:
an aligned 32x48 grid and a padded 30x45 one (pad tokens make the flatten write ~14% more bytes).
"""
from __future__ import annotations

import pytest
import torch

from benchmarks._util import SMOKE, run_benchmark
from kandinsky_kernels import FractalLayout, fractal_flatten, fractal_unflatten
from kandinsky_kernels.backends import use_backend
from kandinsky_kernels.ops import fractal as fractal_ops

# (B, T, H, W, C, dtype)
CASES = [
    (1, 16, 32, 48, 1792, torch.float32),
    (1, 16, 32, 48, 1792, torch.bfloat16),
    (1, 16, 30, 45, 1792, torch.float32),
]
if SMOKE:
    CASES = [(1, 2, 9, 10, 16, torch.float32)]

PROVIDERS = ["torch.clone", "ours[cpu]", "ours[reference]"]


def _case_id(case) -> str:
    b, t, h, w, c, dtype = case
    return f"B{b} T{t} H{h} W{w} C{c} {str(dtype).replace('torch.', '')}"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("op", ["fractal_flatten", "fractal_unflatten"])
def test_fractal_reorder(benchmark, op, case, provider):
    if provider == "ours[cpu]" and fractal_ops._CPP[op] is None:
        pytest.skip("the compiled extension with fractal ops is not built")
    b, t, h, w, c, dtype = case
    layout = FractalLayout(t, h, w)
    if op == "fractal_flatten":
        inp = torch.randn(b, t, h, w, c).to(dtype)
        call = lambda: fractal_flatten(inp)  # noqa: E731
    else:
        inp = torch.randn(b, layout.seq_len, c).to(dtype)
        call = lambda: fractal_unflatten(inp, layout)  # noqa: E731

    if provider == "torch.clone":
        fn = inp.clone
    else:
        backend = provider[len("ours[") : -1]

        def fn():
            with use_backend(backend):
                return call()

    run_benchmark(
        benchmark, fn, suite=op, case=_case_id(case), provider=provider,
        baseline=provider == "torch.clone", goal=">=0.7x" if provider == "ours[cpu]" else None,
        rounds=9,  # the median of more rounds, as neighbours share this machine's memory bandwidth
    )
