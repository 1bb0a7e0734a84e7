"""Reference block-sparse attention: dense SDPA with the block mask expanded to tokens.

O(B * H * S^2) memory; the ground truth of tests and the ``reference`` backend. Differentiable
(plain autograd through it).
"""
from __future__ import annotations

import torch

from kandinsky_kernels.mask import BlockSparseMask


def _token_mask(
    mask: BlockSparseMask, batch: int, heads: int, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """Bool (B, H, S, S): query i sees key j. Block pattern (broadcast from the mask's B, H of 1),
    pad keys removed, and with ``cu_seqlens`` only pairs inside one video (tokens past the last
    offset see nothing and are seen by nothing)."""
    dense = mask.to_dense_tokens()  # (Bm, Hm, Sq, Sk), pad keys already removed
    dense = dense.expand(batch, heads, -1, -1)
    if cu_seqlens is not None:
        seg_q, seg_k = _segments(cu_seqlens, dense.shape[-2], dense.shape[-1], dense.device)
        same = (seg_q[:, None] == seg_k[None, :]) & (seg_q[:, None] >= 0)
        dense = dense & same
    return dense


def _segments(cu_seqlens: torch.Tensor, sq: int, sk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Video ids of the query and key tokens: ``cu_seqlens`` (n+1,) serves both sides (Sq == Sk),
    (2, n+1) holds the query offsets then the key offsets."""
    if cu_seqlens.dim() == 2:
        return _segment_ids(cu_seqlens[0], sq, device), _segment_ids(cu_seqlens[1], sk, device)
    seg = _segment_ids(cu_seqlens, sq, device)
    return seg, seg


def _segment_ids(cu_seqlens: torch.Tensor, s: int, device) -> torch.Tensor:
    """int64 (S,): the video each token belongs to; -1 past the last offset (matched by nothing thanks
    to the callers' ``>= 0`` test)."""
    pos = torch.arange(s, device=device)
    cu = cu_seqlens.to(device=device, dtype=pos.dtype)
    seg = torch.searchsorted(cu[1:], pos, right=True)
    return torch.where(pos < cu[-1], seg, -1)


def _probs(q, k, mask: BlockSparseMask, scale, cu_seqlens):
    """Softmax probabilities (B, H, Sq, Sk) over the visible keys, masked logits, the bool
    (B, H, Sq, 1) "row sees some key" and the token mask (B, H, Sq, Sk). Rows that see nothing are
    softmaxed over zeros (finite values and gradients), then zeroed. Probabilities of hidden keys are
    exactly 0 even in a row made NaN by a NaN score, as in the kernels, which never touch them."""
    b, _, h, _ = q.shape
    allowed = _token_mask(mask, b, h, cu_seqlens)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    any_key = allowed.any(-1, keepdim=True)
    scores = scores.masked_fill(~any_key, 0.0)
    probs = torch.where(allowed, torch.softmax(scores, -1), 0.0)
    return probs, scores, any_key, allowed


def _compute_dtype(x: torch.Tensor, upcast: bool) -> torch.dtype:
    return torch.float32 if upcast and x.dtype != torch.float64 else x.dtype


def block_sparse_attention_with_lse(
    q, k, v, mask: BlockSparseMask, scale=None, cu_seqlens=None, upcast=True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, S, H, D), lse (B, H, S) fp32 natural log, -inf for rows that see no key)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype, cdt = q.dtype, _compute_dtype(q, upcast)
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    probs, scores, any_key, _ = _probs(q, k, mask, scale, cu_seqlens)
    lse = torch.logsumexp(scores.float(), -1).masked_fill(~any_key[..., 0], float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", probs.to(v.dtype), v)
    return out.to(dtype), lse


def block_sparse_attention_backward_reference(
    dout, q, k, v, mask: BlockSparseMask, scale=None, cu_seqlens=None, dlse=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of the reference in closed form, fp32 (fp64 for fp64 inputs), in the inputs' dtype.

    Written out rather than taken from autograd so it also runs where autograd is off, e.g. inside the
    backward custom op: dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(P * dP)), dQ = scale dS K,
    dK = scale dS^T Q. ``dlse`` (B, H, S), the gradient of the returned log-sum-exp, adds
    P * dlse to dS (d lse_i / d s_ij = P_ij).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype, cdt = q.dtype, _compute_dtype(q, True)
    q, k, v, dout = q.to(cdt), k.to(cdt), v.to(cdt), dout.to(cdt)
    p, _, _, allowed = _probs(q, k, mask, scale, cu_seqlens)
    dp = torch.einsum("bqhd,bkhd->bhqk", dout, v)
    delta = (p * dp).sum(-1, keepdim=True)
    if dlse is not None:
        delta = delta - dlse.to(cdt)[..., None]
    ds = torch.where(allowed, p * (dp - delta), 0.0)
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, k) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    dv = torch.einsum("bhqk,bqhd->bkhd", p, dout)
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)


def block_sparse_attention_reference(
    q, k, v, mask: BlockSparseMask, scale=None, cu_seqlens=None, upcast=True
) -> torch.Tensor:
    """Dense masked attention. q, k, v: (B, S, H, D); returns (B, S, H, D) in q's dtype.

    Non-finite inputs: a row whose visible scores hold a NaN (or an inf that meets another) is NaN, as
    in torch's SDPA and in the kernels. Being dense, the products here also multiply hidden entries by
    zero, so a NaN/inf stored in q, k or v at a position a row does not see can still turn that row
    (or a gradient) NaN here, where the block-sparse kernels never read it.

    ``upcast=True`` computes in fp32 (or in the inputs' dtype when that is fp64); ``upcast=False``
    computes in the inputs' dtype, the "plain torch at that precision" of the tolerance policy.
    """
    return block_sparse_attention_with_lse(q, k, v, mask, scale, cu_seqlens, upcast)[0]


@torch.no_grad()
def block_sparse_attention_chunked(q, k, v, mask: BlockSparseMask, scale=None, cu_seqlens=None, *,
                                   dtype: torch.dtype = torch.float32,
                                   chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's (out, lse) computed one (batch, head, query chunk) at a time, without autograd.

    q, k, v: (B, S, H, D), any strides and device. Computed in ``dtype`` (fp32 or fp64: the oracle; the
    inputs' own dtype: plain torch at that precision, the yardstick of the tolerance policy). Returns out
    (B, S, H, D) in ``dtype`` and lse (B, H, S) fp32 (natural log, -inf and a zero output for a row that
    sees no key), the same as :func:`block_sparse_attention_with_lse`. Memory is O(chunk x S) rather than
    the dense reference's O(B x H x S^2), so it checks kernels at video lengths: at S = 93,696 one head's
    dense logits alone take 35 GB in fp32.
    """
    b, s, h, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    bs = mask.block_size
    blocks = mask.to_dense_blocks()  # (Bm, Hm, Nq, Nk), Bm in (1, B), Hm in (1, H)
    tv = mask.token_valid  # (Bt, Sk) or None
    seg, seg_k = (None, None) if cu_seqlens is None else _segments(cu_seqlens, s, k.shape[1], q.device)
    out = torch.empty(b, s, h, d, dtype=dtype, device=q.device)
    lse = torch.empty(b, h, s, dtype=torch.float32, device=q.device)
    for bi in range(b):
        for hi in range(h):
            kk, vv = k[bi, :, hi].to(dtype), v[bi, :, hi].to(dtype)
            blk = blocks[bi % blocks.shape[0], hi % blocks.shape[1]]
            for c0 in range(0, s, chunk):
                r = slice(c0, c0 + chunk)
                allowed = blk[torch.arange(c0, min(c0 + chunk, s), device=q.device) // bs]
                allowed = allowed.repeat_interleave(bs, 1)
                if tv is not None:
                    allowed = allowed & tv[bi % tv.shape[0]][None, :]
                if seg is not None:
                    sq = seg[r]
                    allowed = allowed & (sq[:, None] == seg_k[None, :]) & (sq[:, None] >= 0)
                logits = (q[bi, r, hi].to(dtype) @ kk.T) * scale
                logits = logits.masked_fill(~allowed, float("-inf"))
                lse[bi, hi, r] = torch.logsumexp(logits.float(), -1)
                out[bi, r, hi] = torch.softmax(logits, -1).nan_to_num(0.0) @ vv
    return out, lse
