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


def test_missing_measurements_print_dashes():
    rows = [r for r in _rows() if r["provider"] not in ("flex", "ours-atomic")]
    rows[-1].pop("ms")  # ours fwd+bwd skipped by the time budget
    fwd, fwdbwd = table(rows).splitlines()[1:]
    assert fwd.split()[3:9] == ["12.500", "-", "100.000", "8.00", "-", "-"]  # no flex
    assert fwdbwd.split()[3:] == ["-", "-", "350.000", "-", "-", "-", "8.0"] + ["-"] * 5
