"""Attention backends of the CrossDiT, chosen per call by name (a model attribute, not a class).

All functions take and return the BSHD layout: q (B, Sq, H, Dh), k and v (B, Sk, H, Dh), output
(B, Sq, H, Dh), default scale 1/sqrt(Dh).

Dense backends (visual self-attention, refiner and cross-attention):
  ``sdpa``   ``torch.nn.functional.scaled_dot_product_attention``; a boolean key mask (B, Sk) is
             passed as the bool ``attn_mask`` (B, 1, 1, Sk).
  ``flash``  flash-attn 2 when installed (fp16/bf16 on CUDA); masked keys go through the varlen API
             (keys unpadded).
  ``flex``   ``torch.nn.attention.flex_attention``, compiled on first use on CUDA (eager elsewhere:
             Inductor's CPU flex needs a compiler per shape, and eager flex is exact). Flex has no
             CPU backward: train on CPU with ``sdpa`` or ``nabla``.
Sparse backend (visual self-attention only; text attention falls back to ``sdpa`` as officially):
  ``nabla``  :func:`kandinsky_kernels.nabla_block_mask` from the post-RMSNorm/RoPE q, k (CDF threshold
             P, STA window union), then :func:`kandinsky_kernels.block_sparse_attention`. Tokens must
             be in fractal order; pad tokens of a non-multiple-of-8 grid are excluded via
             ``token_valid``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

import kandinsky_kernels as kk
from kandinsky_kernels.ops.nabla import _nabla_sparse_attention

from .config import ATTENTION_BACKENDS


@dataclass
class NablaState:
    """Per-forward NABLA inputs, built once from the token grid (see ``CrossDiT``)."""

    threshold: float
    """CDF mass P kept per query block."""
    block_size: int
    """Tokens per block (64)."""
    sta: torch.Tensor | None
    """bool (N, N) sliding-tile block mask in fractal block order, or None (no STA union)."""
    token_valid: torch.Tensor | None
    """bool (S,) False on pad tokens of the fractal layout, or None when the grid has no padding."""
    record: list | None = None
    """When a list, every computed ``BlockSparseMask`` is appended (tests and density reports)."""


@dataclass
class Packing:
    """Several videos packed along the token axis of one sample (B = 1), each a contiguous run of whole
    frames: video i owns tokens ``cu_tokens[i]:cu_tokens[i + 1]`` and text row i. No token attends to
    another video's tokens or text."""

    cu_tokens: tuple[int, ...]
    """Token offsets of the videos, n + 1 Python ints from 0 to S."""
    cu_seqlens: torch.Tensor
    """The same offsets as an int32 (n + 1,) tensor on the tokens' device (for the NABLA kernels)."""

    def segments(self) -> list[tuple[int, int]]:
        return list(zip(self.cu_tokens[:-1], self.cu_tokens[1:]))


@dataclass
class AttentionContext:
    """What the blocks need to attend: backend name, text key mask, NABLA state."""

    backend: str = "sdpa"
    """Visual self-attention backend (one of ``sdpa``, ``flash``, ``flex``, ``nabla``)."""
    text_mask: torch.Tensor | None = None
    """bool (B, L), True on real text tokens; masks keys of the refiner and cross-attention."""
    nabla: NablaState | None = field(default=None)
    packing: Packing | None = None
    """Packed videos (``CrossDiT.forward(cu_frames=...)``), or None: one video per sample."""
    self_attention_hook: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    """Set from outside the model only (sequence parallelism, ``training/parallelize.py``): visual
    self-attention returns ``hook(q, k, v)`` instead of calling the backend. The blocks then hold a
    slice of the tokens, and the hook moves q, k, v to the layout it needs (all tokens, some heads),
    attends with its own context and moves the result back. The model stays free of
    ``torch.distributed``: this is a plain callable."""

    def __post_init__(self) -> None:
        if self.backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {self.backend!r}")
        if self.backend == "nabla" and self.nabla is None:
            raise ValueError("the nabla backend needs a NablaState")

    @property
    def text_backend(self) -> str:
        """Backend of the refiner and cross-attention: dense always (NABLA is visual-only)."""
        return "sdpa" if self.backend == "nabla" else self.backend


# ------------------------------------------------------------------------------------- dense backends
def _sdpa(q, k, v, key_mask):
    mask = None if key_mask is None else key_mask[:, None, None, :]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


def _flash(q, k, v, key_mask):
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ModuleNotFoundError as e:  # pragma: no cover - depends on the install
        if e.name != "flash_attn":  # installed but broken (a missing dependency): show that error
            raise
        raise RuntimeError("attention backend 'flash' needs the flash-attn package") from e
    if key_mask is None:
        return flash_attn_func(q, k, v)
    b, sq, h, d = q.shape
    lens = key_mask.sum(-1, dtype=torch.int32)
    cu_k = F.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device=q.device)
    out = flash_attn_varlen_func(
        q.reshape(b * sq, h, d), k[key_mask], v[key_mask], cu_q, cu_k, sq, int(lens.max()),
    )
    return out.view(b, sq, h, d)


_FLEX: Callable | None = None


def _flex_fn(device: torch.device) -> Callable:
    """flex_attention, compiled once on first CUDA use (eager flex materialises the scores)."""
    global _FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _FLEX is None:
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def _flex(q, k, v, key_mask):
    from torch.nn.attention.flex_attention import create_block_mask

    b, sq, _, _ = q.shape
    block_mask = None
    if key_mask is not None:
        km = key_mask

        def mask_mod(bi, hi, qi, ki):
            return km[bi, ki]

        block_mask = create_block_mask(mask_mod, b, None, sq, k.shape[1], device=q.device)
    out = _flex_fn(q.device)(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
    return out.transpose(1, 2)


_DENSE = {"sdpa": _sdpa, "flash": _flash, "flex": _flex}


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Full attention, q (B, Sq, H, Dh), k/v (B, Sk, H, Dh), key_mask bool (B, Sk) -> (B, Sq, H, Dh)."""
    try:
        fn = _DENSE[backend]
    except KeyError:
        raise ValueError(f"no dense attention backend {backend!r}; choose one of {sorted(_DENSE)}") from None
    return fn(q, k, v, key_mask)


# ------------------------------------------------------------------------------------- sparse backend
def nabla_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: NablaState,
                    cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """NABLA self-attention on fractal-ordered tokens, q/k/v (B, S, H, Dh) with S = N * block_size;
    ``cu_seqlens`` (int32 (n + 1,), B = 1) keeps packed videos apart in the mask and the attention."""
    if state.record is None:  # the usual case: the mask is recomputed in the backward, never kept
        return _nabla_sparse_attention(q, k, v, state.threshold, state.sta, state.block_size,
                                       state.token_valid, cu_seqlens)
    mask = kk.nabla_block_mask(
        q, k, state.threshold, sta=state.sta, block_size=state.block_size, token_valid=state.token_valid,
        cu_seqlens=cu_seqlens,
    )
    state.record.append(mask)
    return kk.block_sparse_attention(q, k, v, mask, cu_seqlens=cu_seqlens)


def self_attention(q, k, v, ctx: AttentionContext) -> torch.Tensor:
    """Visual self-attention through ``ctx.backend`` (no key mask: every visual token is real, pads of
    the fractal layout are handled by ``token_valid``). Packed videos: NABLA masks and attends per
    video through ``cu_seqlens``; the dense backends attend video by video."""
    if ctx.self_attention_hook is not None:
        return ctx.self_attention_hook(q, k, v)
    pk = ctx.packing
    if ctx.backend == "nabla":
        return nabla_attention(q, k, v, ctx.nabla, None if pk is None else pk.cu_seqlens)  # type: ignore[arg-type]
    if pk is None:
        return dense_attention(q, k, v, None, ctx.backend)
    return torch.cat([dense_attention(q[:, a:b], k[:, a:b], v[:, a:b], None, ctx.backend)
                      for a, b in pk.segments()], dim=1)


def cross_attention(q, k, v, ctx: AttentionContext) -> torch.Tensor:
    """Visual queries q (B, S, H, Dh) to text keys k, v (B, L, H, Dh) masked by ``ctx.text_mask``;
    packed videos (B = 1, k and v (n, L, H, Dh)): the tokens of video i see text row i only."""
    pk = ctx.packing
    if pk is None:
        return text_attention(q, k, v, ctx)
    mask = ctx.text_mask
    return torch.cat([
        dense_attention(q[:, a:b], k[i:i + 1], v[i:i + 1], None if mask is None else mask[i:i + 1],
                        ctx.text_backend)
        for i, (a, b) in enumerate(pk.segments())], dim=1)


def text_attention(q, k, v, ctx: AttentionContext) -> torch.Tensor:
    """Refiner self-attention or cross-attention: keys are text tokens masked by ``ctx.text_mask``."""
    return dense_attention(q, k, v, ctx.text_mask, ctx.text_backend)
