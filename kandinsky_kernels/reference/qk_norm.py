"""Plain-torch reference of the attention's q/k normalisation: per-head RMSNorm with a learned weight and
the optional rotary embedding of adjacent pairs, computed in fp32 and returned in the input's dtype (the
official CrossDiT's numerics: ``apply_rope(RMSNorm(x.float()), cos, sin).to(x.dtype)``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["rms_norm_rope_ref"]


def rms_norm_rope_ref(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, eps: float,
) -> torch.Tensor:
    """x (B, S, H, Dh); weight (Dh,); cos, sin (B or 1, S, 1, Dh / 2) fp32, or both None (no rotation).

    ``y = x / sqrt(mean(x^2) + eps) * weight`` over Dh in fp32, then each pair (y[2j], y[2j + 1]) rotated
    by the angle whose cosine and sine are cos[..., j], sin[..., j]. Returns (B, S, H, Dh) in x's dtype.
    Differentiable."""
    y = F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps)
    if cos is not None:
        yc = torch.view_as_complex(y.contiguous().unflatten(-1, (-1, 2)))
        y = torch.view_as_real(yc * torch.complex(cos.float(), sin.float())).flatten(-2)
    return y.to(x.dtype)
