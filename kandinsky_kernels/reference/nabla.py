"""Pure-torch references of the NABLA block mask (the official sort-based algorithm).

Official algorithm (Kandinsky 5 ``nablaT_v2``; q, k post-RoPE, fractal order, blocks of 64 tokens):

1. mean-pool q and k over each block;
2. ``p = softmax(q_pooled @ k_pooled^T / sqrt(D))`` over key blocks;
3. per (batch, head, query block): sort ``p`` ascending, cumulative sum, keep the entries whose prefix
   is ``>= 1 - threshold``, scatter back: the smallest set of largest blocks holding ``threshold`` of
   the mass;
4. OR with the STA mask.

Pinned details (every backend reproduces them bit for bit up to the rounding of ``p`` itself):

- pooling and everything after it run in fp32 whatever the input dtype;
- the sort is stable: equal probabilities are ordered by block index, so the lower index is dropped
  first;
- torch's CPU ``cumsum`` of fp32 accumulates in double and rounds every prefix to fp32, and the
  comparison is ``fp32 prefix >= fp32(1 - threshold)``; ``threshold = 1`` keeps every block;
- padding tokens (``token_valid`` False) are left out of the pooling mean; a block with no real token
  pools to the zero vector (so a padded query block gets a uniform row, a padded key block logit 0).
"""
from __future__ import annotations

import math

import torch


def pool_blocks_ref(
    x: torch.Tensor, block_size: int, token_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """x (B, S, H, D) -> fp32 (B, H, S // block_size, D): mean over the real tokens of each block."""
    b, s, h, d = x.shape
    xb = x.reshape(b, s // block_size, block_size, h, d)
    if token_valid is None:
        pooled = xb.mean(2, dtype=torch.float32)
    else:
        valid = token_valid.expand(b, s).reshape(b, s // block_size, block_size, 1, 1)
        total = torch.where(valid, xb.float(), 0.0).sum(2)
        pooled = total / valid.sum(2).clamp(min=1).float()
    return pooled.transpose(1, 2)


def block_map_ref(q_pooled: torch.Tensor, k_pooled: torch.Tensor) -> torch.Tensor:
    """fp32 (B, H, Nq, D), (B, H, Nk, D) -> fp32 (B, H, Nq, Nk) block probabilities (rows sum to 1)."""
    logits = q_pooled @ k_pooled.transpose(-1, -2) / math.sqrt(q_pooled.shape[-1])
    return torch.softmax(logits, dim=-1)


def topcdf_mask_ref(p: torch.Tensor, threshold: float) -> torch.Tensor:
    """The official CDF rule on fp32 probabilities (..., Nk) -> bool (..., Nk), with a stable sort."""
    vals, inds = p.sort(dim=-1, stable=True)
    keep_sorted = vals.cumsum(-1) >= 1 - threshold
    return keep_sorted.gather(-1, inds.argsort(-1))


def nabla_block_mask_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    threshold: float,
    sta: torch.Tensor | None = None,
    block_size: int = 64,
    token_valid: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """q, k (B, S, H, D) -> dense bool (B, H, Nq, Nk) NABLA mask (Nq = Nk = S // block_size).

    ``sta``: optional bool (Nq, Nk) OR-ed in. ``token_valid``: optional bool (S,) or (B, S).
    ``cu_seqlens``: optional int32 (n+1,) offsets of n packed videos (B == 1), each a multiple of
    ``block_size`` (not checked here): every video is computed alone (its slice of q, k, token_valid
    and its diagonal part of ``sta``) and placed on the block diagonal; every other entry, including
    the rows and columns of blocks past ``cu_seqlens[-1]``, is False.
    """
    if cu_seqlens is not None:
        def one(qv, kv, sta_v, valid_v, first_block):
            return nabla_block_mask_ref(qv, kv, threshold, sta_v, block_size, valid_v)

        return per_video_ref(one, q, k, sta, block_size, token_valid, cu_seqlens)
    q_pooled = pool_blocks_ref(q, block_size, token_valid)
    k_pooled = pool_blocks_ref(k, block_size, token_valid)
    p = block_map_ref(q_pooled, k_pooled)
    mask = topcdf_mask_ref(p, threshold)
    return mask if sta is None else mask | sta


def per_video_ref(fn, q, k, sta, block_size, token_valid, cu_seqlens) -> torch.Tensor:
    """Dense bool (B, H, Nq, Nk) with ``fn(q_v, k_v, sta_v, token_valid_v, first_block)``, the mask of
    each video of ``cu_seqlens`` (int32 offsets, multiples of ``block_size``) computed alone, on the
    block diagonal; every other entry False. ``sta_v`` / ``token_valid_v`` are the video's parts (or
    None), ``first_block`` the video's first block index in the packed sequence."""
    b, s, h, _ = q.shape
    n = s // block_size
    dense = torch.zeros(b, h, n, n, dtype=torch.bool, device=q.device)
    valid = None if token_valid is None else token_valid.expand(b, s)
    offsets = cu_seqlens.tolist()
    for start, end in zip(offsets, offsets[1:]):
        if start == end:
            continue
        lo, hi = start // block_size, end // block_size
        sta_v = None if sta is None else sta[lo:hi, lo:hi]
        valid_v = None if valid is None else valid[:, start:end]
        dense[:, :, lo:hi, lo:hi] = fn(q[:, start:end], k[:, start:end], sta_v, valid_v, lo)
    return dense


def nabla_official(
    q: torch.Tensor, k: torch.Tensor, threshold: float, sta: torch.Tensor | None = None, block_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official pipeline end to end in plain torch, the speed baseline of the fused kernels.

    q, k (B, H, S, D) as the official model passes them: transposed views of the (B, S, H, D)
    projections. Returns ``(kv_num_blocks int32 (B, H, N), kv_indices int32 (B, H, N, N))``. The
    pooling accumulates in fp32 (``mean(dtype=float32)``, no upcast copy of q, k); the sorts are
    stable, so the indices come out in :class:`BlockSparseMask` order (kept ascending, then the rest).
    """
    b, h, s, d = q.shape
    qa = q.reshape(b, h, s // block_size, block_size, d).mean(-2, dtype=torch.float32)
    ka = k.reshape(b, h, s // block_size, block_size, d).mean(-2, dtype=torch.float32)
    mask = topcdf_mask_ref(block_map_ref(qa, ka), threshold)
    if sta is not None:
        mask |= sta
    kv_num_blocks = mask.sum(-1).to(torch.int32)
    kv_indices = mask.argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    return kv_num_blocks, kv_indices
