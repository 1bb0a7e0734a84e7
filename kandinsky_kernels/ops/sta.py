"""Sliding-tile attention (STA) block mask in fractal block order.

The mask is built once per generation and shared by every layer and step (it depends only on the
latent grid and the window), so a vectorized torch expression is all it needs: no kernel, no backend
dispatch. It is the outer AND of three 1-D band matrices (frames, tile rows, tile columns), formed by
broadcasting and one reshape to (N, N).
"""
from __future__ import annotations

import torch

from kandinsky_kernels._validation import check_positive_int

__all__ = ["sta_block_mask"]

# 4 GiB of bool: ~2,000x Kandinsky 5 Pro's 1,464 x 1,464 blocks at 10 s, far below which an absurd grid
# is refused with a clear error instead of an allocation that fails or exhausts host memory.
_MAX_ELEMENTS = 2**32


def _check_window(window) -> tuple[int, int, int]:
    """``window`` as a tuple of three positive odd ints (wT, wH, wW), or ValueError."""
    if not isinstance(window, (tuple, list)) or len(window) != 3:
        raise ValueError(f"window must be three positive odd ints (wT, wH, wW), got {window!r}")
    for w in window:
        if isinstance(w, bool) or not isinstance(w, int) or w <= 0 or w % 2 == 0:
            raise ValueError(f"window must be three positive odd ints (wT, wH, wW), got {tuple(window)!r}")
    return tuple(window)  # type: ignore[return-value]


def _band(n: int, width: int, device) -> torch.Tensor:
    i = torch.arange(n, device=device)
    return (i[:, None] - i[None, :]).abs() <= width // 2


def sta_block_mask(
    t: int,
    h_tiles: int,
    w_tiles: int,
    window: tuple[int, int, int] = (11, 3, 3),
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bool (N, N) STA block mask, N = t * h_tiles * w_tiles, blocks in fractal order.

    Block ``n`` is frame ``n // (h_tiles*w_tiles)``, tile row ``(n // w_tiles) % h_tiles``, tile column
    ``n % w_tiles`` (t-major, then row, then column). Key block j is visible from query block i iff
    ``|dt| <= wT//2``, ``|drow| <= wH//2`` and ``|dcol| <= wW//2``; the window is not clamped at the
    borders (edge blocks see fewer neighbours), as in the official ``fast_sta_nabla``.

    Args:
        t, h_tiles, w_tiles: latent frames and tile rows / columns (positive ints).
        window: (wT, wH, wW) in frames and tiles, positive odd ints. Kandinsky 5 Lite uses (11, 3, 3).
        device: where the mask is built.

    Raises:
        ValueError: a non-positive size, a bad window, or N * N above 2**32 (a dense mask of 4 GiB).
    """
    for name, v in (("t", t), ("h_tiles", h_tiles), ("w_tiles", w_tiles)):
        check_positive_int(name, v)
    wt, wh, ww = _check_window(window)
    n = t * h_tiles * w_tiles
    if n * n > _MAX_ELEMENTS:
        raise ValueError(f"sta_block_mask: a grid of {t} x {h_tiles} x {w_tiles} = {n} blocks needs a dense "
                         f"({n}, {n}) bool mask, more than {_MAX_ELEMENTS} elements")
    bt, bh, bw = _band(t, wt, device), _band(h_tiles, wh, device), _band(w_tiles, ww, device)
    # (i_t, i_h, i_w, j_t, j_h, j_w) -> (i, j) with i, j flattened t-major like the blocks.
    mask = (
        bt[:, None, None, :, None, None] & bh[None, :, None, None, :, None] & bw[None, None, :, None, None, :]
    )
    return mask.reshape(n, n)
