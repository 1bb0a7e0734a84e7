"""Plain-torch references of the causal video VAE's kernels (the ground truth of the tests and the
``reference`` backend): GroupNorm (+ SiLU) with an optional causal replicate-padded output, the causal
replicate pad (with the VAE's nearest upsampling), the causal Conv3d, and the linear-ramp tile blend.

Padding ``pad = (pt, ph, pw)`` always means: ``pt`` copies of frame 0 in front (nothing behind), ``ph``
replicated rows above and below, ``pw`` replicated columns left and right; a causal conv with kernel
(kt, kh, kw) needs ``(kt - 1, kh // 2, kw // 2)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_conv3d_ref", "causal_pad3d_ref", "group_norm_silu_ref", "tile_blend_ref", "upsample_causal_ref"]


def upsample_causal_ref(x: torch.Tensor, up: tuple[int, int, int]) -> torch.Tensor:
    """The VAE's nearest upsampling of (B, C, T, H, W) by ``up`` = (ut, uh, uw): frame 0 is only upsampled
    in space, so T = 1 + k becomes 1 + ut k."""
    ut, uh, uw = up
    if (ut, uh, uw) == (1, 1, 1):
        return x
    if ut == 1:
        return F.interpolate(x, scale_factor=(1, uh, uw), mode="nearest")
    first = F.interpolate(x[:, :, 0], scale_factor=(uh, uw), mode="nearest").unsqueeze(2)
    if x.shape[2] == 1:
        return first
    rest = F.interpolate(x[:, :, 1:].contiguous(), scale_factor=(ut, uh, uw), mode="nearest")
    return torch.cat((first, rest), dim=2)


def causal_pad3d_ref(x: torch.Tensor, pad: tuple[int, int, int], up: tuple[int, int, int] = (1, 1, 1)) -> torch.Tensor:
    """(B, C, T, H, W) -> nearest-upsampled by ``up`` (see :func:`upsample_causal_ref`), then replicate-
    padded by ``pad`` = (pt, ph, pw): (B, C, T' + pt, H' + 2 ph, W' + 2 pw)."""
    x = upsample_causal_ref(x, up)
    pt, ph, pw = pad
    if not (pt or ph or pw):
        return x
    if x.dtype in (torch.float16, torch.bfloat16) or not x.is_floating_point():
        # replicate padding is a gather: exact in any dtype; index arithmetic keeps every dtype supported
        t = torch.arange(-pt, x.shape[2], device=x.device).clamp(min=0)
        h = torch.arange(-ph, x.shape[3] + ph, device=x.device).clamp(0, x.shape[3] - 1)
        w = torch.arange(-pw, x.shape[4] + pw, device=x.device).clamp(0, x.shape[4] - 1)
        return x[:, :, t][:, :, :, h][:, :, :, :, w]
    return F.pad(x, (pw, pw, ph, ph, pt, 0), mode="replicate")


def group_norm_silu_ref(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int, eps: float = 1e-6,
    silu: bool = True, pad: tuple[int, int, int] = (0, 0, 0),
) -> torch.Tensor:
    """GroupNorm of (B, C, ...) over (C / groups, ...) in fp32, SiLU when ``silu``, rounded once to x's dtype,
    then (5-D x only) the causal replicate pad ``pad``."""
    y = F.group_norm(x.float(), groups, None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if silu:
        y = F.silu(y)
    y = y.to(x.dtype)
    return causal_pad3d_ref(y, pad) if any(pad) else y


def causal_conv3d_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
    stride: int | tuple[int, int, int] = 1,
) -> torch.Tensor:
    """Causal Conv3d: replicate pad (kt - 1 frames in front, k // 2 in H and W), then a plain conv3d."""
    kt, kh, kw = weight.shape[2:]
    return F.conv3d(causal_pad3d_ref(x, (kt - 1, kh // 2, kw // 2)), weight, bias, stride)


def tile_blend_ref(out: torch.Tensor, tile: torch.Tensor, dim: int, start: int, prev_stop: int) -> None:
    """Write ``tile`` into ``out`` at ``start`` along ``dim``, in place. The first ``e = prev_stop - start``
    positions (clipped to [0, tile length]), already written by the previous tile, become
    ``lerp(out, tile, i / e)``, i = 0..e-1 (the peers' linear ramp; fp32 for half types)."""
    n = tile.shape[dim]
    e = max(0, min(prev_stop - start, n))
    if e:
        old = out.narrow(dim, start, e)
        new = tile.narrow(dim, 0, e)
        shape = [1] * out.dim()
        shape[dim] = e
        wdt = torch.float32 if old.dtype in (torch.float16, torch.bfloat16) else old.dtype
        w = (torch.arange(e, device=out.device, dtype=wdt) / e).view(shape)
        old.copy_(torch.lerp(old.to(wdt), new.to(wdt), w))
    if n > e:
        out.narrow(dim, start + e, n - e).copy_(tile.narrow(dim, e, n - e))
