"""Shared helpers of the speedup suites: profiles, interleaved timing of the providers of one case
(:func:`run_case`, through pytest-benchmark), peak memory.

Every suite has one pytest test per *case* (one shape/dtype/parameter point); :func:`run_case` times
all providers of the case interleaved, round by round, and records per-provider per-round times in
``benchmark.extra_info`` (its docstring gives the JSON layout the report reads).

Profiles (``KANDINSKY_BENCH_PROFILE``; ``python -m benchmarks --profile P`` sets it):
  ``smoke``    toy shapes, 1 round, no goals: tests of the benchmark code itself (``make test``; the
               older ``KANDINSKY_BENCH_SMOKE=1`` also means smoke), seconds in all;
  ``quick``    small but real shapes, few rounds: about a minute on a 2-core host (``make bench-quick``);
  ``default``  the shapes of the goals, rounds chosen so ``make bench`` takes <= 10 minutes on a 2-core
               host;
  ``gpu``      the Kandinsky-scale GPU suite only (``test_bench_attention_gpu.py``); the CPU suites
               skip themselves.
"""
from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

PROFILES = ("smoke", "quick", "default", "gpu")


def _profile() -> str:
    name = os.environ.get("KANDINSKY_BENCH_PROFILE", "").strip().lower()
    if not name:
        name = "smoke" if os.environ.get("KANDINSKY_BENCH_SMOKE", "0") == "1" else "default"
    if name not in PROFILES:
        raise ValueError(f"KANDINSKY_BENCH_PROFILE={name!r}: must be one of {PROFILES}")
    return name


PROFILE = _profile()
SMOKE = PROFILE == "smoke"


def by_profile(*, smoke, quick, default, gpu=None):
    """The value for the current profile (``gpu`` falls back to ``default``)."""
    if PROFILE == "gpu" and gpu is not None:
        return gpu
    return {"smoke": smoke, "quick": quick, "default": default, "gpu": default}[PROFILE]


def skip_cpu_suite_in_gpu_profile() -> None:
    """Call at the top of a CPU suite: the ``gpu`` profile runs the GPU suite only."""
    if PROFILE == "gpu":
        import pytest

        pytest.skip("CPU suite: not part of the gpu profile", allow_module_level=True)


def cpu_info() -> tuple[str | None, set[str]]:
    """(model name, ISA flags) of this CPU from /proc/cpuinfo, lscpu as a fallback."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    if model is None or not flags:
        try:
            text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            text = ""
        m = re.search(r"^Model name:\s*(.+)$", text, re.M)
        if model is None and m:
            model = m.group(1).strip()
        m = re.search(r"^Flags:\s*(.+)$", text, re.M)
        if not flags and m:
            flags = set(m.group(1).split())
    return model or platform.processor() or None, flags


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


def cpu_isa_now() -> tuple[str, str | None]:
    """``(path, error)``: the ISA path our C++ kernels take now, ``"unknown"`` where the build does not
    report one (no ``_C``, or one built before the runtime dispatch), and the error text when
    ``KANDINSKY_CPU_ISA`` forces a path this CPU or build cannot run (our kernels would raise)."""
    from kandinsky_kernels import _ext

    try:
        isa = _ext.cpu_isa()
    except RuntimeError as e:
        return os.environ.get("KANDINSKY_CPU_ISA", "unknown"), str(e)
    return isa or "unknown", None


@dataclass
class Provider:
    """One contender of a case. ``fn`` runs one call (it must finish its work before returning);
    ``skip`` says why it cannot run on this machine (then ``fn`` is never called, and the report shows
    the provider as skipped with this reason). ``memory``: also record torch's peak allocation of one
    call (``peak_mb``); ``held``: instead, the bytes its result holds (a storage size, e.g. a mask's). ``cpu_isa``: the ISA path of our C++ kernels this provider runs on (from
    :func:`cpu_isa_now`), recorded in its entry so the report can label it ``ours[cpu:avx512]``;
    None for providers whose speed does not depend on it (the baselines)."""

    name: str
    fn: Callable[[], object] | None = None
    skip: str | None = None
    memory: bool = False
    cpu_isa: str | None = None
    held: Callable[[], int] | None = None  # bytes its result holds: reported instead of a peak


def run_case(
    benchmark,
    *,
    suite: str,
    op: str,
    case: str,
    baseline: str,
    providers: Sequence[Provider],
    params: dict | None = None,
    ideal: float | None = None,
    goals: Sequence[dict] = (),
    mem_goal: dict | None = None,
    no_goal: str | None = None,
    rounds: int = 5,
    warmup_rounds: int = 1,
    sync: Callable[[], None] | None = None,
):
    """Time every provider of one case *interleaved*: each round calls every provider once, back to
    back (the order alternates between rounds), so a drift of a shared host's speed hits all of them
    alike and round ``r`` of the baseline and of ours form a fair pair.

    Records in ``benchmark.extra_info`` (the JSON the report reads):
      ``suite``, ``op``, ``case``    rows of the report (``case`` describes shape and dtype);
      ``params``                     plot coordinates, e.g. ``{"density": 0.1, "head_dim": 64,
                                     "seq_len": 8192, "pass": "forward", "dtype": "fp32"}``;
      ``baseline``                   the provider the others are compared with;
      ``providers``                  ``{name: {"times": [seconds per round], "peak_mb": float | None}}``
                                     for the providers that ran, ``{name: {"skip": reason}}`` for the rest;
      ``ideal``                      the best speedup skipping work can give (1 / density), or None;
      ``goals``                      ``[{"provider": p, "vs": q, "min_speedup": x}, ...]``; met only if the
                                     lower quartile of the per-round ratios q / p is >= x;
      ``mem_goal``                   ``{"provider": p, "vs": q, "max_ratio": r}`` on peak memory.
      ``no_goal``                    why a case that carries a goal elsewhere has none here (e.g. on an
                                     ISA path the goal does not apply to), or None.
      ``profile``, ``rounds``, ``warmup_rounds``  how it was run (every provider that ran has
                                     ``rounds`` times; warm-up rounds are not recorded).
    pytest-benchmark's own statistics are those of a whole round. ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs after every call, inside its timing. In the smoke profile, and
    under ``--benchmark-disable``, one recorded round and no warm-up; goals are dropped in smoke.
    """
    ran = [p for p in providers if p.skip is None]
    if not any(p.name == baseline for p in ran):
        raise ValueError(f"baseline {baseline!r} must be one of the providers that run")
    if len({p.name for p in providers}) != len(providers):
        raise ValueError(f"provider names repeat: {[p.name for p in providers]}")
    if SMOKE or getattr(benchmark, "disabled", False):
        # smoke: one round of toy shapes; --benchmark-disable: pytest-benchmark calls the round once
        # and ignores rounds, so that one call must be the recorded one
        rounds, warmup_rounds = 1, 0
    info = dict(suite=suite, op=op, case=case, params=dict(params or {}), baseline=baseline, ideal=ideal,
                providers={}, goals=[] if SMOKE else list(goals), mem_goal=None if SMOKE else mem_goal,
                no_goal=None if SMOKE else no_goal, profile=PROFILE, rounds=rounds,
                warmup_rounds=warmup_rounds)
    for p in providers:  # in the order given (the report's legend order)
        tag = {} if p.cpu_isa is None else {"cpu_isa": p.cpu_isa}
        if p.skip is not None:
            info["providers"][p.name] = {"skip": p.skip, **tag}
            continue
        entry = {"times": [], "peak_mb": None, **tag}
        if p.held is not None:  # what the result keeps alive (a storage size, exact, no spread)
            entry["peak_mb"], entry["memory"] = p.held() / 2**20, "held"
        elif p.memory:
            p.fn()  # warm caches and lazy inits so they are not counted as peak
            entry["peak_mb"] = peak_memory_bytes(p.fn) / 2**20
        info["providers"][p.name] = entry
    calls = {"n": 0}

    def one_round():
        order = ran if calls["n"] % 2 == 0 else ran[::-1]
        record = calls["n"] >= warmup_rounds
        calls["n"] += 1
        for p in order:
            t0 = time.perf_counter()
            p.fn()
            if sync is not None:
                sync()
            if record:
                info["providers"][p.name]["times"].append(time.perf_counter() - t0)

    benchmark.group = f"{suite} | {case}"
    benchmark.extra_info.update(info)
    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    return info
