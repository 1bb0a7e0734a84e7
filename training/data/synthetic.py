"""A small learnable synthetic dataset: smooth latent patterns whose class the text embedding encodes."""
from __future__ import annotations

import math

import torch

from .shards import write_dataset


def synthetic_samples(n: int, shapes, channels: int, text_dim: int, pooled_dim: int,
                      text_len=(3, 8), seed: int = 0, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    class_text = torch.randn(classes, text_dim, generator=g)
    class_pooled = torch.randn(classes, pooled_dim, generator=g)
    freqs = torch.rand(classes, channels, 3, generator=g) * 2 + 0.5
    for i in range(n):
        t, h, w = (int(v) for v in shapes[i % len(shapes)])
        c = i % classes
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        phase = freqs[c, :, 0] * tt[..., None] * 0.3 + freqs[c, :, 1] * hh[..., None] * 2 * math.pi / h \
            + freqs[c, :, 2] * ww[..., None] * 2 * math.pi / w
        latent = torch.sin(phase) + 0.05 * torch.randn(t, h, w, channels, generator=g)
        length = int(torch.randint(text_len[0], text_len[1] + 1, (1,), generator=g))
        text = class_text[c] + 0.1 * torch.randn(length, text_dim, generator=g)
        pooled = class_pooled[c] + 0.1 * torch.randn(pooled_dim, generator=g)
        yield f"sample-{i:06d}", latent.float(), text, pooled


def write_synthetic(dst: str, model_cfg, spec: dict, *, seed: int = 0, samples_per_shard: int = 8) -> dict:
    """Write ``spec["samples"]`` samples cycling through ``spec["shapes"]`` ([T, H, W] latent grids)."""
    n = int(spec.get("samples", 16))
    shapes = spec.get("shapes", [[1, 8, 8], [3, 8, 8]])
    samples = synthetic_samples(n, shapes, model_cfg.in_visual_dim, model_cfg.in_text_dim,
                                model_cfg.in_text_dim2, tuple(spec.get("text_len", (3, 8))), seed)
    null = (torch.zeros(1, model_cfg.in_text_dim), torch.zeros(model_cfg.in_text_dim2))
    return write_dataset(dst, samples, samples_per_shard=samples_per_shard, null_text=null)
