"""A/B of the model's fp32 CPU Linears: MKL (``KANDINSKY_CPU_LINEAR=torch``) against oneDNN (``onednn``).

1. Each product of a CrossDiT block at Video Lite widths (D 1792, F 7168, 8,192 tokens): forward,
   and the input- and weight-gradient products of the backward, as GFLOP/s per library.
2. The whole block forward (fp32, no grad) with dense SDPA and with NABLA attention (the bench's
   ``CrossDiT block forward`` case, ``benchmarks/test_bench_model.py``), per library;
3. the dense-SDPA block forward under ``torch.compile`` (inductor), one compiled function per library
   (a compiled graph keeps the choice it was traced with).

The two libraries alternate round by round in one process (the mode is read at every eager call); each
figure is the median over ``--rounds`` rounds; ratios are per-round medians. Prints one line per
result; ``--json PATH`` also writes them. About 3 minutes on 2 cores.

    python scripts/cpu_linear_ab.py --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kandinsky_model import linear as lin  # noqa: E402

MODES = ("torch", "onednn")


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _ab(fn, rounds: int, per_mode=None) -> dict[str, list[float]]:
    """Per-mode seconds of ``fn()`` (or of ``per_mode[mode]()``) over ``rounds`` alternating rounds,
    after one warm-up call each (for a compiled function: the compile)."""
    fns = per_mode or {m: fn for m in MODES}
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for m in MODES:
        os.environ[lin.ENV_VAR] = m
        fns[m]()
    for r in range(rounds):
        for m in (MODES if r % 2 == 0 else MODES[::-1]):
            os.environ[lin.ENV_VAR] = m
            times[m].append(_time(fns[m]))
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    args = ap.parse_args(argv)
    if lin._onednn_op()[0] is None:
        print(f"skipped: {lin._onednn_op()[1]}")
        return 0
    saved = os.environ.get(lin.ENV_VAR)
    results = []

    def report(name, times, flop=None):
        med = {m: statistics.median(times[m]) for m in MODES}
        ratio = statistics.median(a / b for a, b in zip(times["torch"], times["onednn"]))
        row = {"case": name, "ms": {m: round(med[m] * 1e3, 1) for m in MODES}, "speedup": round(ratio, 2)}
        rate = ""
        if flop:
            row["gflops"] = {m: round(flop / med[m] / 1e9) for m in MODES}
            rate = f"; GFLOP/s MKL {row['gflops']['torch']}, oneDNN {row['gflops']['onednn']}"
        results.append(row)
        print(f"{name}: MKL {row['ms']['torch']} ms, oneDNN {row['ms']['onednn']} ms, "
              f"oneDNN {ratio:.2f}x faster{rate}", flush=True)

    try:
        torch.manual_seed(0)
        m, d, f = args.tokens, 1792, 7168
        x, g = torch.randn(m, d), torch.randn(m, f)
        w = torch.randn(f, d) / d ** 0.5
        x.requires_grad_(True)
        w.requires_grad_(True)
        flop = 2 * m * d * f
        with torch.no_grad():
            report(f"forward {m}x{d} @ {d}x{f}", _ab(lambda: lin.linear(x, w), args.rounds), flop)

        def fwd_bwd():
            x.grad = w.grad = None
            lin.linear(x, w).backward(g)

        report(f"forward+backward {m}x{d} @ {d}x{f} (3 products)", _ab(fwd_bwd, args.rounds), 3 * flop)

        os.environ.setdefault("KANDINSKY_BENCH_PROFILE", "default")
        from benchmarks import test_bench_model as tb

        block, xb, text, te, ctxs, density, _ = tb._get_setup("fp32")
        for name in ("sdpa", "nabla"):
            ctx, rope = ctxs[name]

            def fwd():
                with torch.no_grad():
                    block(xb, text, te, rope, ctx)

            report(f"CrossDiT block forward fp32 {name} (S {tb.GRID[0] * tb.GRID[1] * tb.GRID[2]})",
                   _ab(fwd, args.rounds))
        if not args.no_compile:
            ctx, rope = ctxs["sdpa"]

            def compiled():  # a new function object per mode: its own compiled graph
                f = torch.compile(lambda t: block(t, text, te, rope, ctx))

                def run():
                    with torch.no_grad():
                        f(xb)
                return run

            report(f"CrossDiT block forward fp32 sdpa, torch.compile (S {tb.GRID[0] * tb.GRID[1] * tb.GRID[2]})",
                   _ab(None, args.rounds, {m: compiled() for m in MODES}))
    finally:
        if saved is None:
            os.environ.pop(lin.ENV_VAR, None)
        else:
            os.environ[lin.ENV_VAR] = saved
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
