"""Rotary position embeddings of Kandinsky 5.0: 1-D over text, 3-D over the (T, H, W) token grid.

Layout facts (official ``RoPE1D``/``RoPE3D``):

- rotation acts on **adjacent pairs** (dims 2i, 2i+1), not split halves;
- an axis of width ``d`` has ``d/2`` frequencies ``theta ** (-i / (d/2))``;
- the 3-D table concatenates the pairs of T, then H, then W (``axes_dims`` order), each axis with its
  own frequency ladder, and divides each axis's angle by its ``scale`` (linear position
  interpolation: (1, 2, 2) for the 512-px video configs, (1, 3.16, 3.16) for 1024 px, 1 for images);
- everything is computed and applied in fp32, the result cast back to the activation dtype.

Tables are returned as **angles** (fp32, ``(..., head_dim/2)``) so that the fractal reordering can
permute (and zero-pad) them like tokens before cos/sin are taken; :func:`apply_rope` takes
``(cos, sin)``.
"""
from __future__ import annotations

from typing import Sequence

import torch


def _inv_freq(dim: int, theta: float, device) -> torch.Tensor:
    """(dim/2,) fp32 frequencies ``theta ** (-i / (dim/2))``."""
    half = dim // 2
    return theta ** (-torch.arange(half, dtype=torch.float64, device=device) / half)


def text_rope_angles(length: int, head_dim: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """Angles of the 1-D text RoPE for positions 0..L-1: fp32 (L, head_dim/2)."""
    pos = torch.arange(length, dtype=torch.float64, device=device)
    return torch.outer(pos, _inv_freq(head_dim, theta, device)).float()


def visual_rope_angles(
    grid: Sequence[int],
    axes_dims: Sequence[int],
    scale: Sequence[float] = (1.0, 1.0, 1.0),
    theta: float = 10000.0,
    device=None,
) -> torch.Tensor:
    """Angles of the 3-D RoPE on a token grid (T, H, W): fp32 (T, H, W, sum(axes_dims)/2).

    ``scale`` divides each axis's angle (position interpolation).
    """
    if len(grid) != 3 or len(axes_dims) != 3 or len(scale) != 3:
        raise ValueError(f"grid, axes_dims and scale need 3 entries, got {grid}, {axes_dims}, {scale}")
    parts = []
    for axis, (n, d, s) in enumerate(zip(grid, axes_dims, scale)):
        ang = torch.outer(torch.arange(n, dtype=torch.float64, device=device), _inv_freq(d, theta, device))
        ang = ang / float(s)
        shape = [1, 1, 1, d // 2]
        shape[axis] = n
        parts.append(ang.view(shape).expand(*grid, d // 2))
    return torch.cat(parts, dim=-1).float()


def rope_cos_sin(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of an angle table, fp32, same shape."""
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of ``x`` (..., S, H, Dh) by angles whose cos/sin are (..., S, 1, Dh/2).

    Computed in fp32; returns fp32 (the caller casts once, after RMSNorm + RoPE, like the official
    code).
    """
    # (x0 + i x1)(cos + i sin) = (x0 cos - x1 sin) + i (x0 sin + x1 cos): one complex multiply reads
    # and writes x once (the real-arithmetic form made six passes: 15x slower at S = 8192, fp32).
    xc = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * torch.complex(cos, sin)).flatten(-2)
