"""Pure-torch reference of the Kandinsky 5 fractal token order (the ground truth of every backend).

``x`` (B, T, H, W, *rest) is zero-padded to (B, T, Hp, Wp, *rest) with Hp, Wp the next multiples of
``tile``, then reordered frame by frame, tile by tile (row-major tile order), row-major inside a tile:
the official ``local_patching`` with group (1, tile, tile).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _padded(n: int, tile: int) -> int:
    return -(-n // tile) * tile


def fractal_flatten_ref(x: torch.Tensor, tile: int = 8) -> torch.Tensor:
    """(B, T, H, W, *rest) -> (B, T*Hp*Wp, *rest), pad tokens zero."""
    b, t, h, w, *rest = x.shape
    hp, wp = _padded(h, tile), _padded(w, tile)
    # F.pad lists (left, right) pairs from the last dim backwards: leave *rest alone, pad W then H.
    x = F.pad(x, [0, 0] * len(rest) + [0, wp - w, 0, hp - h])
    x = x.reshape(b, t, hp // tile, tile, wp // tile, tile, *rest)
    x = x.permute(0, 1, 2, 4, 3, 5, *range(6, x.dim()))
    return x.reshape(b, t * hp * wp, *rest)


def fractal_unflatten_ref(y: torch.Tensor, t: int, h: int, w: int, tile: int = 8) -> torch.Tensor:
    """(B, T*Hp*Wp, *rest) -> (B, T, H, W, *rest), pad tokens dropped."""
    b, _, *rest = y.shape
    hp, wp = _padded(h, tile), _padded(w, tile)
    y = y.reshape(b, t, hp // tile, wp // tile, tile, tile, *rest)
    y = y.permute(0, 1, 2, 4, 3, 5, *range(6, y.dim()))
    return y.reshape(b, t, hp, wp, *rest)[:, :, :h, :w]


def gather_positions_ref(x: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    """(B, Sr, ...) rows -> (B, Sf, ...) positions: position p holds row ``token_index[p]``, zeros where
    it is -1. The copy that the kernels' ``token_index`` argument avoids."""
    real = token_index >= 0
    out = x.new_zeros((x.shape[0], token_index.shape[0], *x.shape[2:]))
    out[:, real] = x[:, token_index[real]]
    return out


def scatter_positions_ref(y: torch.Tensor, token_index: torch.Tensor, rows: int) -> torch.Tensor:
    """The inverse of :func:`gather_positions_ref`: (B, Sf, ...) positions -> (B, ``rows``, ...) rows,
    padding positions dropped (the index names every row once)."""
    real = token_index >= 0
    out = y.new_zeros((y.shape[0], rows, *y.shape[2:]))
    out[:, token_index[real]] = y[:, real]
    return out
