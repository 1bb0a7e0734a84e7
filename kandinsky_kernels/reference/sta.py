"""Pure-torch reference of the sliding-tile (STA) block mask, written from block coordinates.

Block ``n`` of a (t, h_tiles, w_tiles) grid in fractal order sits at frame ``n // (h*w)``, tile row
``(n // w) % h`` and tile column ``n % w``. Block ``j`` is visible from block ``i`` iff every coordinate
differs by at most half the window (integer division): ``|dt| <= wT//2``, ``|drow| <= wH//2``,
``|dcol| <= wW//2``. The window is not clamped at the borders (edge blocks see fewer neighbours), as
in the official ``fast_sta_nabla``.
"""
from __future__ import annotations

import torch


def sta_block_mask_ref(
    t: int, h_tiles: int, w_tiles: int, window: tuple[int, int, int] = (11, 3, 3), device=None
) -> torch.Tensor:
    """Bool (N, N), N = t * h_tiles * w_tiles: True where query block i may attend to key block j."""
    n = torch.arange(t * h_tiles * w_tiles, device=device)
    coords = (n // (h_tiles * w_tiles), (n // w_tiles) % h_tiles, n % w_tiles)
    mask = torch.ones(n.numel(), n.numel(), dtype=torch.bool, device=device)
    for c, win in zip(coords, window):
        mask &= (c[:, None] - c[None, :]).abs() <= win // 2
    return mask
