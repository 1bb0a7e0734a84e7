"""The fuzz suite: every case of ``tests/fuzz_cases.py`` as its own test.

The cases run in one worker process (``python tests/fuzz_cases.py NAME ...``), so that a case that
crashes the process (segfault, abort, heap corruption) fails as a test instead of killing the run:
the worker is restarted on the cases after the one that crashed. Each case prints ``START`` then
``RESULT <name> PASS|FAIL|SKIP``; a case with a START but no RESULT crashed the worker.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fuzz_cases import CASES

_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz_cases.py")
_TIMEOUT_S = 900


def _run_all(names: list[str]) -> dict[str, tuple[str, str]]:
    results: dict[str, tuple[str, str]] = {}
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    pending = list(names)
    while pending:
        proc = subprocess.run([sys.executable, _WORKER, *pending], capture_output=True, text=True, env=env,
                              timeout=_TIMEOUT_S)
        started = None
        for line in proc.stdout.splitlines():
            if line.startswith("START "):
                started = line.split(" ", 1)[1]
            elif line.startswith("RESULT "):
                _, name, status, *detail = line.split(" ", 3)
                results[name] = (status, detail[0] if detail else "")
                started = None
        if started is not None:  # the worker died inside this case
            tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            results[started] = ("CRASH", f"worker exited with {proc.returncode}: {tail}")
        left = [n for n in pending if n not in results]
        if len(left) == len(pending):  # no case finished: the worker cannot start at all
            raise RuntimeError(f"fuzz worker made no progress (exit {proc.returncode}): {proc.stderr[-2000:]}")
        pending = left
    return results


@pytest.fixture(scope="session")
def fuzz_results():
    return _run_all(list(CASES))


@pytest.mark.parametrize("name", list(CASES))
def test_fuzz_case(name, fuzz_results):
    status, detail = fuzz_results[name]
    if status == "SKIP":
        pytest.skip(detail)
    assert status == "PASS", f"{status}: {detail}"


def test_a_crash_is_a_failed_case_not_a_dead_run(monkeypatch):
    """The runner itself: a case that kills the worker is reported as CRASH, and the cases after it
    still run."""
    import fuzz_cases

    names = ["mask-repr-of-empty-mask", "mask-repr-density-in-range"]
    code = (f"import os, sys; sys.path.insert(0, {os.path.dirname(_WORKER)!r});"
            "import fuzz_cases as f; f.CASES['mask-repr-of-empty-mask'] = lambda: os.abort(); f.run(sys.argv[1:])")
    script = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"kk_fuzz_crash_{os.getpid()}.py")
    with open(script, "w") as fh:
        fh.write(code)
    monkeypatch.setattr(sys.modules[__name__], "_WORKER", script)
    try:
        results = _run_all(names)
    finally:
        os.remove(script)
    assert results["mask-repr-of-empty-mask"][0] == "CRASH"
    assert results["mask-repr-density-in-range"] == ("PASS", "")
    assert set(fuzz_cases.CASES) >= set(names)


def test_a_skip_inside_rejects_is_a_skip():
    """A case whose backend cannot run here (``backend_scope`` raises Skip inside the call that ``rejects``
    runs) is skipped, not failed: with triton 3.6 and NumPy >= 2.4 (the H200 machine's stack) the Triton
    interpreter cannot run, and 57 ``rejects`` cases used to fail with "expected ValueError ..., got Skip"."""
    import fuzz_cases

    def cannot_run():
        raise fuzz_cases.Skip("no backend here")

    with pytest.raises(fuzz_cases.Skip):
        fuzz_cases.rejects(cannot_run, "anything")
