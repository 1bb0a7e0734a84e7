"""Pack a folder of per-sample latent files into tar shards plus a manifest.

    python -m training.data.write_shards SRC DST [--samples-per-shard N] [--null-text FILE]

Shards are sized as the report's section 6.1 describes unless ``--samples-per-shard`` fixes a count:
each holds one modality and size class (images: 1024 / 256 / 64 per shard at low / medium / high
resolution; videos: 16 / 4 / 1), so archives are about equal in bytes and few objects are opened.

SRC holds one ``*.safetensors`` (or ``*.pt``) file per sample with ``latent`` (T, H, W, C),
``text`` (L, D) and ``pooled`` (D2,); the file stem is the sample key. DST is a local folder or an
``s3://`` URL (fsspec). ``--null-text`` names a file with ``text`` and ``pooled`` of the empty caption.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from .shards import SAMPLE_KEYS, write_dataset


def _load(path: Path) -> dict:
    try:
        d = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable sample file: {e}") from e
    if not isinstance(d, dict) or not all(k in d for k in SAMPLE_KEYS):
        raise ValueError(f"{path} must hold {list(SAMPLE_KEYS)}")
    return d


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m training.data.write_shards",
                                description=__doc__.split("\n")[0])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--samples-per-shard", type=int, default=None,
                   help="fixed samples per shard (default: by modality and resolution, as the report)")
    p.add_argument("--null-text", default=None)
    args = p.parse_args(argv)
    files = sorted(f for f in Path(args.src).iterdir() if f.suffix in (".safetensors", ".pt"))
    if not files:
        raise SystemExit(f"no *.safetensors or *.pt sample files in {args.src}")

    def samples():
        for f in files:
            d = _load(f)
            yield f.stem, d["latent"], d["text"], d["pooled"]

    null = None
    if args.null_text:
        d = load_file(args.null_text)
        null = (d["text"], d["pooled"])
    manifest = write_dataset(args.dst, samples(), samples_per_shard=args.samples_per_shard, null_text=null)
    n = sum(len(s["samples"]) for s in manifest["shards"])
    print(f"wrote {n} samples into {len(manifest['shards'])} shards under {args.dst}")
    return manifest


if __name__ == "__main__":
    main()
