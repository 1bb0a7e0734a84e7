"""The speedup report of one benchmark run: ``report.md``, PNG plots and the terminal headline.

Input: the pytest-benchmark JSON of a run whose cases were timed by :func:`benchmarks._util.run_case`
(every provider of a case interleaved, round by round; per-provider times in ``extra_info``).

Figures that hold up on a noisy shared machine: round ``r`` of the baseline and round ``r`` of a
provider ran next to each other, so each round gives one paired ratio ``baseline_r / provider_r``.
A speedup is the median of those ratios, shown with its spread (lower to upper quartile), and a
goal counts as met only when it holds at the pessimistic end: the lower quartile of the ratios
(the upper quartile for a memory ratio, which is measured once and has no spread).

Usage: ``python -m benchmarks.report results.json [--out DIR]`` writes ``report.md`` and the plots
into DIR (default: the JSON's folder) and prints the headline table and the paths.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field

PLOTS = ("attention_speedup.png", "nabla_mask.png", "vae_time_memory.png", "summary.png")
_LINEAR_LIBRARIES = {"onednn": "oneDNN (kandinsky_model/linear.py)", "torch": "torch's F.linear (MKL)"}


# ----------------------------------------------------------------------------------------- data
@dataclass
class Row:
    """One provider of one case, compared with the case's baseline."""

    suite: str
    op: str
    case: str
    params: dict
    provider: str
    baseline: str
    times: list = field(default_factory=list)  # seconds per round
    base_times: list = field(default_factory=list)
    peak_mb: float | None = None
    base_peak_mb: float | None = None
    ideal: float | None = None
    skip: str | None = None
    goals: list = field(default_factory=list)  # [(text, measured_pessimistic, met)]
    goal_spread: dict = field(default_factory=dict)  # speed goal text -> (q1, median, q3) of its ratio
    tokens_per_s: list = field(default_factory=list)  # throughput per round, where a suite records it
    cpu_isa: str | None = None  # the ISA path of our C++ kernels this provider ran on, where recorded
    no_goal: str | None = None  # why this case has no goal here (set by the suite), shown in the goal cell
    errors: dict = field(default_factory=dict)  # other provider -> {output: relative L2 error}, where recorded
    hwm_mb: float | None = None  # absolute peak RSS of the provider's own process, where recorded
    part: bool = False  # a part of a round (a VAE's encode or decode), from the entry's ``parts``

    @property
    def is_baseline(self) -> bool:
        return self.provider == self.baseline

    @property
    def label(self) -> str:
        return label(self.provider, self.cpu_isa)

    @property
    def median_ms(self) -> float | None:
        return 1e3 * statistics.median(self.times) if self.times else None

    @property
    def ratios(self) -> list:
        return [b / t for b, t in zip(self.base_times, self.times) if t > 0]

    @property
    def speedup(self) -> tuple | None:
        """(lower quartile, median, upper quartile) of the paired per-round ratios."""
        return _quartiles(self.ratios) if self.ratios else None

    @property
    def mem_ratio(self) -> float | None:
        if self.peak_mb is None or not self.base_peak_mb:
            return None
        return self.peak_mb / self.base_peak_mb


def label(provider: str, cpu_isa: str | None) -> str:
    """The provider's name with the ISA path it ran on: ``ours[cpu]`` -> ``ours[cpu:avx512]``,
    ``nabla`` -> ``nabla[cpu:avx512]``; unchanged where no path is recorded (the baselines)."""
    if not cpu_isa:
        return provider
    if provider.endswith("]") and "[" in provider:
        return f"{provider[:-1]}:{cpu_isa}]"
    return f"{provider}[cpu:{cpu_isa}]"


def _quartiles(xs: list) -> tuple:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def _ratio_between(case_providers: dict, num: str, den: str) -> tuple | None:
    """Quartiles of the per-round ratios times[num] / times[den] (den faster -> > 1)."""
    a, b = case_providers.get(num, {}).get("times"), case_providers.get(den, {}).get("times")
    if not a or not b:
        return None
    return _quartiles([x / y for x, y in zip(a, b) if y > 0])


def error_of(errors: dict, vs: str) -> float | None:
    """The largest relative L2 error of any output against ``vs`` (``errors`` as recorded per provider:
    ``{vs: {output: error}}``), or None when not recorded."""
    e = (errors or {}).get(vs)
    return max(e.values()) if e else None


def load(data: dict) -> list[Row]:
    """Every provider row of every case recorded by run_case, in run order.

    Besides run_case's fields a provider entry may carry ``parts`` (``{op: {"times", "peak_mb"}}``: the
    parts of one round timed separately, e.g. a VAE's encode and decode; each becomes a row of that op
    right after the case's rows), ``errors`` (``{other provider: {output: relative L2 error}}``, shown
    in the goal cell), ``hwm_mb`` (absolute peak RSS of its own process); the case may carry
    ``error_goal`` ``{"provider", "vs", "max_rel_l2"}``, met when every recorded output error of the
    provider against ``vs`` is at most that."""
    rows = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "providers" not in info:
            continue
        provs, base = info["providers"], info["baseline"]
        base_entry = provs.get(base, {})
        part_rows = []
        for name, entry in provs.items():
            row = Row(
                suite=info["suite"], op=info.get("op", info["suite"]), case=info["case"],
                params=info.get("params", {}), provider=name, baseline=base,
                times=entry.get("times", []), base_times=base_entry.get("times", []),
                peak_mb=entry.get("peak_mb"), base_peak_mb=base_entry.get("peak_mb"),
                ideal=info.get("ideal"), skip=entry.get("skip"), tokens_per_s=entry.get("tokens_per_s") or [],
                cpu_isa=entry.get("cpu_isa"), no_goal=None if name == base else info.get("no_goal"),
                errors=entry.get("errors") or {}, hwm_mb=entry.get("hwm_mb"),
            )
            for part, pe in (entry.get("parts") or {}).items():
                bp = (base_entry.get("parts") or {}).get(part, {})
                part_rows.append(Row(
                    suite=row.suite, op=part, case=row.case, params=row.params, provider=name, baseline=base,
                    times=pe.get("times", []), base_times=bp.get("times", []), peak_mb=pe.get("peak_mb"),
                    base_peak_mb=bp.get("peak_mb"), cpu_isa=row.cpu_isa, part=True))
            for g in info.get("goals") or []:
                if g["provider"] != name:
                    continue
                q = _ratio_between(provs, g["vs"], name)
                text = f">={g['min_speedup']:g}x vs {g['vs']}"
                row.goals.append((text, None if q is None else q[0], q is not None and q[0] >= g["min_speedup"]))
                if q is not None:
                    row.goal_spread[text] = q
            mg = info.get("mem_goal")
            if mg and mg["provider"] == name:
                other = provs.get(mg["vs"], {}).get("peak_mb")
                ratio = None if row.peak_mb is None or not other else row.peak_mb / other
                row.goals.append((f"{mg.get('what', 'peak memory')} <={mg['max_ratio']:g}x of {mg['vs']}", ratio,
                                  ratio is not None and ratio <= mg["max_ratio"]))
            eg = info.get("error_goal")
            if eg and eg["provider"] == name:
                err = error_of(row.errors, eg["vs"])
                row.goals.append((f"output error <={eg['max_rel_l2']:g} (rel. L2) vs {eg['vs']}", err,
                                  err is not None and err <= eg["max_rel_l2"]))
            rows.append(row)
        rows.extend(part_rows)
    return rows


def is_speed_goal(text: str) -> bool:
    """Speed goals read ">=2x vs sdpa"; memory and error goals are measured once, without a spread."""
    return text.startswith(">=")


def machine_line(data: dict) -> str:
    """"AMD EPYC (2 cores; avx2, avx512f, avx512_bf16)", with the GPU's name first where there is one:
    for titles and headers. Reads the fields benchmarks/conftest.py adds to ``machine_info``."""
    m = data.get("machine_info", {})
    cpu = m.get("cpu_model") or m.get("cpu", {}).get("brand_raw") or m.get("processor") or "unknown CPU"
    cores = m.get("cpu_cores") or m.get("cpu", {}).get("count", "?")
    isa = m.get("isa")
    isa_s = ", ".join(k for k, v in isa.items() if v) if isinstance(isa, dict) else ""
    text = f"{cpu} ({cores} cores{'; ' + isa_s if isa_s else ''})"
    return f"{m['gpu']} + {text}" if m.get("gpu") else text


def isa_paths_line(data: dict) -> str | None:
    """"available amx, avx512_bf16, avx512, avx2, baseline; this run: avx512" from ``machine_info``
    (None for results recorded before the runtime ISA dispatch was reported)."""
    m = data.get("machine_info", {})
    if "cpu_isas" not in m:
        return None
    avail = ", ".join(m["cpu_isas"]) or "unknown (this build does not report them)"
    if m.get("cpu_isa_error"):
        now = f"forced path cannot run here: {m['cpu_isa_error']}"
    else:
        now = m.get("cpu_isa") or "unknown"
    return f"available {avail}; this run: {now}"


# ------------------------------------------------------------------------------------- report.md
def _fmt_ms(x):
    return "-" if x is None else (f"{x:.1f}" if x >= 10 else f"{x:.2f}")


def _fmt_speedup(q):
    if q is None:
        return "-"
    lo, med, hi = q
    return f"{med:.2f}x ({lo:.2f}-{hi:.2f})"


def render_markdown(data: dict, rows: list[Row]) -> str:
    m = data.get("machine_info", {})
    profile = (data.get("kandinsky") or {}).get("profile", "?")
    commit = data.get("commit_info", {})
    lines = [
        "# kandinsky-kernels benchmark report",
        "",
        f"- Machine: {machine_line(data)}",
        f"- Software: python {m.get('python_version', '?')}, torch {m.get('torch', '?')}, "
        f"triton {m.get('triton', '?')}, numpy {m.get('numpy', '?')}",
        f"- Commit: {commit.get('id', '?')[:12]}{' (dirty)' if commit.get('dirty') else ''}; "
        f"run {data.get('datetime', '?')}; profile {profile}",
        *([f"- ISA paths of our C++ kernels: {isa_paths_line(data)}"] if isa_paths_line(data) else []),
        *([f"- The model's fp32 CPU Linear layers (CrossDiT block rows): "
           f"{_LINEAR_LIBRARIES.get(m['cpu_linear_fp32'], m['cpu_linear_fp32'])}"] if m.get("cpu_linear_fp32") else []),
        "- Method: every provider of a case runs once per round, back to back; speedup = median of "
        "the per-round ratios baseline / provider, with the lower-upper quartile in brackets. A goal "
        "is met only if it holds at the lower quartile.",
        "",
        "| suite | op | case | provider | baseline | baseline ms | ms | speedup | of ideal | peak MB | mem ratio | goal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base_ms = {(r.suite, r.op, r.case): r.median_ms for r in rows if r.is_baseline}
    for r in rows:
        if r.is_baseline:
            continue
        if r.skip is not None:
            lines.append(f"| {r.suite} | {r.op} | {r.case} | {r.label} | {r.baseline} | "
                         f"{_fmt_ms(base_ms.get((r.suite, r.op, r.case)))} | skipped: {r.skip} | - | - | - | - | - |")
            continue
        sp = r.speedup
        of_ideal = f"{sp[1] / r.ideal:.0%}" if sp and r.ideal else "-"
        peak = "-" if r.peak_mb is None else f"{r.peak_mb:.1f}"
        mem = "-" if r.mem_ratio is None else f"{r.mem_ratio:.3f}"
        goal = "; ".join(f"{t}: {'met' if ok else '**missed**'} ({_fmt_goal_value(t, v)})"
                         for t, v, ok in r.goals) or (f"no goal: {r.no_goal}" if r.no_goal else "-")
        if r.errors:
            goal = _fmt_errors(r.errors) if goal == "-" else f"{goal}; {_fmt_errors(r.errors)}"
        lines.append(f"| {r.suite} | {r.op} | {r.case} | {r.label} | {r.baseline} | {_fmt_ms(base_ms.get((r.suite, r.op, r.case)))} | "
                     f"{_fmt_ms(r.median_ms)} | {_fmt_speedup(sp)} | {of_ideal} | {peak} | {mem} | {goal} |")
    met = sum(ok for r in rows for _, _, ok in r.goals)
    total = sum(len(r.goals) for r in rows)
    lines += ["", f"Goals: {met} of {total} met (judged at the pessimistic end of the spread)."]
    tput = throughput(rows)
    if tput:
        lines += ["", "Throughput (median over rounds, quartiles in brackets):", "", *[f"- {t}" for t in tput]]
    lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in PLOTS)]
    return "\n".join(lines) + "\n"


def _fmt_goal_value(text: str, v) -> str:
    if v is None:
        return "-"
    return f"{v:.1e}" if text.startswith("output error") else f"{v:.2f}"


def _fmt_errors(errors: dict) -> str:
    """``rel. L2 error vs diffusers: latents 2.1e-07, video 3.4e-07; vs ...``"""
    parts = [f"vs {other}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) for other, errs in errors.items()]
    return "rel. L2 error " + "; ".join(parts)


def throughput(rows: list[Row]) -> list[str]:
    """"op, provider: N tokens/s (q1-q3)" for every row that records a throughput."""
    out = []
    for r in rows:
        if r.tokens_per_s:
            lo, med, hi = _quartiles(r.tokens_per_s)
            out.append(f"{r.op}, {r.label}: {med:,.0f} tokens/s ({lo:,.0f}-{hi:,.0f})")
    return out


def headline(rows: list[Row]) -> str:
    """The terminal table: every row that carries a goal."""
    out = []
    for r in rows:
        for text, val, ok in r.goals:
            shown = "-" if val is None else f"{val:.2f}"
            if not is_speed_goal(text):
                how = f"measured {_fmt_goal_value(text, val)}"
            else:
                how = f"lower quartile {shown}x, median {_fmt_speedup(r.goal_spread.get(text))}"
            out.append(f"{'met   ' if ok else 'MISSED'}  {r.suite:<28.28} {r.case:<46.46} {r.label:<21.21} "
                       f"{text}: {how}")
    met = sum(ok for r in rows for _, _, ok in r.goals)
    return "\n".join(out + [f"Goals: {met} of {sum(len(r.goals) for r in rows)} met", *throughput(rows)])


# ----------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _no_data(ax, what: str):
    ax.text(0.5, 0.5, f"no {what} in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_attention(data: dict, rows: list[Row], path: str) -> None:
    """Speedup of our attention over each baseline against block density, forward and fwd+bwd, one
    line per (baseline, head dim, dtype), quartile error bars, the ideal 1 / density dashed."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, pas in zip(axes, ("forward", "fwd+bwd")):
        sel = [r for r in rows if r.op == "block_sparse_attention" and r.params.get("pass") == pas
               and not r.is_baseline and r.skip is None and r.speedup and "density" in r.params]
        if not sel:
            _no_data(ax, f"attention {pas} cases")
            ax.set_title(pas)
            continue
        groups: dict = {}
        for r in sel:
            key = (r.label, r.baseline, r.params.get("head_dim"), r.params.get("dtype"))
            groups.setdefault(key, []).append(r)
        # each baseline a line: also ours vs the other competitors (e.g. flex) from the same rounds
        for r in sel:
            if not r.provider.startswith("ours"):
                continue
            for other in [o for o in sel if (o.suite, o.case) == (r.suite, r.case) and o is not r]:
                cp = _pair(r, other)
                if cp:
                    groups.setdefault((r.label, other.provider, r.params.get("head_dim"),
                                       r.params.get("dtype")), []).append(cp)
        for (prov, base, hd, dt), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
            if not prov.startswith("ours"):
                continue
            rs = sorted(rs, key=lambda r: r.params["density"])
            x = [100 * r.params["density"] for r in rs]
            q = [r.speedup for r in rs]
            med = [s[1] for s in q]
            err = [[s[1] - s[0] for s in q], [s[2] - s[1] for s in q]]
            ax.errorbar(x, med, yerr=err, marker="o", capsize=3,
                        label=f"{prov} vs {base}, D={hd}, {dt}")
        dens = sorted({r.params["density"] for r in sel})
        xs = [100 * d for d in dens]
        ax.plot(xs, [1 / d for d in dens], "k--", label="ideal vs dense (1 / density)")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("block density (%)")
        ax.set_title(f"block-sparse attention, {pas}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("speedup (x, median of paired rounds, quartile bars)")
    fig.suptitle(f"Attention speedup vs density - {machine_line(data)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _pair(ours: Row, other: Row) -> Row | None:
    """A row comparing ``ours`` against another (non-baseline) provider of the same case."""
    if not other.times or other.provider.startswith("ours"):
        return None
    return Row(ours.suite, ours.op, ours.case, ours.params, ours.provider, other.provider,
               times=ours.times, base_times=other.times, cpu_isa=ours.cpu_isa)


def plot_nabla(data: dict, rows: list[Row], path: str) -> None:
    """NABLA mask: time and peak memory against sequence length, ours vs the official algorithm."""
    plt = _plt()
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    sel = [r for r in rows if r.op == "nabla_block_mask" and r.skip is None and r.times
           and "seq_len" in r.params]
    if not sel:
        _no_data(ax_t, "NABLA mask cases")
        _no_data(ax_m, "NABLA mask cases")
    groups: dict = {}
    for r in sel:
        groups.setdefault((r.provider, r.params.get("head_dim"), r.params.get("dtype")), []).append(r)
    for (prov, hd, dt), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        rs = sorted(rs, key=lambda r: r.params["seq_len"])
        x = [r.params["seq_len"] for r in rs]
        q = [_quartiles([1e3 * t for t in r.times]) for r in rs]
        ax_t.errorbar(x, [s[1] for s in q], yerr=[[s[1] - s[0] for s in q], [s[2] - s[1] for s in q]],
                      marker="o", capsize=3, label=f"{prov}, D={hd}, {dt}")
        mem = [(r.params["seq_len"], r.peak_mb) for r in rs if r.peak_mb is not None]
        if mem:
            ax_m.plot(*zip(*mem), marker="o", label=f"{prov}, D={hd}, {dt}")
    for ax, ylabel, title in ((ax_t, "time per call (ms, median, quartile bars)", "NABLA mask time"),
                              (ax_m, "peak memory allocated by torch (MB)", "NABLA mask peak memory")):
        if sel:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length S (tokens)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        ax.set_title(title)
    fig.suptitle(f"NABLA block mask vs sequence length - {machine_line(data)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_vae(data: dict, rows: list[Row], path: str) -> None:
    """VAE time and memory: per case (clip, dtype) a bar per provider, encode and decode stacked (median
    seconds, quartile whiskers on the sum); beside it each provider's peak RSS above its RSS before the
    call (encode and decode side by side), measured in the provider's own process."""
    plt = _plt()
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5))
    main = [r for r in rows if r.params.get("vae") and r.skip is None and r.times and not r.part]
    parts = {(r.case, r.provider, r.op): r for r in rows if r.params.get("vae") and r.times and r.part}
    if not main:
        _no_data(ax_t, "VAE cases")
        _no_data(ax_m, "VAE cases")
    cases = list(dict.fromkeys(r.case for r in main))
    provs = list(dict.fromkeys(r.provider for r in main))
    width = 0.8 / max(1, len(provs))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, prov in enumerate(provs):
        color = colors[j % len(colors)]
        for i, case in enumerate(cases):
            r = next((r for r in main if r.case == case and r.provider == prov), None)
            if r is None:
                continue
            x = i + (j - (len(provs) - 1) / 2) * width
            enc = parts.get((case, prov, "VAE encode"))
            dec = parts.get((case, prov, "VAE decode"))
            lab = r.label if i == 0 else None
            if enc and dec:
                e, d = enc.median_ms / 1e3, dec.median_ms / 1e3
                ax_t.bar(x, e, width, color=color, label=lab)
                ax_t.bar(x, d, width, bottom=e, color=color, alpha=0.5, hatch="//")
            else:
                ax_t.bar(x, r.median_ms / 1e3, width, color=color, label=lab)
            lo, med, hi = _quartiles(r.times)
            ax_t.errorbar(x, med, yerr=[[med - lo], [hi - med]], color="k", capsize=3)
            for k, (part, alpha) in enumerate((("VAE encode", 1.0), ("VAE decode", 0.5))):
                pr = parts.get((case, prov, part))
                if pr is not None and pr.peak_mb is not None:
                    ax_m.bar(x - width / 4 + k * width / 2, pr.peak_mb, width / 2, color=color, alpha=alpha,
                             hatch="//" if k else None, label=lab if k == 0 else None)
    if main:
        for ax, ylabel, title in (
                (ax_t, "seconds per call (median; encode solid, decode hatched)", "VAE time: encode + decode"),
                (ax_m, "peak RSS above the RSS before the call (MB)", "VAE peak memory (encode solid, decode hatched)")):
            ax.set_xticks(range(len(cases)))
            ax.set_xticklabels([c.replace(" widths", "") for c in cases], fontsize=8, rotation=10)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_title(title)
            ax.grid(True, axis="y", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"VAE time and memory, each provider in its own process - {machine_line(data)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_summary(data: dict, rows: list[Row], path: str) -> None:
    """Every headline ratio (rows with a speed goal) as a bar: median, quartile whiskers, the goal as
    a tick; green when met at the lower quartile, red when missed."""
    plt = _plt()
    items = []
    for r in rows:
        for text, val, ok in r.goals:
            if not is_speed_goal(text):
                continue
            vs = text.split(" vs ", 1)[1]
            q = r.goal_spread.get(text)
            if q is None:
                continue
            want = float(text[2:].split("x", 1)[0])
            items.append((f"{r.suite}: {r.case[:44]}\n{r.label} vs {vs}", q, want, ok))
    fig, ax = plt.subplots(figsize=(12, max(2.5, 0.55 * len(items) + 1.4)))
    if not items:
        _no_data(ax, "goals")
    for i, (label, (lo, med, hi), want, ok) in enumerate(items):
        ax.barh(i, med, color="tab:green" if ok else "tab:red", alpha=0.8)
        ax.errorbar(med, i, xerr=[[med - lo], [hi - med]], color="k", capsize=3)
        ax.plot([want, want], [i - 0.4, i + 0.4], color="k", lw=2)
    ax.set_yticks(range(len(items)))
    ax.set_yticklabels([it[0] for it in items], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup (x): bar = median, whiskers = quartiles, black tick = goal")
    ax.set_title(f"Headline ratios (green: goal met at the lower quartile)\n{machine_line(data)}", fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# --------------------------------------------------------------------------------------- driver
def write_report(json_path: str, out_dir: str | None = None) -> str:
    """Write ``report.md`` and the plots next to (or into ``out_dir``) and return the text to print:
    the headline table and the paths."""
    with open(json_path) as f:
        data = json.load(f)
    out_dir = out_dir or os.path.dirname(os.path.abspath(json_path))
    os.makedirs(out_dir, exist_ok=True)
    rows = load(data)
    md = os.path.join(out_dir, "report.md")
    with open(md, "w") as f:
        f.write(render_markdown(data, rows))
    paths = [md]
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # e.g. a GPU machine without it: the tables still count
        note = "plots skipped: matplotlib is not installed"
    else:
        note = None
        for name, fn in zip(PLOTS, (plot_attention, plot_nabla, plot_vae, plot_summary)):
            p = os.path.join(out_dir, name)
            fn(data, rows, p)
            paths.append(p)
    lines = [headline(rows), "", "Written:", *[f"  {p}" for p in [json_path, *paths]]]
    return "\n".join(lines + ([note] if note else []))


def main(argv: list[str]) -> int:
    paths = [a for a in argv if not a.startswith("--")]
    if len(paths) != 1 + ("--out" in argv):
        print(__doc__)
        return 2
    out = argv[argv.index("--out") + 1] if "--out" in argv else None
    print(write_report(paths[0], out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
