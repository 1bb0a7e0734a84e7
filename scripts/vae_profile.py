"""Where the time of one VAE encode + decode goes on the CPU: torch.profiler op tables, ours vs diffusers'
``AutoencoderKLHunyuanVideo`` with identical random weights (both in this process, one after the other).

    PYTHONPATH=. python scripts/vae_profile.py [--frames 9 --size 160 --width published --dtype fp32 --top 15]

Prints, per side, the wall time of the encode and the decode and the top ops by self CPU time (with
their share of the total and call counts). ``--width narrow`` quarters every width, as the default
benchmark profile does (``benchmarks/test_bench_vae.py``). A warm-up at 5x32x32 runs first per side.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

WIDTHS = {"published": ((128, 256, 512, 512), 32), "narrow": ((32, 64, 128, 128), 32)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--width", choices=tuple(WIDTHS), default="published")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--sides", default="ours,diffusers")
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    from kandinsky_model import CausalVAEConfig, CausalVideoVAE

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    blocks, groups = WIDTHS[args.width]
    torch.manual_seed(0)
    ours = CausalVideoVAE(CausalVAEConfig(block_out_channels=blocks, norm_num_groups=groups)).to(dtype).eval()
    g = torch.Generator().manual_seed(0)
    video = (torch.rand(1, 3, args.frames, args.size, args.size, generator=g) * 2 - 1).to(dtype)
    t = 1 + (args.frames - 1) // 4
    latents = torch.randn(1, 16, t, args.size // 8, args.size // 8, generator=g).to(dtype)
    warm_v, warm_z = video[:, :, :5, :32, :32], latents[:, :, :2, :4, :4]
    sides = {}
    for side in args.sides.split(","):
        if side == "ours":
            sides[side] = (ours.encode, ours.decode)
        elif side == "diffusers":
            from diffusers import AutoencoderKLHunyuanVideo

            with tempfile.TemporaryDirectory() as d:
                ours.save_pretrained(d)
                theirs = AutoencoderKLHunyuanVideo.from_pretrained(d, torch_dtype=dtype).eval()
            sides[side] = (lambda x, m=theirs: m.encode(x).latent_dist.mode(), lambda z, m=theirs: m.decode(z).sample)
        else:
            raise SystemExit(f"--sides: unknown side {side!r} (ours, diffusers)")
    print(f"# {args.frames}x{args.size}x{args.size} {args.dtype}, {args.width} widths {blocks}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    for side, (enc, dec) in sides.items():
        with torch.no_grad():
            dec(enc(warm_v)), dec(warm_z)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                enc(video)
                t1 = time.perf_counter()
                dec(latents)
                t2 = time.perf_counter()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        print(f"\n## {side}: encode {t1 - t0:.2f} s, decode {t2 - t1:.2f} s (under the profiler)")
        print(f"{'op':<44} {'self CPU s':>10} {'share':>6} {'calls':>6}")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
            print(f"{e.key[:44]:<44} {e.self_cpu_time_total / 1e6:>10.2f} {e.self_cpu_time_total / total:>6.1%} "
                  f"{e.count:>6}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
