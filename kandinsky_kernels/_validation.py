"""Boundary checks shared by the public ops: every failure is a ValueError naming what was passed."""
from __future__ import annotations

import weakref
from typing import Any, Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(
    name: str,
    x,
    *,
    ndim: int | Sequence[int] | None = None,
    min_ndim: int | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name} must have {want} dims, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(x.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if x.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise ValueError(f"{name} must have dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")


def bshd_hint(name: str, shape, block_size: int) -> str:
    """A hint for a (B, H, S, D) tensor passed where (B, S, H, D) is expected, when its dim 2 (not its
    dim 1) is a whole number of blocks; the empty string otherwise."""
    if len(shape) == 4 and shape[1] % block_size and shape[2] % block_size == 0:
        return f"; did you pass (B, H, S, D)? use {name}.transpose(1, 2)"
    return ""


def check_same_device(**tensors: torch.Tensor) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    devices = {v.device for _, v in items}
    if len(devices) > 1:
        desc = ", ".join(f"{k} on {v.device}" for k, v in items)
        raise ValueError(f"tensors must be on one device, got {desc}")


def check_positive_int(name: str, value, *, multiple_of: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if multiple_of is not None and value % multiple_of:
        raise ValueError(f"{name} must be a multiple of {multiple_of}, got {value}")
    return value


def check_finite_number(name: str, value, *, positive: bool = False) -> float:
    """``value`` as a float; ValueError for a non-number (bools included), NaN, inf, or (with
    ``positive``) a value <= 0."""
    import math
    import numbers

    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        want = "a finite positive number" if positive else "a finite number"
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return float(value)


def _versions(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor):
    """Version counters of both tensors, or None where they are not tracked (inference mode)."""
    try:
        return kv_num_blocks._version, kv_indices._version
    except RuntimeError:
        return None


def mark_mask_checked(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor) -> None:
    """Record that this (counts, indices) pair, or (row pointers, ids) pair, passed
    :func:`check_mask_contents` / :func:`check_csr_contents` (or was built valid by the library). The record lives on the index tensor: a weak reference to the counts it was checked
    with and both tensors' versions, so pairing it with other counts, or changing either tensor in
    place, makes the next use check again."""
    versions = _versions(kv_num_blocks, kv_indices)
    if versions is not None:
        kv_indices._kk_mask_checked = (weakref.ref(kv_num_blocks), versions)


def _is_marked(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor) -> bool:
    record = getattr(kv_indices, "_kk_mask_checked", None)
    if record is None:
        return False
    counts_ref, versions = record
    return counts_ref() is kv_num_blocks and versions == _versions(kv_num_blocks, kv_indices)


def check_mask_contents(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, *, force: bool = False) -> None:
    """ValueError unless every row of the mask is well formed: ``kv_num_blocks`` in [0, Nk], the first
    ``kv_num_blocks`` entries of each ``kv_indices`` row in [0, Nk) and pairwise distinct (the
    inactive tail is never read and may hold anything).

    kv_num_blocks int32 (B, H, Nq), kv_indices int32 (B, H, Nq, Nk), any device. Vectorised torch
    (on a GPU one host sync); a pair already checked and unchanged since (see
    :func:`mark_mask_checked`) is not checked again unless ``force``, so a mask shared by layers and
    by the backward costs one check. The C++ kernels repeat the check themselves in O(active blocks).
    """
    if kv_indices.device.type == "meta" or (not force and _is_marked(kv_num_blocks, kv_indices)):
        return  # meta tensors hold no values: shapes only
    nk = kv_indices.shape[-1]
    if kv_num_blocks.numel():
        lo, hi = (int(x) for x in torch.aminmax(kv_num_blocks))
        if lo < 0 or hi > nk:
            raise ValueError(f"kv_num_blocks must lie in [0, Nk={nk}], got values in [{lo}, {hi}]")
    if kv_indices.numel():
        active = torch.arange(nk, device=kv_indices.device) < kv_num_blocks.unsqueeze(-1)
        out_of_range = active & ((kv_indices < 0) | (kv_indices >= nk))
        if bool(out_of_range.any()):
            where = tuple(out_of_range.nonzero()[0].tolist())
            raise ValueError(
                f"kv_indices must lie in [0, Nk={nk}) in the first kv_num_blocks entries of each row, got "
                f"{int(kv_indices[where])} at index {where}"
            )
        # Count each active id per row; inactive slots land in the spare column nk.
        ids = torch.where(active, kv_indices, nk).long()
        seen = torch.zeros((*kv_indices.shape[:-1], nk + 1), dtype=torch.int32, device=kv_indices.device)
        seen.scatter_add_(-1, ids, torch.ones_like(ids, dtype=torch.int32))
        repeated = seen[..., :nk] > 1
        if bool(repeated.any()):
            where = tuple(repeated.nonzero()[0].tolist())
            raise ValueError(
                f"kv_indices repeats key block {where[-1]} in the active part of row {where[:-1]} "
                "(each key block may appear once per row)"
            )
    mark_mask_checked(kv_num_blocks, kv_indices)


def check_csr_contents(ptr: torch.Tensor, cols: torch.Tensor, num_cols: int, *, force: bool = False,
                       name: str = "mask") -> None:
    """ValueError unless the compressed-row mask is well formed: ``ptr`` int64 (Bm, Hm, N + 1) row
    pointers of consecutive rows (the first 0, each head's last the next head's first, the last,
    nnz, at most ``cols.numel()``, at most ``num_cols`` entries a row), ``cols[:nnz]`` ids in
    [0, num_cols), none twice in a row (ids past nnz are unused capacity). Vectorised torch (on a GPU a few host syncs); a pair already checked and
    unchanged since (:func:`mark_mask_checked`) is not checked again unless ``force``. The C++
    kernels repeat the check themselves in O(nnz).
    """
    if ptr.device.type == "meta" or (not force and _is_marked(ptr, cols)):
        return
    if cols.device != ptr.device:
        raise ValueError(f"{name}: ids on {cols.device} but row pointers on {ptr.device}")
    bm, hm, n1 = ptr.shape
    flat = ptr.reshape(bm * hm, n1)
    counts = flat[:, 1:] - flat[:, :-1]
    firsts = flat[:, 0]
    prev_last = torch.cat([firsts.new_zeros(1), flat[:-1, -1]])
    nnz = int(flat[-1, -1]) if flat.numel() else 0
    bad = [
        bool((firsts != prev_last).any()),
        bool(((counts < 0) | (counts > num_cols)).any()) if counts.numel() else False,
        nnz > cols.numel(),
    ]
    if any(bad):
        raise ValueError(
            f"{name}: row pointers (Bm, Hm, N + 1) = {tuple(ptr.shape)} must describe consecutive rows "
            f"(start at 0, each head's first pointer equal to the previous head's last, 0..{num_cols} "
            f"entries a row, the last pointer at most the {cols.numel()} ids)"
        )
    if nnz:
        cols = cols[:nnz]  # the rest is unused capacity, never read
        lo, hi = (int(x) for x in torch.aminmax(cols))
        if lo < 0 or hi >= num_cols:
            raise ValueError(f"{name}: block ids must lie in [0, {num_cols}), got values in [{lo}, {hi}]")
        rows = torch.repeat_interleave(torch.arange(counts.numel(), device=ptr.device), counts.reshape(-1))
        key = torch.sort(rows * num_cols + cols.long()).values
        dup = key[1:] == key[:-1]
        if bool(dup.any()):
            k = int(key[1:][dup][0])
            r, j = divmod(k, num_cols)
            h, i = divmod(r, n1 - 1)
            raise ValueError(f"{name}: block {j} appears twice in row {i} of head {h} "
                             "(each block may appear once a row)")
    mark_mask_checked(ptr, cols)


def check_cu_seqlens(cu_seqlens: torch.Tensor, seq_len: int, name: str = "cu_seqlens") -> None:
    """ValueError unless int32 (n+1,) offsets start at 0, never decrease and end at most at ``seq_len``.
    Reads the values (a host sync on a GPU)."""
    check_tensor(name, cu_seqlens, ndim=1, dtypes=(torch.int32,))
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{name} needs at least 2 offsets (n+1 for n videos), got {cu_seqlens.numel()}")
    c = cu_seqlens.tolist()
    if c[0] != 0 or any(x > y for x, y in zip(c, c[1:])) or c[-1] > seq_len:
        shown = c if len(c) <= 16 else f"{c[:8]} ... {c[-4:]}"
        raise ValueError(f"{name} must start at 0, be non-decreasing and end <= S={seq_len}, got {shown}")


BLOCK_SIZES = (16, 32, 64, 128)
"""Mask block sizes every attention backend runs (C++, Triton, reference): 64 is Kandinsky 5's (8 x 8
fractal tiles), 16 (4 x 4 tiles) suits small tests; 32 and 128 serve non-fractal masks."""


def check_block_size(block_size: Any, what: str = "block_size") -> int:
    """ValueError unless ``block_size`` is one of :data:`BLOCK_SIZES` (the one contract of every backend)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size not in BLOCK_SIZES:
        raise ValueError(f"{what} must be one of {BLOCK_SIZES} (the block sizes every backend runs), got "
                         f"{block_size!r}")
    return block_size


def check_token_index(token_index: torch.Tensor, rows: int, *, force: bool = False) -> None:
    """ValueError unless ``token_index`` maps positions to rows one to one: int64 (Sf,) values in
    [-1, ``rows``) (-1: a padding position), each row 0 .. rows - 1 exactly once. Vectorised torch (on a
    GPU a host sync); an index already checked for ``rows`` and unchanged since is not checked again
    unless ``force`` (the record lives on the tensor, as :func:`mark_mask_checked`'s)."""
    if token_index.device.type == "meta":
        return
    try:
        version = token_index._version
    except RuntimeError:  # inference mode: no version counter, check every time
        version = None
    if not force and version is not None and getattr(token_index, "_kk_index_checked", None) == (rows, version):
        return
    real = token_index[token_index >= 0]
    lo = int(token_index.min()) if token_index.numel() else -1
    hi = int(token_index.max()) if token_index.numel() else -1
    if lo < -1 or hi >= rows:
        raise ValueError(f"token_index must hold rows in [0, {rows}) of q, k, v (the raster sequence) or -1 "
                         f"for padding, got values in [{lo}, {hi}]")
    counts = torch.bincount(real, minlength=rows)
    if real.numel() != rows or bool((counts != 1).any()):
        missing = int((counts == 0).sum())
        repeated = int((counts > 1).sum())
        raise ValueError(f"token_index must name each of the {rows} rows of q, k, v exactly once (-1 for "
                         f"padding positions): {missing} rows are missing and {repeated} repeated")
    if version is not None:
        token_index._kk_index_checked = (rows, version)


def mark_token_index_checked(token_index: torch.Tensor, rows: int) -> None:
    """Record that ``token_index`` is valid for ``rows`` rows (built valid by the library)."""
    try:
        token_index._kk_index_checked = (rows, token_index._version)
    except RuntimeError:
        pass
