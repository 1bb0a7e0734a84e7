"""Training throughput of the bundled harness on CPU: ``tiny-cpu`` in 1 process (baseline) and in 2
processes under FSDP2 (``torchrun``, gloo), the same global batch per step (1 process accumulates
two micro-batches where 2 processes take one each).

Each call is one short run into a fresh folder, so its time includes start-up (imports, process
group, synthetic shards); the steady-state figure is ``tokens_per_s``, recorded per provider and
round from the run's ``metrics.jsonl`` (global tokens over step time, steps after the first two)
and listed by the report. On this 2-core host the 2-process run splits the same cores, so it shows
what FSDP2's communication costs rather than a scaling gain.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._util import Provider, by_profile, run_case, skip_cpu_suite_in_gpu_profile

skip_cpu_suite_in_gpu_profile()

ROOT = Path(__file__).resolve().parents[1]
STEPS = by_profile(smoke=3, quick=6, default=12)
ROUNDS = by_profile(smoke=1, quick=1, default=3)
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(procs: int, tokens_per_s: list) -> None:
    with tempfile.TemporaryDirectory(prefix="kk_bench_train_") as out:
        common = ["--config", "tiny-cpu", "--output", out, "--max-steps", str(STEPS), "log.progress=False",
                  "log.plot=False", "checkpoint.every=1000", "checkpoint.export_ema=False"]
        if procs == 1:
            cmd = [sys.executable, "-m", "training.train", *common, "optim.grad_accum=2"]
            env = dict(os.environ)
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
                   "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                   "-m", "training.train", *common]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        if res.returncode != 0:
            raise RuntimeError(f"{cmd} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        steady = [r for r in rows if r["step"] > 2] or rows
        tokens = sum(r["tokens_per_s"] * r["step_time"] for r in steady)
        tokens_per_s.append(tokens / sum(r["step_time"] for r in steady))


def test_training_tokens_per_s(benchmark):
    rates = {"1 process": [], "2 processes (FSDP2)": []}
    info = run_case(
        benchmark,
        suite="training tokens/s (CPU)",
        op="training tiny-cpu",
        case=f"tiny-cpu, {STEPS} steps per run incl. start-up, global batch of 2 micro-batches",
        baseline="1 process",
        providers=[Provider("1 process", lambda: _run(1, rates["1 process"])),
                   Provider("2 processes (FSDP2)", lambda: _run(2, rates["2 processes (FSDP2)"]))],
        params={"steps": STEPS},
        rounds=ROUNDS,
        warmup_rounds=0,
    )
    for name, rs in rates.items():
        info["providers"][name]["tokens_per_s"] = rs
