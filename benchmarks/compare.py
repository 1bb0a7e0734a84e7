"""Compare two benchmark runs: ``python -m benchmarks.compare A B`` (``make bench-compare A=dir1 B=dir2``).

A and B are result folders of ``python -m benchmarks`` (holding ``results.json``) or JSON files.
Cases are matched by (suite, case, provider). Per row: the median time in A and in B, B/A (> 1: B is
slower), and the speedup against the case's baseline in each run (the median of the per-round ratios
baseline / provider, rounds being paired since the providers of a case run interleaved). Rows present in
one run only show ``-`` on the other side; skipped providers show ``skipped``.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _load(path: str) -> tuple[Path, dict]:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    with open(p) as f:
        return p, json.load(f)


def rows(data: dict) -> dict[tuple[str, str, str], dict]:
    """{(suite, case, provider): {"median": s | None, "speedup": x | None, "skip": reason | None}}."""
    out = {}
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        providers = info.get("providers")
        if not isinstance(providers, dict):
            continue
        base = providers.get(info.get("baseline"), {}).get("times") or []
        for name, entry in providers.items():
            times = entry.get("times") or []
            pairs = [bt / t for bt, t in zip(base, times) if t > 0]
            out[(info.get("suite", "?"), info.get("case", "?"), name)] = {
                "median": statistics.median(times) if times else None,
                "speedup": statistics.median(pairs) if pairs else None,
                "skip": entry.get("skip"),
                "baseline": name == info.get("baseline"),
            }
    return out


def _describe(path: Path, data: dict) -> str:
    commit = data.get("commit_info", {})
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu_model") or machine.get("cpu", {}).get("brand_raw") or "?"
    profile = data.get("kandinsky", {}).get("profile", "?")
    dirty = " (dirty)" if commit.get("dirty") else ""
    isa = f", ISA path {machine.get('cpu_isa') or 'unknown'}" if "cpu_isas" in machine else ""
    return (f"{path.parent}: {data.get('datetime', '?')}, commit {str(commit.get('id', '?'))[:10]}{dirty}, "
            f"profile {profile}, {cpu}, {machine.get('cpu_cores', '?')} cores{isa}")


def _ms(r: dict | None) -> str:
    if r is None:
        return "-"
    if r["skip"] is not None:
        return "skipped"
    return f"{r['median'] * 1e3:.2f}" if r["median"] is not None else "?"


def _x(r: dict | None) -> str:
    if r is None or r["skip"] is not None or r["speedup"] is None:
        return "-"
    return "baseline" if r["baseline"] else f"{r['speedup']:.2f}x"


def render(path_a: Path, a: dict, path_b: Path, b: dict) -> str:
    ra, rb = rows(a), rows(b)
    keys = list(ra) + [k for k in rb if k not in ra]
    table = [["suite", "case", "provider", "A ms", "B ms", "B/A", "speedup A", "speedup B"]]
    for key in keys:
        x, y = ra.get(key), rb.get(key)
        ratio = "-"
        if x and y and x["median"] and y["median"]:
            ratio = f"{y['median'] / x['median']:.2f}"
        table.append([*key, _ms(x), _ms(y), ratio, _x(x), _x(y)])
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    right = {3, 4, 5, 6, 7}
    lines = [f"A = {_describe(path_a, a)}", f"B = {_describe(path_b, b)}",
             "B/A: time in B over time in A (> 1: B slower); speedup: vs the case's baseline, same run", ""]
    for row in table:
        lines.append("  ".join(c.rjust(w) if i in right else c.ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    only_a, only_b = sum(k not in rb for k in ra), sum(k not in ra for k in rb)
    if only_a or only_b:
        lines.append(f"\n{only_a} rows only in A, {only_b} only in B")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 2
    try:
        (pa, a), (pb, b) = _load(argv[0]), _load(argv[1])
    except (OSError, json.JSONDecodeError) as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    print(render(pa, a, pb, b))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
