"""Ulysses sequence parallelism (training/parallelize.py) on 2 CPU processes (gloo): the same loss and
gradients as one process, for dense SDPA and NABLA, one video per sample and packed videos; exactly 2
all-to-alls per block forward and 2 backward, with and without activation checkpointing; the mesh's
errors; ``python -m training.train --sp 2`` against one process; HSDP with 4 processes (with and
without sp) against one process.

Every multi-process test has a deadline (workers are killed after it) and a gloo timeout, so a hang
fails instead of blocking the suite.
"""
from __future__ import annotations

import copy
import datetime
import os
import socket
import subprocess
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from kandinsky_model import CrossDiT, preset
from kandinsky_model.config import NablaConfig
from training.config import ParallelConfig, apply_overrides, get_config
from training.parallelize import ParallelDims, UlyssesSP, install_block_runner
from test_training import ROOT, assert_same_losses, losses, run_train

TIMEOUT = 180
SP = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, port: int, out_dir: str, timeout: float = TIMEOUT) -> None:
    """Run ``fn(rank, port, out_dir)`` on SP processes; fail (and kill them) past ``timeout``."""
    ctx = mp.spawn(_worker, args=(fn, port, out_dir), nprocs=SP, join=False)
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise AssertionError(f"{fn.__name__} did not finish within {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def _worker(rank, fn, port, out_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=SP,
                            timeout=datetime.timedelta(seconds=120))
    try:
        fn(rank, out_dir)
    except BaseException:
        # the parent sees only the exit code: keep the traceback for the assertion message
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------- model-level parity
def _config(backend: str):
    # NABLA without the STA window and at P = 0.5 on 4 blocks per frame: a really sparse mask
    return preset("tiny", nabla=NablaConfig(threshold=0.5, add_sta=False)) if backend == "nabla" else preset("tiny")


def _inputs(packed: bool, backend: str):
    g = torch.Generator().manual_seed(1)
    c = _config(backend)
    side = 32 if backend == "nabla" else 8  # NABLA: 16 x 16 tokens per frame = 4 blocks of 64
    if packed:  # 2 videos of 1 and 2 frames: S/2 ends inside a frame and inside video 1
        x = torch.randn(1, 3, side, side, c.in_channels, generator=g)
        n, kwargs = 2, {"cu_frames": [0, 1, 3]}
    else:
        x = torch.randn(2, 2, side, side, c.in_channels, generator=g)
        n, kwargs = 2, {}
    text = torch.randn(n, 5, c.in_text_dim, generator=g)
    mask = torch.ones(n, 5, dtype=torch.bool)
    mask[1, 3:] = False  # padded text keys must stay masked per video
    pooled = torch.randn(n, c.in_text_dim2, generator=g)
    timestep = torch.tensor([300.0, 800.0])
    return (x, text, pooled, timestep, mask), {"attention_backend": backend, **kwargs}


def _model(backend: str) -> CrossDiT:
    torch.manual_seed(0)
    model = CrossDiT(_config(backend))
    with torch.no_grad():  # the modulations start at zero (identity blocks): make them matter
        for name, p in model.named_parameters():
            if "modulation" in name:
                p.normal_(0, 0.05)
    return model


def _loss_and_grads(model, args, kwargs):
    model.zero_grad(set_to_none=True)
    out = model(*args, **kwargs)
    loss = (out.float() ** 2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


class CountAllToAll(TorchDispatchMode):
    """Counts the functional all-to-alls that run (plain and autograd-visible). A recompute that
    reuses a saved output is not counted: the checkpoint's mode answers it before this one sees it.
    (``CommDebugMode`` counts the same ops, but its module tracker raises KeyError in backward with
    the block stack used here.)"""

    OPS = (torch.ops._c10d_functional.all_to_all_single, torch.ops._c10d_functional_autograd.all_to_all_single)

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _check_parity(rank, out_dir):
    group = dist.group.WORLD
    report = []
    for backend in ("sdpa", "nabla"):
        for packed in (False, True):
            args, kwargs = _inputs(packed, backend)
            ref = _model(backend)
            loss_ref, grads_ref = _loss_and_grads(ref, args, kwargs)
            if backend == "nabla":  # the masks the comparison covers are sparse
                masks = []
                with torch.no_grad():
                    ref.run_visual_blocks(ref.prepare(*args, record_masks=masks, **kwargs))
                dense = sum((b - a) ** 2 for a, b in zip([0, 4], [4, 12])) if packed else 8 * 8
                kept = [m.kv_num_blocks.sum(-1).float().mean().item() / dense for m in masks]
                assert max(kept) < 0.9, f"NABLA masks keep {kept} of the blocks: not sparse"
            for ac in (False, True):
                model = install_block_runner(copy.deepcopy(ref), UlyssesSP(group, SP, rank), ac)
                model.zero_grad(set_to_none=True)
                with CountAllToAll() as fwd:
                    out = model(*args, **kwargs)
                    loss = (out.float() ** 2).mean()
                with CountAllToAll() as bwd:
                    loss.backward()
                case = f"{backend} packed={packed} ac={ac}"
                blocks = len(model.visual_transformer_blocks)
                n_fwd, n_bwd = fwd.count, bwd.count
                assert (n_fwd, n_bwd) == (2 * blocks, 2 * blocks), \
                    f"{case}: all-to-alls forward {n_fwd}, backward {n_bwd}; expected {2 * blocks} each"
                rel = abs(loss.item() - loss_ref.item()) / abs(loss_ref.item())
                assert rel <= 1e-5, f"{case}: loss {loss.item()} vs one process {loss_ref.item()}"
                # each sp rank's gradients are shares of sp x the gradient (see _GatherTokens)
                worst = 0.0
                for name, p in model.named_parameters():
                    grad = p.grad.clone()
                    dist.all_reduce(grad)
                    grad /= SP
                    err = (grad - grads_ref[name]).norm() / grads_ref[name].norm().clamp_min(1e-30)
                    worst = max(worst, err.item())
                    assert err <= 1e-5, f"{case}: gradient of {name} off by {err:.2e} (relative L2)"
                report.append(f"{case}: loss rel {rel:.1e}, worst grad rel {worst:.1e}, a2a {n_fwd}+{n_bwd}"
                              + (f", blocks kept {max(kept):.2f}" if backend == "nabla" else ""))
    if rank == 0:
        with open(os.path.join(out_dir, "report.txt"), "w") as f:
            f.write("\n".join(report))


def test_ulysses_matches_one_process_and_counts_all_to_alls(tmp_path):
    try:
        _spawn(_check_parity, _free_port(), str(tmp_path))
    except Exception as e:
        errors = "".join(p.read_text() for p in tmp_path.glob("error*.txt"))
        raise AssertionError(f"{e}\n{errors}") from None
    print((tmp_path / "report.txt").read_text())


# -------------------------------------------------------------------------------------- mesh errors
def test_mesh_and_divisibility_errors():
    assert ParallelDims.from_config(ParallelConfig(sp=2), 4, num_heads=2) == ParallelDims(1, 2, 2)
    assert ParallelDims.from_config(ParallelConfig(sp=2, replicate=2), 8, num_heads=4) == ParallelDims(2, 2, 2)
    with pytest.raises(ValueError, match=r"world size 3 is not divisible by .* = 1 x 2 = 2"):
        ParallelDims.from_config(ParallelConfig(sp=2), 3)
    with pytest.raises(ValueError, match=r"world size 4 is not divisible by .* 3 x 1 = 3"):
        ParallelDims.from_config(ParallelConfig(replicate=3), 4)
    with pytest.raises(ValueError, match="parallel.sp = 4 must divide the model's 2 attention heads"):
        ParallelDims.from_config(ParallelConfig(sp=4), 4, num_heads=2)
    with pytest.raises(ValueError, match="parallel.sp"):
        ParallelConfig(sp=0)
    # the training config knows the heads: tiny-cpu has 2
    with pytest.raises(ValueError, match="parallel.sp = 4 must divide the model's 2 attention heads"):
        apply_overrides(get_config("tiny-cpu"), ["parallel.sp=4"])
    # a batch whose token count does not split: checked before any communication (no group needed)
    model = CrossDiT(preset("tiny"))
    state = model.prepare(torch.randn(1, 1, 2, 6, model.config.in_channels), torch.randn(1, 3, 48),
                          torch.randn(1, 24), torch.tensor([500.0]))  # 1 x 1 x 3 = 3 tokens
    with pytest.raises(ValueError, match=r"S = 3 tokens .* not a multiple of 2"):
        UlyssesSP(None, 2, 0).shard(state, model.config.num_heads)
    with pytest.raises(ValueError, match="needs the heads to divide: the model has 3 heads"):
        UlyssesSP(None, 2, 0).shard(state, 3)


# ------------------------------------------------------------------------------------------ the CLI
def _torchrun(output, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(SP),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "training.train", "--config", "tiny-cpu", "--output", str(output),
           "log.progress=False", "checkpoint.export_ema=False", *args]
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.parametrize("attention", ["sdpa", "nabla"])
def test_train_sp2_matches_one_process(tmp_path, attention):
    """``--sp 2`` on 2 processes (FSDP2 over shard x sp, the 2 ranks on the same packed batches) gives
    the losses of one process: step 1 within 1e-5 relative, the next steps too (they depend on the
    gradients). The sdpa run also checkpoints every block."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--max-steps", "3", f"model.attention={attention}", "checkpoint.every=0"]
    run_train(one, *common, "checkpoint.export_ema=False")
    extra = ["parallel.activation_checkpointing=True"] if attention == "sdpa" else []
    _torchrun(two, "--sp", "2", *common, *extra)
    assert_same_losses(losses(one), losses(two), range(1, 4), rtol=1e-5)


@pytest.mark.parametrize("sp", [1, 2])
def test_hsdp_four_ranks_match_one_process(tmp_path, sp):
    """4 processes on a (replicate 2, shard 2 / sp, sp) mesh: HSDP, FSDP2 on the 2-D (replicate,
    shard x sp) mesh. One process with grad_accum = 4 / sp sees the same batches per step (the loader
    shards by the data-parallel rank, so both sp ranks of a batch read it)."""
    one, four = tmp_path / "one", tmp_path / "four"
    common = ["--max-steps", "3", "checkpoint.every=0", "checkpoint.export_ema=False"]
    run_train(one, *common, f"optim.grad_accum={4 // sp}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "training.train", "--config", "tiny-cpu", "--output", str(four), "log.progress=False",
           "--sp", str(sp), "parallel.replicate=2", *common]
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert_same_losses(losses(one), losses(four), range(1, 4), rtol=1e-5)
