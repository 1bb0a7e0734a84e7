"""Print the speedup report from a pytest-benchmark JSON file (``make bench`` calls this).

Rows are grouped by (suite, case). Each row gives the median time, the speedup against the case's
baseline provider (baseline median / provider median, so > 1 is faster), the fraction of the ideal
speedup where the benchmark records ``ideal``, and peak memory relative to the baseline where
recorded. Goals recorded by the benchmarks are judged from the same run:

    goal = ">=3.0x"                       speedup against the baseline
    goal = ">=6.0x; >=2.0x vs flex[compiled]"   several goals, the second against another provider
    mem_goal = "<=0.333"                  peak memory ratio (provider / baseline)

Usage: python -m benchmarks.report results.json [--markdown]
"""
from __future__ import annotations

import json
import re
import sys
from collections import defaultdict

_GOAL = re.compile(r"^\s*>=\s*([0-9.]+)\s*x\s*(?:vs\s+(.+?))?\s*$")


def _rows(data: dict):
    groups: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        if "suite" not in info:
            continue
        groups[(info["suite"], info["case"])][info["provider"]] = {
            "median": b["stats"]["median"],
            "info": info,
        }
    return groups


def _judge(goal: str, provider_t: float, providers: dict, baseline: str | None):
    verdicts = []
    for part in goal.split(";"):
        m = _GOAL.match(part)
        if not m:
            verdicts.append((part.strip(), None, "unparsed"))
            continue
        want, vs = float(m.group(1)), (m.group(2) or baseline)
        if vs not in providers:
            verdicts.append((part.strip(), None, f"no {vs} in this run"))
            continue
        got = providers[vs]["median"] / provider_t
        verdicts.append((f">={want:g}x vs {vs}", got, "met" if got >= want else "MISSED"))
    return verdicts


def render(data: dict, markdown: bool = False) -> tuple[str, int, int]:
    machine = data.get("machine_info", {})
    lines = []
    cpu = machine.get("cpu", {}).get("brand_raw") or machine.get("processor", "?")
    lines.append(f"kandinsky-kernels speedup report  ({data.get('datetime', '?')}, {cpu}, "
                 f"{machine.get('cpu', {}).get('count', '?')} cores)")
    goals_met = goals_missed = 0
    sep = " | " if markdown else "  "
    header = ["suite", "case", "provider", "median ms", "speedup", "of ideal", "peak MB", "mem ratio"]
    table = [header]
    goal_lines = []
    for (suite, case), providers in sorted(_rows(data).items()):
        baseline = next((p for p, r in providers.items() if r["info"].get("baseline")), None)
        base_t = providers[baseline]["median"] if baseline else None
        base_mem = providers[baseline]["info"].get("peak_mb") if baseline else None
        for name, r in sorted(providers.items(), key=lambda kv: (not kv[1]["info"].get("baseline"), kv[0])):
            info = r["info"]
            speed = base_t / r["median"] if base_t else None
            ideal = info.get("ideal")
            mem = info.get("peak_mb")
            mem_ratio = mem / base_mem if (mem is not None and base_mem) else None
            table.append([
                suite, case, name + (" (baseline)" if info.get("baseline") else ""),
                f"{r['median'] * 1e3:.2f}",
                f"{speed:.2f}x" if speed else "-",
                f"{speed / ideal:.0%}" if (speed and ideal and not info.get("baseline")) else "-",
                f"{mem:.1f}" if mem is not None else "-",
                f"{mem_ratio:.3f}" if mem_ratio is not None else "-",
            ])
            if info.get("goal"):
                for text, got, verdict in _judge(info["goal"], r["median"], providers, baseline):
                    goals_met += verdict == "met"
                    goals_missed += verdict != "met"
                    got_s = f"{got:.2f}x" if got is not None else "?"
                    goal_lines.append(f"[{verdict}] {suite} | {case} | {name}: {text}, measured {got_s}")
            if info.get("mem_goal") and mem_ratio is not None:
                want = float(info["mem_goal"].lstrip("<= "))
                ok = mem_ratio <= want
                goals_met += ok
                goals_missed += not ok
                goal_lines.append(f"[{'met' if ok else 'MISSED'}] {suite} | {case} | {name}: peak memory "
                                  f"<= {want:g} of baseline, measured {mem_ratio:.3f}")
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        lines.append(sep.join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if markdown and i == 0:
            lines.append(sep.join("-" * w for w in widths))
    if goal_lines:
        lines.append("")
        lines.append(f"Goals: {goals_met} met, {goals_missed} missed")
        lines.extend(goal_lines)
    return "\n".join(lines), goals_met, goals_missed


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    markdown = "--markdown" in argv
    paths = [a for a in argv if not a.startswith("--")]
    for path in paths:
        with open(path) as f:
            text, _, _ = render(json.load(f), markdown=markdown)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
