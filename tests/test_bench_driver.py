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
    a = _drive(base / "a", "fractal or nabla_block_mask")
    b = _drive(base / "b", "nabla_block_mask")
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
    from kandinsky_kernels import _ext

    assert f"cores, ISA path {_ext.cpu_isa() or 'unknown'}" in text.splitlines()[0], text
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


def test_cpu_isa_request_and_plan():
    from benchmarks import isa

    assert isa.parse_request("all") == ["amx", "avx512_bf16", "avx512", "avx2", "baseline"]
    assert isa.parse_request("avx2, AVX512,avx2") == ["avx512", "avx2"]  # fastest first, once each
    for bad in ("avx3", "", "avx2,,sse"):
        with pytest.raises(ValueError, match="expected 'all' or a comma list"):
            isa.parse_request(bad)
    flags = {"avx2", "fma", "avx512f", "avx512bw", "avx512_bf16"}  # an AMD Zen 4: no AMX
    run, skipped = isa.plan(["amx", "avx512_bf16", "avx512", "avx2"], ["avx512", "avx2", "baseline"], flags)
    assert run == ["avx512", "avx2"]
    assert skipped == {"amx": "this CPU lacks amx_tile, amx_bf16",
                       "avx512_bf16": "this build cannot run it here (its paths: avx512, avx2, baseline)"}
    run, skipped = isa.plan(["avx2"], [], flags)
    assert run == [] and "cpu_isas() is empty" in skipped["avx2"]
    # the build's own reason wins over the guess from the flags
    why = {"amx": "Linux refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)"}
    run, skipped = isa.plan(["amx", "avx2"], ["avx2"], flags | {"amx_tile", "amx_bf16"}, why)
    assert run == ["avx2"] and skipped == why


def test_build_reasons(monkeypatch):
    from benchmarks import isa
    from kandinsky_kernels import _ext

    monkeypatch.setattr(_ext, "cpp_op", lambda name: None)
    assert isa.build_reasons() == {}
    report = ["amx: this CPU lacks AMX-TILE/AMX-BF16 (or the OS does not enable them)", "avx512: ok", "avx2: ok"]
    monkeypatch.setattr(_ext, "cpp_op", lambda name: (lambda: report) if name == "cpu_isa_report" else None)
    assert isa.build_reasons() == {"amx": "this CPU lacks AMX-TILE/AMX-BF16 (or the OS does not enable them)"}


def _fake_results(path: str, isa: str, ours_s: float) -> dict:
    provs = {"sdpa": {"times": [0.1, 0.1, 0.1]}, "ours[cpu]": {"times": [ours_s] * 3, "cpu_isa": isa}}
    info = {"suite": "bsa forward", "op": "block_sparse_attention", "case": "S=4096 fp32 density=10%",
            "params": {"density": 0.1, "cpu_isa": isa}, "baseline": "sdpa", "providers": provs,
            "goals": [{"provider": "ours[cpu]", "vs": "sdpa", "min_speedup": 6.0}]}
    return {"benchmarks": [{"extra_info": info}],
            "machine_info": {"cpu_model": "Fake CPU", "cpu_cores": 2, "cpu_isas": ["avx512", "avx2"],
                             "cpu_isa": isa}}


def test_driver_cpu_isa_runs_one_subprocess_per_path(tmp_path, monkeypatch, capsys):
    import benchmarks.__main__ as driver
    from benchmarks import _util, isa
    from kandinsky_kernels import _ext

    isa_mod = isa
    # the driver sets these for the suites; monkeypatch restores them after the test
    monkeypatch.setenv("KANDINSKY_BENCH_PROFILE", "smoke")
    monkeypatch.setenv("KANDINSKY_BENCH_SMOKE", "1")
    monkeypatch.setattr(_ext, "cpu_isas", lambda: ["avx512_bf16", "avx512", "avx2", "baseline"])
    monkeypatch.setattr(isa, "build_reasons", dict)  # the real build's reasons depend on this machine
    monkeypatch.setattr(_util, "cpu_info", lambda: ("Fake CPU", {"avx2", "fma", "avx512f", "avx512bw",
                                                                 "avx512_bf16"}))
    calls = []

    def fake_run(cmd, cwd=None, env=None):
        out = Path(cmd[cmd.index("--out") + 1])
        isa = env["KANDINSKY_CPU_ISA"]
        calls.append((isa, cmd, env))
        if isa == "baseline":  # as if the path crashed with an illegal instruction
            return subprocess.CompletedProcess(cmd, -4)
        out.mkdir(parents=True)
        ours = {"avx512_bf16": 0.01, "avx512": 0.012, "avx2": 0.05}[isa]
        (out / "results.json").write_text(json.dumps(_fake_results(str(out), isa, ours)))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    out = tmp_path / "run"
    rc = driver.main(["--cpu-isa", "all", "--out", str(out), "-k", "10pct"])
    text = capsys.readouterr().out
    assert rc == 1  # one path failed
    assert [c[0] for c in calls] == ["avx512_bf16", "avx512", "avx2", "baseline"]
    for isa, cmd, env in calls:
        assert cmd[1:] == ["-m", "benchmarks", "--profile", "quick", "--out", str(out / f"isa-{isa}"),
                           "--suite", "attention", "-k", "10pct"]
        assert "KANDINSKY_BENCH_SMOKE" not in env
        # --torch-isa same (the default): torch's own kernels limited to the path's instruction set
        assert {k: env.get(k) for k in isa_mod.TORCH_ISA_ENV[isa]} == isa_mod.TORCH_ISA_ENV[isa]
    assert calls[2][2]["ATEN_CPU_CAPABILITY"] == "avx2" and calls[2][2]["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    meta = json.loads((out / "isa.json").read_text())
    assert meta["torch_isa"] == "same" and meta["ran"]["avx2"]["env"]["ATEN_CPU_CAPABILITY"] == "avx2"
    assert meta["skipped"] == {"amx": "this CPU lacks amx_tile, amx_bf16"}
    assert meta["ran"]["baseline"]["rc"] == -4 and meta["profile"] == "quick"
    md = (out / "report.md").read_text()
    assert md.rstrip() in text and "- Skipped amx: this CPU lacks amx_tile, amx_bf16" in md
    assert "ours[cpu:avx512_bf16] | ours[cpu:avx512] | ours[cpu:avx2] | ours[cpu:baseline] |" in md
    assert ("| bsa forward | S=4096 fp32 density=10% | 100.0 (100.0-100.0) | 10.0 ms · 10.00x sdpa | "
            "12.0 ms · 8.33x sdpa | 50.0 ms · 2.00x sdpa | no results |") in md
    assert "Goals met: avx512_bf16 1 of 1; avx512 1 of 1; avx2 0 of 1; baseline no results" in md
    assert "killed by SIGILL" in md
    assert "torch: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2" in md
    assert "Baselines limited to each path's instruction set" in md

    # every path fine -> 0; the profile is passed on; a path list runs those paths only
    calls.clear()
    rc = driver.main(["--cpu-isa", "avx2,avx512", "--profile", "default", "--out", str(tmp_path / "b")])
    assert rc == 0 and [c[0] for c in calls] == ["avx512", "avx2"]
    assert all(c[1][c[1].index("--profile") + 1] == "default" for c in calls)
    # --torch-isa native: the baselines keep this CPU's best
    calls.clear()
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert driver.main(["--cpu-isa", "avx2", "--torch-isa", "native", "--out", str(tmp_path / "n")]) == 0
    assert "ATEN_CPU_CAPABILITY" not in calls[0][2]
    assert "at this CPU's best" in (tmp_path / "n" / "report.md").read_text()
    # nothing runnable, or a bad name: status 2, no subprocess
    calls.clear()
    monkeypatch.setattr(_ext, "cpu_isas", lambda: [])
    assert driver.main(["--cpu-isa", "all", "--out", str(tmp_path / "c")]) == 2
    assert driver.main(["--cpu-isa", "sse4", "--out", str(tmp_path / "d")]) == 2
    assert calls == [] and "No path ran" in (tmp_path / "c" / "report.md").read_text()
    with pytest.raises(SystemExit):
        driver.main(["--cpu-isa", "all", "--profile", "gpu"])


_INTERRUPTED_SUITE = '''
def test_a(benchmark):
    benchmark.pedantic(lambda: sum(range(100)), rounds=3)


def test_b(benchmark):  # stands for a case hit by the SIGINT of a time limit
    def interrupted():
        raise KeyboardInterrupt
    benchmark.pedantic(interrupted, rounds=3)
'''


def test_an_interrupted_run_keeps_the_finished_cases(tmp_path):
    # scripts/gpu_check.sh stops the bench with SIGINT at its time limit; pytest-benchmark used to die
    # on the interrupted case's empty stats (min([])) before writing any JSON, losing every finished case
    (tmp_path / "test_interrupted.py").write_text(_INTERRUPTED_SUITE)
    code = (
        "import sys, pytest\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from benchmarks._progress import Progress\n"
        "sys.exit(int(pytest.main(['test_interrupted.py', '-q', '-p', 'no:cacheprovider', "
        "'--benchmark-json=r.json'], plugins=[Progress()])))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr  # pytest's "interrupted"
    assert "ValueError" not in proc.stdout + proc.stderr
    assert "interrupted: 1 case(s) with no finished rounds" in proc.stdout
    names = [b["name"] for b in json.loads((tmp_path / "r.json").read_text())["benchmarks"]]
    assert names == ["test_a"]
