"""The GPU check's Python stages (scripts/*_gpu_check.py) in their CPU modes, and gpu_check.sh's syntax:
they run only in the rare sessions that have a GPU, so API drift in them would otherwise surface there,
costing that session's device minutes (on 2026-12-04 two stages of the first H200 run were lost to
problems a CPU run would have shown)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)  # the scripts run as gpu_check.sh runs them
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_gpu_check_sh_parses():
    proc = subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_vae_gpu_check_parity_step_on_cpu(tmp_path):
    """Step 2 of scripts/vae_gpu_check.py (ours vs diffusers, untiled fp32) at a toy size."""
    pytest.importorskip("diffusers")
    proc = _run([sys.executable, "scripts/vae_gpu_check.py", "--dry-run-cpu", "--frames", "5", "--height", "32",
                 "--width", "32", "--steps", "parity", "--out-dir", str(tmp_path)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    parity = json.loads((tmp_path / "vae_gpu.json").read_text())["parity_fp32_untiled"]
    row = parity[0] if isinstance(parity, list) else parity
    assert row["encode_rel_l2"] < 1e-4 and row["decode_rel_l2"] < 1e-3, row


def test_offload_gpu_check_on_cpu(tmp_path):
    """scripts/offload_gpu_check.py with the tiny preset on CPU: both runs, the profile summary and the
    gradient comparison are written (the copies themselves need a GPU)."""
    proc = _run([sys.executable, "scripts/offload_gpu_check.py", "--out-dir", str(tmp_path), "--preset", "tiny",
                 "--blocks", "4", "--grid", "5", "8", "8", "--device", "cpu"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((tmp_path / "offload_gpu.json").read_text())
    assert not data["errors"], data["errors"]
    assert data["ac"]["loss"] == data["ac_offload"]["loss"]
    assert data["ac_offload"]["grad_max_rel_diff_vs_ac"] == 0.0  # same arithmetic on CPU: bit for bit
    assert set(data["profile"]) >= {"DtoH", "HtoD", "compute_ms"}
