"""Paired before / after timings of forward + backward of the DiT's fp32 islands at one CrossDiT-sized
case: the fused custom ops with their fused backward ("fused") against the torch references under
autograd ("ref", what a training step ran before the backward existed).

Each process times one side only, so the two sides never share allocator or cache state; the driver runs
fresh processes alternately (ref, fused, ref, fused, ...) so that load from other processes on a shared
host hits both alike, and reports per op the min and the median over the processes of each one's
best-of-reps time.

    PYTHONPATH=. python scripts/islands_backward_ab.py [--pairs 5] [--reps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def _one_side(side: str, reps: int) -> dict[str, float]:
    from kandinsky_kernels.ops.adaln import gated_residual, scale_shift_layer_norm
    from kandinsky_kernels.ops.qk_norm import rms_norm_rope
    from kandinsky_kernels.reference.adaln import gated_residual_ref, scale_shift_layer_norm_ref
    from kandinsky_kernels.reference.qk_norm import rms_norm_rope_ref

    fused = side == "fused"
    ln = scale_shift_layer_norm if fused else scale_shift_layer_norm_ref
    gate = gated_residual if fused else gated_residual_ref
    rope = rms_norm_rope if fused else rms_norm_rope_ref
    torch.manual_seed(0)
    x = torch.randn(1, 8192, 1792).bfloat16().requires_grad_()
    o = torch.randn(1, 8192, 1792).bfloat16().requires_grad_()
    mods = [torch.randn(1, 1, 1792, requires_grad=True) for _ in range(3)]
    dy = torch.randn(1, 8192, 1792).bfloat16()
    q = torch.randn(1, 8192, 28, 64).bfloat16().requires_grad_()
    w = (torch.rand(64) + 0.5).requires_grad_()
    theta = torch.rand(1, 8192, 1, 32) * 6.28
    cos, sin = theta.cos(), theta.sin()
    dq = torch.randn(1, 8192, 28, 64).bfloat16()
    eps = torch.finfo(torch.float32).eps
    cases = {
        "scale_shift_layer_norm":
            lambda: torch.autograd.grad(ln(x, mods[0], mods[1], 1e-5), (x, mods[0], mods[1]), dy),
        "gated_residual": lambda: torch.autograd.grad(gate(x, o, mods[2]), (x, o, mods[2]), dy),
        "rms_norm_rope": lambda: torch.autograd.grad(rope(q, w, cos, sin, eps), (q, w), dq),
    }
    best = {}
    for name, fn in cases.items():
        fn()  # warm up (first custom-op call, allocator)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        best[name] = min(times)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--side", choices=("ref", "fused"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        print(json.dumps(_one_side(a.side, a.reps)))
        return
    runs: dict[str, list[dict[str, float]]] = {"ref": [], "fused": []}
    for i in range(a.pairs):
        for side in ("ref", "fused"):
            out = subprocess.run([sys.executable, __file__, "--side", side, "--reps", str(a.reps)],
                                 capture_output=True, text=True, check=True, env=os.environ)
            runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
            times = "  ".join(f"{k} {v * 1e3:7.1f} ms" for k, v in runs[side][-1].items())
            print(f"pair {i + 1} {side:5s} {times}", flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.pairs} pairs x best of {a.reps}")
    print(f"{'forward + backward':24s} {'ref min':>9s} {'ref med':>9s} {'fused min':>10s} {'fused med':>10s} "
          f"{'speedup (med)':>14s}")
    for name in runs["ref"][0]:
        r = [d[name] * 1e3 for d in runs["ref"]]
        f = [d[name] * 1e3 for d in runs["fused"]]
        print(f"{name:24s} {min(r):9.1f} {statistics.median(r):9.1f} {min(f):10.1f} {statistics.median(f):10.1f} "
              f"{statistics.median(r) / statistics.median(f):13.2f}x")


if __name__ == "__main__":
    main()
