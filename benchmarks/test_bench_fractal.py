"""Speedup suite of the fractal token reorder on CPU.

The reorder moves every byte once, so its limit is a plain copy of the same tensor: the baseline is
``torch.clone`` of the op's input, and the goal is ``ours[cpu]`` at >= 0.7x of its throughput
(``ours[reference]``, the pure-torch reorder, is shown beside it). Shapes are Kandinsky 5 Lite (model
dim 1792) with the token grid scaled down to fit this machine: an aligned 32x48 grid and a padded
30x45 one (pad tokens make the flatten write ~14% more bytes). One test per case, its three providers
interleaved round by round.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks._util import Provider, by_profile, run_case, skip_cpu_suite_in_gpu_profile
from kandinsky_kernels import FractalLayout, fractal_flatten, fractal_unflatten
from kandinsky_kernels.backends import use_backend
from kandinsky_kernels.ops import fractal as fractal_ops

skip_cpu_suite_in_gpu_profile()

# (B, T, H, W, C, dtype)
CASES = by_profile(
    smoke=[(1, 2, 9, 10, 16, torch.float32)],
    quick=[(1, 4, 32, 48, 1792, torch.float32), (1, 4, 32, 48, 1792, torch.bfloat16),
           (1, 4, 30, 45, 1792, torch.float32)],
    default=[
        (1, 16, 32, 48, 1792, torch.float32),
        (1, 16, 32, 48, 1792, torch.bfloat16),
        (1, 16, 30, 45, 1792, torch.float32),
    ],
)
# calls take 20-100 ms, bound by memory bandwidth that neighbours on this host share: many rounds
ROUNDS = by_profile(smoke=1, quick=5, default=9)
DT = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def _case_id(case) -> str:
    b, t, h, w, c, dtype = case
    return f"B{b} T{t} H{h} W{w} C{c} {str(dtype).replace('torch.', '')}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("op", ["fractal_flatten", "fractal_unflatten"])
def test_fractal_reorder(benchmark, op, case):
    b, t, h, w, c, dtype = case
    layout = FractalLayout(t, h, w)
    if op == "fractal_flatten":
        inp = torch.randn(b, t, h, w, c).to(dtype)
        call = lambda: fractal_flatten(inp)  # noqa: E731
    else:
        inp = torch.randn(b, layout.seq_len, c).to(dtype)
        call = lambda: fractal_unflatten(inp, layout)  # noqa: E731

    def ours(backend):
        def fn():
            with use_backend(backend):
                return call()
        return fn

    why = None if fractal_ops._CPP[op] is not None else "the compiled extension with fractal ops is not built"
    run_case(
        benchmark, suite=op, op=op, case=_case_id(case), baseline="torch.clone",
        providers=[Provider("torch.clone", inp.clone), Provider("ours[cpu]", ours("cpu"), skip=why),
                   Provider("ours[reference]", ours("reference"))],
        params={"op": op, "dtype": DT[dtype], "grid": f"{t}x{h}x{w}", "channels": c,
                "padded": h % 8 != 0 or w % 8 != 0, "bytes": inp.numel() * inp.element_size()},
        goals=[{"provider": "ours[cpu]", "vs": "torch.clone", "min_speedup": 0.7}],
        rounds=ROUNDS,
    )
