"""benchmarks/gpu_timing.py on the CPU: the arithmetic of its table (which the GPU session's goals are
read from), the order of its measurements, and its sampled gradient check (synthetic rows and small
shapes, no timing)."""
from __future__ import annotations

import pytest
import torch

from benchmarks.gpu_timing import _sampled_grad_error, autotune_choices, table
from kandinsky_kernels.mask import BlockSparseMask
from kandinsky_kernels.reference.attention import block_sparse_attention_reference


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


@pytest.mark.parametrize("chunk", [4096, 128], ids=["one-chunk", "partial-last-chunk"])
def test_sampled_grad_error_finds_wrong_blocks(chunk):
    """Exact gradients score ~0; a 1 % error in one sampled block of dq, dk or dv shows as ~1e-2."""
    s, h, d = 320, 3, 16
    torch.manual_seed(0)
    blocks = torch.rand(1, h, 5, 5) < 0.4
    blocks |= torch.eye(5, dtype=torch.bool)
    mask = BlockSparseMask.from_dense_blocks(blocks, 64)
    q, k, v, do = (torch.randn(1, s, h, d, dtype=torch.float64) for _ in range(4))
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    grads = torch.autograd.grad(block_sparse_attention_reference(*ins, mask, scale=0.3), ins, do)
    bhsd = [t.transpose(1, 2).float() for t in (q, k, v, do)]
    exact = [g.transpose(1, 2).float().contiguous() for g in grads]
    errs = _sampled_grad_error(exact, *bhsd, mask, 0.3, chunk=chunk)
    assert max(errs.values()) < 1e-5, errs
    # middle query block of head 0, last key block of the last head, first key block of head 0
    for i, (head, rows) in enumerate([(0, slice(128, 192)), (h - 1, slice(256, 320)), (0, slice(0, 64))]):
        wrong = [g.clone() for g in exact]
        wrong[i][0, head, rows] *= 1.01
        errs = _sampled_grad_error(wrong, *bhsd, mask, 0.3, chunk=chunk)
        name = ("dq", "dk", "dv")[i]
        assert 2e-3 < errs[name] < 2e-2 and all(e < 1e-5 for n, e in errs.items() if n != name), (name, errs)


def test_autotune_choices_are_recorded(monkeypatch):
    """The JSON keeps what the autotuner chose per kernel and key, each key with its own tuning's timings
    (a tuner keeps only its last ones)."""
    import json
    from types import SimpleNamespace

    from benchmarks import gpu_timing
    from kandinsky_kernels.ops import _bsa_triton as m

    monkeypatch.setattr(gpu_timing, "_autotune_seen", {})
    k64, k128 = (64, 64, False, False, "torch.bfloat16"), (128, 64, False, False, "torch.bfloat16")
    fwd = SimpleNamespace(cache={k64: "w8"},
                          configs_timings={"w8": [1.0, 0.9, 1.1], "w4": [float("inf")] * 3})
    monkeypatch.setattr(m, "_fwd_tuned", fwd, raising=False)
    monkeypatch.setattr(m, "_dq_tuned", SimpleNamespace(cache={}), raising=False)
    got = autotune_choices()
    assert got["fwd"] == {str(k64): {"chosen": "w8", "timings_ms": {"w8": [1.0, 0.9, 1.1],
                                                                      "w4": [float("inf")] * 3}}}
    assert got["dq"] == {}
    fwd.cache[k128] = "w4"
    fwd.configs_timings = {"w8": [3.0] * 3, "w4": [2.0] * 3}
    got = autotune_choices()
    assert got["fwd"][str(k64)]["timings_ms"]["w8"] == [1.0, 0.9, 1.1]  # not overwritten by the D=128 tuning
    assert got["fwd"][str(k128)] == {"chosen": "w4", "timings_ms": {"w8": [3.0] * 3, "w4": [2.0] * 3}}
    json.dumps(got)  # what Run.save writes
