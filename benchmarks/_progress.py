"""A pytest plugin of the benchmark driver (``python -m benchmarks``): one progress line per case,
and none of pytest's per-test dots.

A line reads ``[ 7/31] bsa forward | S=8192 H=4 D=64 fp32 density=10% | flex[compiled] 4.8x,
ours[cpu:avx512] 10.7x vs sdpa (4.1 s)``: the suite and case of the test, then for every provider that
ran beside the baseline the median over rounds of the per-round ratio baseline time / provider time (the
providers of a case run interleaved, so round r of each is a fair pair), then the test's wall time
(setup included). A provider that ran our C++ kernels shows their ISA path (``ours[cpu:avx512]``).
"""
from __future__ import annotations

import statistics
import time
from typing import TextIO

import pytest

from benchmarks.report import label


def _median_ratio(base: list[float], other: list[float]) -> float | None:
    pairs = [b / o for b, o in zip(base, other) if o > 0]
    return statistics.median(pairs) if pairs else None


def summarize(info: dict) -> str:
    """``suite | case | ratios vs baseline`` from one test's ``extra_info`` (the run_case layout)."""
    providers = info.get("providers", {})
    base = info.get("baseline")
    base_times = providers.get(base, {}).get("times") or []
    parts, skipped = [], []
    for name, entry in providers.items():
        if name == base:
            continue
        shown = label(name, entry.get("cpu_isa"))
        if "skip" in entry:
            skipped.append(shown)
            continue
        r = _median_ratio(base_times, entry.get("times") or [])
        parts.append(f"{shown} {r:.2f}x" if r is not None else f"{shown} ?")
    if parts:
        text = ", ".join(parts) + f" vs {base}"
    elif base_times:
        text = f"{base} {statistics.median(base_times) * 1e3:.1f} ms"
    else:
        text = "no times"
    mem = [(n, e["peak_mb"]) for n, e in providers.items() if e.get("peak_mb") is not None]
    if mem:
        text += " | peak " + ", ".join(f"{n} {mb:.1f} MB" for n, mb in mem)
    if skipped:
        text += " | skipped: " + ", ".join(skipped)
    return f"{info.get('suite', '?')} | {info.get('case', '?')} | {text}"


def drop_empty_benchmarks(config) -> int:
    """Remove the benchmarks of ``config``'s pytest-benchmark session that have no timed round (an
    interrupted case); returns how many were removed."""
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or not getattr(bs, "benchmarks", None):
        return 0
    kept = [b for b in bs.benchmarks if getattr(getattr(b, "stats", None), "data", None)]
    dropped = len(bs.benchmarks) - len(kept)
    bs.benchmarks[:] = kept
    return dropped


class Progress:
    """Register with ``pytest.main(args, plugins=[Progress()])``. ``log``: also write the lines there."""

    def __init__(self, log: TextIO | None = None):
        self.log = log
        self.total = 0
        self.done = 0
        self.failed = 0
        self._config = None
        self._start: dict[str, float] = {}
        self._info: dict[str, dict] = {}
        self._status: dict[str, str] = {}

    def pytest_configure(self, config):
        self._config = config

    def pytest_collection_finish(self, session):
        self.total = len(session.items)

    def pytest_runtest_logstart(self, nodeid, location):
        self._start[nodeid] = time.perf_counter()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        yield
        if call.when == "call":
            bm = getattr(item, "funcargs", {}).get("benchmark")
            if bm is not None and bm.extra_info:
                self._info[item.nodeid] = dict(bm.extra_info)

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self._status[report.nodeid] = f"FAILED ({report.when})"
        elif report.skipped and report.nodeid not in self._status:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self._status[report.nodeid] = f"skipped: {reason.removeprefix('Skipped: ')}"

    @pytest.hookimpl(tryfirst=True)
    def pytest_report_teststatus(self, report, config):
        # no dot or 's' per test (the progress line says it); failures keep pytest's own 'F'
        if report.when == "call" and report.passed:
            return "passed", "", "PASSED"
        if report.skipped and not hasattr(report, "wasxfail"):
            return "skipped", "", "SKIPPED"
        return None

    def pytest_runtest_logfinish(self, nodeid, location):
        self.done += 1
        seconds = time.perf_counter() - self._start.pop(nodeid, time.perf_counter())
        status = self._status.pop(nodeid, None)
        info = self._info.pop(nodeid, None)
        if status is not None and status.startswith("FAILED"):
            self.failed += 1
        if info is not None and status is None:
            text = summarize(info)
        else:
            name = nodeid.split("::", 1)[-1]
            text = f"{name} {status or 'passed'}"
        width = len(str(self.total))
        self.write(f"[{self.done:>{width}}/{self.total}] {text} ({seconds:.1f} s)")

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_sessionfinish(self, session, exitstatus):
        # A run stopped by SIGINT / a timeout (scripts/gpu_check.sh) leaves the interrupted case's stats
        # registered with no rounds; pytest-benchmark's own sessionfinish then dies on min([]) before it
        # writes the JSON, losing every finished case. Drop the empty ones first (this wrapper runs
        # outside pytest-benchmark's).
        dropped = drop_empty_benchmarks(session.config)
        if dropped:
            self.write(f"interrupted: {dropped} case(s) with no finished rounds left out of the results")
        yield

    def write(self, line: str) -> None:
        tr = self._config.pluginmanager.get_plugin("terminalreporter") if self._config else None
        if tr is not None:
            tr.ensure_newline()
            tr.write_line(line)
            tr.flush()  # a line per case as it ends, also into a pipe
        else:
            print(line, flush=True)
        if self.log is not None:
            self.log.write(line + "\n")
            self.log.flush()
