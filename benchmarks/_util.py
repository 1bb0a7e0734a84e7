"""Shared helpers of the speedup suites: timing through pytest-benchmark, peak memory, smoke mode.

Every benchmark records in ``benchmark.extra_info``:
  ``suite``     the comparison it belongs to (rows of the report are grouped by it and ``case``),
  ``case``      the shape/parameter description, identical for every provider of one comparison,
  ``provider``  what ran (``ours[cpu]``, ``torch.clone``, ``official``, ...),
  ``baseline``  True for the provider the others are compared with,
  ``peak_mb``   peak bytes allocated by torch during one call (optional),
  ``goal``      optional string such as ``>=3.0x`` (speed) checked by the report against the baseline,
  ``mem_goal``  optional string such as ``<=0.333`` (peak memory ratio ours/baseline).
``make bench`` saves the JSON and ``python -m benchmarks.report`` prints ratios from one run.

``KANDINSKY_BENCH_SMOKE=1`` (set by ``make test``) shrinks every shape so the suites run in seconds as
tests of the benchmark code itself; the numbers are then meaningless and no goal is judged.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

SMOKE = os.environ.get("KANDINSKY_BENCH_SMOKE", "0") == "1"


def peak_memory_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes torch allocates on the CPU while ``fn`` runs, above what was live before.

    Measured from the profiler's allocator events, so it counts every tensor allocation (ATen ops and
    ``at::empty`` inside C++ kernels), not small std::vector scratch buffers inside kernels.
    """
    from torch.profiler import ProfilerActivity, profile

    _CPU = torch._C._autograd.DeviceType.CPU

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        if e.device_type() != _CPU:
            continue
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def run_benchmark(
    benchmark,
    fn: Callable[[], object],
    *,
    suite: str,
    case: str,
    provider: str,
    baseline: bool = False,
    goal: str | None = None,
    mem_goal: str | None = None,
    measure_memory: bool = False,
    rounds: int = 5,
    warmup_rounds: int = 1,
    **extra,
):
    """Time ``fn`` with ``benchmark.pedantic`` and record the metadata the report needs."""
    benchmark.group = f"{suite} | {case}"
    info = dict(suite=suite, case=case, provider=provider, baseline=baseline, **extra)
    if goal and not SMOKE:
        info["goal"] = goal
    if mem_goal and not SMOKE:
        info["mem_goal"] = mem_goal
    if measure_memory:
        fn()  # warm caches and lazy inits so they are not counted as peak
        info["peak_mb"] = peak_memory_bytes(fn) / 2**20
    benchmark.extra_info.update(info)
    if SMOKE:
        rounds, warmup_rounds = 1, 0
    return benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
