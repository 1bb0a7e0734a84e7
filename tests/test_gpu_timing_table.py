"""The arithmetic of benchmarks/gpu_timing.py's table, which the GPU session's goals are read from
(CPU only: synthetic rows, no timing)."""
from __future__ import annotations

from benchmarks.gpu_timing import table


def _rows():
    rows = [
        {"model": "lite", "density": 1.0, "pass": "fwd", "provider": "sdpa", "ms": 100.0, "flops": 1e12},
        {"model": "lite", "density": 1.0, "pass": "fwd+bwd", "provider": "sdpa", "ms": 350.0, "flops": 1e12},
    ]
    for p, prov, ms in [("fwd", "ours", 12.5), ("fwd", "flex", 20.0), ("fwd+bwd", "ours", 50.0),
                        ("fwd+bwd", "flex", 60.0), ("fwd+bwd", "ours-atomic", 40.0)]:
        rows.append({"model": "lite", "density": 0.1, "real_density": 0.125, "pass": p, "provider": prov,
                     "ms": ms, "flops": 1.25e11})
    return rows


def test_ratios_and_backward_over_forward():
    lines = table(_rows()).splitlines()
    header, fwd, fwdbwd = lines
    assert header.split()[:4] == ["model", "dens", "pass", "ours"]
    assert len(lines) == 3  # one line per (model, density, pass); sdpa and ours-atomic are columns
    # fwd: x sdpa 8.00, x flex 1.60, flex x sdpa 5.00, ideal 1/0.125 = 8.0, fraction 1.00, 10 TFLOP/s
    assert fwd.split()[3:12] == ["12.500", "20.000", "100.000", "8.00", "1.60", "5.00", "8.0", "1.00", "10.0"]
    assert fwd.split()[12:] == ["-", "-", "-"]
    # fwd+bwd: backward alone (50 - 12.5) / 12.5 = 3.00x the forward; atomic (40 - 12.5) / 12.5 = 2.20x
    assert fwdbwd.split()[3:9] == ["50.000", "60.000", "350.000", "7.00", "1.20", "5.83"]
    assert fwdbwd.split()[-3:] == ["3.00", "40.000", "2.20"]


def test_rows_sorted_by_model_then_density():
    """gpu_timing measures the goals' density of every model first; the table still reads in order."""
    rows = _rows()
    late = [dict(r, density=0.05, real_density=0.0625) for r in rows[2:]]
    pro = [dict(r, model="pro") for r in rows]
    keys = [tuple(line.split()[:3]) for line in table(rows + pro + late).splitlines()[1:]]
    assert keys == [("lite", "0.05", "fwd"), ("lite", "0.05", "fwd+bwd"), ("lite", "0.1", "fwd"),
                    ("lite", "0.1", "fwd+bwd"), ("pro", "0.1", "fwd"), ("pro", "0.1", "fwd+bwd")]


def test_missing_measurements_print_dashes():
    rows = [r for r in _rows() if r["provider"] not in ("flex", "ours-atomic")]
    rows[-1].pop("ms")  # ours fwd+bwd skipped by the time budget
    fwd, fwdbwd = table(rows).splitlines()[1:]
    assert fwd.split()[3:9] == ["12.500", "-", "100.000", "8.00", "-", "-"]  # no flex
    assert fwdbwd.split()[3:] == ["-", "-", "350.000", "-", "-", "-", "8.0"] + ["-"] * 5


def test_main_measures_the_goal_density_of_every_model_first(monkeypatch, tmp_path):
    import benchmarks.gpu_timing as gt

    calls = []
    real_init = gt.Run.__init__

    def init_without_cuda(self, args):  # Run.__init__ asks CUDA for the device name
        monkeypatch.setattr(gt.torch.cuda, "get_device_name", lambda: "none")
        real_init(self, args)

    monkeypatch.setattr(gt.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gt.Run, "__init__", init_without_cuda)
    monkeypatch.setattr(gt, "bench_model", lambda run, *args: calls.append(args))
    monkeypatch.setattr("sys.argv", ["gpu_timing.py", "--out-dir", str(tmp_path)])
    gt.main()
    assert calls == [("lite", 93_696, [0.1], True), ("pro", 93_696, [0.1], True),
                     ("lite", 93_696, [0.05, 0.25, 0.5], False), ("pro", 93_696, [0.05, 0.25, 0.5], False)]
    assert (tmp_path / "gpu_timing_table.txt").exists()
