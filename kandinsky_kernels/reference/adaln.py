"""Plain-torch references of the DiT's adaptive-LayerNorm "fp32 islands" (the ground truth of the tests
and the ``reference`` backend): ``LN(x) * (1 + scale) + shift`` and the gated residual ``x + gate * out``.

Both are exactly the ops of the official forward as ``kandinsky_model.nn`` wrote them before the fused
kernels: the math runs in fp32 (in fp64 for an fp64 x, which the tests use as the high-precision ground
truth) and the result is rounded once to x's dtype.

Named dims: ``...`` leading dims, R rows, D features. The modulations are (..., 1, D) with x's leading
dims, broadcast over the R rows, or per group (..., G, 1, D) with G dividing R: rows
[g R/G, (g+1) R/G) take modulation row g (the model's per-frame modulation of packed videos: x (B, S, D),
(B, T', 1, D)); fp32 or x's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gated_residual_ref", "grouped", "scale_shift_layer_norm_ref", "ungrouped"]


def _upcast(x: torch.Tensor) -> torch.dtype:
    """fp32 for the half types and fp32 (the model's ``x.float()``), fp64 for fp64."""
    return torch.promote_types(x.dtype, torch.float32)


def grouped(t: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
    """``t`` (..., R, D) viewed (reshaped) as (..., G, R / G, D) for a per-group modulation (..., G, 1, D);
    ``t`` itself for a (..., 1, D) one."""
    if mod.dim() != t.dim() + 1:
        return t
    return t.reshape(*t.shape[:-2], mod.shape[-3], -1, t.shape[-1])


def ungrouped(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` (..., G, R / G, D) back in x's shape (..., R, D); ``y`` itself where the shapes already agree."""
    return y if y.shape == x.shape else y.reshape(x.shape)


def scale_shift_layer_norm_ref(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-5,
) -> torch.Tensor:
    """``LN(x) * (1 + scale) + shift`` in fp32 (non-affine LayerNorm over D), returned in x's dtype.

    x (..., R, D); shift, scale (..., 1, D) or (..., G, 1, D). ``1 + scale`` is formed in scale's dtype."""
    h = F.layer_norm(grouped(x, shift).to(_upcast(x)), (x.shape[-1],), eps=eps)
    return ungrouped(torch.addcmul(shift, h, 1.0 + scale).to(x.dtype), x)


def gated_residual_ref(x: torch.Tensor, out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Gated residual ``x + gate * out`` in fp32, returned in x's dtype.

    x, out (..., R, D); gate (..., 1, D) or (..., G, 1, D)."""
    u = _upcast(x)
    return ungrouped(torch.addcmul(grouped(x, gate).to(u), gate, grouped(out, gate).to(u)).to(x.dtype), x)
