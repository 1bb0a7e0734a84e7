"""GPU check of the host offload of checkpointed block inputs (training/offload.py), < 2 minutes.

A CrossDiT with Video Lite blocks (D 1792, 28 heads of 64, ff 7168; ``--blocks`` of them, 4 by
default, 2 text blocks) in bf16 on one packed-free sequence of S = 61 x 32 x 48 = 93,696 visual
tokens (a 10 s clip at 512 x 768), dense SDPA attention, activation checkpointing per block:

1. the peak memory (``torch.cuda.max_memory_allocated`` above the step's start) and the time of one
   training step (forward + backward) with AC and with AC + offload, after a warm-up step each;
2. one AC + offload step under ``torch.profiler`` (CPU + CUDA): the device-to-host and
   host-to-device copies (``Memcpy DtoH`` / ``HtoD``) and how much of their time overlaps compute
   kernels running on another stream ("hidden"), plus the gradients' agreement with the AC step.

Writes ``offload_gpu.json`` (and the profiler's Chrome trace ``offload_trace.json.gz`` when asked)
into ``--out-dir``; prints one line per result. Every phase is guarded: a failure is recorded and the
script goes on. ``--preset tiny --device cpu`` is a dry run of the same code on the CPU (no
profiler overlap figures there).

    OUT=/tmp/o python3 scripts/offload_gpu_check.py --out-dir $OUT
"""
from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kandinsky_model import CrossDiT, preset  # noqa: E402
from training.offload import BlockInputOffloader  # noqa: E402
from training.parallelize import install_block_runner  # noqa: E402


def _inputs(cfg, grid, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    t, h, w = grid
    x = torch.randn(1, t, h, w, cfg.in_channels, generator=g).to(device, dtype)
    text = torch.randn(1, 32, cfg.in_text_dim, generator=g).to(device, dtype)
    pooled = torch.randn(1, cfg.in_text_dim2, generator=g).to(device, dtype)
    return x, text, pooled, torch.tensor([500.0], device=device), torch.ones(1, 32, dtype=torch.bool, device=device)


def _step(model, inputs, backend):
    model.zero_grad(set_to_none=False)  # the gradients stay allocated: the peak is activations
    out = model(*inputs, attention_backend=backend)
    loss = out.float().pow(2).mean()
    loss.backward()
    return loss.detach()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_and_time(model, inputs, backend, device):
    _sync(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    loss = _step(model, inputs, backend)
    _sync(device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
    return loss, dt, peak


def _union(intervals):
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _overlap(interval, union):
    a, b = interval
    return sum(max(0, min(b, y) - max(a, x)) for x, y in union)


def overlap_summary(kineto_events) -> dict:
    """Copies (Memcpy DtoH / HtoD) and how much of their device time overlaps kernels on other
    streams. ``kineto_events``: ``prof.profiler.kineto_results.events()``."""
    copies, kernels = [], []
    for e in kineto_events:
        try:
            if e.device_type() != torch.autograd.DeviceType.CUDA:
                continue
            name, start, dur, stream = e.name(), e.start_ns(), e.duration_ns(), e.device_resource_id()
        except Exception:  # an event kind without these fields
            continue
        if dur <= 0:
            continue
        if "Memcpy DtoH" in name or "Memcpy HtoD" in name:
            copies.append((name, start, start + dur, stream))
        elif "Memcpy" not in name and "Memset" not in name:
            kernels.append((start, start + dur, stream))
    out = {}
    for kind in ("DtoH", "HtoD"):
        cs = [c for c in copies if f"Memcpy {kind}" in c[0]]
        total = hidden = 0
        for _, a, b, stream in cs:
            union = _union([(x, y) for x, y, s in kernels if s != stream and y > a and x < b])
            total += b - a
            hidden += _overlap((a, b), union)
        out[kind] = {"count": len(cs), "copy_ms": total / 1e6, "hidden_ms": hidden / 1e6,
                     "hidden_frac": hidden / total if total else None,
                     "streams": sorted({c[3] for c in cs})}
    span = _union([(x, y) for x, y, _ in kernels])
    out["compute_ms"] = sum(b - a for a, b in span) / 1e6
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default=os.environ.get("OUT", "."))
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--grid", type=int, nargs=3, default=(61, 64, 96), help="latent T H W (tokens: T x H/2 x W/2)")
    p.add_argument("--preset", default="video_lite", choices=("video_lite", "tiny"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="sdpa")
    p.add_argument("--trace", action="store_true", help="also write the Chrome trace (large)")
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t, h, w = args.grid
    res = {"device": str(device), "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "preset": args.preset, "blocks": args.blocks, "grid": [t, h, w],
           "tokens": t * (h // 2) * (w // 2), "dtype": str(dtype), "errors": {}}
    t_start = time.perf_counter()

    def save():
        res["wall_s"] = time.perf_counter() - t_start
        (out_dir / "offload_gpu.json").write_text(json.dumps(res, indent=2))

    def guard(name, fn):
        try:
            return fn()
        except BaseException as e:  # record and go on (KeyboardInterrupt: the stage's time limit)
            res["errors"][name] = "".join(traceback.format_exception_only(type(e), e)).strip()[-2000:]
            print(f"{name}: FAILED {res['errors'][name]}", flush=True)
            traceback.print_exc()
            save()
            if isinstance(e, KeyboardInterrupt):
                raise
            return None

    cfg = preset(args.preset, num_visual_blocks=args.blocks)

    def build():
        torch.manual_seed(0)
        with torch.device(device):
            base = CrossDiT(cfg)
        base.to(dtype)
        with torch.no_grad():
            for n, prm in base.named_parameters():
                if "modulation" in n:
                    prm.normal_(0, 0.02)
        ac = copy.deepcopy(base) if device.type == "cpu" else base
        install_block_runner(ac, None, True, False)
        return base, ac
    built = guard("build", build)
    if built is None:
        save()
        return 1
    base, ac = built
    inputs = _inputs(cfg, (t, h, w), device, dtype)
    res["block_input_mib"] = res["tokens"] * cfg.model_dim * (2 if dtype == torch.bfloat16 else 4) / 2 ** 20
    print(f"{res['name']}: {args.blocks} {args.preset} blocks, S = {res['tokens']} tokens, block input "
          f"{res['block_input_mib']:.0f} MiB", flush=True)

    def run_ac():
        _step(ac, inputs, args.backend)  # warm-up (kernels, workspace)
        loss, dt, peak = _peak_and_time(ac, inputs, args.backend, device)
        res["ac"] = {"loss": float(loss), "step_s": dt, "peak_mib": None if peak is None else peak / 2 ** 20}
        grads = {n: prm.grad.detach().float().clone() for n, prm in ac.named_parameters() if prm.grad is not None}
        print(f"AC: step {dt * 1e3:.0f} ms, peak above start {res['ac']['peak_mib']} MiB", flush=True)
        return grads
    grads_ac = guard("ac", run_ac)
    save()

    # the same weights, now with offload (on CUDA the model is reused: one copy of the weights)
    offloader = BlockInputOffloader()

    def run_offload():
        model = ac if device.type == "cuda" else copy.deepcopy(base)
        install_block_runner(model, None, True, offloader)
        _step(model, inputs, args.backend)  # warm-up: allocates the pinned host buffers
        loss, dt, peak = _peak_and_time(model, inputs, args.backend, device)
        res["ac_offload"] = {"loss": float(loss), "step_s": dt, "peak_mib": None if peak is None else peak / 2 ** 20,
                             "host_pool_mib": offloader.pool.allocated_bytes / 2 ** 20,
                             "pinned": offloader.pool.pin}
        if grads_ac is not None:
            worst = 0.0
            for n, prm in model.named_parameters():
                if n in grads_ac and prm.grad is not None:
                    ref = grads_ac[n]
                    err = (prm.grad.float() - ref).abs().max().item() / (ref.abs().max().item() + 1e-12)
                    worst = max(worst, err)
            res["ac_offload"]["grad_max_rel_diff_vs_ac"] = worst
        print(f"AC + offload: step {dt * 1e3:.0f} ms, peak above start {res['ac_offload']['peak_mib']} MiB, "
              f"grads vs AC max rel diff {res['ac_offload'].get('grad_max_rel_diff_vs_ac')}", flush=True)
        if res.get("ac", {}).get("peak_mib") and res["ac_offload"]["peak_mib"] is not None:
            res["peak_saved_mib"] = res["ac"]["peak_mib"] - res["ac_offload"]["peak_mib"]
            res["expected_saved_mib"] = (args.blocks - 2) * res["block_input_mib"]
            print(f"peak saved {res['peak_saved_mib']:.0f} MiB (expected about (L - 2) block inputs = "
                  f"{res['expected_saved_mib']:.0f} MiB)", flush=True)
        return model
    model_off = guard("ac_offload", run_offload)
    save()

    def profile():
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof_ctx
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with prof_ctx(activities=acts) as prof:
            _step(model_off, inputs, args.backend)
            _sync(device)
        summary = overlap_summary(prof.profiler.kineto_results.events())
        res["profile"] = summary
        for kind in ("DtoH", "HtoD"):
            s = summary[kind]
            frac = "-" if s["hidden_frac"] is None else f"{100 * s['hidden_frac']:.0f} %"
            print(f"copies {kind}: {s['count']}, {s['copy_ms']:.1f} ms, hidden behind compute {s['hidden_ms']:.1f} ms "
                  f"({frac}), streams {s['streams']}", flush=True)
        print(f"compute kernels busy {summary['compute_ms']:.0f} ms", flush=True)
        if args.trace:
            path = out_dir / "offload_trace.json"
            prof.export_chrome_trace(str(path))
            with open(path, "rb") as f, gzip.open(str(path) + ".gz", "wb") as g:
                g.write(f.read())
            path.unlink()
    if model_off is not None:
        guard("profile", profile)
    save()
    print(f"wrote {out_dir / 'offload_gpu.json'} ({time.perf_counter() - t_start:.0f} s)", flush=True)
    return 0 if not res["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
