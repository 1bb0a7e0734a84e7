"""GPU check of the causal video VAE (stage of scripts/gpu_check.sh; first run on an H200 on 2026-12-04).

The published HunyuanVideo VAE config with random weights on CUDA, in this order (each step skipped,
saying so, once ``--budget-s`` is spent):

1. the issue's figures: encode and decode of a 121x512x768 clip in bf16, ours (``CausalVideoVAE``, its
   defaults: ``tiling="auto"``, whose plan is recorded) against diffusers' ``AutoencoderKLHunyuanVideo``
   with identical weights and its defaults (framewise encoding/decoding in 17-frame tiles, no spatial
   tiling). Per call: seconds (CUDA-synchronised wall time after a warm-up at 9x64x64) and peak memory
   (``torch.cuda.max_memory_allocated`` above what was allocated before the call). If diffusers' defaults
   run out of memory, the call is repeated with ``enable_tiling()`` and the row says so. The relative
   L2 difference of the outputs is recorded too (informational: both sides tile differently here);
2. parity: ours against diffusers, identical weights, neither side tiling, fp32 with TF32 off, at the
   small clip's size (relative L2 of latents and frames: the implementation alone, without step 1's
   tiling differences);
3. which convolution kernels a causal conv runs (cuDNN, not ``slow_conv_dilated3d``), from the profiler;
4. the older check: encode + decode of a 17x256x256 clip in fp32 and bf16 (time, peak memory, bf16
   error against fp32) and which SDPA backends accept the mid-block attention's head dim of 512.

Prints one JSON line per measurement and writes ``vae_gpu.json`` into ``--out-dir`` (rewritten after every
step, so a run stopped by its time limit keeps what it finished).

    python scripts/vae_gpu_check.py --out-dir OUT [--budget-s 140] [--frames 121 --height 512 --width 768]
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

START = time.perf_counter()
DEV = torch.device("cuda")  # --dry-run-cpu: the CPU (memory figures are then None)


def _cuda() -> bool:
    return DEV.type == "cuda"


def _sync() -> None:
    if _cuda():
        torch.cuda.synchronize()


def _empty_cache() -> None:
    if _cuda():
        torch.cuda.empty_cache()


def _elapsed() -> float:
    return time.perf_counter() - START


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float | None:
    if a.shape != b.shape:
        return None
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _measure(fn, arg):
    """(output, seconds, peak GiB above the memory allocated before the call; None on the CPU)."""
    _sync()
    if _cuda():
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = fn(arg)
    _sync()
    s = time.perf_counter() - t0
    return out, s, (torch.cuda.max_memory_allocated() - before) / 2**30 if _cuda() else None


class Report:
    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / "vae_gpu.json"
        out_dir.mkdir(parents=True, exist_ok=True)
        self.data: dict = {
            "gpu": torch.cuda.get_device_name(0) if _cuda() else "none (--dry-run-cpu)",
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if _cuda() else None, "issue_rows": [], "notes": [],
        }
        try:
            import diffusers

            self.data["diffusers"] = diffusers.__version__
        except ImportError as e:
            self.data["diffusers"] = f"not installed: {e}"
        self.write()

    def add(self, key: str, value) -> None:
        if isinstance(self.data.get(key), list):
            self.data[key].append(value)
        else:
            self.data[key] = value
        print(json.dumps({key: value}), flush=True)
        self.write()

    def write(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1))


def _perturb_vectors(model: torch.nn.Module, dev: torch.device) -> torch.Generator:
    """Add noise to every 1-D parameter (norm scales, biases; fresh ones are ones and zeros), so that a
    comparison exercises them. Returns the generator for the inputs that follow."""
    g = torch.Generator(device=dev).manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g, device=dev))
    return g


def issue_rows(rep: Report, args, budget_s: float) -> None:
    """Step 1: 121x512x768 bf16 encode and decode, ours vs diffusers (both on the GPU at once: ~1 GiB of
    bf16 weights each)."""
    from kandinsky_model import CausalVideoVAE
    from kandinsky_model.vae_tiling import plan_tiling

    dev, dtype = DEV, torch.bfloat16
    torch.manual_seed(0)
    with dev:  # random init on the device: seconds, where 246 M parameters take a minute on a few CPU cores
        ours = CausalVideoVAE().eval()
    _perturb_vectors(ours, dev)
    sides = {}
    try:
        from diffusers import AutoencoderKLHunyuanVideo

        with dev:
            theirs = AutoencoderKLHunyuanVideo().eval()
        theirs.load_state_dict(ours.state_dict())
        sides["diffusers"] = theirs.to(dev, dtype)
        rep.add("notes", f"diffusers defaults: use_framewise_encoding={theirs.use_framewise_encoding}, "
                         f"use_framewise_decoding={theirs.use_framewise_decoding}, use_tiling={theirs.use_tiling}, "
                         f"tile_sample_min_num_frames={theirs.tile_sample_min_num_frames}")
    except ImportError as e:
        rep.add("notes", f"diffusers skipped: not installed ({e})")
    ours = ours.to(dev, dtype)
    sides = {"ours": ours, **sides}
    shape = (1, 3, args.frames, args.height, args.width)
    plan = {op: str(plan_tiling(shape, dtype, device=dev, op=op)) for op in ("encode", "decode")}
    rep.add("ours_tiling_plan", plan)
    gen = torch.Generator(device=dev).manual_seed(2)
    video = torch.rand(shape, device=dev, generator=gen, dtype=torch.float32).mul_(2).sub_(1).to(dtype)
    t = 1 + (args.frames - 1) // 4
    latents = torch.randn(1, 16, t, args.height // 8, args.width // 8, device=dev, generator=gen).to(dtype)
    calls = {
        "ours": {"encode": lambda x: ours.encode(x), "decode": lambda z: ours.decode(z)},
    }
    if "diffusers" in sides:
        m = sides["diffusers"]
        calls["diffusers"] = {"encode": lambda x: m.encode(x).latent_dist.mode(),
                              "decode": lambda z: m.decode(z).sample}
    for side, fns in calls.items():  # warm-up: CUDA context, cuDNN handles, kernels' first launch
        with torch.no_grad():
            fns["decode"](fns["encode"](video[:, :, :9, :64, :64]))
    _sync()
    outs: dict = {}
    for op, arg in (("encode", video), ("decode", latents)):
        for side, fns in calls.items():
            row = {"side": side, "op": op, "clip": [args.frames, args.height, args.width], "dtype": "bf16"}
            if _elapsed() > budget_s:
                row["skipped"] = f"budget of {budget_s:.0f} s spent"
                rep.add("issue_rows", row)
                continue
            if side == "ours":
                row["settings"] = f"tiling=auto: {plan[op]}"
            else:
                row["settings"] = "diffusers defaults (framewise, no spatial tiling)"
            try:
                out, s, peak = _measure(fns[op], arg)
            except torch.cuda.OutOfMemoryError as e:
                _empty_cache()
                if side != "diffusers":
                    row["error"] = f"OOM: {str(e).splitlines()[0][:200]}"
                    rep.add("issue_rows", row)
                    continue
                row["settings"] = ("diffusers with enable_tiling(): its defaults ran out of memory "
                                   f"({str(e).splitlines()[0][:120]})")
                sides["diffusers"].enable_tiling()
                try:
                    out, s, peak = _measure(fns[op], arg)
                except torch.cuda.OutOfMemoryError as e2:
                    _empty_cache()
                    row["error"] = f"OOM even with enable_tiling(): {str(e2).splitlines()[0][:200]}"
                    rep.add("issue_rows", row)
                    continue
            row.update(seconds=round(s, 3), peak_gib=None if peak is None else round(peak, 2),
                       out_shape=list(out.shape))
            outs[(side, op)] = out
            rep.add("issue_rows", row)
        if ("ours", op) in outs and ("diffusers", op) in outs:
            rep.add("notes", f"{op}: rel. L2 difference ours vs diffusers "
                             f"{_rel_l2(outs[('ours', op)], outs[('diffusers', op)])} (informational: the "
                             f"sides' tilings differ, see the rows' settings)")
        for side in calls:
            outs.pop((side, op), None)
        _empty_cache()
    rows = {(r["side"], r["op"]): r for r in rep.data["issue_rows"] if "seconds" in r}
    for op in ("encode", "decode"):
        a, b = rows.get(("ours", op)), rows.get(("diffusers", op))
        if a and b:
            mem = (f", memory ratio {a['peak_gib'] / max(b['peak_gib'], 1e-9):.2f}"
                   if a["peak_gib"] is not None and b["peak_gib"] is not None else "")
            rep.add("notes", f"{op}: ours {a['seconds']} s / {a['peak_gib']} GiB vs diffusers {b['seconds']} s / "
                             f"{b['peak_gib']} GiB: speedup {b['seconds'] / a['seconds']:.2f}x{mem}")


def conv_kernels(rep: Report) -> None:
    """Step 3: which aten/cuDNN ops one causal conv (512 channels, bf16) dispatches to."""
    from torch.profiler import ProfilerActivity, profile

    from kandinsky_model.vae import CausalConv3d

    conv = CausalConv3d(512, 512, 3).to("cuda", torch.bfloat16)
    x = torch.randn(1, 512, 5, 64, 96, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        conv(x)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            conv(x)
            torch.cuda.synchronize()
    names = sorted({e.key for e in prof.key_averages() if "conv" in e.key.lower() or "cudnn" in e.key.lower()})
    rep.add("conv3d_ops", names[:30])


def parity(rep: Report, frames: int, height: int, width: int) -> None:
    """Step 2: ours against diffusers with identical weights and neither side tiling (diffusers' framewise
    paths off), fp32 with TF32 off: the same outputs are expected up to fp32 rounding. Step 1's difference
    mixes in the two sides' different tilings; this one is the implementation alone."""
    try:
        from diffusers import AutoencoderKLHunyuanVideo
    except ImportError as e:
        rep.add("notes", f"parity skipped: diffusers not installed ({e})")
        return
    from kandinsky_model import CausalVideoVAE

    dev = DEV
    torch.manual_seed(0)
    with dev:
        ours = CausalVideoVAE().eval()
        theirs = AutoencoderKLHunyuanVideo().eval()
    g = _perturb_vectors(ours, dev)
    theirs.load_state_dict(ours.state_dict())
    theirs.use_framewise_encoding = theirs.use_framewise_decoding = False
    theirs.use_tiling = False
    video = torch.rand(1, 3, frames, height, width, device=dev, generator=g) * 2 - 1
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            z_ours = ours.encode(video, tiling="none")
            z_theirs = theirs.encode(video).latent_dist.mode()
            y_ours = ours.decode(z_theirs, tiling="none")
            y_theirs = theirs.decode(z_theirs).sample
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    rep.add("parity_fp32_untiled", {"clip": [frames, height, width], "device": str(dev),
                                    "encode_rel_l2": _rel_l2(z_ours, z_theirs),
                                    "decode_rel_l2": _rel_l2(y_ours, y_theirs)})
    del ours, theirs
    _empty_cache()


def small_clip(rep: Report, frames: int, size: int) -> None:
    """Step 4: the older 17x256x256 fp32/bf16 check and the SDPA backends at head dim 512."""
    from kandinsky_model import CausalVideoVAE

    torch.manual_seed(0)
    dev = torch.device("cuda")
    vae32 = CausalVideoVAE().to(dev).eval()
    g = torch.Generator(device=dev).manual_seed(1)
    video = torch.rand(1, 3, frames, size, size, device=dev, generator=g) * 2 - 1
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        vae = vae32 if dtype == torch.float32 else CausalVideoVAE(vae32.config).to(dev, dtype).eval()
        if dtype != torch.float32:
            vae.load_state_dict({k: v.to(dtype) for k, v in vae32.state_dict().items()})
        x = video.to(dtype)
        with torch.no_grad():
            vae.decode(vae.encode(x[:, :, :5, :64, :64]))  # warm-up
        z, s_enc, p_enc = _measure(vae.encode, x)
        y, s_dec, p_dec = _measure(vae.decode, z)
        outs[dtype] = (z.float(), y.float())
        rep.add("small_clip", {"dtype": str(dtype), "clip": [frames, size, size], "encode_s": round(s_enc, 3),
                               "decode_s": round(s_dec, 3), "encode_peak_gib": round(p_enc, 2),
                               "decode_peak_gib": round(p_dec, 2)})
        del vae
    (z32, y32), (z16, y16) = outs[torch.float32], outs[torch.bfloat16]
    rep.add("small_clip_bf16_error", {"latent_rel_l2": _rel_l2(z16, z32), "frames_rel_l2": _rel_l2(y16, y32)})
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 1, 1024, 512, device=dev, dtype=torch.bfloat16)
    backends = {}
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                     ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([be]):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
            backends[name] = "ok"
        except RuntimeError as e:
            backends[name] = f"refused: {str(e).splitlines()[0][:120]}"
    rep.add("sdpa_head_dim_512", backends)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", type=Path, default=Path("."))
    ap.add_argument("--frames", type=int, default=121)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--budget-s", type=float, default=140.0,
                    help="start no measurement after this many seconds (the stage's timeout is the backstop)")
    ap.add_argument("--small-frames", type=int, default=17)
    ap.add_argument("--small-size", type=int, default=256)
    ap.add_argument("--dry-run-cpu", action="store_true",
                    help="test this script on the CPU: steps 1 and 2 only, at the sizes given (e.g. --frames 9 "
                         "--height 64 --width 64); no memory figures")
    ap.add_argument("--steps", default=None, metavar="NAMES",
                    help="comma list of the steps to run (issue_rows, parity, conv3d_ops, small_clip); "
                         "default: all")
    args = ap.parse_args()
    global DEV
    if args.dry_run_cpu:
        DEV = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    rep = Report(args.out_dir)
    rc = 0
    steps = [("issue_rows", lambda: issue_rows(rep, args, args.budget_s))]
    if _cuda():
        steps += [("parity", lambda: parity(rep, args.small_frames, args.small_size, args.small_size)),
                  ("conv3d_ops", lambda: conv_kernels(rep)),
                  ("small_clip", lambda: small_clip(rep, args.small_frames, args.small_size))]
    if args.dry_run_cpu:
        steps.append(("parity", lambda: parity(rep, args.frames, args.height, args.width)))
    if args.steps:
        wanted = args.steps.split(",")
        unknown = sorted(set(wanted) - {name for name, _ in steps})
        if unknown:
            ap.error(f"--steps: unknown or unavailable here: {', '.join(unknown)}")
        steps = [(name, step) for name, step in steps if name in wanted]
    for name, step in steps:
        if _elapsed() > args.budget_s:
            rep.add("notes", f"{name}: skipped, budget of {args.budget_s:.0f} s spent")
            continue
        try:
            step()
        except Exception:  # one failing step must not lose the others' figures
            rc = 1
            rep.add("notes", f"{name} failed: {traceback.format_exc()[-1500:]}")
            _empty_cache()
    rep.add("elapsed_s", round(_elapsed(), 1))
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
