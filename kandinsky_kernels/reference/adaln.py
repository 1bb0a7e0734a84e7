"""Plain-torch references of the DiT's adaptive-LayerNorm "fp32 islands" (the ground truth of the tests
and the ``reference`` backend): ``LN(x) * (1 + scale) + shift`` and the gated residual ``x + gate * out``.

Both are exactly the ops of the official forward as ``kandinsky_model.nn`` wrote them before the fused
kernels: the math runs in fp32 (in fp64 for an fp64 x, which the tests use as the high-precision ground
truth) and the result is rounded once to x's dtype.

Named dims: ``...`` leading dims (B, or B, T' for per-frame modulation), R rows that share one modulation
vector (tokens of a sample or of a frame), D features. The modulations are (..., 1, D) with x's leading
dims, fp32 or x's dtype, and broadcast over the R rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gated_residual_ref", "scale_shift_layer_norm_ref"]


def _upcast(x: torch.Tensor) -> torch.dtype:
    """fp32 for the half types and fp32 (the model's ``x.float()``), fp64 for fp64."""
    return torch.promote_types(x.dtype, torch.float32)


def scale_shift_layer_norm_ref(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-5,
) -> torch.Tensor:
    """``LN(x) * (1 + scale) + shift`` in fp32 (non-affine LayerNorm over D), returned in x's dtype.

    x (..., R, D); shift, scale (..., 1, D). ``1 + scale`` is formed in scale's dtype."""
    h = F.layer_norm(x.to(_upcast(x)), (x.shape[-1],), eps=eps)
    return torch.addcmul(shift, h, 1.0 + scale).to(x.dtype)


def gated_residual_ref(x: torch.Tensor, out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Gated residual ``x + gate * out`` in fp32, returned in x's dtype.

    x, out (..., R, D); gate (..., 1, D)."""
    u = _upcast(x)
    return torch.addcmul(x.to(u), gate, out.to(u)).to(x.dtype)
