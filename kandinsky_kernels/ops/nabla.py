"""NABLA adaptive block mask, fused: pool -> block softmax -> CDF threshold -> STA union -> compact form.

The official code materialises the (B, H, N, N) probability map, sorts every row (values plus int64
indices), argsorts the indices to scatter back and argsorts the final mask to compact it: several
O(B*H*N^2) int64 temporaries per layer and step. Here two kernels do the same exactly:

1. ``_nabla_pool_kernel``: fp32 mean of q and k over each block of ``block_size`` tokens (padding left
   out), q into (B, H, N, D) and k transposed into (B, H, D, N) so the key axis is contiguous. With a
   ``token_index`` (raster-order q, k) it reads each position's row through the index.
2. ``_nabla_mask_fwd_kernel``: a program holds the logits of BLOCK_M query blocks against all key
   blocks, (BLOCK_M, next_pow2(N)), in registers: fp32 logits, softmax, then the CDF rule by bisection
   on the fp32 bit pattern (monotone for p >= 0) with the mass summed in fp64 and rounded to fp32
   before comparing, which is what torch's CPU cumsum (double accumulator) compares; ties at the
   boundary value are resolved by their rank in index order, as a stable sort would. The STA row is
   OR-ed in. It runs twice, as one compiled kernel: the first pass writes each row's count (the row
   pointers are their prefix sums), the second recomputes the row and writes its kept ids, ascending,
   at the row's offset: compressed rows with no (N, N) table at any point. With ``cu_seqlens``
   (packed videos of whole blocks) a per-block video id masks other videos' logits to -inf before the
   softmax and is AND-ed into the final keep; query blocks past the end keep nothing.

:func:`nabla_attention` chains the two steps of Kandinsky 5's sparse attention: this mask (united with
a sliding-tile window), then :func:`kandinsky_kernels.block_sparse_attention` over it.

Trade-off: every row tile re-reads the pooled keys of its head (no tensor-core GEMM), which is cheap
for the N <= ~4k blocks of Kandinsky 5 (pooled keys are 64x smaller than k) and keeps the memory
O(N) per program. The C++ CPU kernel (``csrc/nabla.cpp``) follows the same plan with a radix select.
Probabilities may differ from torch's in the last bit (exp, summation order); that moves a decision
only where a prefix sum lies within rounding of 1 - threshold.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Literal, Optional, Sequence, overload

import torch
from torch import Tensor

from kandinsky_kernels import _ext
from kandinsky_kernels._triton import HAS_TRITON, tl, triton
from kandinsky_kernels._validation import (
    bshd_hint,
    check_positive_int,
    check_cu_seqlens,
    check_same_device,
    check_tensor,
    check_token_index,
    mark_mask_checked,
    mark_token_index_checked,
)
from kandinsky_kernels.backends import _backend_of_tag, select_backend, use_backend
from kandinsky_kernels.mask import BlockSparseMask, _ids_dtype, _ptr_from_counts, _transpose_csr
from kandinsky_kernels.ops import block_sparse_attention as _bsa
from kandinsky_kernels.ops.block_sparse_attention import block_sparse_attention
from kandinsky_kernels.ops.fractal import FractalLayout, _bhsd_hint, _fmt_grid, _grid_token_valid, _layout_arg
from kandinsky_kernels.ops.sta import sta_block_mask
from kandinsky_kernels.reference.fractal import gather_positions_ref
from kandinsky_kernels.reference.nabla import block_map_ref, per_video_ref, pool_blocks_ref, topcdf_mask_ref

__all__ = ["nabla_attention", "nabla_block_mask"]

_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

if HAS_TRITON:

    @triton.jit
    def _nabla_pool_kernel(
        x_ptr,  # (B, S, H, D), any strides
        valid_ptr,  # uint8 (B, S)
        out_ptr,  # fp32, element (b, h, n, d) at b*stride_ob + h*stride_oh + n*stride_on + d*stride_od
        index_ptr,  # int64 (S,): the raster row of x of each position, -1 = padding (HAS_INDEX)
        N,
        H,
        D,
        stride_xb,
        stride_xs,
        stride_xh,
        stride_xd,
        stride_vb,
        stride_ob,
        stride_oh,
        stride_on,
        stride_od,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_HD: tl.constexpr,
        HAS_VALID: tl.constexpr,
        HAS_INDEX: tl.constexpr,
    ):
        # One program: one block of tokens x a chunk of the flattened (head, dim) axis.
        pid = tl.program_id(0).to(tl.int64)  # b * N + n
        b = pid // N
        n = pid % N
        offs_t = tl.arange(0, BLOCK_T)
        offs_hd = tl.program_id(1) * BLOCK_HD + tl.arange(0, BLOCK_HD)
        h = offs_hd // D
        d = offs_hd % D
        mask_t = offs_t < BLOCK_SIZE
        mask_hd = offs_hd < H * D
        tokens = n * BLOCK_SIZE + offs_t
        cols = h * stride_xh + d * stride_xd
        if HAS_INDEX:
            # position -> raster row; -1 positions read zeros (the launcher also marks them not valid)
            rows = tl.load(index_ptr + tokens, mask=mask_t, other=-1)
            x_ptrs = x_ptr + b * stride_xb + tl.maximum(rows, 0)[:, None] * stride_xs + cols[None, :]
            x = tl.load(x_ptrs, mask=(rows >= 0)[:, None] & mask_hd[None, :], other=0.0).to(tl.float32)
        else:
            x_ptrs = x_ptr + b * stride_xb + tokens[:, None] * stride_xs + cols[None, :]
            x = tl.load(x_ptrs, mask=mask_t[:, None] & mask_hd[None, :], other=0.0).to(tl.float32)
        if HAS_VALID:
            valid = tl.load(valid_ptr + b * stride_vb + tokens, mask=mask_t, other=0) != 0
            x = tl.where(valid[:, None], x, 0.0)
            # a block without real tokens pools to zero
            pooled = tl.sum(x, axis=0) / tl.maximum(tl.sum(valid.to(tl.float32), axis=0), 1.0)
        else:
            pooled = tl.sum(x, axis=0) / BLOCK_SIZE
        out_ptrs = out_ptr + b * stride_ob + h * stride_oh + n * stride_on + d * stride_od
        tl.store(out_ptrs, pooled, mask=mask_hd)

    # write_cols unspecialised: 0 and 1 would otherwise compile two variants (the passes must agree)
    @triton.jit(do_not_specialize=["write_cols"])
    def _nabla_mask_fwd_kernel(
        qp_ptr,  # fp32 (B, H, Nq, D) contiguous
        kt_ptr,  # fp32 (B, H, D, Nk) contiguous
        sta_ptr,  # uint8 (Nq, Nk) contiguous
        seg_ptr,  # int32 (N,): video of each block, -1 past the end (HAS_SEG)
        counts_ptr,  # int32 (B, H, Nq): written when write_cols == 0
        ptr_ptr,  # int64 (B, H, Nq + 1): row pointers from the counts (read when write_cols != 0)
        cols_ptr,  # int16 / int32 (nnz,): the kept key-block ids of each row (written when write_cols != 0)
        Nq,
        Nk,
        D,
        sqrt_d,
        c,  # fp32(1 - threshold)
        write_cols,  # 0: pass 1 (counts), else pass 2 (ids); a runtime flag, so both passes run one binary
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        HAS_STA: tl.constexpr,
        HAS_SEG: tl.constexpr,
    ):
        bh = tl.program_id(0).to(tl.int64)
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        mask_m = offs_m < Nq
        mask_n = offs_n < Nk
        mask = mask_m[:, None] & mask_n[None, :]

        q_rows = qp_ptr + (bh * Nq + offs_m) * D
        k_cols = kt_ptr + bh * D * Nk + offs_n
        offs_d = tl.arange(0, BLOCK_D)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + offs_d
            mask_d = dims < D
            qd = tl.load(q_rows[:, None] + dims[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            kd = tl.load(
                k_cols[None, :] + dims[:, None] * Nk, mask=mask_d[:, None] & mask_n[None, :], other=0.0
            )
            acc += tl.sum(qd[:, :, None] * kd[None, :, :], axis=1)
        # IEEE divisions (div_rn), as torch computes them: a plain `/` compiles to the approximate
        # div.full.f32 on NVIDIA GPUs, and exactly tied rows (p = 1/n) must get the same last bit as
        # the reference for the CDF rule to make the same decision.
        logits = tl.math.div_rn(acc, sqrt_d)
        if HAS_SEG:
            # Packed videos: a row sees only its own video's key blocks (probability exactly 0 elsewhere,
            # as if they were absent); a row past the end (segment -1) gets zero logits, a finite row
            # that the final AND empties.
            seg_m = tl.load(seg_ptr + offs_m, mask=mask_m, other=-1)
            seg_n = tl.load(seg_ptr + offs_n, mask=mask_n, other=-2)
            dead = seg_m < 0
            same = (seg_m[:, None] == seg_n[None, :]) & ~dead[:, None]
            logits = tl.where(dead[:, None], 0.0, logits)
            logits = tl.where(mask_n[None, :] & (same | dead[:, None]), logits, float("-inf"))
        else:
            logits = tl.where(mask_n[None, :], logits, float("-inf"))
        e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        total = tl.sum(e, axis=1)
        # A NaN or +inf logit makes the total NaN (NaN compares false): such rows get count -1, which the
        # launcher turns into a ValueError, as the other backends raise.
        row_ok = total < float("inf")
        p = e * tl.math.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), total)[:, None]

        # Smallest bit pattern t with fp32(sum of p over bits <= t) >= c, per row, by bisection with the
        # invariant pred(lo) false, pred(hi) true. min(bits) - 1 and max(bits) + 1 stand in for the ends:
        # below the smallest entry the sum is 0 < c, and if even the total rounds below c, hi stays above
        # every entry and nothing is kept. The loop runs until every row of the tile has converged.
        bits = p.to(tl.int32, bitcast=True)
        p64 = p.to(tl.float64)
        lo = tl.min(tl.where(mask_n[None, :], bits, 0x7F800000), axis=1) - 1
        hi = tl.max(tl.where(mask_n[None, :], bits, 0), axis=1) + 1
        while tl.max(hi - lo, axis=0) > 1:
            mid = lo + (hi - lo) // 2
            mass = tl.sum(tl.where(bits <= mid[:, None], p64, 0.0), axis=1)
            ok = mass.to(tl.float32) >= c
            hi = tl.where(ok, mid, hi)
            lo = tl.where(ok, lo, mid)
        # Entries above the boundary value are kept, below it dropped; entries equal to it (a tie group)
        # are kept from the first whose prefix, in index order, rounds to >= c.
        below = tl.sum(tl.where(bits < hi[:, None], p64, 0.0), axis=1)
        tie = (bits == hi[:, None]) & mask_n[None, :]
        rank = tl.cumsum(tie.to(tl.int32), axis=1)
        prefix = below[:, None] + rank.to(tl.float64) * p64
        keep = (bits > hi[:, None]) | (tie & (prefix.to(tl.float32) >= c))
        if HAS_STA:
            sta = tl.load(sta_ptr + offs_m[:, None] * Nk + offs_n[None, :], mask=mask, other=0)
            keep = keep | (sta != 0)
        keep = keep & mask_n[None, :]
        if HAS_SEG:
            keep = keep & same

        # Compressed rows: pass 1 stores each row's count; pass 2 (the same binary on the same inputs, so
        # the same keep) stores the kept ids ascending at the row's offset, nothing else.
        active = keep.to(tl.int32)
        rows = (bh * Nq + offs_m).to(tl.int64)
        if write_cols != 0:
            start = tl.load(ptr_ptr + bh * (Nq + 1) + offs_m, mask=mask_m, other=0)
            slot = start[:, None] + (tl.cumsum(active, axis=1) - 1).to(tl.int64)
            ids = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32) + offs_n[None, :]
            tl.store(cols_ptr + slot, ids.to(cols_ptr.dtype.element_ty), mask=keep & mask_m[:, None])
        else:
            count = tl.sum(active, axis=1)
            tl.store(counts_ptr + rows, tl.where(row_ok, count, -1), mask=mask_m)


def _nabla_block_mask_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    threshold: float,
    sta: torch.Tensor | None,
    block_size: int,
    token_valid: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None = None,
    token_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher: pool, then the fused mask kernel, twice (counts, then the ids straight into the
    compressed rows: nothing (N, N) is ever allocated). Inputs as validated by :func:`nabla_block_mask`
    (``cu_seqlens`` also by :func:`_check_cu_blocks`).

    ``token_index`` int64 (Sf,) or None: block j pools the raster rows ``token_index[p]`` of q and k
    (B, Sr, H, D) for its positions p; -1 positions are left out like ``token_valid`` False tokens.
    Then ``token_valid`` (Sf,) / (1 or B, Sf), ``cu_seqlens`` and the blocks are in positions."""
    b, s, h, d = q.shape
    if token_index is not None:
        from kandinsky_kernels.ops._bsa_triton import check_token_index_arg

        if k.shape != q.shape:
            raise ValueError(
                f"token_index needs q and k of one shape, got {tuple(q.shape)} and {tuple(k.shape)}"
            )
        check_token_index_arg(token_index, s, block_size, q.device)
        token_index = token_index.contiguous()
        if token_index.numel() > s:  # -1 positions (Sf - rows of them) pool like padding tokens
            real = (token_index >= 0).unsqueeze(0)
            token_valid = real if token_valid is None else token_valid.reshape(-1, token_index.numel()) & real
        s = token_index.numel()  # positions from here on
    n = s // block_size
    qp = torch.empty(b, h, n, d, dtype=torch.float32, device=q.device)
    kt = torch.empty(b, h, d, n, dtype=torch.float32, device=q.device)
    valid = None if token_valid is None else token_valid.reshape(-1, s).contiguous().view(torch.uint8)
    block_t = triton.next_power_of_2(block_size)
    block_hd = min(triton.next_power_of_2(h * d), max(32, 16384 // block_t))
    for x, out, out_strides in (
        (q, qp, (qp.stride(0), qp.stride(1), qp.stride(2), qp.stride(3))),
        (k, kt, (kt.stride(0), kt.stride(1), kt.stride(3), kt.stride(2))),
    ):
        _nabla_pool_kernel[(b * n, triton.cdiv(h * d, block_hd))](
            x,
            x if valid is None else valid,
            out,
            x if token_index is None else token_index,
            n,
            h,
            d,
            *x.stride(),
            0 if valid is None or valid.shape[0] == 1 else valid.stride(0),
            *out_strides,
            BLOCK_SIZE=block_size,
            BLOCK_T=block_t,
            BLOCK_HD=block_hd,
            HAS_VALID=valid is not None,
            HAS_INDEX=token_index is not None,
            num_warps=min(16, max(4, block_t * block_hd // 1024)),
        )

    counts = torch.empty(b, h, n, dtype=torch.int32, device=q.device)
    block_n = triton.next_power_of_2(n)
    # Rows per program: share the pooled-key loads while the (BLOCK_M, BLOCK_N) tile stays register-sized.
    block_m = max(1, min(16, triton.next_power_of_2(n), 2048 // block_n))
    block_d = max(1, min(triton.next_power_of_2(d), 8192 // (block_m * block_n)))
    seg = None if cu_seqlens is None else _block_segments(cu_seqlens, n, block_size)
    sta_u8 = counts if sta is None else sta.contiguous().view(torch.uint8)

    def launch(ptr, cols, write_cols):
        _nabla_mask_fwd_kernel[(b * h, triton.cdiv(n, block_m))](
            qp,
            kt,
            sta_u8,
            counts if seg is None else seg,
            counts,
            ptr,
            cols,
            n,
            n,
            d,
            math.sqrt(d),
            _fp32(1.0 - threshold),
            write_cols,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            HAS_STA=sta is not None,
            HAS_SEG=seg is not None,
            num_warps=min(16, max(4, block_m * block_n // 256)),
        )

    # pass 1: the count of each row (ptr and cols are not read: stand-ins of their dtypes, so that both
    # passes launch one compiled kernel)
    ids_dtype = _ids_dtype(n)
    launch(counts.new_zeros(1, dtype=torch.int64), counts.new_zeros(1, dtype=ids_dtype), 0)
    ptr = _ptr_from_counts(counts)
    lowest, nnz = torch.stack([counts.min().to(torch.int64), ptr[-1, -1, -1]]).tolist()  # one host sync
    if lowest < 0:
        _raise_nonfinite(*(counts < 0).nonzero()[0].tolist())
    # pass 2: recompute the rows, write each row's kept ids ascending at its offset
    cols = torch.empty(nnz, dtype=ids_dtype, device=q.device)
    if cols.numel():
        launch(ptr, cols, 1)
    return ptr, cols


def _raise_nonfinite(b: int, h: int, i: int):
    # The message of the C++ kernel's check, so that every backend reports the same thing.
    raise ValueError(
        f"nabla_block_mask needs finite block logits, but query block {i} of (b={b}, h={h}) has a NaN "
        "or inf logit: q or k holds NaN/inf, or values so large that the pooled q.k overflows fp32"
    )


def _nabla_reference(
    q, k, threshold, sta, block_size, token_valid, cu_seqlens=None, first_block=0
) -> torch.Tensor:
    """The reference algorithm with the kernels' finiteness check: dense bool (B, H, Nq, Nk).

    With ``cu_seqlens`` (already checked by :func:`_check_cu_blocks`) each video is computed alone and
    placed on the block diagonal; everything else stays False."""
    if cu_seqlens is not None:
        def one(qv, kv, sta_v, valid_v, first):
            return _nabla_reference(qv, kv, threshold, sta_v, block_size, valid_v, first_block=first)

        return per_video_ref(one, q, k, sta, block_size, token_valid, cu_seqlens)
    p = block_map_ref(pool_blocks_ref(q, block_size, token_valid),
                      pool_blocks_ref(k, block_size, token_valid))
    bad = (~torch.isfinite(p)).any(-1).nonzero()
    if len(bad):
        b, h, i = bad[0].tolist()
        _raise_nonfinite(b, h, i + first_block)
    mask = topcdf_mask_ref(p, threshold)
    return mask if sta is None else mask | sta


def _check_cu_blocks(cu_seqlens: torch.Tensor, seq_len: int, block_size: int) -> None:
    """The data-dependent checks of ``cu_seqlens``: those of block-sparse attention (start at 0,
    non-decreasing, end <= S), and every offset a multiple of ``block_size``. Reads the values (a host
    sync on a GPU)."""
    check_cu_seqlens(cu_seqlens, seq_len)
    for i, c in enumerate(cu_seqlens.tolist()):
        if c % block_size:
            raise ValueError(
                f"cu_seqlens[{i}]={c} is not a multiple of block_size={block_size}: nabla_block_mask "
                "needs videos of whole blocks (in fractal order every video is)"
            )


def _block_segments(cu_seqlens: torch.Tensor, n: int, block_size: int) -> torch.Tensor:
    """int32 (N,): the video of each block (offsets checked, whole blocks), -1 past ``cu_seqlens[-1]``."""
    starts = torch.arange(n, dtype=torch.int32, device=cu_seqlens.device) * block_size
    seg = torch.searchsorted(cu_seqlens[1:].contiguous(), starts, right=True, out_int32=True)
    return torch.where(starts < cu_seqlens[-1], seg, -1).to(torch.int32).contiguous()


def _fp32(x: float) -> float:
    """``x`` rounded to fp32 (the value torch compares the fp32 prefix sums with)."""
    return torch.tensor(x, dtype=torch.float32).item()


def _backend(device: torch.device | str) -> str:
    """The backend a call on ``device`` runs on now: called inside the custom op, when it runs."""
    implemented = {"triton": HAS_TRITON, "cpu": _ext.cpp_op("nabla_block_mask") is not None}
    return select_backend("nabla_block_mask", device, implemented)


@torch.library.custom_op("kandinsky_kernels::nabla_block_mask", mutates_args=())
def _nabla_block_mask_op(
    q: torch.Tensor,
    k: torch.Tensor,
    threshold: float,
    sta: torch.Tensor | None,
    block_size: int,
    token_valid: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    fixed_size: bool = False,
    token_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    backend = _backend(q.device)
    s = q.shape[1] if token_index is None else token_index.shape[0]
    if cu_seqlens is not None:  # here, so that a compiled graph cannot skip it (C++ checks again)
        _check_cu_blocks(cu_seqlens, s, block_size)
    if token_index is not None:
        check_token_index(token_index, q.shape[1])
    if backend == "cpu":
        ptr, cols = _ext.cpp_op("nabla_block_mask")(q, k, threshold, sta, block_size, token_valid, cu_seqlens,
                                                    *_bsa._index_arg(token_index))
    elif backend == "triton":
        ptr, cols = _nabla_block_mask_forward(q, k, threshold, sta, block_size, token_valid, cu_seqlens,
                                              token_index=token_index)
    else:
        if token_index is not None:  # the reference pools copies in position order
            q, k = gather_positions_ref(q, token_index), gather_positions_ref(k, token_index)
            token_valid = _bsa._index_valid(token_valid, token_index)
        dense = _nabla_reference(q, k, threshold, sta, block_size, token_valid, cu_seqlens)
        mask = BlockSparseMask.from_dense_blocks(dense, block_size)
        ptr, cols = mask.kv_ptr, mask.kv_cols
    if fixed_size:  # every pair's room, so the size is known before it runs (a compiled graph's need)
        b, _, h, _ = q.shape
        full = cols.new_zeros(b * h * (s // block_size) ** 2)
        full[:cols.numel()] = cols
        cols = full
    return ptr, cols


@_nabla_block_mask_op.register_fake
def _(q, k, threshold, sta, block_size, token_valid, cu_seqlens, fixed_size=False, token_index=None):
    b, s, h, _ = q.shape
    if token_index is not None:
        s = token_index.shape[0]
    n = s // block_size
    # the number of active blocks is known only when it runs: a graph needs fixed_size (else it breaks)
    nnz = b * h * n * n if fixed_size else torch.library.get_ctx().new_dynamic_size()
    return q.new_empty(b, h, n + 1, dtype=torch.int64), q.new_empty(nnz, dtype=_ids_dtype(n))


def _sta_blocks(sta: Tensor | None, n: int, s: int, block_size: int) -> Tensor | None:
    """``sta`` as a bool (N, N) (a (1, N, N) or (1, 1, N, N) one squeezed), or ValueError phrased in
    what was passed: blocks of ``block_size`` tokens over S = ``s`` tokens."""
    if sta is None:
        return None
    check_tensor("sta", sta, ndim=(2, 3, 4), dtypes=(torch.bool,))
    lead, last = tuple(sta.shape[:-2]), tuple(sta.shape[-2:])
    if last == (n, n) and all(x == 1 for x in lead):
        return sta.reshape(n, n)
    msg = (f"sta must have shape (Nq, Nk) = ({n}, {n}) (or (1, 1, {n}, {n}), broadcast over B and H): "
           f"one entry per block of {block_size} tokens of S={s}, got {tuple(sta.shape)}")
    if last == (n, n):
        msg += "; a per-batch or per-head STA mask is not supported (it is OR-ed into every (b, h))"
    elif last[0] == last[1] and last[0] * block_size != s:
        msg += (f"; {last[0]} blocks hold {last[0] * block_size} tokens: if sta came from sta_block_mask, "
                "give it the block grid in tiles (FractalLayout.tile_grid = (T, h_tiles, w_tiles)), not "
                "the token grid")
    raise ValueError(msg)


def _check_token_valid(token_valid: Tensor | None, b: int, s: int) -> None:
    if token_valid is None:
        return
    check_tensor("token_valid", token_valid, ndim=(1, 2), dtypes=(torch.bool,))
    if token_valid.shape not in ((s,), (b, s)):
        raise ValueError(
            f"token_valid must have shape (S,) = ({s},) or (B, S) = ({b}, {s}), "
            f"got {tuple(token_valid.shape)}"
        )


def _check_inputs(
    q, k, threshold, sta, block_size, token_valid, cu_seqlens=None, token_index=None
) -> tuple[Tensor | None, Tensor | None]:
    """Raise ValueError on bad input; return (``token_valid`` as a contiguous bool (B, S) or None,
    ``sta`` as a bool (N, N) or None). With ``token_index`` S counts positions (its length) and the
    returned ``token_valid`` is False at its padding positions."""
    check_tensor("q", q, ndim=4, dtypes=_INPUT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=_INPUT_DTYPES)
    if q.shape != k.shape:
        raise ValueError(
            f"q and k must have the same shape (B, S, H, D), got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if q.dtype != k.dtype:
        raise ValueError(f"q and k must have the same dtype, got {q.dtype} and {k.dtype}")
    check_same_device(q=q, k=k, sta=sta, token_valid=token_valid, cu_seqlens=cu_seqlens)
    check_positive_int("block_size", block_size)
    b, s, _, _ = q.shape
    if q.numel() == 0:
        raise ValueError(f"q and k must be non-empty, got shape {tuple(q.shape)}")
    if token_index is not None:
        check_tensor("token_index", token_index, ndim=1, dtypes=(torch.int64,))
        check_same_device(q=q, token_index=token_index)
        s = token_index.shape[0]
        if s % block_size:
            raise ValueError(f"token_index holds Sf={s} positions, not a multiple of block_size={block_size}")
    if s % block_size:
        raise ValueError(
            f"q has shape (B, S, H, D) = {tuple(q.shape)}: S={s} is not a multiple of "
            f"block_size={block_size}" + bshd_hint("q", q.shape, block_size)
        )
    is_number = isinstance(threshold, numbers.Real) and not isinstance(threshold, bool)
    if not is_number or not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
    sta = _sta_blocks(sta, s // block_size, s, block_size)
    if cu_seqlens is not None:  # the values are checked where the kernels run (_check_cu_blocks)
        check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,))
        if cu_seqlens.numel() < 2:
            raise ValueError(
                f"cu_seqlens needs at least 2 offsets (n+1 for n videos), got {cu_seqlens.numel()}"
            )
        if b != 1:
            raise ValueError(
                f"cu_seqlens packs videos along S and needs B == 1, got q shape {tuple(q.shape)}"
            )
    _check_token_valid(token_valid, b, s)
    if token_index is not None:
        real = token_index >= 0
        token_valid = real if token_valid is None else token_valid & real
    return (None if token_valid is None else token_valid.expand(b, s).contiguous()), sta


def nabla_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    threshold: float,
    sta: torch.Tensor | None = None,
    block_size: int = 64,
    *,
    token_valid: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    grid: FractalLayout | tuple[int, int, int] | None = None,
    token_index: torch.Tensor | None = None,
) -> BlockSparseMask:
    """NABLA block mask: the smallest set of most probable key blocks per query block, OR the STA mask.

    Exactly the official Kandinsky 5 rule (see :mod:`kandinsky_kernels.reference.nabla`): mean-pool q
    and k over each block, ``p = softmax(q_pooled @ k_pooled^T / sqrt(D))`` over key blocks in fp32,
    per (batch, head, query block) sort ``p`` ascending (stably: on equal values the lower block index
    is dropped first), cumulative sum (double accumulator, each prefix rounded to fp32), keep the blocks
    whose prefix is ``>= fp32(1 - threshold)``, then OR ``sta``. Computed without sorting and without
    any O(Nq*Nk) temporary besides the returned indices. Not differentiable (integer outputs).

    Args:
        q, k: (B, S, H, D) queries and keys after RMSNorm and RoPE, in fractal token order, fp32, fp16
            or bf16 (pooling and everything after it run in fp32). Same shape, dtype and device.
        threshold: probability mass to keep per row, in (0, 1]; 1 keeps every block. Kandinsky 5 uses
            0.7-0.9. Below ~1e-6, 1 - threshold is within a few ulps of the row total and the rule
            itself may keep no block (then only ``sta`` remains), as in the official code.
        sta: optional bool (Nq, Nk) block mask OR-ed into every (batch, head), e.g. from
            :func:`kandinsky_kernels.sta_block_mask`; (1, Nq, Nk) and (1, 1, Nq, Nk) are accepted and
            broadcast the same way.
        block_size: tokens per block (64 in Kandinsky 5); S must be a multiple of it. Any positive
            size builds a mask; :func:`block_sparse_attention` runs 16, 32, 64 and 128.
            Nq = Nk = S // block_size.
        token_valid: optional bool (S,) or (B, S), False for padding tokens (from the fractal
            reordering). Padding is left out of the pooled means; a block with no real token pools to
            the zero vector. Carried over into the returned mask.
        cu_seqlens: optional int32 (n+1,) offsets of n videos packed along S (needs B == 1), as for
            :func:`kandinsky_kernels.block_sparse_attention`; every offset must be a multiple of
            ``block_size`` (videos in fractal order are whole blocks). Pooling, the block softmax and
            the CDF rule never cross a video: the result equals each video computed alone, placed on
            the block diagonal. Every block pair across videos is inactive, also with ``threshold`` 1
            and where ``sta`` would connect it (``sta`` is AND-ed with "same video"). Tokens past
            ``cu_seqlens[-1]`` belong to no video: their query blocks have no active block (count 0),
            their key blocks are never kept, and their values are never used. Use the mask with
            ``block_sparse_attention(..., cu_seqlens=cu_seqlens)``.
        grid: optional token grid (T, H, W) of q and k, in tokens (latent frames x height x width after
            patching), or a :class:`FractalLayout`: its padding tokens (H or W not a multiple of the
            tile) are marked invalid, AND-ed with ``token_valid``. A tuple is always read in tokens;
            one that only fits S as (T, h_tiles, w_tiles) in tiles is refused with an explanation.
            Its tile must be sqrt(``block_size``).
        token_index: optional int64 (Sf,): q and k are (B, Sr, H, D) in another order (raster, say) and
            position p of the sequence the mask describes reads their row ``token_index[p]`` (-1: a
            padding position, left out of the pooling), as :func:`block_sparse_attention` takes it.
            S, ``token_valid``, ``cu_seqlens`` and the mask are then in positions (Nq = Nk = Sf /
            block_size). :meth:`FractalLayout.token_index` gives it for a raster (T, H, W) grid; pass
            that ``grid`` too, for the STA window's blocks.

    Returns:
        :class:`BlockSparseMask` with ``kv_num_blocks`` int32 (B, H, Nq) and ``kv_indices`` int32
        (B, H, Nq, Nk) (kept key blocks ascending, then the others ascending).

    Raises:
        ValueError: on mismatched or malformed inputs (the message names the shapes or values), and
            when a row of block logits is not finite (NaN or inf in q or k, or pooled means so large
            that q.k overflows fp32): the CDF rule means nothing there. Every backend checks this, also
            under ``torch.compile`` (on a GPU it costs one host sync per call). ``cu_seqlens`` that is
            not int32 (n+1,) with n >= 1, given with B > 1, not starting at 0, decreasing, ending past
            S, or holding an offset that is not a multiple of ``block_size`` (the message names it):
            the value checks run where the kernels run, also under ``torch.compile`` (one host sync).

    Backends (:mod:`kandinsky_kernels.backends`): ``cpu`` (C++/OpenMP), ``triton``, ``reference`` (the
    sort-based algorithm), chosen when the call runs, also inside a compiled graph.
    """
    if grid is not None:
        check_tensor("q", q, ndim=4, dtypes=_INPUT_DTYPES)
        check_positive_int("block_size", block_size)
        if token_index is not None:
            check_tensor("token_index", token_index, ndim=1, dtypes=(torch.int64,))
        s = q.shape[1] if token_index is None else token_index.shape[0]
        _, token_valid = _grid_token_valid(grid, token_valid, s, block_size, q.device, shape=q.shape)
    valid, sta = _check_inputs(q, k, threshold, sta, block_size, token_valid, cu_seqlens, token_index)
    compiling = torch.compiler.is_compiling()
    # Inside a compiled graph the ids get every pair's room (B * H * N * N int16, half an int32 table):
    # a size that depends on the data would break the graph. Eager masks hold exactly their blocks.
    ptr, cols = _nabla_block_mask_op(q, k, float(threshold), sta, block_size, valid, cu_seqlens, compiling,
                                     token_index)
    if not compiling:
        mark_mask_checked(ptr, cols)  # valid by construction
    n = (q.shape[1] if token_index is None else token_index.shape[0]) // block_size
    return BlockSparseMask.from_csr(ptr, cols, n, block_size, token_valid=valid)


# ------------------------------------------------------------------ NABLA + attention, mask recomputed
# The mask is built inside the forward op and again inside the backward op from the saved q and k, so
# nothing mask-sized is kept between them (the attention keeps q, k, v anyway) and no graph value has
# a data-dependent size; the backward runs NABLA on the forward's backend, so it finds the same mask.
@torch.library.custom_op("kandinsky_kernels::nabla_attention_fwd", mutates_args=())
def _nabla_attention_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, threshold: float, sta: Optional[Tensor], block_size: int,
    token_valid: Optional[Tensor], cu_seqlens: Optional[Tensor], scale: float,
    token_index: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    ptr, cols = _nabla_block_mask_op(q, k, threshold, sta, block_size, token_valid, cu_seqlens,
                                     token_index=token_index)
    mark_mask_checked(ptr, cols)
    return _bsa._fwd_op(q, k, v, ptr, cols, block_size, scale, token_valid, cu_seqlens, token_index)


@_nabla_attention_fwd_op.register_fake
def _(q, k, v, threshold, sta, block_size, token_valid, cu_seqlens, scale, token_index=None):
    return _bsa._fake_fwd_outputs(q, token_index)


@torch.library.custom_op("kandinsky_kernels::nabla_attention_bwd", mutates_args=())
def _nabla_attention_bwd_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, threshold: float,
    sta: Optional[Tensor], block_size: int, token_valid: Optional[Tensor], cu_seqlens: Optional[Tensor],
    scale: float, backend_tag: Tensor, token_index: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    with use_backend(_backend_of_tag(backend_tag)):
        ptr, cols = _nabla_block_mask_op(q, k, threshold, sta, block_size, token_valid, cu_seqlens,
                                         token_index=token_index)
    mark_mask_checked(ptr, cols)
    q_ptr, q_cols = _transpose_csr(ptr, cols, lse.shape[2] // block_size)
    return _bsa._bwd_op(dout, q, k, v, out, lse, ptr, cols, q_ptr, q_cols, block_size, scale, token_valid,
                        cu_seqlens, backend_tag, None, token_index)


@_nabla_attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, threshold, sta, block_size, token_valid, cu_seqlens, scale, backend_tag,
      token_index=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _nabla_attention_setup(ctx, inputs, output):
    q, k, v, threshold, sta, block_size, token_valid, cu_seqlens, scale, *rest = inputs
    out, lse, tag = output
    ctx.save_for_backward(q, k, v, out, lse, sta, token_valid, cu_seqlens, tag, rest[0] if rest else None)
    ctx.params = (threshold, block_size, scale)
    ctx.set_materialize_grads(False)


def _nabla_attention_backward(ctx, dout, dlse, dtag):
    q, k, v, out, lse, sta, token_valid, cu_seqlens, tag, token_index = ctx.saved_tensors
    if dout is None:  # lse is not returned by the public function: only out carries a gradient
        return (None,) * 10
    threshold, block_size, scale = ctx.params
    dq, dk, dv = _nabla_attention_bwd_op(dout, q, k, v, out, lse, threshold, sta, block_size, token_valid,
                                         cu_seqlens, scale, tag, token_index)
    return dq, dk, dv, None, None, None, None, None, None, None


_nabla_attention_fwd_op.register_autograd(_nabla_attention_backward, setup_context=_nabla_attention_setup)


def _nabla_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, threshold: float, sta: Tensor | None = None, block_size: int = 64,
    token_valid: Tensor | None = None, cu_seqlens: Tensor | None = None, scale: float | None = None,
    token_index: Tensor | None = None,
) -> Tensor:
    """``block_sparse_attention(q, k, v, nabla_block_mask(q, k, threshold, sta, block_size, ...))`` with
    the same result, forward and backward, but the mask is recomputed in the backward instead of kept:
    no mask memory between them, and under ``torch.compile`` no mask in the graph at all. Arguments as
    :func:`nabla_block_mask` takes them (``sta`` a block mask), q, k, v (B, S, H, D) of one shape
    (with ``token_index``: (B, Sr, H, D) rows read through it, S in positions)."""
    valid, sta = _check_inputs(q, k, threshold, sta, block_size, token_valid, cu_seqlens, token_index)
    # the attention's own checks, against an empty mask of the right shape (a few bytes)
    n = (q.shape[1] if token_index is None else token_index.shape[0]) // block_size
    shape_only = BlockSparseMask.from_csr(q.new_zeros((1, 1, n + 1), dtype=torch.int64),
                                          q.new_zeros((0,), dtype=torch.int16), n, block_size)
    _bsa._check_offset_args(cu_seqlens, None, None)
    _bsa._validate(q, k, v, shape_only, {"cu_seqlens": cu_seqlens, "cu_seqlens_q": None,
                                          "cu_seqlens_k": None}, scale, token_index)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _, _ = _nabla_attention_fwd_op(q, k, v, float(threshold), sta, block_size, valid, cu_seqlens, scale,
                                        token_index)
    return out


@overload
def nabla_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    threshold: float,
    sta_window: Sequence[int] | None = ...,
    grid: FractalLayout | tuple[int, int, int] | None = ...,
    return_mask: Literal[False] = ...,
    scale: float | None = ...,
    cu_seqlens: Tensor | None = ...,
    *,
    token_valid: Tensor | None = ...,
    order: Literal["fractal", "raster"] = ...,
) -> Tensor: ...


@overload
def nabla_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    threshold: float,
    sta_window: Sequence[int] | None,
    grid: FractalLayout | tuple[int, int, int] | None,
    return_mask: Literal[True],
    scale: float | None = ...,
    cu_seqlens: Tensor | None = ...,
    *,
    token_valid: Tensor | None = ...,
    order: Literal["fractal", "raster"] = ...,
) -> tuple[Tensor, BlockSparseMask]: ...


@overload
def nabla_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    threshold: float,
    sta_window: Sequence[int] | None = ...,
    grid: FractalLayout | tuple[int, int, int] | None = ...,
    *,
    return_mask: Literal[True],
    scale: float | None = ...,
    cu_seqlens: Tensor | None = ...,
    token_valid: Tensor | None = ...,
    order: Literal["fractal", "raster"] = ...,
) -> tuple[Tensor, BlockSparseMask]: ...


@overload
def nabla_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    threshold: float,
    sta_window: Sequence[int] | None = ...,
    grid: FractalLayout | tuple[int, int, int] | None = ...,
    return_mask: bool = ...,
    scale: float | None = ...,
    cu_seqlens: Tensor | None = ...,
    *,
    token_valid: Tensor | None = ...,
    order: Literal["fractal", "raster"] = ...,
) -> Tensor | tuple[Tensor, BlockSparseMask]: ...


def nabla_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    threshold: float,
    sta_window: Sequence[int] | None = (11, 3, 3),
    grid: FractalLayout | tuple[int, int, int] | None = None,
    return_mask: bool = False,
    scale: float | None = None,
    cu_seqlens: Tensor | None = None,
    *,
    token_valid: Tensor | None = None,
    order: Literal["fractal", "raster"] = "fractal",
) -> Tensor | tuple[Tensor, BlockSparseMask]:
    """NABLA adaptive block mask (united with a sliding-tile window) and attention in one call.

    Args:
        q, k, v: (B, S, H, D) in fractal token order (:func:`kandinsky_kernels.fractal_flatten`),
            S = T * Hp * Wp (H, W padded up to multiples of 8). Same dtypes/head dims as
            :func:`block_sparse_attention`.
        threshold: NABLA CDF threshold in (0, 1] (keep the most likely key blocks up to this mass).
        sta_window: (wT, wH, wW) sliding-tile window in frames and 8x8 tiles, united with the NABLA
            mask, or None.
        grid: the token grid, in TOKENS: (T, H, W) = latent frames x height x width after patching
            (before the padding to 8x8 tiles), or the :class:`FractalLayout` that
            ``fractal_flatten(..., return_layout=True)`` returned. Padding tokens of a grid whose H or
            W is not a multiple of 8 are masked (never attended to) from it, and the STA window is laid
            on its blocks. A tuple is always read in tokens; a (T, h_tiles, w_tiles) tuple in tiles
            (what this argument took before) does not fit S and is refused with an explanation (the one
            grid that fits both, H = W = 1, is read in tokens). ``None`` is accepted only with
            ``sta_window=None`` and an explicit ``token_valid`` (the library cannot tell padding from
            q alone).
        return_mask: also return the :class:`BlockSparseMask`, e.g. to reuse it for the
            unconditional CFG branch with :func:`block_sparse_attention`.
        scale: softmax scale, default 1/sqrt(D).
        cu_seqlens: optional int32 (n+1,) offsets of n videos packed along S (needs B == 1), each a
            multiple of 64 (whole blocks). Passed to both :func:`kandinsky_kernels.nabla_block_mask`
            (each video's mask computed alone, nothing across videos, the STA window included) and
            :func:`block_sparse_attention`: every video attends as if it ran alone, and tokens past
            ``cu_seqlens[-1]`` return zeros. ``grid`` (for the STA window) spans the whole S; videos of
            different grids pass ``token_valid`` instead (their layouts' flags concatenated).
        token_valid: optional bool (S,) or (B, S), False for tokens never to attend to (AND-ed with
            the padding of ``grid``); all True declares that no token is padding.
        order: ``"fractal"`` (default): q, k, v and the output in fractal order, as above.
            ``"raster"``: q, k, v (B, T*H*W, H, D) in the model's own raster order (frame, row,
            column: token (t, y, x) at row (t*H + y)*W + x), the output likewise. The kernels read
            and write the rows through the fractal index of ``grid`` (required; a token-grid tuple or
            a FractalLayout): no fractal-order copy of q, k, v or the output is made, and the result
            equals ``fractal_unflatten(nabla_attention(fractal_flatten(q), ...))`` bit for bit on
            every backend. ``token_valid`` is then (S,) / (B, S) over the fractal positions (S =
            T*Hp*Wp), as ``FractalLayout.token_valid()`` gives it; ``cu_seqlens`` is not taken (pack
            videos in fractal order). With ``return_mask`` the mask is in fractal positions: reuse it
            with ``block_sparse_attention(q, k, v, mask, token_index=layout.token_index())``.

    Returns:
        out (B, S, H, D) in q's dtype, or (out, mask) with ``return_mask=True``. Without
        ``return_mask`` the mask lives only inside the forward op and is built again in the backward
        from the saved q and k on the forward's backend (the same mask, a NABLA call's cost): nothing
        mask-sized is kept for the backward, and a compiled graph holds no mask.

    Raises:
        ValueError: as :func:`kandinsky_kernels.nabla_block_mask` and :func:`block_sparse_attention`
            raise (a bad ``cu_seqlens``: not int32 (n+1,), B > 1, not starting at 0, decreasing,
            ending past S, or an offset that is not a multiple of 64), a bad ``grid`` / window, a grid
            that does not hold S tokens (the message says the units it read, and hints at (B, H, S, D)
            input), or ``grid=None`` without ``token_valid``.
    """
    check_tensor("q", q, ndim=4)
    if order not in ("fractal", "raster"):
        raise ValueError(f"order must be 'fractal' or 'raster', got {order!r}")
    token_index = None
    if order == "raster":
        grid, token_index = _raster_grid(q, grid, cu_seqlens)
    if isinstance(grid, FractalLayout) and grid.block_size != 64:
        raise ValueError(f"nabla_attention uses 64-token blocks, but grid has tile {grid.tile} "
                         f"({grid.block_size}-token blocks); flatten with tile=8")
    if grid is None:
        if sta_window is not None:
            raise ValueError("nabla_attention needs grid=(T, H, W) (the token grid) or a FractalLayout "
                             "when sta_window is set")
        if token_valid is None:
            raise ValueError(
                "nabla_attention got grid=None and no token_valid, so it cannot tell padding tokens from "
                "real ones: pass grid=(T, H, W), the token grid (latent frames x height x width after "
                "patching), or the FractalLayout from fractal_flatten(..., return_layout=True); or "
                "token_valid= (bool (S,) or (B, S), all True when no token is padding)"
            )
        tile_grid = None
    else:
        s = q.shape[1] if token_index is None else token_index.shape[0]
        layout, token_valid = _grid_token_valid(grid, token_valid, s, 64, q.device, shape=q.shape)
        tile_grid = layout.tile_grid
    sta = None
    if sta_window is not None:
        if not isinstance(sta_window, (tuple, list)):
            raise ValueError(f"sta_window must be three positive odd ints (wT, wH, wW) or None, "
                             f"got {sta_window!r}")
        sta = sta_block_mask(*tile_grid, tuple(sta_window), device=q.device)
    if not return_mask:  # the mask is recomputed in the backward rather than kept
        return _nabla_sparse_attention(q, k, v, threshold, sta, 64, token_valid, cu_seqlens, scale, token_index)
    mask = nabla_block_mask(q, k, threshold, sta=sta, block_size=64, token_valid=token_valid,
                            cu_seqlens=cu_seqlens, token_index=token_index)
    out = block_sparse_attention(q, k, v, mask, scale, cu_seqlens, token_index=token_index)
    return out, mask


def _raster_grid(q: Tensor, grid, cu_seqlens) -> tuple[FractalLayout, Tensor]:
    """``order="raster"``: the layout of ``grid`` (tile 8), checked to hold q's T*H*W raster tokens, and
    its fractal index on q's device (built valid, so never checked again)."""
    if grid is None:
        raise ValueError("nabla_attention(order='raster') needs grid=(T, H, W), the token grid of q's raster "
                         "rows (latent frames x height x width after patching), or a FractalLayout")
    if cu_seqlens is not None:
        raise ValueError("nabla_attention(order='raster') takes one token grid, not cu_seqlens: pack videos "
                         "in fractal order (fractal_flatten each) and call with order='fractal'")
    layout = _layout_arg(grid)
    rows = layout.t * layout.h * layout.w
    if q.shape[1] != rows:
        raise ValueError(
            f"order='raster': grid {_fmt_grid(grid) if not isinstance(grid, FractalLayout) else grid} holds "
            f"T*H*W = {layout.t}*{layout.h}*{layout.w} = {rows} raster tokens, but q has S={q.shape[1]} "
            f"(shape {tuple(q.shape)})" + _bhsd_hint("q", q.shape, rows))
    return layout, _raster_token_index(layout, q.device)


def _raster_token_index(layout: FractalLayout, device: torch.device) -> Tensor:
    """``layout.token_index(device)``: built in the graph under torch.compile (the ops check it), else
    one cached index per (layout, device)."""
    if torch.compiler.is_compiling():
        return layout.token_index(device)
    return _cached_token_index(layout, torch.device(device))


@functools.lru_cache(maxsize=32)
def _cached_token_index(layout: FractalLayout, device: torch.device) -> Tensor:
    """One index per (layout, device), shared by the layers of a model and built valid (never checked).
    Built outside inference mode: an inference tensor could not be saved for a later backward."""
    with torch.inference_mode(False):
        index = layout.token_index(device)
    mark_token_index_checked(index, layout.t * layout.h * layout.w)
    return index
