"""The causal 3-D video VAE of HunyuanVideo ("884-16c-hy"), used by every Kandinsky 5.0 video model.

Architecturally identical to diffusers' ``AutoencoderKLHunyuanVideo`` and the original
``AutoencoderKLCausal3D``: same module tree, parameter names and shapes (248 tensors, 246,478,803
parameters at the published config), so their weights load unchanged. Plain PyTorch; the tiler
(:mod:`kandinsky_model.vae_tiling`) wraps :meth:`CausalVideoVAE._encode` / :meth:`CausalVideoVAE._decode`.
Kernels (``kandinsky_kernels``, on by default, ``USE_KERNELS = False`` for the plain-torch path): the
fused GroupNorm + SiLU writes the causal conv's replicate-padded input directly (no F.pad copy), the
upsamplers' nearest upsampling and padding are one gather, the attention's GroupNorm is the same kernel
without SiLU, and the tiler blends with the fused tile blend. The convolutions stay on oneDNN / cuDNN.

Named dims: B batch, C channels, F video frames (``1 + 4k``), H x W pixels (multiples of 8);
latents have ``t = 1 + (F - 1) / 4`` frames of ``h x w = H/8 x W/8``.

- Encoder: ``conv_in`` 3 -> 128, four down blocks (2 resnets each; strides (1,2,2), (2,2,2), (2,2,2),
  none), mid block (resnet, single-head attention, resnet), GroupNorm + SiLU, ``conv_out`` -> 2 x 16
  (mean, logvar), ``quant_conv`` (1x1x1).
- Decoder: ``post_quant_conv`` (1x1x1), ``conv_in`` 16 -> 512, mid block, four up blocks (3 resnets
  each; upsampling (1,2,2), (2,2,2), (2,2,2), none), GroupNorm + SiLU, ``conv_out`` -> 3.
- Every convolution is causal in time: frame 0 is repeated ``k - 1`` times in front (replicate padding,
  also replicate in space), so output frame ``i`` sees input frames ``<= i`` only. Temporal
  upsampling doubles every frame except frame 0, which keeps the ``1 + 4k`` frame counts.
- The mid-block attention is block-causal over frames (a token of frame ``i`` attends to every token
  of frames ``<= i``). It runs one query-frame chunk at a time against the keys of the frames up to
  it, so the dense ``(THW)^2`` mask of the peers is never built (67.6 GiB at 121x512x768).

The model is causal per layer, not end to end: GroupNorm normalises over (C/G, T, H, W) and the
attention's GroupNorm over all tokens, so later frames shift the statistics of earlier ones.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

import kandinsky_kernels as kk  # ops load on first use: importing the model stays cheap

from ._checks import check_bool, check_int, check_ints, check_number
from .linear import Linear
from .vae_tiling import TilingConfig, plan_tiling, resolve_tiling, tiled_decode, tiled_encode

__all__ = ["CausalVAEConfig", "CausalConv3d", "CausalVideoVAE", "TilingConfig", "block_causal_attention",
           "plan_tiling"]

# Block type names of the two published configs (diffusers, original release); both mean the same.
_DOWN_BLOCK_TYPES = ("HunyuanVideoDownBlock3D", "DownEncoderBlockCausal3D")
_UP_BLOCK_TYPES = ("HunyuanVideoUpBlock3D", "UpDecoderBlockCausal3D")


# ------------------------------------------------------------------------------------------ config
@dataclass(kw_only=True, slots=True)
class CausalVAEConfig:
    """Hyper-parameters of :class:`CausalVideoVAE`; the defaults are the published HunyuanVideo VAE
    (diffusers ``AutoencoderKLHunyuanVideo`` config names). Tests build tiny variants with fewer
    channels (e.g. ``block_out_channels=(8, 16, 16, 32), norm_num_groups=4``)."""

    in_channels: int = 3
    """Channels of the video (RGB)."""
    out_channels: int = 3
    """Channels of the decoded video."""
    latent_channels: int = 16
    """Latent channels C; the encoder emits 2C (mean and log-variance)."""
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    """Width of each encoder down block (the decoder's up blocks use them reversed); >= 3 blocks."""
    layers_per_block: int = 2
    """Resnets per encoder down block; the decoder's up blocks have one more."""
    norm_num_groups: int = 32
    """GroupNorm groups (eps 1e-6 everywhere); must divide every block width."""
    scaling_factor: float = 0.476986
    """Latents are multiplied by this before the diffusion model (applied outside the VAE; no shift)."""
    spatial_compression_ratio: int = 8
    """H and W shrink by this (2**s, one stride-2 stage per block from the first, s <= len(blocks))."""
    temporal_compression_ratio: int = 4
    """Frames shrink from 1 + 4k to 1 + k; 4 is the only ratio the HunyuanVideo decoder defines."""
    mid_block_add_attention: bool = True
    """Whether the mid blocks carry the single-head block-causal attention."""
    act_fn: str = "silu"
    """Activation; only SiLU exists in this VAE."""

    def __post_init__(self) -> None:
        """Raises ValueError naming the field on a bad value; a list ``block_out_channels`` becomes a tuple."""
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            check_int(name, getattr(self, name))
        if not isinstance(self.block_out_channels, (list, tuple)) or len(self.block_out_channels) < 3:
            raise ValueError(
                f"block_out_channels must be a list of >= 3 positive ints (one per down block; the 4x "
                f"temporal compression needs two inner blocks), got {self.block_out_channels!r}"
            )
        self.block_out_channels = check_ints(
            "block_out_channels", self.block_out_channels, len(self.block_out_channels)
        )
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"norm_num_groups={self.norm_num_groups} must divide every block width, but "
                f"block_out_channels={self.block_out_channels} has {bad}"
            )
        self.scaling_factor = check_number("scaling_factor", self.scaling_factor, gt=0.0)
        s = check_int("spatial_compression_ratio", self.spatial_compression_ratio, ge=2)
        if s & (s - 1) or s.bit_length() - 1 > len(self.block_out_channels):
            raise ValueError(
                f"spatial_compression_ratio must be a power of 2 with at most one halving per block "
                f"(<= {2 ** len(self.block_out_channels)} for {len(self.block_out_channels)} blocks), got {s}"
            )
        if self.temporal_compression_ratio != 4 or isinstance(self.temporal_compression_ratio, bool):
            raise ValueError(
                "temporal_compression_ratio must be 4 (the only ratio the HunyuanVideo decoder defines), "
                f"got {self.temporal_compression_ratio!r}"
            )
        check_bool("mid_block_add_attention", self.mid_block_add_attention)
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"act_fn must be 'silu' (the only activation of this VAE), got {self.act_fn!r}")

    def replace(self, **changes: Any) -> "CausalVAEConfig":
        return dataclasses.replace(self, **changes)

    @property
    def down_strides(self) -> list[tuple[int, int, int] | None]:
        """(T, H, W) stride of each encoder down block's downsampler, None where it has none.

        diffusers' rule: spatial halving in the first log2(spatial) blocks, temporal halving in the two
        blocks before the last; (1,2,2), (2,2,2), (2,2,2), None at the published config."""
        n = len(self.block_out_channels)
        n_space = self.spatial_compression_ratio.bit_length() - 1
        n_time = 2  # log2(temporal_compression_ratio)
        out: list[tuple[int, int, int] | None] = []
        for i in range(n):
            hw = 2 if i < n_space else 1
            t = 2 if n - 1 - n_time <= i < n - 1 else 1
            out.append(None if (t, hw) == (1, 1) else (t, hw, hw))
        return out

    @property
    def up_factors(self) -> list[tuple[int, int, int] | None]:
        """(T, H, W) nearest-upsampling factor of each decoder up block, None where it has none.

        diffusers applies the encoder's rule to the up blocks (which run widest-last), so the factors
        sit at the same block indices: (1,2,2), (2,2,2), (2,2,2), None at the published config."""
        return self.down_strides

    def to_dict(self) -> dict[str, Any]:
        """The Diffusers ``config.json`` content of ``AutoencoderKLHunyuanVideo`` (what :meth:`from_dict` reads)."""
        n = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKLHunyuanVideo",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "latent_channels": self.latent_channels,
            "down_block_types": [_DOWN_BLOCK_TYPES[0]] * n,
            "up_block_types": [_UP_BLOCK_TYPES[0]] * n,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "act_fn": self.act_fn,
            "norm_num_groups": self.norm_num_groups,
            "scaling_factor": self.scaling_factor,
            "spatial_compression_ratio": self.spatial_compression_ratio,
            "temporal_compression_ratio": self.temporal_compression_ratio,
            "mid_block_add_attention": self.mid_block_add_attention,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CausalVAEConfig":
        """Read a ``config.json`` of diffusers' ``AutoencoderKLHunyuanVideo`` or of the original
        ``AutoencoderKLCausal3D`` (``time_compression_ratio``, ``*CausalBlock3D`` type names).

        Keys starting with ``_`` are metadata; the original tiling settings (``sample_size``,
        ``sample_tsize``) and other unknown keys are ignored with a warning. Raises ValueError for a
        block type other than the HunyuanVideo ones, a block-type list whose length is not that of
        ``block_out_channels``, or an invalid value (see ``__post_init__``)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a VAE config must be a dict, got {type(d).__name__}")
        d = dict(d)
        if "time_compression_ratio" in d and "temporal_compression_ratio" not in d:
            d["temporal_compression_ratio"] = d.pop("time_compression_ratio")
        n = len(d.get("block_out_channels", cls().block_out_channels) or ())
        for key, accepted in (("down_block_types", _DOWN_BLOCK_TYPES), ("up_block_types", _UP_BLOCK_TYPES)):
            types = d.pop(key, None)
            if types is None:
                continue
            if (not isinstance(types, (list, tuple)) or len(types) != n
                    or any(t not in accepted for t in types)):
                raise ValueError(
                    f"{key} must list one of {accepted} per block ({n} blocks), got {types!r}"
                )
        own = {f.name for f in dataclasses.fields(cls)}
        ignored = sorted(k for k in d if k not in own and not k.startswith("_"))
        if ignored:
            warnings.warn(f"CausalVAEConfig.from_dict ignores keys {ignored}", stacklevel=2)
        return cls(**{k: v for k, v in d.items() if k in own})


# ------------------------------------------------------------------------------------------ layers
# The VAE runs on the kandinsky_kernels ops (fused GroupNorm + SiLU writing the next causal conv's padded
# input, causal pad / upsample gathers, fused tile blend); False restores the plain-torch path (F.pad +
# conv3d, nn.GroupNorm + SiLU, lerp blend) for A/B comparisons. Read at every call.
USE_KERNELS = True
# On the kernels path on CPU, the encoder and decoder run channels-last-3d (B, T, H, W, C in memory)
# from their first layer to their last: oneDNN convolves that layout without reordering activations to
# and from its blocked format at every call, and the VAE kernels read and write it natively. False keeps
# the contiguous (B, C, T, H, W) layout (for A/B comparisons). Read at every call.
CHANNELS_LAST = True


def _kernels() -> bool:
    return USE_KERNELS


def _channels_last_wanted() -> bool:
    """CHANNELS_LAST applies where the C++ kernels run (not with KANDINSKY_KERNELS_BACKEND=reference: the
    torch references would take the layout to torch's channels-last GroupNorm, which loses ~1e-4 relative
    accuracy at 17x256x256 to cancellation, and the reference path is the ground truth)."""
    if not (USE_KERNELS and CHANNELS_LAST):
        return False
    from kandinsky_kernels.backends import forced_backend

    return forced_backend() in (None, "cpu")


def _channels_last(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dim() == 5 and _channels_last_wanted()


def _to_layout(x: torch.Tensor) -> torch.Tensor:
    """The encoder's / decoder's input in the layout its layers run in (see CHANNELS_LAST)."""
    return x.contiguous(memory_format=torch.channels_last_3d) if _channels_last(x) else x


def _weights_to_channels_last(module: nn.Module) -> None:
    """Store every Conv3d weight under ``module`` channels-last-3d, in place (values, names and the
    Parameter objects unchanged): oneDNN takes a channels-last input's weight in that layout, and
    ``torch.mkldnn_convolution`` would otherwise copy a contiguous weight at every call (~50 ms for a
    512 x 512 x 3^3 weight on this project's CPU). Done once; a no-op check afterwards."""
    cl = torch.channels_last_3d
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv3d) and not m.weight.is_contiguous(memory_format=cl):
                m.weight.data = m.weight.data.contiguous(memory_format=cl)


def _conv_goes_to_onednn(conv: nn.Conv3d, x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and not torch.is_grad_enabled()
            and x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)
            and conv.padding_mode == "zeros" and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled)


def _conv(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``; a channels-last-3d CPU input at inference goes to oneDNN directly: ``F.conv3d``
    sends small ones (N * C * T * H <= 20480) to its im2col fallback, which is ~1.5-2x slower in that
    layout. Same arithmetic (oneDNN) as F.conv3d takes for the large ones; ``torch.backends.mkldnn``
    disabled is honoured (F.conv3d then)."""
    if _conv_goes_to_onednn(conv, x):
        return torch.mkldnn_convolution(x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation,
                                        conv.groups)
    return conv(x)


def _norm_silu_padded(norm: nn.GroupNorm, x: torch.Tensor, conv: "CausalConv3d") -> torch.Tensor:
    """``silu(norm(x))`` written by the fused kernel directly as ``conv``'s replicate-padded input (no
    unpadded normalised activation, no padded copy); ``conv.conv`` (padding 0) then completes the conv."""
    return kk.group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, pad=conv.pad3)


def _norm_silu_pad(norm: nn.GroupNorm, x: torch.Tensor, conv: "CausalConv3d") -> torch.Tensor:
    """``conv(silu(norm(x)))``, on the kernels when enabled."""
    if _kernels():
        return _conv(conv.conv, _norm_silu_padded(norm, x, conv))
    return conv(_silu(norm(x)))


def _silu(x: torch.Tensor) -> torch.Tensor:
    # In place when no graph is recorded: saves one full activation per call at inference. Under
    # autograd the out-of-place op is used, so no saved tensor can be overwritten.
    return F.silu(x, inplace=not torch.is_grad_enabled())


def _conv_add_(conv: nn.Conv3d, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``conv(x) + residual`` at inference, written into ``residual`` (returned): for channels-last-3d CPU
    tensors oneDNN adds the residual inside the convolution (a fused post-op, bit for bit conv then add),
    so the sum costs no separate pass and no new activation. Otherwise ``_conv(conv, x).add_(residual)``.
    ``residual`` must be free to overwrite (an intermediate activation)."""
    if (_fused_conv_add() and residual.dtype == x.dtype and residual.device.type == "cpu"
            and not residual.is_contiguous() and residual.is_contiguous(memory_format=torch.channels_last_3d)
            and _conv_goes_to_onednn(conv, x)):
        torch.ops.mkldnn._convolution_pointwise_.binary(
            residual, x, conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation),
            conv.groups, "add", 1.0, None, [], None)
        return residual
    return _conv(conv, x).add_(residual)


_FUSED_CONV_ADD: bool | None = None


def _fused_conv_add() -> bool:
    """Whether this torch build has oneDNN's in-place conv + add (``mkldnn._convolution_pointwise_``),
    checked once on a tiny input against conv + add."""
    global _FUSED_CONV_ADD
    if _FUSED_CONV_ADD is None:
        try:
            cl = torch.channels_last_3d
            x = torch.randn(1, 2, 2, 3, 3).contiguous(memory_format=cl)
            w = torch.randn(2, 2, 1, 1, 1).contiguous(memory_format=cl)
            r = torch.randn(1, 2, 2, 3, 3).contiguous(memory_format=cl)
            out = r.clone()
            torch.ops.mkldnn._convolution_pointwise_.binary(out, x, w, None, [0] * 3, [1] * 3, [1] * 3, 1, "add",
                                                             1.0, None, [], None)
            _FUSED_CONV_ADD = bool(torch.allclose(out, F.conv3d(x, w) + r, atol=1e-5))
        except Exception:  # an op missing from this build, or with another signature
            _FUSED_CONV_ADD = False
    return _FUSED_CONV_ADD


class CausalConv3d(nn.Module):
    """``nn.Conv3d`` causal in time: the input is padded with ``kT - 1`` copies of frame 0 in front
    (nothing behind) and ``k // 2`` replicated border pixels on each side in H and W, then convolved
    with padding 0. Output frame ``i`` depends on input frames ``<= i * stride_T`` only.

    The conv lives in ``self.conv`` (hence the ``.conv.conv`` parameter names of the published weights).
    Input (B, C_in, T, H, W) -> (B, C_out, (T - 1) // sT + 1, ceil(H / sH), ceil(W / sW)) for k = 3.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int] = 3,
        stride: int | tuple[int, int, int] = 1, bias: bool = True,
    ) -> None:
        super().__init__()
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        # F.pad order is (W left, W right, H top, H bottom, T front, T back). diffusers swaps the kT/kW
        # entries (harmless for its cubic kernels); this order is right for any kernel.
        self.padding = (kw // 2, kw // 2, kh // 2, kh // 2, kt - 1, 0)
        self.pad3 = (kt - 1, kh // 2, kw // 2)  # (front frames, rows, columns): kandinsky_kernels' order
        self.conv = nn.Conv3d(in_channels, out_channels, (kt, kh, kw), stride, padding=0, bias=bias)

    def forward(self, x: torch.Tensor, up: tuple[int, int, int] = (1, 1, 1)) -> torch.Tensor:
        """``up``: the VAE's causal nearest upsampling applied first (kernels path: fused into the pad)."""
        if _kernels():
            if any(self.pad3) or tuple(up) != (1, 1, 1):
                x = kk.causal_pad3d(x, self.pad3, up)
            return _conv(self.conv, x)
        if tuple(up) != (1, 1, 1):
            x = _upsample_causal(x, up)
        if any(self.padding):
            x = F.pad(x, self.padding, mode="replicate")
        return self.conv(x)


class ResnetBlockCausal3D(nn.Module):
    """GroupNorm, SiLU, causal conv, GroupNorm, SiLU, causal conv, plus the (1x1x1-projected) input."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.conv_shortcut = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _kernels():
            # Rebinding h frees conv1's output as soon as its padded normalised copy exists: besides x at
            # most two activations are alive (the plain path holds three: norm output, padded copy, conv).
            h = _conv(self.conv1.conv, _norm_silu_padded(self.norm1, x, self.conv1))
            h = _norm_silu_padded(self.norm2, h, self.conv2)
            if not torch.is_grad_enabled():  # x is an intermediate activation: the sum may overwrite it
                residual = x if self.conv_shortcut is None else self.conv_shortcut(x)
                del x
                return _conv_add_(self.conv2.conv, h, residual)
            h = _conv(self.conv2.conv, h)
        else:
            h = self.conv1(_silu(self.norm1(x)))
            h = self.conv2(_silu(self.norm2(h)))
        residual = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h.add_(residual) if not torch.is_grad_enabled() else h + residual


def block_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens_per_frame: int, *, frames_per_chunk: int = 1,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention in which a token of frame ``i`` attends to every token of frames ``<= i``.

    q, k, v: (B, N, S, D) with S = T * tokens_per_frame tokens in frame-major order. Returns (B, N, S, D)
    (written into ``out`` when given). Query frames go ``frames_per_chunk`` at a time against the keys
    of the frames up to the chunk's last one; with one frame per chunk no mask is needed at all, and
    larger chunks need only a (chunk, keys) boolean mask. Never builds the dense (S, S) mask; the result
    equals the dense masked softmax (masked scores contribute exp(-inf) = 0 there).
    """
    s = q.shape[-2]
    if tokens_per_frame < 1 or s % tokens_per_frame:
        raise ValueError(f"the token count {s} must be a multiple of tokens_per_frame, got {tokens_per_frame}")
    t = s // tokens_per_frame
    if out is None:
        out = torch.empty_like(q)
    for f0 in range(0, t, frames_per_chunk):
        s0, s1 = f0 * tokens_per_frame, min(f0 + frames_per_chunk, t) * tokens_per_frame
        out[..., s0:s1, :] = _chunk_attention(q[..., s0:s1, :], k[..., :s1, :], v[..., :s1, :], tokens_per_frame, f0)
    return out


class CausalFrameAttention(nn.Module):
    """The mid-block attention: GroupNorm over all tokens, one head of width C (512), block-causal over
    frames, output projection, residual. Parameter names are diffusers' ``Attention``
    (``group_norm``, ``to_q``, ``to_k``, ``to_v``, ``to_out.0``).

    (B, C, T, H, W) -> same shape. Queries (and the output projection) run per frame chunk, so besides
    the input and output only the normalised tokens and K, V are alive at once.
    """

    def __init__(self, channels: int, groups: int, frames_per_chunk: int = 1) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = Linear(channels, channels)
        self.to_k = Linear(channels, channels)
        self.to_v = Linear(channels, channels)
        self.to_out = nn.ModuleList([Linear(channels, channels)])
        self.frames_per_chunk = frames_per_chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        hw = h * w
        # GroupNorm on (B, C, T, H, W) has the statistics of diffusers' GroupNorm on (B, C, THW) tokens.
        gn = self.group_norm
        normed = kk.group_norm(x, gn.weight, gn.bias, gn.num_groups, gn.eps) if _kernels() else gn(x)
        tokens = normed.flatten(2).transpose(1, 2)  # (B, S, C)
        k = self.to_k(tokens).unsqueeze(1)  # (B, 1, S, C): one head
        v = self.to_v(tokens).unsqueeze(1)
        residual = x.flatten(2).transpose(1, 2)
        out = torch.empty(b, t * hw, c, dtype=x.dtype, device=x.device)
        for f0 in range(0, t, self.frames_per_chunk):
            f1 = min(f0 + self.frames_per_chunk, t)
            s0, s1 = f0 * hw, f1 * hw
            q = self.to_q(tokens[:, s0:s1]).unsqueeze(1)
            # Local frame index f0.. inside the chunk: pass the chunk's queries with keys of frames < f1.
            a = _chunk_attention(q, k[:, :, :s1], v[:, :, :s1], hw, f0)
            out[:, s0:s1] = self.to_out[0](a.squeeze(1)) + residual[:, s0:s1]
        return out.transpose(1, 2).reshape(b, c, t, h, w)


def _chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hw: int, f0: int) -> torch.Tensor:
    """Queries of frames f0..f0+n-1 against keys of frames 0..f0+n-1 (block-causal inside the chunk)."""
    n = q.shape[-2] // hw
    mask = None
    if n > 1:
        q_frame = torch.arange(f0, f0 + n, device=q.device).repeat_interleave(hw)
        k_frame = torch.arange(f0 + n, device=q.device).repeat_interleave(hw)
        mask = k_frame[None, :] <= q_frame[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class MidBlock3D(nn.Module):
    """resnet, (attention, resnet): the VAE's bottleneck at the lowest resolution."""

    def __init__(self, channels: int, groups: int, add_attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlockCausal3D(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([CausalFrameAttention(channels, groups) if add_attention else None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions[0] is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownsampleCausal3D(nn.Module):
    """k = 3 causal conv with stride (sT, sH, sW): T = 1 + 2k -> 1 + k, H -> H / 2."""

    def __init__(self, channels: int, stride: tuple[int, int, int]) -> None:
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UpsampleCausal3D(nn.Module):
    """Nearest upsampling by (fT, fH, fW), frame 0 only by (1, fH, fW) (T = 1 + k -> 1 + fT k), then a
    k = 3 causal conv."""

    def __init__(self, channels: int, factor: tuple[int, int, int]) -> None:
        super().__init__()
        self.factor = factor
        self.conv = CausalConv3d(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, up=self.factor)


def _upsample_causal(x: torch.Tensor, factor: tuple[int, int, int]) -> torch.Tensor:
    """Plain-torch causal nearest upsampling (frame 0 only in space)."""
    ft, fh, fw = factor
    if ft == 1:
        return F.interpolate(x, scale_factor=(1, fh, fw), mode="nearest")
    first = F.interpolate(x[:, :, 0], scale_factor=(fh, fw), mode="nearest").unsqueeze(2)
    if x.shape[2] == 1:
        return first
    # contiguous(): pytorch#81665, interpolate of non-contiguous inputs was wrong on some versions.
    rest = F.interpolate(x[:, :, 1:].contiguous(), scale_factor=factor, mode="nearest")
    return torch.cat((first, rest), dim=2)


class DownBlock3D(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, stride: tuple[int, int, int] | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlockCausal3D(cin if i == 0 else cout, cout, groups) for i in range(layers)]
        )
        self.downsamplers = nn.ModuleList([DownsampleCausal3D(cout, stride)]) if stride else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpBlock3D(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, factor: tuple[int, int, int] | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlockCausal3D(cin if i == 0 else cout, cout, groups) for i in range(layers)]
        )
        self.upsamplers = nn.ModuleList([UpsampleCausal3D(cout, factor)]) if factor else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder3D(nn.Module):
    """(B, 3, F, H, W) -> (B, 2C, t, h, w) before ``quant_conv``."""

    def __init__(self, cfg: CausalVAEConfig) -> None:
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0], 3)
        self.down_blocks = nn.ModuleList(
            DownBlock3D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, stride)
            for i, stride in enumerate(cfg.down_strides)
        )
        self.mid_block = MidBlock3D(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(_to_layout(x))
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return _norm_silu_pad(self.conv_norm_out, x, self.conv_out)


class Decoder3D(nn.Module):
    """(B, C, t, h, w) after ``post_quant_conv`` -> (B, 3, F, H, W)."""

    def __init__(self, cfg: CausalVAEConfig) -> None:
        super().__init__()
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = CausalConv3d(cfg.latent_channels, ch[0], 3)
        self.mid_block = MidBlock3D(ch[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpBlock3D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, factor)
            for i, factor in enumerate(cfg.up_factors)
        )
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = CausalConv3d(ch[-1], cfg.out_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(_to_layout(z))
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return _norm_silu_pad(self.conv_norm_out, x, self.conv_out)


# ------------------------------------------------------------------------------------------- model
def check_vae_input(name: str, x: Any, spec: str, channels: int, ndim: int, hint: str,
                    device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The checks every VAE input passes (video and image VAEs): a float tensor of rank ``ndim`` with
    ``channels`` on dim 1, no empty dim, on the weights' ``device``; returns it in ``dtype``. ``hint``
    ends the wrong-rank message (the caller's guess at what was meant)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of shape {spec}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be a {ndim}-D tensor {spec}, got {x.dim()}-D shape {tuple(x.shape)}{hint}")
    if not x.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor (float32, bfloat16 or float16), got dtype "
            f"{str(x.dtype).replace('torch.', '')}"
        )
    if x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels on dim 1 {spec}, got shape {tuple(x.shape)}")
    if min(x.shape) < 1:
        raise ValueError(f"{name} must have no empty dimension {spec}, got shape {tuple(x.shape)}")
    if x.device != device and device.type != "meta":
        raise ValueError(f"{name} is on {x.device} but the VAE's weights are on {device}")
    return x.to(dtype)


class CausalVideoVAE(nn.Module):
    """The HunyuanVideo causal 3-D VAE (the latent space of Kandinsky 5.0 video models).

    >>> vae = CausalVideoVAE.from_pretrained("/path/to/vae")     # or CausalVideoVAE(CausalVAEConfig())
    >>> z = vae.encode(video)                # (B, 3, 1+4k, H, W) in [-1, 1] -> (B, 16, 1+k, H/8, W/8)
    >>> video = vae.decode(z)                # and back; latents are unscaled (x vae.scaling_factor
    ...                                      # before the diffusion model, / after it)

    Weights and inputs may be fp32, bf16 or fp16; inputs are cast to the weights' dtype and the result
    has that dtype. On CPU with the kernels the encoder and decoder run channels-last-3d (``CHANNELS_LAST``);
    the first such call stores the Conv3d weights in that layout, in place (same values and Parameter
    objects; ``save_pretrained`` writes them contiguous). Results are contiguous.
    Under ``torch.no_grad`` no activation outlives its layer (SiLU and the residual adds
    run in place).

    Tiling (:mod:`kandinsky_model.vae_tiling`): ``encode`` / ``decode`` take ``tiling="auto" | "none" |
    TilingConfig``; by default the attribute ``vae.tiling`` ("auto": :func:`plan_tiling` picks tiles from
    the shape, dtype and the device's free memory; a clip that fits runs untiled, bit for bit the
    ``"none"`` result).
    """

    def __init__(self, config: CausalVAEConfig | None = None) -> None:
        super().__init__()
        if config is None:
            config = CausalVAEConfig()
        if not isinstance(config, CausalVAEConfig):
            raise ValueError(f"config must be a CausalVAEConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = Encoder3D(config)
        self.decoder = Decoder3D(config)
        c = config.latent_channels
        self.quant_conv = nn.Conv3d(2 * c, 2 * c, kernel_size=1)
        self.post_quant_conv = nn.Conv3d(c, c, kernel_size=1)
        self.tiling = "auto"

    @property
    def tiling(self) -> "str | TilingConfig":
        """Default tiling of :meth:`encode` / :meth:`decode`: "auto" (planned per call), "none" or a
        :class:`TilingConfig`. Setting anything else raises ValueError."""
        return self._tiling

    @tiling.setter
    def tiling(self, value) -> None:
        self._tiling = resolve_tiling(value, "CausalVideoVAE.tiling")

    @property
    def scaling_factor(self) -> float:
        """Multiply latents by this before the diffusion model (0.476986 for the published weights)."""
        return self.config.scaling_factor

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    # ------------------------------------------------------------------------------- encode/decode
    def encode(
        self, video: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None,
        tiling: "str | TilingConfig | None" = None,
    ) -> torch.Tensor:
        """Video (B, 3, F, H, W) in [-1, 1], F = 1 + 4k, H and W multiples of 8 -> unscaled latents
        (B, 16, 1 + k, H/8, W/8): the mean of the posterior, or with ``sample=True`` a draw
        ``mean + exp(logvar / 2) * eps`` (logvar clamped to [-30, 20], ``eps`` from ``generator``).
        ``tiling``: "auto", "none" or a :class:`TilingConfig`; None means ``self.tiling``. Tiles blend
        the moments (mean and log-variance), so a sample is drawn once, after blending.

        Raises ValueError naming the problem for a wrong rank, channel count, frame count or size, a
        non-float dtype, a device other than the weights', or a bad ``sample`` / ``generator`` /
        ``tiling``."""
        check_bool("sample", sample)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        cfg = self._tiling_for(tiling, "encode")
        video = self._check_video(video)
        if cfg == "auto":
            cfg = self._plan(video.shape, "encode")
        moments = self._encode(video) if cfg == "none" else tiled_encode(self, video, cfg)
        mean, logvar = moments.chunk(2, dim=1)
        if not sample:
            return mean.contiguous()
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        # Drawn on the generator's device (a CPU generator with CUDA latents works, as in diffusers).
        eps_device = generator.device if generator is not None else mean.device
        eps = torch.randn(mean.shape, generator=generator, device=eps_device, dtype=mean.dtype)
        return mean + std * eps.to(mean.device)

    def decode(self, latents: torch.Tensor, *, tiling: "str | TilingConfig | None" = None) -> torch.Tensor:
        """Unscaled latents (B, 16, t, h, w) -> video (B, 3, 1 + 4(t - 1), 8h, 8w), nominally in [-1, 1]
        (not clamped). ``tiling``: "auto", "none" or a :class:`TilingConfig` (pixel/frame sizes of the
        video); None means ``self.tiling``. Raises ValueError for a wrong rank or channel count, an
        empty dimension, a non-float dtype, a device other than the weights' or a bad ``tiling``."""
        cfg = self._tiling_for(tiling, "decode")
        latents = self._check_latents(latents)
        if cfg == "auto":
            b, _, t, h, w = latents.shape
            r = self.config.spatial_compression_ratio
            cfg = self._plan((b, self.config.out_channels, 1 + 4 * (t - 1), h * r, w * r), "decode")
        return self._decode(latents) if cfg == "none" else tiled_decode(self, latents, cfg)

    def _tiling_for(self, tiling, op: str) -> "str | TilingConfig":
        return self.tiling if tiling is None else resolve_tiling(tiling, f"{op}(tiling=...)")

    def _plan(self, shape, op: str) -> "str | TilingConfig":
        """The planner's choice for this model, device and dtype; "none" when it is one tile."""
        if self.device.type == "meta":
            return "none"
        cfg = plan_tiling(shape, self.dtype, device=self.device, config=self.config, op=op)
        whole = cfg.tile_frames is None and cfg.tile_height is None and cfg.tile_width is None
        return "none" if whole else cfg

    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        """Untiled: checked video (B, 3, F, H, W) -> moments (B, 2C, t, h, w) = (mean, logvar) on dim 1.
        The tiler wraps this."""
        if _channels_last(video):
            _weights_to_channels_last(self)
        h = self.encoder(video)
        return _conv(self.quant_conv, h).contiguous()

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Untiled: checked latents (B, C, t, h, w) -> video (B, 3, F, H, W). The tiler wraps this."""
        if _channels_last(latents):
            _weights_to_channels_last(self)
        return self.decoder(self.post_quant_conv(latents)).contiguous()

    def forward(self, video: torch.Tensor, *, sample: bool = False,
                generator: torch.Generator | None = None,
                tiling: "str | TilingConfig | None" = None) -> torch.Tensor:
        """Reconstruction ``decode(encode(video))`` (both with ``tiling``)."""
        z = self.encode(video, sample=sample, generator=generator, tiling=tiling)
        return self.decode(z, tiling=tiling)

    # ----------------------------------------------------------------------------------- checks
    def _check_common(self, name: str, x, spec: str, channels: int) -> torch.Tensor:
        images = name == "video" and isinstance(x, torch.Tensor) and x.dim() == 4
        hint = " (for images pass F = 1: x.unsqueeze(2))" if images else ""
        return check_vae_input(name, x, spec, channels, 5, hint, self.device, self.dtype)

    def _check_video(self, video) -> torch.Tensor:
        cfg = self.config
        s, tc = cfg.spatial_compression_ratio, cfg.temporal_compression_ratio
        spec = f"(B, {cfg.in_channels}, F, H, W)"
        video = self._check_common("video", video, spec, cfg.in_channels)
        f, h, w = video.shape[2:]
        if (f - 1) % tc:
            lo = (f - 1) // tc * tc + 1
            raise ValueError(
                f"video must have 1 + {tc}k frames (1, {1 + tc}, {1 + 2 * tc}, ...), got F={f}; "
                f"nearest accepted: {lo} or {lo + tc}"
            )
        if h % s or w % s:
            raise ValueError(f"video height and width must be multiples of {s}, got H={h}, W={w}")
        return video

    def _check_latents(self, latents) -> torch.Tensor:
        c = self.config.latent_channels
        return self._check_common("latents", latents, f"(B, {c}, t, h, w)", c)

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def on_meta(cls, config: CausalVAEConfig | None = None) -> "CausalVideoVAE":
        """The model on the meta device: names and shapes without memory (counting, loading)."""
        with torch.device("meta"):
            return cls(config)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, path: str | os.PathLike, *, max_shard_bytes: int | None = None) -> Path:
        """Write the Diffusers layout: ``config.json`` (``AutoencoderKLHunyuanVideo`` keys) and
        ``diffusion_pytorch_model.safetensors``, or numbered shards plus an index JSON when
        ``max_shard_bytes`` (a positive int) is given. Returns the folder."""
        from .dit import _save_diffusers_folder

        if max_shard_bytes is not None:
            check_int("max_shard_bytes", max_shard_bytes)
        return _save_diffusers_folder(path, self.config.to_dict(), self.state_dict(), max_shard_bytes)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        config: CausalVAEConfig | Mapping[str, Any] | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> "CausalVideoVAE":
        """Load HunyuanVideo VAE weights from local files (no download code).

        ``path`` is either
          - a folder in the Diffusers layout: ``config.json`` plus one ``*.safetensors`` file or shards
            with a ``*.safetensors.index.json`` (a pipeline folder holding a ``vae/`` subfolder works too);
          - a bare state-dict file of the original release: ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt``
            (read with ``torch.load(weights_only=True)``) or ``.safetensors``, optionally wrapped in
            ``{"state_dict": ...}``; when keys carry a ``vae.`` prefix only those keys are read, with the
            prefix stripped (what the original loader does). Its config is the published one unless
            ``config`` (a :class:`CausalVAEConfig` or a config dict) is given.
        ``config`` also overrides a folder's ``config.json``; ``dtype`` casts the weights (default: keep
        the checkpoint's).

        Raises FileNotFoundError for a missing path, shard or weights file, and ValueError naming the
        file for a malformed config/index/checkpoint, and ONE ValueError listing every missing,
        unexpected and mis-shaped (or non-float) key when the checkpoint does not fit the config.
        """
        from .dit import _check_load_args, _find_checkpoint, _mismatch_message, _read_json, _read_safetensors

        device = _check_load_args(path, dtype, device)
        if config is not None and not isinstance(config, (CausalVAEConfig, Mapping)):
            raise ValueError(f"config must be None, a CausalVAEConfig or a dict, got {type(config).__name__}")
        path = Path(path)
        if path.is_dir():
            if not (path / "config.json").exists() and (path / "vae").is_dir():
                path = path / "vae"
            elif not (path / "config.json").exists() and (path / "transformer").is_dir():
                # the shared folder finder would descend into the DiT's transformer/ here
                raise FileNotFoundError(f"{path} looks like a pipeline folder but has no vae/ subfolder")
            files, cfg_file = _find_checkpoint(path)
            if config is None:
                if cfg_file is None:
                    raise ValueError(f"{path} has no config.json; pass config= (a CausalVAEConfig or dict)")
                try:
                    config = CausalVAEConfig.from_dict(_read_json(cfg_file))
                except (ValueError, TypeError) as e:
                    raise ValueError(f"{cfg_file}: {e}") from None
            sd, origin = _read_safetensors(files, device, dtype)
        elif path.is_file():
            sd, origin = _read_state_dict_file(path, device, dtype)
        else:
            raise FileNotFoundError(f"no VAE checkpoint at {path}")
        if config is None:
            config = CausalVAEConfig()
        elif not isinstance(config, CausalVAEConfig):
            config = CausalVAEConfig.from_dict(config)

        model = cls.on_meta(config)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        missing = sorted(set(expected) - set(sd))
        unexpected = sorted(f"{k} (in {origin[k]})" for k in set(sd) - set(expected))
        mismatched = sorted(
            f"{k} (in {origin[k]}): checkpoint {tuple(sd[k].shape)} {str(sd[k].dtype).replace('torch.', '')}"
            f" vs model {tuple(expected[k])}"
            for k in set(sd) & set(expected) if sd[k].shape != expected[k] or not sd[k].is_floating_point()
        )
        if missing or unexpected or mismatched:
            raise ValueError(_mismatch_message(
                path, f"the CausalVideoVAE config (block_out_channels={config.block_out_channels}, "
                f"latent_channels={config.latent_channels})", missing, unexpected, mismatched))
        if device.type == "cpu":
            sd = _owned_weights(model, sd)
        model.load_state_dict(sd, strict=True, assign=True)
        return model


def _owned_weights(model: nn.Module, sd: dict) -> dict:
    """CPU state dict -> tensors that own their memory, the Conv3d weights channels-last-3d when the
    model will run in that layout (``USE_KERNELS`` and ``CHANNELS_LAST``, the cpu kernels backend).

    safetensors (and ``torch.load(mmap=True)``) hand out views of a memory-mapped file: its pages
    become resident when first read, i.e. inside the first encode / decode, and stay mapped as long as
    any one tensor of the file lives; a weight converted to channels-last later is then held twice
    (measured: +112 MB RSS at quartered widths). Copies made here, once, leave nothing mapped."""
    conv = {n + ".weight" for n, m in model.named_modules() if isinstance(m, nn.Conv3d)}
    cl = _channels_last_wanted()
    return {k: v.clone(memory_format=torch.channels_last_3d) if cl and k in conv and v.dim() == 5
            else v.clone() for k, v in sd.items()}


def _read_state_dict_file(path: Path, device: torch.device, dtype: torch.dtype | None):
    """A bare original-release checkpoint -> (state dict, key -> file name), unwrapped and de-prefixed."""
    from .dit import _read_safetensors

    if path.suffix == ".safetensors":
        sd, _ = _read_safetensors([path], device, dtype)
    elif path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        try:
            obj = torch.load(path, map_location=device, weights_only=True, mmap=True)
        except Exception as e:  # unpickling errors come in many types; name the file
            raise ValueError(f"{path} is not a torch state-dict file readable with weights_only=True: {e}") from e
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
            raise ValueError(f"{path} must hold a state dict (str -> tensor), got {type(obj).__name__}")
        bad = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
        if bad:
            raise ValueError(f"{path}: entries that are not tensors: {bad[:20]}")
        sd = {k: v if dtype is None else v.to(dtype) for k, v in obj.items()}
    else:
        raise ValueError(
            f"expected a folder, a .safetensors file or a torch .pt/.pth/.bin/.ckpt file, got {path}"
        )
    if any(k.startswith("vae.") for k in sd):
        sd = {k[len("vae."):]: v for k, v in sd.items() if k.startswith("vae.")}
    return sd, dict.fromkeys(sd, path.name)
