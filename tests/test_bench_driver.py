"""The bench driver (``python -m benchmarks``), its progress lines, metadata, ``run_case`` and
``benchmarks.compare``, on the smoke profile (toy shapes, seconds)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ISA = ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_tile", "amx_bf16")


def _drive(out: Path, keyword: str) -> subprocess.CompletedProcess:
    drop = ("KANDINSKY_BENCH_SMOKE", "KANDINSKY_BENCH_PROFILE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return subprocess.run([sys.executable, "-m", "benchmarks", "--profile", "smoke", "--out", str(out),
                           "-k", keyword], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("bench")
    a = _drive(base / "a", "fractal or nabla")
    b = _drive(base / "b", "nabla")
    return (base / "a", a), (base / "b", b)


def test_driver_writes_results_with_metadata(runs):
    (out, proc), _ = runs
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((out / "results.json").read_text())
    m = data["machine_info"]
    assert m["cpu_model"]
    assert set(m["isa"]) == set(ISA) and all(isinstance(v, bool) for v in m["isa"].values())
    assert m["cpu_cores"] >= 1 and m["torch"] and "numpy" in m and "triton" in m and "gpu" in m
    from kandinsky_kernels import _ext

    assert m["cpu_isas"] == _ext.cpu_isas() and m["cpu_isa"] == _ext.cpu_isa()
    assert data["commit_info"].get("id"), data["commit_info"]
    assert data["kandinsky"]["profile"] == "smoke"
    suites = {b["extra_info"]["suite"] for b in data["benchmarks"]}
    assert suites == {"fractal_flatten", "fractal_unflatten", "nabla_block_mask"}
    for b in data["benchmarks"]:
        info = b["extra_info"]
        assert info["profile"] == "smoke" and info["rounds"] == 1 and info["params"]
        ran = {p: e for p, e in info["providers"].items() if "skip" not in e}
        assert info["baseline"] in ran
        assert all(len(e["times"]) == 1 and e["times"][0] > 0 for e in ran.values()), info
        if info["suite"] == "nabla_block_mask":
            assert all(e["peak_mb"] is not None for e in ran.values())
    assert (out / "progress.log").exists()
    assert (out / "report.md").exists()  # written by benchmarks.report.write_report


def test_driver_prints_one_progress_line_per_case(runs):
    (_, proc), _ = runs
    lines = [ln for ln in proc.stdout.splitlines() if re.match(r"\[\s*\d+/3\] ", ln)]
    assert len(lines) == 3, proc.stdout
    nabla = r"nabla_block_mask \| .* \| ours\[cpu\] [\d.]+x vs official"
    fractal = r"fractal_flatten \| .*ours\[cpu\] [\d.]+x, ours\[reference\] [\d.]+x vs torch.clone"
    assert any(re.search(nabla, ln) for ln in lines), lines
    assert any(re.search(fractal, ln) for ln in lines), lines
    assert not re.search(r"^\.+\s", proc.stdout, re.M), "pytest's per-test dots should be off"
    assert "wall time:" in proc.stdout


def test_compare_two_runs(runs, capsys):
    from benchmarks import compare

    (a, pa), (b, pb) = runs
    assert pa.returncode == 0 and pb.returncode == 0, pb.stdout + pb.stderr
    assert compare.main([str(a), str(b)]) == 0
    text = capsys.readouterr().out
    nabla = [ln for ln in text.splitlines() if ln.startswith("nabla_block_mask") and "ours[cpu]" in ln]
    assert len(nabla) == 1 and re.search(r"\d+\.\d\dx\s+\d+\.\d\dx$", nabla[0]), text
    assert "only in A" in text  # the fractal cases ran in A only
    assert compare.main([str(a)]) == 2


class _FakeBenchmark:
    """pytest-benchmark's fixture as run_case uses it: ``pedantic`` runs warm-up rounds then rounds, or
    the function once when disabled (``--benchmark-disable``)."""

    def __init__(self, disabled: bool):
        self.disabled, self.extra_info, self.group = disabled, {}, None

    def pedantic(self, fn, rounds, warmup_rounds, iterations):
        for _ in range(1 if self.disabled else warmup_rounds + rounds):
            fn()


@pytest.mark.parametrize("disabled", [False, True])
def test_run_case_interleaves_providers(disabled, monkeypatch):
    from benchmarks import _util
    from benchmarks._util import Provider, run_case

    monkeypatch.setattr(_util, "SMOKE", False)
    calls = []
    providers = [Provider("base", lambda: calls.append("base")), Provider("x", lambda: calls.append("x")),
                 Provider("off", skip="not here")]
    goals = [{"provider": "x", "vs": "base", "min_speedup": 1.0}]
    info = run_case(_FakeBenchmark(disabled), suite="s", op="o", case="c", baseline="base",
                    providers=providers, rounds=3, warmup_rounds=1, goals=goals)
    n = 1 if disabled else 3
    assert list(info["providers"]) == ["base", "x", "off"]
    assert info["providers"]["off"] == {"skip": "not here"}
    assert len(info["providers"]["base"]["times"]) == len(info["providers"]["x"]["times"]) == n
    assert info["rounds"] == n and info["goals"]
    if not disabled:  # one warm-up round, then 3; the order alternates between rounds
        assert calls == ["base", "x", "x", "base", "base", "x", "x", "base"]
    with pytest.raises(ValueError, match="baseline"):
        run_case(_FakeBenchmark(disabled), suite="s", op="o", case="c", baseline="off", providers=providers)


def test_latest_link_and_summary(tmp_path, monkeypatch):
    import benchmarks.__main__ as driver
    from benchmarks._progress import summarize

    monkeypatch.setattr(driver, "RESULTS_ROOT", tmp_path)
    first = driver._new_dir()
    first.mkdir()
    second = driver._new_dir()
    assert second != first and second.parent == tmp_path
    second.mkdir()
    driver._point_latest(first)
    driver._point_latest(second)
    assert (tmp_path / "latest").resolve() == second.resolve()
    driver._point_latest(tmp_path / "elsewhere" / "x")  # not a folder of the results root: left alone
    assert (tmp_path / "latest").resolve() == second.resolve()

    info = {"suite": "bsa forward", "case": "S=1", "baseline": "sdpa",
            "providers": {"sdpa": {"times": [4.0, 6.0, 5.0]}, "flex": {"skip": "no"},
                          "ours[cpu]": {"times": [1.0, 2.0, 2.5]}}}
    assert summarize(info) == "bsa forward | S=1 | ours[cpu] 3.00x vs sdpa | skipped: flex"


# ------------------------------------------------------------------ ISA paths (issue 13)
def test_run_case_records_the_isa_path_and_no_goal(monkeypatch):
    from benchmarks import _util
    from benchmarks._util import Provider, run_case

    monkeypatch.setattr(_util, "SMOKE", False)
    providers = [Provider("sdpa", lambda: None), Provider("ours[cpu]", lambda: None, cpu_isa="avx2"),
                 Provider("ours[gone]", skip="forced path", cpu_isa="amx")]
    info = run_case(_FakeBenchmark(False), suite="s", op="o", case="c", baseline="sdpa", providers=providers,
                    rounds=2, warmup_rounds=0, no_goal="bf16 goals need avx512_bf16 or amx")
    assert "cpu_isa" not in info["providers"]["sdpa"]
    assert info["providers"]["ours[cpu]"]["cpu_isa"] == "avx2"
    assert info["providers"]["ours[gone]"] == {"skip": "forced path", "cpu_isa": "amx"}
    assert info["no_goal"] == "bf16 goals need avx512_bf16 or amx"


def test_cpu_isa_now(monkeypatch):
    from benchmarks._util import cpu_isa_now
    from kandinsky_kernels import _ext

    monkeypatch.setattr(_ext, "cpu_isa", lambda: None)  # a build without the runtime dispatch
    assert cpu_isa_now() == ("unknown", None)
    monkeypatch.setattr(_ext, "cpu_isa", lambda: "avx512")
    assert cpu_isa_now() == ("avx512", None)

    def refuse():
        raise RuntimeError("KANDINSKY_CPU_ISA=amx: this CPU has no AMX")

    monkeypatch.setattr(_ext, "cpu_isa", refuse)
    monkeypatch.setenv("KANDINSKY_CPU_ISA", "amx")
    assert cpu_isa_now() == ("amx", "KANDINSKY_CPU_ISA=amx: this CPU has no AMX")


def test_attention_goals_per_isa_path():
    from benchmarks import test_bench_attention as suite

    fp32 = {isa: suite._goals(0.10, "forward", "fp32", isa) for isa in ("amx", "avx2", "baseline", "unknown")}
    for goals, why in fp32.values():  # fp32 goals on every path
        assert {(g["vs"], g["min_speedup"]) for g in goals} == {("sdpa", 6.0), (suite.FLEX, 2.0)}
        assert why is None
    for isa in ("amx", "avx512_bf16"):
        goals, why = suite._goals(0.10, "forward", "bf16", isa)
        assert [(g["vs"], g["min_speedup"]) for g in goals] == [("sdpa", 6.0)] and why is None
        goals, why = suite._goals(0.10, "fwd+bwd", "bf16", isa)
        assert [(g["vs"], g["min_speedup"]) for g in goals] == [("sdpa", 4.0)] and why is None
    for isa in ("avx512", "avx2", "baseline", "unknown"):
        for mode in ("forward", "fwd+bwd"):
            goals, why = suite._goals(0.10, mode, "bf16", isa)
            assert goals == [] and why and isa in why
    assert suite._goals(0.25, "forward", "bf16", "amx") == ([], None)
    assert suite._goals(0.25, "forward", "fp32", "avx2") == ([], None)
