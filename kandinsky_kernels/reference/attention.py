"""Reference block-sparse attention: dense SDPA with the block mask expanded to tokens.

O(B * H * S^2) memory; the ground truth of tests and the ``reference`` backend. Differentiable
(plain autograd through it).
"""
from __future__ import annotations

import torch

from kandinsky_kernels.mask import BlockSparseMask


def token_mask(mask: BlockSparseMask, batch: int, heads: int, cu_seqlens: torch.Tensor | None = None):
    """Bool (B, H, S, S): query i sees key j. Block pattern (broadcast from the mask's B, H of 1),
    pad keys removed, and with ``cu_seqlens`` only pairs inside one video (tokens past the last
    offset see nothing and are seen by nothing)."""
    dense = mask.to_dense_tokens()  # (Bm, Hm, S, S), pad keys already removed
    dense = dense.expand(batch, heads, -1, -1)
    if cu_seqlens is not None:
        s = dense.shape[-1]
        pos = torch.arange(s, device=dense.device)
        # segment id per token; -1 past the end (matched by nothing thanks to the `>= 0` test)
        seg = torch.searchsorted(cu_seqlens.to(pos.dtype)[1:], pos, right=True)
        seg = torch.where(pos < cu_seqlens[-1].to(pos.dtype), seg, -1)
        same = (seg[:, None] == seg[None, :]) & (seg[:, None] >= 0)
        dense = dense & same
    return dense


def _probs(q, k, mask: BlockSparseMask, scale, cu_seqlens):
    """Softmax probabilities (B, H, Sq, Sk) over the visible keys, masked logits, and the bool
    (B, H, Sq, 1) "row sees some key". Rows that see nothing are softmaxed over zeros (finite values
    and gradients), then zeroed."""
    b, _, h, _ = q.shape
    allowed = token_mask(mask, b, h, cu_seqlens)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    any_key = allowed.any(-1, keepdim=True)
    scores = scores.masked_fill(~any_key, 0.0)
    return torch.softmax(scores, -1) * any_key, scores, any_key


def _compute_dtype(x: torch.Tensor, upcast: bool) -> torch.dtype:
    return torch.float32 if upcast and x.dtype != torch.float64 else x.dtype


def block_sparse_attention_with_lse(q, k, v, mask: BlockSparseMask, scale=None, cu_seqlens=None, upcast=True):
    """(out (B, S, H, D), lse (B, H, S) fp32 natural log, -inf for rows that see no key)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype, cdt = q.dtype, _compute_dtype(q, upcast)
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    probs, scores, any_key = _probs(q, k, mask, scale, cu_seqlens)
    lse = torch.logsumexp(scores.float(), -1).masked_fill(~any_key[..., 0], float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", probs.to(v.dtype), v)
    return out.to(dtype), lse


def block_sparse_attention_backward_reference(dout, q, k, v, mask: BlockSparseMask, scale=None, cu_seqlens=None):
    """(dq, dk, dv) of the reference in closed form, fp32 (fp64 for fp64 inputs), in the inputs' dtype.

    Written out rather than taken from autograd so it also runs where autograd is off, e.g. inside the
    backward custom op: dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(P * dP)), dQ = scale dS K,
    dK = scale dS^T Q.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype, cdt = q.dtype, _compute_dtype(q, True)
    q, k, v, dout = q.to(cdt), k.to(cdt), v.to(cdt), dout.to(cdt)
    p, _, _ = _probs(q, k, mask, scale, cu_seqlens)
    dp = torch.einsum("bqhd,bkhd->bhqk", dout, v)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, k) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    dv = torch.einsum("bhqk,bqhd->bkhd", p, dout)
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)


def block_sparse_attention_reference(q, k, v, mask: BlockSparseMask, scale=None, cu_seqlens=None, upcast=True):
    """Dense masked attention. q, k, v: (B, S, H, D); returns (B, S, H, D) in q's dtype.

    ``upcast=True`` computes in fp32 (or in the inputs' dtype when that is fp64); ``upcast=False``
    computes in the inputs' dtype, the "plain torch at that precision" of the tolerance policy.
    """
    return block_sparse_attention_with_lse(q, k, v, mask, scale, cu_seqlens, upcast)[0]
