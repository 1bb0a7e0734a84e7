"""Our CPU attention on each ISA path, side by side: ``python -m benchmarks --cpu-isa all`` (or a list,
``--cpu-isa avx2,avx512``; ``make bench-isa``).

Our C++ kernels pick an instruction-set path at run time (``kandinsky_kernels._ext``: amx, avx512_bf16,
avx512, avx2, baseline); ``KANDINSKY_CPU_ISA=<path>`` forces one. For every requested path this CPU and
build can run, the driver starts one subprocess, ``python -m benchmarks --suite attention`` with
``KANDINSKY_CPU_ISA`` set, into ``<out>/isa-<path>/`` (results.json, progress.log, report.md and plots of
that path alone); a path it cannot run is listed as skipped with the reason, never silently dropped.
A subprocess per path also keeps an illegal instruction on one path from taking the others down.

Each path's run stands for a CPU class: by default (``--torch-isa same``) torch's own kernels in that
run, the baselines (dense SDPA, compiled Flex), are limited to the path's instruction set too
(:data:`TORCH_ISA_ENV`), so the AVX2 column is what an AVX2 laptop would see; ``--torch-isa native``
times the baselines at this CPU's best in every run. The baselines are timed in every path's run,
interleaved with ours with equal rounds: every speedup and goal is then a paired ratio from
one run, as in ``make bench``. The side-by-side ``<out>/report.md`` (also printed) shows per case the
baselines' median time over the runs (range across runs in brackets) and per path our time and our
speedup against each baseline, then every goal per path, judged as in ``benchmarks.report`` (the lower
quartile of the paired per-round ratios). ``<out>/isa.json`` records what was requested, run and skipped.

``python -m benchmarks.isa <out>`` re-renders the side-by-side report of such a folder, and
``make bench-compare A=<out>/isa-avx2 B=<out>/isa-avx512`` compares two paths case by case.
"""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import report

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# CPU flags (/proc/cpuinfo) a path needs; used only to say why a path is not available (the C++
# decides by CPUID what it can run; a path may also be missing because the compiler lacked support).
REQUIRES = {
    "amx": ("amx_tile", "amx_bf16"),
    "avx512_bf16": ("avx512f", "avx512bw", "avx512_bf16"),
    "avx512": ("avx512f", "avx512bw"),
    "avx2": ("avx2", "fma"),
    "baseline": (),
}


# What each path stands for as a CPU class: with ``--torch-isa same`` the baselines of a path's run are
# limited to it too, ATen's vector kernels and Inductor's code for compiled Flex through
# ATEN_CPU_CAPABILITY, oneDNN (bf16 SDPA, matmuls) through ONEDNN_MAX_CPU_ISA, MKL through
# MKL_ENABLE_INSTRUCTIONS. An AVX2 path measured against AVX-512 (or AMX) baselines answers no user's
# question: a laptop without AVX-512 runs neither.
TORCH_ISA_ENV = {
    "amx": {},
    "avx512_bf16": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16",
                    "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "baseline": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                 "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}


def torch_isa_env(path: str, mode: str) -> dict[str, str]:
    """The environment that limits torch's kernels to ``path``'s instruction set (``mode`` 'same'), or
    {} (``mode`` 'native')."""
    if mode not in ("same", "native"):
        raise ValueError(f"torch_isa mode {mode!r}: expected 'same' or 'native'")
    return dict(TORCH_ISA_ENV.get(path, {})) if mode == "same" else {}


def all_paths() -> tuple[str, ...]:
    from kandinsky_kernels import _ext

    return tuple(_ext.CPU_ISAS)


def parse_request(spec: str) -> list[str]:
    """``all`` or a comma list of path names -> the paths, fastest first, each once; ValueError on an
    unknown name."""
    names = all_paths()
    if spec.strip().lower() == "all":
        return list(names)
    want = [s.strip().lower() for s in spec.split(",") if s.strip()]
    bad = [w for w in want if w not in names]
    if bad or not want:
        raise ValueError(f"--cpu-isa {spec!r}: expected 'all' or a comma list of {', '.join(names)}")
    return [n for n in names if n in want]


def build_reasons() -> dict[str, str]:
    """{path: why it cannot run here} as the C++ says it (op ``cpu_isa_report``: "name: ok" or
    "name: reason"), {} where the build lacks that op."""
    from kandinsky_kernels import _ext

    op = _ext.cpp_op("cpu_isa_report")
    if op is None:
        return {}
    out = {}
    for line in op():
        name, _, why = str(line).partition(": ")
        if why and why != "ok":
            out[name] = why
    return out


def plan(requested: list[str], available: list[str], flags: set[str],
         reasons: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(paths to run, {path: why it is skipped}) from what this CPU and build report; ``reasons``: the
    build's own (:func:`build_reasons`), preferred over a guess from the CPU flags."""
    if not available:
        why = ("this build reports no ISA paths (kandinsky_kernels._ext.cpu_isas() is empty: the C++ "
               "extension is missing or predates the runtime ISA dispatch)")
        return [], {p: why for p in requested}
    run, skipped = [], {}
    for p in requested:
        if p in available:
            run.append(p)
            continue
        missing = [f for f in REQUIRES.get(p, ()) if f not in flags]
        if reasons and reasons.get(p):
            skipped[p] = reasons[p]
        elif missing:
            skipped[p] = f"this CPU lacks {', '.join(missing)}"
        else:
            skipped[p] = f"this build cannot run it here (its paths: {', '.join(available)})"
    return run, skipped


def _exit_text(rc: int) -> str:
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"killed by {name}" + (" (illegal instruction)" if name == "SIGILL" else "")
    return f"exit status {rc}"


def run_paths(paths: list[str], out: Path, *, profile: str, suites: list[str], keyword: str | None,
              pytest_args: list[str], runner=None, torch_isa: str = "same") -> dict[str, dict]:
    """One ``python -m benchmarks`` subprocess per path (``KANDINSKY_CPU_ISA`` set, and with
    ``torch_isa`` 'same' torch limited to the path's instruction set: :data:`TORCH_ISA_ENV`), its output
    shown as it goes. Returns ``{path: {"dir", "rc", "seconds", "env"}}``. ``runner``:
    ``subprocess.run`` by default."""
    runner = runner or subprocess.run
    ran = {}
    for i, p in enumerate(paths, 1):
        sub = out / f"isa-{p}"
        cmd = [sys.executable, "-m", "benchmarks", "--profile", profile, "--out", str(sub)]
        for s in suites:
            cmd += ["--suite", s]
        if keyword:
            cmd += ["-k", keyword]
        if pytest_args:
            cmd += ["--", *pytest_args]
        extra = {"KANDINSKY_CPU_ISA": p, **torch_isa_env(p, torch_isa)}
        env = dict(os.environ, **extra)
        env.pop("KANDINSKY_BENCH_SMOKE", None)
        shown = " ".join(f"{k}={v}" for k, v in extra.items())
        print(f"\n=== ISA path {p} ({i}/{len(paths)}): {shown} -> {sub}", flush=True)
        t0 = time.perf_counter()
        rc = runner(cmd, cwd=str(ROOT), env=env).returncode
        ran[p] = {"dir": sub.name, "rc": rc, "seconds": round(time.perf_counter() - t0, 1), "env": extra}
        if rc != 0:
            print(f"=== ISA path {p}: {_exit_text(rc)}", flush=True)
    return ran


# ------------------------------------------------------------------------------------- the report
def _cases(data: dict) -> dict[tuple[str, str], dict]:
    return {(b["extra_info"]["suite"], b["extra_info"]["case"]): b["extra_info"]
            for b in data.get("benchmarks", []) if "providers" in b.get("extra_info", {})}


def _median_ratio(num: list, den: list) -> float | None:
    pairs = [a / b for a, b in zip(num, den) if b > 0]
    return statistics.median(pairs) if pairs else None


def _ms(seconds: list) -> str:
    return report._fmt_ms(1e3 * statistics.median(seconds)) if seconds else "-"


def _merge_names(infos: list[dict], dispatched: bool) -> list[str]:
    """Provider names in first-seen order: those that ran our C++ (``cpu_isa`` recorded) or the rest."""
    names: list[str] = []
    for info in infos:
        for name, entry in info["providers"].items():
            if ("cpu_isa" in entry) == dispatched and name not in names:
                names.append(name)
    return names


def _baseline_cell(name: str, infos: list[dict]) -> str:
    meds = [statistics.median(i["providers"][name]["times"]) for i in infos
            if i["providers"].get(name, {}).get("times")]
    if meds:
        lo, hi = min(meds), max(meds)
        spread = f" ({report._fmt_ms(1e3 * lo)}-{report._fmt_ms(1e3 * hi)})" if len(meds) > 1 else ""
        return report._fmt_ms(1e3 * statistics.median(meds)) + spread
    if any("skip" in i["providers"].get(name, {}) for i in infos):
        return "skipped"
    return "-"


def _path_cell(path: str, info: dict | None, ours: list[str]) -> str:
    if info is None:
        return "-"
    provs = info["providers"]
    base = info["baseline"]
    others = [n for n, e in provs.items() if "cpu_isa" not in e and n != base and e.get("times")]
    parts = []
    for name in ours:
        entry = provs.get(name)
        if entry is None:
            continue
        prefix = f"{name}: " if len(ours) > 1 else ""
        if "skip" in entry:
            parts.append(f"{prefix}skipped: {entry['skip']}")
            continue
        text = f"{prefix}{_ms(entry['times'])} ms"
        for other in [base, *others]:
            x = _median_ratio(provs[other].get("times") or [], entry["times"])
            if x is not None:
                text += f" · {x:.2f}x {other}"
        if entry.get("cpu_isa") != path:
            text += f" (ran on {entry.get('cpu_isa')})"
        parts.append(text)
    return "; ".join(parts) or "-"


def render(meta: dict, runs: dict[str, dict]) -> str:
    """The side-by-side markdown of the runs ``{path: results.json data}`` described by ``meta``
    (isa.json: profile, requested, available, ran, skipped, command)."""
    ran = meta.get("ran", {})
    requested, avail = meta.get("requested", []), meta.get("available") or []
    order = [p for p in requested if p in ran] + [p for p in ran if p not in requested]
    paths = [p for p in order if p in runs]  # those with results
    first = runs[paths[0]] if paths else {}
    m = first.get("machine_info", {})
    commit = first.get("commit_info", {})
    lines = [
        "# kandinsky-kernels: CPU attention per ISA path",
        "",
        f"- Machine: {report.machine_line(first) if first else meta.get('cpu_model') or '?'}",
        f"- ISA paths of our C++ kernels: available {', '.join(avail) or 'none reported'}; "
        f"requested {', '.join(requested)}",
        f"- Commit: {str(commit.get('id', '?'))[:12]}{' (dirty)' if commit.get('dirty') else ''}; "
        f"torch {m.get('torch', '?')}; profile {meta.get('profile', '?')}",
        f"- Command: `{meta.get('command', 'python -m benchmarks --cpu-isa ...')}`: one subprocess per path "
        "with KANDINSKY_CPU_ISA set, each into isa-<path>/ (its own results.json and report.md)",
    ]
    done = []
    for p in order:
        r = ran[p]
        status = "" if r["rc"] == 0 else f", {_exit_text(r['rc'])}"
        torch_env = {k: v for k, v in r.get("env", {}).items() if k != "KANDINSKY_CPU_ISA"}
        if torch_env:
            status += f", torch: {' '.join(f'{k}={v}' for k, v in torch_env.items())}"
        if p not in runs:
            status += ", no results.json"
        done.append(f"{p} {r['seconds']:.0f} s{status}")
    if done:
        lines.append(f"- Ran (wall time per path): {'; '.join(done)}")
    for p, why in meta.get("skipped", {}).items():
        lines.append(f"- Skipped {p}: {why}")
    if meta.get("torch_isa", "native") == "same":
        lines.append(
            "- Baselines limited to each path's instruction set (`--torch-isa same`: ATEN_CPU_CAPABILITY, "
            "ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS per path, as each path's run line records), so "
            "each path's column is what a CPU of that class would see; baseline columns: the median over "
            "the runs of each run's median (min-max across runs, which spans the instruction sets).")
    else:
        lines.append(
            "- Baselines at this CPU's best instruction set in every run (`--torch-isa native`); "
            "baseline columns: the median over the runs of each run's median (min-max across runs).")
    lines += [
        "- Baselines are timed again in every path's run, interleaved with ours with equal rounds, so each "
        "speedup below is the median of paired per-round ratios from one run.",
        "",
    ]
    if not paths:
        lines.append("No path ran: nothing to compare.")
        return "\n".join(lines) + "\n"

    cases = {p: _cases(runs[p]) if p in runs else {} for p in order}
    failed = {p: "no results" for p in order if p not in runs}  # the header says why
    keys: list = []
    for p in paths:
        keys += [k for k in cases[p] if k not in keys]
    keys = [k for k in keys if any("cpu_isa" in e for p in paths if k in cases[p]
                                   for e in cases[p][k]["providers"].values())]
    all_infos = [cases[p][k] for k in keys for p in paths if k in cases[p]]
    base_names: list[str] = []
    for info in all_infos:
        for n in [info["baseline"], *_merge_names([info], dispatched=False)]:
            if n not in base_names:
                base_names.append(n)

    # time and speedup
    lines += ["## Time and speedup per path",
              "",
              "Cell: our median ms · median speedup against each baseline that ran in that path's run.",
              "",
              "| suite | case | " + " | ".join(f"{n} ms" for n in base_names) + " | "
              + " | ".join(report.label("ours[cpu]", p) for p in order) + " |",
              "|" + "---|" * (2 + len(base_names) + len(order))]
    skip_notes: dict = {}
    for key in keys:
        infos = [cases[p][key] for p in paths if key in cases[p]]
        for info in infos:
            for n, e in info["providers"].items():
                if "skip" in e and "cpu_isa" not in e:
                    skip_notes.setdefault((n, e["skip"]), []).append(key[0])
        ours = _merge_names(infos, dispatched=True)
        cells = [_baseline_cell(n, infos) for n in base_names]
        cells += [failed.get(p) or _path_cell(p, cases[p].get(key), ours) for p in order]
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    for (n, why), suites in skip_notes.items():
        lines.append(f"\n{n} skipped in {', '.join(dict.fromkeys(suites))}: {why}")

    # goals: one row per (case, goal), or per case where no path has one but some path says why not
    goal_cells: dict = {}  # (suite, case) -> {goal text: {path: cell}}
    why_not: dict = {}  # (suite, case) -> {path: reason}
    totals = {p: [0, 0] for p in paths}
    for p in paths:
        for r in report.load(runs[p]):
            if (r.suite, r.case) not in keys or r.is_baseline or r.cpu_isa is None:
                continue
            for text, val, ok in r.goals:
                shown = "-" if val is None else f"{val:.2f}"
                cell = f"{'met' if ok else '**missed**'} ({shown})"
                goal_cells.setdefault((r.suite, r.case), {}).setdefault(text, {})[p] = cell
                totals[p][0] += ok
                totals[p][1] += 1
            if not r.goals and r.no_goal:
                why_not.setdefault((r.suite, r.case), {})[p] = r.no_goal
    goal_rows = []
    for key in keys:
        goals = goal_cells.get(key, {})
        nogo = why_not.get(key, {})
        for text, by_path in goals.items() or ([("-", {})] if nogo else []):
            goal_rows.append((*key, text, {p: by_path.get(p) or ("no goal" if p in nogo else "-")
                                           for p in order}))
    lines += ["", "## Goals per path",
              "",
              "Met only if the goal holds at the lower quartile of the paired per-round ratios (value in "
              "brackets).",
              "",
              "| suite | case | goal | " + " | ".join(order) + " |",
              "|" + "---|" * (3 + len(order))]
    for s, c, t, cells in goal_rows:
        lines.append(f"| {s} | {c} | {t} | " + " | ".join(cells[p] for p in order) + " |")
    if not goal_rows:
        lines.append(f"\nNo case carries a goal in these runs (profile {meta.get('profile', '?')}; "
                     "smoke has none).")
    lines += ["", "Goals met: " + "; ".join(f"{p} {totals[p][0]} of {totals[p][1]}" if p in totals
                                            else f"{p} {failed[p]}" for p in order)]
    reasons: dict = {}
    for nogo in why_not.values():
        for p, why in nogo.items():
            reasons.setdefault((p, why), None)
    for p, why in reasons:
        lines.append(f"\nno goal on {p}: {why}")
    return "\n".join(lines) + "\n"


def write_isa_report(out: Path) -> str:
    """Render ``<out>/report.md`` from ``<out>/isa.json`` and the per-path results; return the text to
    print (the report and its path)."""
    out = Path(out)
    meta = json.loads((out / "isa.json").read_text())
    runs = {}
    for p, r in meta.get("ran", {}).items():
        path = out / r["dir"] / "results.json"
        if path.exists():
            runs[p] = json.loads(path.read_text())
    text = render(meta, runs)
    (out / "report.md").write_text(text)
    return text.rstrip() + f"\n\nWritten: {out / 'report.md'} (per path: {out}/isa-<path>/report.md)"


def main_isa(args, out: Path, *, flags: set[str] | None = None, available: list[str] | None = None,
             runner=None) -> int:
    """The ``--cpu-isa`` mode of ``python -m benchmarks`` (args: its parsed options, profile resolved)."""
    try:
        requested = parse_request(args.cpu_isa)
    except ValueError as e:
        print(f"benchmarks: {e}", file=sys.stderr)
        return 2
    if available is None:
        from kandinsky_kernels import _ext

        available = _ext.cpu_isas()
    from benchmarks._util import cpu_info

    cpu_model, cpu_flags = cpu_info()
    flags = cpu_flags if flags is None else flags
    paths, skipped = plan(requested, available, flags, build_reasons())
    suites = args.suite or ["attention"]
    torch_isa = getattr(args, "torch_isa", "same")
    command = f"python -m benchmarks --cpu-isa {args.cpu_isa} --profile {args.profile} --torch-isa {torch_isa}"
    command += "".join(f" --suite {s}" for s in args.suite or [])
    command += f" -k '{args.keyword}'" if args.keyword else ""
    meta = {"command": command, "cpu_model": cpu_model, "profile": args.profile, "requested": requested,
            "available": list(available), "torch_isa": torch_isa,
            "suites": suites, "ran": {}, "skipped": skipped}
    print(f"benchmarks: ISA paths {', '.join(paths) or 'none'} (profile {args.profile}, suites "
          f"{', '.join(suites)}), results in {out}", flush=True)
    for p, why in skipped.items():
        print(f"  skipped {p}: {why}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    meta["ran"] = run_paths(paths, out, profile=args.profile, suites=suites, keyword=args.keyword,
                            pytest_args=args.pytest_args, runner=runner, torch_isa=torch_isa)
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "isa.json").write_text(json.dumps(meta, indent=1))
    print("\n" + write_isa_report(out), flush=True)
    print(f"\nwall time: {meta['seconds']:.0f} s for {len(paths)} paths; results: {out}", flush=True)
    if not paths:
        return 2
    return next((1 for r in meta["ran"].values() if r["rc"] != 0), 0)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(2)
    print(write_isa_report(Path(sys.argv[1])))
