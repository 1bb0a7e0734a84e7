"""Building blocks of the CrossDiT. Attribute names equal the official ones, so state_dict keys match.

Numerics follow the official forward: the time embedding, the modulation MLPs, LayerNorm with
scale/shift, the gated residual sums, the QK RMSNorm and RoPE run in fp32; results are cast back to
the activation dtype (that of the block input). Linear layers, attention and the MLP run in the
activation dtype.

Named dims: B batch, S visual tokens, L text tokens, D model_dim, E time_dim, H heads, Dh head_dim,
T' latent frames after patching.
Conditioning vectors are per sample, (B, E), and broadcast over tokens; for packed videos (several
clips along the time axis of one sample, see ``CrossDiT.forward(cu_frames=...)``) they are per frame,
(B, T', E), and broadcast over the tokens of each frame: every frame holds the same number of tokens
in both token orders, so the modulation stays T' x D small instead of one row per token.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kandinsky_kernels.ops.adaln import gated_residual, scale_shift_layer_norm
from kandinsky_kernels.ops.qk_norm import rms_norm_rope

from .attention import AttentionContext, cross_attention, self_attention, text_attention
from .linear import Linear, is_plain_linear, linear, linear_gelu

LN_EPS = 1e-5


def _fp32_linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(x)`` with input and weights upcast to fp32 (the official fp32-autocast islands)."""
    b = None if layer.bias is None else layer.bias.float()
    return linear(x.float(), layer.weight.float(), b)


class TimeEmbeddings(nn.Module):
    """Timestep (B,) in the official scale (1000 t) -> fp32 (B, E).

    Sinusoid of ``model_dim`` features (cos first, then sin; ``model_dim/2`` frequencies
    ``exp(-ln(10000) i / (model_dim/2))``), then Linear -> SiLU -> Linear, all fp32.
    """

    def __init__(self, model_dim: int, time_dim: int, max_period: float = 10000.0):
        super().__init__()
        self.model_dim = model_dim
        self.max_period = max_period
        self.in_layer = Linear(model_dim, time_dim)
        self.activation = nn.SiLU()
        self.out_layer = Linear(time_dim, time_dim)

    def forward(self, time: torch.Tensor) -> torch.Tensor:
        half = self.model_dim // 2
        # Computed on the fly (no buffer), so meta-device construction and loading need no re-init.
        steps = torch.arange(half, dtype=torch.float32, device=time.device)
        freqs = torch.exp(-math.log(self.max_period) * steps / half)
        args = time.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return _fp32_linear(self.activation(_fp32_linear(emb, self.in_layer)), self.out_layer)


class TextEmbeddings(nn.Module):
    """Linear + affine LayerNorm: Qwen hidden states (B, L, 3584) -> (B, L, D); also used for the
    pooled CLIP vector (B, 768) -> (B, E)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.in_layer = Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.in_layer(x))


class VisualEmbeddings(nn.Module):
    """Patch embedding: latents (B, T, H, W, C) channels-last -> tokens (B, T/pt, H/ph, W/pw, D).

    Each patch is flattened with feature order (pt, ph, pw, C), C fastest (official layout).
    """

    def __init__(self, in_channels: int, model_dim: int, patch_size: tuple[int, int, int]):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.in_layer = Linear(math.prod(patch_size) * in_channels, model_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h, w, c = x.shape
        pt, ph, pw = self.patch_size  # divisibility is checked by CrossDiT.prepare
        x = x.reshape(b, t // pt, pt, h // ph, ph, w // pw, pw, c)
        x = x.permute(0, 1, 3, 5, 2, 4, 6, 7).flatten(4)
        return self.in_layer(x)


class Modulation(nn.Module):
    """SiLU -> Linear(E, n*D), fp32: conditioning (B, E) -> fp32 (B, n*D). Zero-initialised."""

    def __init__(self, time_dim: int, model_dim: int, num_params: int):
        super().__init__()
        self.num_params = num_params
        self.activation = nn.SiLU()
        self.out_layer = Linear(time_dim, num_params * model_dim)
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)

    def forward(self, time_embed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, E) -> ``num_params`` fp32 tensors (B, 1, D), ready to broadcast over tokens;
        per frame (B, T', E) -> (B, T', 1, D), broadcast over the tokens of each frame."""
        out = _fp32_linear(self.activation(time_embed.float()), self.out_layer)
        return out.unsqueeze(-2).chunk(self.num_params, dim=-1)


def scale_shift_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``LN(x) * (1 + scale) + shift`` in fp32 (non-affine LayerNorm, eps 1e-5), cast to x.dtype.
    x (B, S, D); shift, scale (B, 1, D), or per frame (B, T', 1, D). One fused pass
    (:func:`kandinsky_kernels.ops.adaln.scale_shift_layer_norm`, fused backward too)."""
    return scale_shift_layer_norm(x, shift, scale, LN_EPS)


def gate_sum(x: torch.Tensor, out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Gated residual ``x + gate * out`` in fp32, cast to x.dtype; gate as ``shift`` above. One fused
    pass (:func:`kandinsky_kernels.ops.adaln.gated_residual`)."""
    return gated_residual(x, out, gate)


class RMSNorm(nn.Module):
    """RMSNorm over the head dim with a learned weight, fp32, eps = fp32 machine epsilon (the
    official module passes ``eps=None``). Returns fp32."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = torch.finfo(torch.float32).eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)

    def norm_rope(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, dtype: torch.dtype):
        """``apply_rope(self(x), *rope).to(dtype)`` (no rotation for ``rope=None``) in one pass
        (kandinsky_kernels.rms_norm_rope): x (B, S, H, Dh), rope (cos, sin) (1|B, S, 1, Dh/2)."""
        cos, sin = rope if rope is not None else (None, None)
        return rms_norm_rope(x, self.weight, cos, sin, self.eps).to(dtype)


class _Attention(nn.Module):
    """q, k, v projections (with bias), per-head fp32 RMSNorm on q and k, output projection."""

    def __init__(self, num_channels: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.to_query = Linear(num_channels, num_channels)
        self.to_key = Linear(num_channels, num_channels)
        self.to_value = Linear(num_channels, num_channels)
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)
        self.out_layer = Linear(num_channels, num_channels)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (-1, self.head_dim))


class SelfAttention(_Attention):
    """Self-attention with RoPE: x (B, S, D), rope (cos, sin) fp32 (1|B, S, 1, Dh/2) -> (B, S, D)."""

    def forward(self, x, rope, ctx: AttentionContext, text: bool = False):
        q = self.query_norm.norm_rope(self._heads(self.to_query(x)), rope, x.dtype)
        k = self.key_norm.norm_rope(self._heads(self.to_key(x)), rope, x.dtype)
        v = self._heads(self.to_value(x))
        out = text_attention(q, k, v, ctx) if text else self_attention(q, k, v, ctx)
        return self.out_layer(out.flatten(-2))


class CrossAttention(_Attention):
    """Visual queries (B, S, D) attend to refined text (B, L, D), keys masked by ``ctx.text_mask``;
    q and k RMSNorm-ed, no RoPE."""

    def forward(self, x, text, ctx: AttentionContext):
        q = self.query_norm.norm_rope(self._heads(self.to_query(x)), None, x.dtype)
        k = self.key_norm.norm_rope(self._heads(self.to_key(text)), None, x.dtype)
        v = self._heads(self.to_value(text))
        return self.out_layer(cross_attention(q, k, v, ctx).flatten(-2))


class FeedForward(nn.Module):
    """Linear(D, F, no bias) -> exact GELU -> Linear(F, D, no bias)."""

    def __init__(self, dim: int, ff_dim: int):
        super().__init__()
        self.in_layer = Linear(dim, ff_dim, bias=False)
        self.activation = nn.GELU()
        self.out_layer = Linear(ff_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (type(self.activation) is nn.GELU and self.activation.approximate == "none"
                and is_plain_linear(self.in_layer)):
            h = linear_gelu(x, self.in_layer.weight, self.in_layer.bias)
        else:
            h = self.activation(self.in_layer(x))
        return self.out_layer(h)


class TransformerEncoderBlock(nn.Module):
    """Linguistic Token Refiner block: AdaLN self-attention (1-D RoPE, masked keys) + AdaLN MLP.

    Modulation order (6 chunks): [shift, scale, gate] attention, [shift, scale, gate] MLP.
    """

    def __init__(self, model_dim: int, time_dim: int, ff_dim: int, head_dim: int):
        super().__init__()
        self.text_modulation = Modulation(time_dim, model_dim, 6)
        self.self_attention = SelfAttention(model_dim, head_dim)
        self.feed_forward = FeedForward(model_dim, ff_dim)

    def forward(self, x, time_embed, rope, ctx: AttentionContext):
        """x (B, L, D), time_embed (B, E), rope (cos, sin) (1, L, 1, Dh/2) -> (B, L, D)."""
        sa_shift, sa_scale, sa_gate, ff_shift, ff_scale, ff_gate = self.text_modulation(time_embed)
        h = self.self_attention(scale_shift_norm(x, sa_shift, sa_scale), rope, ctx, text=True)
        x = gate_sum(x, h, sa_gate)
        h = self.feed_forward(scale_shift_norm(x, ff_shift, ff_scale))
        return gate_sum(x, h, ff_gate)


class TransformerDecoderBlock(nn.Module):
    """CrossDiT block: AdaLN self-attention (3-D RoPE, backend of ``ctx``), AdaLN cross-attention to
    the refined text, AdaLN MLP, each with a gated residual.

    Modulation order (9 chunks): [shift, scale, gate] x (self-attention, cross-attention, MLP).
    """

    def __init__(self, model_dim: int, time_dim: int, ff_dim: int, head_dim: int):
        super().__init__()
        self.visual_modulation = Modulation(time_dim, model_dim, 9)
        self.self_attention = SelfAttention(model_dim, head_dim)
        self.cross_attention = CrossAttention(model_dim, head_dim)
        self.feed_forward = FeedForward(model_dim, ff_dim)

    def forward(self, x, text, time_embed, rope, ctx: AttentionContext):
        """x (B, S, D), text (B, L, D), time_embed (B, E), rope (cos, sin) (1, S, 1, Dh/2) -> (B, S, D).
        Packed videos (``ctx.packing``): B = 1, text (n, L, D) one row per video, time_embed per frame
        (1, T', E)."""
        (sa_shift, sa_scale, sa_gate, ca_shift, ca_scale, ca_gate,
         ff_shift, ff_scale, ff_gate) = self.visual_modulation(time_embed)
        h = self.self_attention(scale_shift_norm(x, sa_shift, sa_scale), rope, ctx)
        x = gate_sum(x, h, sa_gate)
        h = self.cross_attention(scale_shift_norm(x, ca_shift, ca_scale), text, ctx)
        x = gate_sum(x, h, ca_gate)
        h = self.feed_forward(scale_shift_norm(x, ff_shift, ff_scale))
        return gate_sum(x, h, ff_gate)


class OutLayer(nn.Module):
    """AdaLN ([shift, scale]) -> Linear(D, prod(patch) * C_out) -> unpatchify.

    The output feature vector is read as (C, pt, ph, pw), C slowest (unlike the input patchify).
    """

    def __init__(self, model_dim: int, time_dim: int, out_dim: int, patch_size: tuple[int, int, int]):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.out_dim = out_dim
        self.modulation = Modulation(time_dim, model_dim, 2)
        self.out_layer = Linear(model_dim, math.prod(patch_size) * out_dim)

    def forward(self, x: torch.Tensor, time_embed: torch.Tensor) -> torch.Tensor:
        """x (B, T', H', W', D), time_embed (B, E) or per frame (B, T', E) -> (B, T, H, W, C_out)."""
        b, t, h, w, d = x.shape
        shift, scale = self.modulation(time_embed)
        x = scale_shift_norm(x.view(b, -1, d), shift, scale)
        x = self.out_layer(x)
        pt, ph, pw = self.patch_size
        x = x.view(b, t, h, w, self.out_dim, pt, ph, pw)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)
        return x.reshape(b, t * pt, h * ph, w * pw, self.out_dim)
