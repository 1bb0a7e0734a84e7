"""The benchmark driver: ``python -m benchmarks [--profile P] [--suite NAME ...] [--cpu-isa PATHS]
[--out DIR] [-k EXPR] [-- PYTEST_ARGS]``.

Runs the pytest-benchmark suites of profile P (smoke | quick | default | gpu; see ``benchmarks/_util.py``;
``--suite attention`` runs ``test_bench_attention.py`` alone, and so on) in this process, one progress
line per case, into DIR (default ``bench-results/<UTC timestamp>/``, then ``bench-results/latest``
points at it):

    results.json    pytest-benchmark's JSON: per case ``extra_info`` with every provider's per-round
                    times (``benchmarks._util.run_case``), machine and commit info
                    (``benchmarks/conftest.py``)
    progress.log    the progress lines and the wall time
    report.md, *.png  written by ``benchmarks.report.write_report``, whose text is printed at the end

Exit status: pytest's (non-zero when a test failed or none ran), or 1 when the report failed.
``make bench`` runs the default profile, ``make bench-quick`` the quick one; ``make bench-compare
A=dir1 B=dir2`` compares two result folders (``python -m benchmarks.compare``).

``--cpu-isa all`` (or ``avx2,avx512``; ``make bench-isa``) instead runs the CPU attention suite once per
ISA path of our C++ kernels, each in a subprocess with ``KANDINSKY_CPU_ISA`` set, at the ``quick``
shapes unless ``--profile`` says otherwise, and writes a side-by-side report (``benchmarks/isa.py``);
``--torch-isa same`` (the default) limits torch's baselines in each path's run to that path's instruction
set, ``native`` leaves them at this CPU's best.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_ROOT = ROOT / "bench-results"
PROFILES = ("smoke", "quick", "default", "gpu")
CPU_SUITES = [
    "test_bench_fractal.py", "test_bench_nabla.py", "test_bench_mask.py", "test_bench_attention.py",
    "test_bench_model.py",
    "test_bench_training.py", "test_bench_integrations.py", "test_bench_vae.py",
]
SUITES = {
    "smoke": CPU_SUITES + ["test_bench_attention_gpu.py"],
    "quick": CPU_SUITES,
    "default": CPU_SUITES,
    "gpu": ["test_bench_attention_gpu.py"],
}


def _minutes(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{seconds:.1f} s"


def _new_dir() -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS_ROOT / stamp
    n = 1
    while out.exists():
        n += 1
        out = RESULTS_ROOT / f"{stamp}-{n}"
    return out


def _point_latest(out: Path) -> None:
    """bench-results/latest -> out, when out is a folder of bench-results/ (relative link, swapped
    atomically)."""
    if out.resolve().parent != RESULTS_ROOT.resolve():
        return
    link = RESULTS_ROOT / "latest"
    tmp = RESULTS_ROOT / f".latest-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(out.name)
    os.replace(tmp, link)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=PROFILES, default=None,
                    help="default: 'default', or 'quick' with --cpu-isa")
    ap.add_argument("--suite", action="append", default=None, metavar="NAME",
                    help="run benchmarks/test_bench_NAME.py only (repeatable), e.g. --suite attention")
    ap.add_argument("--cpu-isa", default=None, metavar="PATHS",
                    help="'all' or a comma list of ISA paths (amx, avx512_bf16, avx512, avx2, baseline): run "
                         "the attention suite (or --suite) once per path, then a side-by-side report")
    ap.add_argument("--torch-isa", choices=("same", "native"), default="same",
                    help="with --cpu-isa: 'same' (default) limits torch's own kernels in each path's run to "
                         "that path's instruction set (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, "
                         "MKL_ENABLE_INSTRUCTIONS), so the baselines are what a CPU of that class runs; "
                         "'native' leaves them at this CPU's best")
    ap.add_argument("--out", type=Path, default=None,
                    help="result folder (default: bench-results/<UTC timestamp>/, then bench-results/latest)")
    ap.add_argument("-k", dest="keyword", default=None, help="pytest -k expression: run only matching cases")
    ap.add_argument("pytest_args", nargs="*", help="more pytest arguments, after --")
    args = ap.parse_args(argv)
    if args.profile is None:
        # one quick suite per path keeps --cpu-isa all near the time of one default attention suite
        args.profile = "quick" if args.cpu_isa else "default"
    if args.cpu_isa and args.profile == "gpu":
        ap.error("--cpu-isa times our CPU kernels: use a CPU profile (smoke, quick, default)")
    suites = SUITES[args.profile]
    if args.suite:
        suites = [f"test_bench_{name}.py" for name in args.suite]
        missing = [f for f in suites if not (HERE / f).exists()]
        if missing:
            ap.error(f"--suite: no {', '.join(missing)} in {HERE}")

    # The suites read the profile when they are imported, below.
    os.environ["KANDINSKY_BENCH_PROFILE"] = args.profile
    os.environ.pop("KANDINSKY_BENCH_SMOKE", None)

    out = (args.out if args.out is not None else _new_dir()).resolve()
    if args.cpu_isa:
        from benchmarks.isa import main_isa

        rc = main_isa(args, out)
        if args.out is None and out.exists():
            _point_latest(out)
        return rc
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"
    log = open(out / "progress.log", "w")

    import pytest

    from benchmarks._progress import Progress

    progress = Progress(log)
    pytest_args = [str(HERE / f) for f in suites] + [
        "-q", "-p", "no:cacheprovider", "--tb=short", "--disable-warnings", "-rfEs",
        "--benchmark-quiet", f"--benchmark-json={json_path}",
    ]
    if args.keyword:
        pytest_args += ["-k", args.keyword]
    pytest_args += args.pytest_args
    print(f"benchmarks: profile {args.profile}, results in {out}", flush=True)
    t0 = time.perf_counter()
    rc = int(pytest.main(pytest_args, plugins=[progress]))
    bench_s = time.perf_counter() - t0
    if args.out is None:
        _point_latest(out)

    report_failed = False
    if json_path.exists():
        try:
            from benchmarks.report import write_report
        except ImportError as e:
            print(f"\nreport: benchmarks.report.write_report is not available yet ({e}); "
                  f"the results are in {json_path}")
        else:
            try:
                text = write_report(json_path, out)
            except Exception:
                report_failed = True
                print("\nreport: write_report failed:\n" + traceback.format_exc())
            else:
                if text:
                    print("\n" + str(text).rstrip())
    else:
        print(f"\nno {json_path.name} was written (pytest exit status {rc})")
    wall = time.perf_counter() - t0
    summary = (f"wall time: {_minutes(wall)} (suites {_minutes(bench_s)}); {progress.done} cases, "
               f"{progress.failed} failed; results: {out}")
    print("\n" + summary, flush=True)
    log.write(summary + "\n")
    log.close()
    return rc if rc != 0 else int(report_failed)


if __name__ == "__main__":
    sys.exit(main())
