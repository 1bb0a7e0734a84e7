"""FSDP2 over 2 CPU processes (torchrun, gloo) matches 1 process with the same batches per step, and its
checkpoint resumes in 1 process."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from test_training import ROOT, assert_same_losses, losses, run_train

TIMEOUT = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_two_ranks_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # 1 rank x 2 micro-batches sees the same global batches per step as 2 ranks x 1
    run_train(one, "--max-steps", "4", "optim.grad_accum=2", "checkpoint.every=2",
              "checkpoint.export_ema=False")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "training.train", "--config", "tiny-cpu", "--output", str(two),
           "--max-steps", "3", "log.progress=False", "checkpoint.every=2"]
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert_same_losses(losses(one), losses(two), range(1, 4), rtol=1e-5)
    ckpt = Path(two) / "checkpoints" / "step-00000003"
    assert (ckpt / "COMPLETE").exists()
    # a shard file per rank
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (Path(two) / "ema" / "config.json").exists()
    # resume the 2-rank checkpoint in 1 process (DCP reshards; the loader cursor is global)
    run_train(two, "--max-steps", "4", "optim.grad_accum=2", "checkpoint.every=2")
    assert_same_losses(losses(one), losses(two), range(1, 5), rtol=1e-5)
