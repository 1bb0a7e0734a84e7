"""Flow-matching training of the CrossDiT on latent shards, FSDP2, async DCP checkpoints.

    python -m training.train --config tiny-cpu --max-steps 20 --output runs/tiny \\
        [--data PATH_OR_URL] [key=value ...]
    torchrun --nproc-per-node 2 -m training.train --config tiny-cpu --output runs/tiny2

Without ``--data`` the config's synthetic set is written into ``<output>/data`` (once). Running again
with the same ``--output`` resumes from the newest complete checkpoint and continues to
``--max-steps``. Writes ``metrics.jsonl`` (step, loss, lr, tokens_per_s, step_time, grad_norm, task)
and, at the end, ``loss.png`` (if matplotlib imports) and the EMA weights in ``ema/`` (the
``CrossDiT.from_pretrained`` folder format).

Per optimizer step, rank r of W processes ``grad_accum`` micro-batches (global batches
``(step * A + m) * W + r``); the loss is the mean over micro-batches and ranks. Batch randomness is
seeded by the global batch id (see :mod:`training.objective`), so W = 2 with A = 1 sees the same
batches per step as W = 1 with A = 2. With ``--sp N`` (``parallel.sp``) W counts data-parallel
ranks (world / N): the N sequence-parallel ranks of one batch read the same batch and each runs the
blocks on 1/N of its tokens (:mod:`training.parallelize`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from tqdm import tqdm

from .checkpoint import CheckpointError, Checkpointer, export_ema
from .config import TrainConfig, apply_overrides, get_config
from .data import LatentLoader, write_synthetic
from .data.shards import MANIFEST, ShardError
from .objective import build_batch, flow_loss
from .parallelize import (
    ParallelDims,
    build_mesh,
    build_sharded_dit,
    init_distributed,
    mixed_precision_policy,
)

KILL_ENV = "KANDINSKY_TRAIN_KILL_AFTER_SAVE"
"""Test hook: ``os._exit`` right after the async save of this step started (a crash mid-save)."""


def parse_args(argv=None) -> tuple[argparse.Namespace, TrainConfig]:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="registered config (training.config.REGISTRY)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--output", default="runs/default")
    p.add_argument("--data", default=None, help="dataset folder or s3:// URL (default: synthetic)")
    p.add_argument("--sp", type=int, default=None, help="sequence-parallel degree (parallel.sp)")
    p.add_argument("overrides", nargs="*", help="key=value with dotted keys, e.g. optim.lr=3e-4")
    args = p.parse_intermixed_args(argv)
    overrides = list(args.overrides) + ([] if args.sp is None else [f"parallel.sp={args.sp}"])
    cfg = apply_overrides(get_config(args.config), overrides)
    if args.max_steps is not None:
        cfg = dataclasses.replace(cfg, max_steps=args.max_steps)
    return args, cfg


def _state(model, optimizer, ema, scheduler, loader, step) -> dict:
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd, "ema": dict(ema),
            "train": {"step": torch.tensor(step), "scheduler": scheduler.state_dict(),
                      "loader": loader.state_dict(), "rng": torch.get_rng_state()}}


def plot_losses(metrics: Path, out: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = {}
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        rows[r["step"]] = r["loss"]
    steps = sorted(rows)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [rows[s] for s in steps])
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def train(cfg: TrainConfig, output: str, data: str | None = None) -> dict:
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    rank, world = init_distributed(device_type)
    device = torch.device("cpu")
    if device_type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    out = Path(output)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    url = data
    if url is None:
        url = str(out / "data")
        if rank == 0 and not (out / "data" / MANIFEST).exists():
            write_synthetic(url, cfg.model, cfg.synthetic, seed=cfg.data.seed)
    dist.barrier()

    dims = ParallelDims.from_config(cfg.parallel, world, cfg.model.num_heads)
    mesh = build_mesh(device_type, dims)
    dp_rank, dp_world = mesh.dp_rank_world()  # the sp ranks of one dp index read the same batches
    mp_policy = mixed_precision_policy(cfg.mixed_precision, device_type)
    compute_dtype = torch.float32 if mp_policy is None else mp_policy.param_dtype
    model = build_sharded_dit(cfg.model, mesh, mp_policy, device, cfg.seed,
                              activation_checkpointing=cfg.parallel.activation_checkpointing,
                              offload=cfg.parallel.offload)
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cfg.schedule.factor(s, cfg.max_steps))
    ema = {n: p.detach().clone() for n, p in model.named_parameters()} if cfg.ema.enabled else {}
    loader = LatentLoader(url, t_max=cfg.data.t_max, seed=cfg.data.seed, rank=dp_rank, world=dp_world,
                          prefetch=cfg.data.prefetch, pack=cfg.data.pack, workers=cfg.data.workers,
                          weights=None if cfg.data.resolutions == "data" else cfg.data.resolutions)
    channels = loader.batcher.entries[0].shape[3]
    if channels != cfg.model.in_visual_dim:
        raise ValueError(f"dataset {url} holds {channels}-channel latents but the model takes "
                         f"model.in_visual_dim = {cfg.model.in_visual_dim}")
    ckpt = Checkpointer(out / "checkpoints", keep_last=cfg.checkpoint.keep_last,
                        async_save=cfg.checkpoint.async_save, rank=rank)

    step = 0
    latest = ckpt.latest()
    if latest is not None:
        state = _state(model, optimizer, ema, scheduler, loader, 0)
        ckpt.load(latest, state)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        scheduler.load_state_dict(state["train"]["scheduler"])
        loader.load_state_dict(state["train"]["loader"])
        torch.set_rng_state(state["train"]["rng"])
        step = int(state["train"]["step"])
        if step != latest:
            raise RuntimeError(f"checkpoint step-{latest:08d} holds step {step}")

    metrics_path = out / "metrics.jsonl"
    if rank == 0 and metrics_path.exists():  # drop lines of steps after the checkpoint (redone now)
        kept = [line for line in metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        metrics_path.write_text("".join(line + "\n" for line in kept))
    bar = tqdm(total=cfg.max_steps, initial=step, disable=rank != 0 or not cfg.log.progress,
               desc=cfg.name, dynamic_ncols=True)
    kill_at = int(os.environ.get(KILL_ENV, "-1"))
    ema_names = list(ema)
    ema_params = [dict(model.named_parameters())[n] for n in ema_names]
    ema_bufs = [ema[n] for n in ema_names]
    losses = []
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64)
        tokens, tasks = 0, []
        for _ in range(o.grad_accum):
            gid, samples = loader.next()
            fb = build_batch(samples, gid, cfg.data, cfg.flow, visual_cond=cfg.model.visual_cond,
                             null_text=loader.null_text, patch=cfg.model.patch_size,
                             pack=cfg.data.pack).to(device, compute_dtype)
            loss = flow_loss(model, fb, cfg.data.rope_scale)
            (loss / o.grad_accum).backward()
            loss_sum += loss.detach().double().cpu()
            tokens += fb.tokens
            tasks.append(fb.task)
        grad_norm = None
        if o.grad_clip > 0:
            gn = torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
            grad_norm = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
        optimizer.step()
        scheduler.step()
        if ema:
            with torch.no_grad():
                torch._foreach_lerp_(ema_bufs, [p.detach() for p in ema_params], 1.0 - cfg.ema.decay)
        step += 1
        stats = torch.tensor([loss_sum.item() / o.grad_accum, float(tokens)], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(stats)
        loss_val = stats[0].item() / world  # the sp ranks of a batch hold the same loss
        dt = time.perf_counter() - t0
        tok_s = stats[1].item() / dims.sp / dt  # ... and count the same tokens
        losses.append(loss_val)
        if rank == 0 and (step % cfg.log.every == 0 or step == cfg.max_steps):
            row = {"step": step, "loss": loss_val, "lr": lr, "tokens_per_s": tok_s, "step_time": dt,
                   "grad_norm": grad_norm, "task": tasks}
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{tok_s:.0f}", step_s=f"{dt:.2f}")
        bar.update(1)
        ckpt.poll()
        every = cfg.checkpoint.every
        if (every and step % every == 0) or step == cfg.max_steps:
            ckpt.save(step, _state(model, optimizer, ema, scheduler, loader, step))
            if step == kill_at:
                os._exit(17)
    bar.close()
    loader.close()
    ckpt.close()
    result = {"step": step, "losses": losses, "output": str(out)}
    if ema and cfg.checkpoint.export_ema:
        export_ema(model, ema, out / "ema", rank)
    if rank == 0 and cfg.log.plot and metrics_path.exists():
        plot_losses(metrics_path, out / "loss.png")
    dist.barrier()
    return result


def main(argv=None) -> dict:
    """Run; a user error (config, data, checkpoint) ends with its message on stderr and exit code 2."""
    try:
        args, cfg = parse_args(argv)
        return train(cfg, args.output, args.data)
    except (ValueError, ShardError, CheckpointError) as e:
        if os.environ.get("KANDINSKY_TRACEBACK"):
            raise
        print(f"training.train: error: {e}\n(KANDINSKY_TRACEBACK=1 shows the traceback)", file=sys.stderr,
              flush=True)
        raise SystemExit(2) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
