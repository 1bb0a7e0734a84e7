"""sta_block_mask against its reference and a brute-force loop over block pairs."""
from __future__ import annotations

import itertools

import pytest
import torch
from conftest import assert_exact

from kandinsky_kernels import sta_block_mask
from kandinsky_kernels.reference.sta import sta_block_mask_ref


def _brute_force(t, h, w, window):
    wt, wh, ww = window
    blocks = list(itertools.product(range(t), range(h), range(w)))  # t-major, then row, then column
    mask = torch.zeros(len(blocks), len(blocks), dtype=torch.bool)
    for i, (ti, ri, ci) in enumerate(blocks):
        for j, (tj, rj, cj) in enumerate(blocks):
            mask[i, j] = abs(ti - tj) <= wt // 2 and abs(ri - rj) <= wh // 2 and abs(ci - cj) <= ww // 2
    return mask


@pytest.mark.parametrize(
    "grid, window",
    [
        ((1, 1, 1), (1, 1, 1)),
        ((3, 2, 5), (1, 1, 1)),
        ((4, 3, 3), (3, 3, 3)),
        ((5, 2, 4), (11, 3, 3)),  # window wider than the grid: everything visible in time
        ((13, 3, 2), (5, 1, 3)),
        ((7, 4, 1), (3, 5, 1)),
        ((16, 4, 4), (11, 3, 3)),  # Kandinsky 5 Lite window on the benchmark grid
    ],
)
def test_sta_matches_brute_force(grid, window):
    expected = _brute_force(*grid, window)
    assert_exact(sta_block_mask(*grid, window), expected, "sta_block_mask")
    assert_exact(sta_block_mask_ref(*grid, window), expected, "sta_block_mask_ref")


def test_sta_properties():
    mask = sta_block_mask(6, 3, 4, (5, 3, 3))
    assert mask.dtype == torch.bool and mask.shape == (72, 72)
    assert torch.equal(mask, mask.T)
    assert mask.diagonal().all()
    # Not clamped at borders: a corner block sees fewer neighbours than an interior one.
    corner, interior = 0, 1 * 12 + 1 * 4 + 1  # (t=0, 0, 0) vs (t=1, 1, 1)
    assert mask[corner].sum() == 3 * 2 * 2 and mask[interior].sum() == 4 * 3 * 3


def test_sta_default_window_and_device():
    mask = sta_block_mask(2, 2, 2, device="cpu")
    assert mask.device.type == "cpu" and mask.all()  # (11, 3, 3) covers a 2x2x2 grid


@pytest.mark.parametrize(
    "args, match",
    [
        ((0, 2, 2, (1, 1, 1)), "t must be a positive int"),
        ((2, -1, 2, (1, 1, 1)), "h_tiles must be a positive int"),
        ((2, 2, 2.0, (1, 1, 1)), "w_tiles must be a positive int"),
        ((2, 2, 2, (3, 3)), "three positive odd ints"),
        ((2, 2, 2, (3, 2, 3)), "three positive odd ints"),
        ((2, 2, 2, (3, 0, 3)), "three positive odd ints"),
        ((2, 2, 2, (-1, 3, 3)), "three positive odd ints"),
        ((2, 2, 2, (3.0, 3, 3)), "three positive odd ints"),
        ((2, 2, 2, (True, 3, 3)), "three positive odd ints"),
        ((2, 2, 2, 3), "three positive odd ints"),
    ],
)
def test_sta_value_errors(args, match):
    with pytest.raises(ValueError, match=match):
        sta_block_mask(*args)
