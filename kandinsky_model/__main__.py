"""End-to-end sampling from the command line; by default a tiny random model on the CPU.

    python -m kandinsky_model --out out/latent.pt            # tiny random DiT and VAE, random prompt
    python -m kandinsky_model --weights DIR --config video_lite \\
        --prompt-embeds prompt.pt --frames 31 --height 64 --width 96 --rope-scale 1 2 2 --out latent.pt

``--prompt-embeds`` is a ``torch.save`` dict with ``text`` (B, L, 3584), ``pooled_text`` (B, 768) and
optionally ``text_mask``, ``negative_text``, ``negative_pooled_text``, ``negative_text_mask`` (see
:mod:`kandinsky_model.sampler` for how the official pipeline computes them). The output is a
``torch.save`` dict: ``latent`` (B, T, H, W, C) fp32 channels-last, ``nfe``, ``skipped``, ``config``.

Then the latent is decoded by the causal VAE (``--vae DIR``: the HunyuanVideo VAE from a local folder
or file, see ``CausalVideoVAE.from_pretrained``; default: a tiny random VAE for the tiny config, none
for the real configs unless given; ``--no-vae`` skips it) and written next to ``--out`` as a video
(``--video-format mp4`` through PyAV when installed, else an animated WebP) and a PNG contact sheet.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from pathlib import Path

from .config import preset
from .dit import CrossDiT
from .sampler import MagCacheConfig, generate
from .vae import CausalVAEConfig, CausalVideoVAE
from .video_io import contact_sheet, write_video


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kandinsky_model", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="tiny", help="preset: tiny, video_lite, video_pro, image_lite")
    p.add_argument("--weights", help="local Diffusers-layout folder or .safetensors file (default: random)")
    p.add_argument("--prompt-embeds", help="torch.save dict of text encoder outputs (default: random)")
    p.add_argument("--frames", type=int, default=3, help="latent frames T (1 for images)")
    p.add_argument("--height", type=int, default=16, help="latent height (pixels / 8)")
    p.add_argument("--width", type=int, default=16, help="latent width (pixels / 8)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--shift", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rope-scale", type=float, nargs=3, default=(1.0, 1.0, 1.0))
    p.add_argument("--backend", choices=("sdpa", "flash", "flex", "nabla"), default=None)
    p.add_argument("--magcache", help="JSON list of per-call magnitude ratios (cond/uncond interleaved)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="latent.pt")
    p.add_argument("--vae", help="local HunyuanVideo VAE folder or file (default: tiny random for --config tiny)")
    p.add_argument("--no-vae", action="store_true", help="stop at the latent")
    p.add_argument("--video-format", choices=("mp4", "webp", "gif"), default="mp4",
                   help="mp4 needs PyAV; without it an animated WebP is written")
    p.add_argument("--fps", type=float, default=24.0)
    return p.parse_args(argv)


def tiny_vae(latent_channels: int) -> CausalVideoVAE:
    """A small random VAE (same architecture, fewer channels) for the tiny end-to-end run."""
    return CausalVideoVAE(CausalVAEConfig(latent_channels=latent_channels, block_out_channels=(8, 16, 16, 16),
                                          layers_per_block=1, norm_num_groups=4))


def main(argv=None) -> dict:
    args = _parse(argv)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    if args.weights:
        bare = args.weights.endswith(".safetensors")  # a bare file needs the config by name
        model = CrossDiT.from_pretrained(args.weights, config=args.config if bare else None, dtype=dtype,
                                         device=args.device)
    else:
        model = CrossDiT(preset(args.config)).to(args.device, dtype)
    model.eval()
    cfg = model.config
    if args.prompt_embeds:
        prompt = torch.load(args.prompt_embeds, map_location="cpu")
    else:
        g = torch.Generator().manual_seed(args.seed + 1)
        prompt = {
            "text": torch.randn(1, 12, cfg.in_text_dim, generator=g),
            "pooled_text": torch.randn(1, cfg.in_text_dim2, generator=g),
            "negative_text": torch.randn(1, 6, cfg.in_text_dim, generator=g),
            "negative_pooled_text": torch.randn(1, cfg.in_text_dim2, generator=g),
        }
    magcache = None
    if args.magcache:
        with open(args.magcache) as f:
            magcache = MagCacheConfig(mag_ratios=json.load(f))
    vae = None
    if not args.no_vae and (args.vae or args.config == "tiny"):
        vae = (CausalVideoVAE.from_pretrained(args.vae) if args.vae else tiny_vae(cfg.out_visual_dim))
        vae = vae.to(args.device, dtype).eval()
    start = time.perf_counter()
    res = generate(
        model, shape=(args.frames, args.height, args.width), num_steps=args.steps,
        guidance_scale=args.guidance, shift=args.shift, seed=args.seed, rope_scale=args.rope_scale,
        attention_backend=args.backend, magcache=magcache, vae=vae, **prompt,
    )
    out = {"latent": res.latent.cpu(), "nfe": res.nfe, "skipped": res.skipped,
           "config": cfg.to_official_dict()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, args.out)
    print(f"wrote {args.out}: latent {tuple(res.latent.shape)}, {res.nfe} DiT evaluations "
          f"({res.skipped} skipped by MagCache) in {time.perf_counter() - start:.1f} s")
    if res.video is not None:
        stem = Path(args.out).with_suffix("")
        out["video_path"] = str(write_video(res.video[0], f"{stem}.{args.video_format}", fps=args.fps))
        out["sheet_path"] = str(contact_sheet(res.video[0], f"{stem}_frames.png"))
        print(f"wrote {out['video_path']} ({res.video.shape[2]} frames, {res.video.shape[4]}x"
              f"{res.video.shape[3]}) and {out['sheet_path']}")
    return out


if __name__ == "__main__":
    main()
