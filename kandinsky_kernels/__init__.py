"""kandinsky-kernels: fast, checked kernels for video diffusion transformers (Kandinsky 5.0).

Public ops (each with a pure-torch reference in ``kandinsky_kernels.reference``, Triton kernels and
C++ CPU kernels, chosen by :mod:`kandinsky_kernels.backends`):

- :func:`fractal_flatten`, :func:`fractal_unflatten`, :class:`FractalLayout`: Kandinsky 5 token order
  (frame, 8x8 tile, row-major inside the tile), with padding for any H, W.
- :func:`sta_block_mask`: sliding-tile block mask in fractal block order.
- :func:`nabla_block_mask`: NABLA adaptive block mask (pooled Q/K, CDF threshold, STA union).
- :class:`BlockSparseMask`: the compact block-sparse mask every attention kernel consumes.
- :func:`block_sparse_attention`: fused block-sparse attention, forward and backward, packed
  variable-length batches and padded grids, optionally returning the log-sum-exp;
  :func:`merge_attention` merges two partial attentions; :func:`nabla_attention`: mask and attention
  in one call.
- :func:`group_norm_silu`, :func:`group_norm`: fused GroupNorm (+ SiLU) of the causal video VAE, fp32
  statistics, optionally writing the next causal conv's replicate-padded input directly.
- :func:`causal_conv3d`, :func:`causal_pad3d`: causal Conv3d with the replicate time padding (and the
  VAE's nearest upsampling) done by index arithmetic; the conv itself on oneDNN / cuDNN.
- :func:`scale_shift_layer_norm`, :func:`gated_residual`: the DiT's adaptive LayerNorm
  ``LN(x) * (1 + scale) + shift`` and gated residual ``x + gate * out``, fp32 math, one write each.
- :func:`tile_blend_`: the tiled VAE's linear-ramp overlap blend in one pass, in place.
- :func:`rms_norm_rope`: the attention's per-head q/k RMSNorm + rotary embedding in fp32, one pass.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Type checkers read these imports; at run time the names load on first access (``__getattr__``
# below), so that ``import kandinsky_kernels`` stays cheap (no Triton, no compiled extension) and
# touches no device. The two lists must agree (tests/test_backends.py checks it).
if TYPE_CHECKING:
    from kandinsky_kernels.backends import BackendUnavailableError as BackendUnavailableError
    from kandinsky_kernels.backends import use_backend as use_backend
    from kandinsky_kernels.mask import BlockSparseMask as BlockSparseMask
    from kandinsky_kernels.ops.block_sparse_attention import block_sparse_attention as block_sparse_attention
    from kandinsky_kernels.ops.block_sparse_attention import merge_attention as merge_attention
    from kandinsky_kernels.ops.causal_conv3d import causal_conv3d as causal_conv3d
    from kandinsky_kernels.ops.causal_conv3d import causal_pad3d as causal_pad3d
    from kandinsky_kernels.ops.fractal import FractalLayout as FractalLayout
    from kandinsky_kernels.ops.fractal import fractal_flatten as fractal_flatten
    from kandinsky_kernels.ops.adaln import gated_residual as gated_residual
    from kandinsky_kernels.ops.adaln import scale_shift_layer_norm as scale_shift_layer_norm
    from kandinsky_kernels.ops.fractal import fractal_unflatten as fractal_unflatten
    from kandinsky_kernels.ops.group_norm_silu import group_norm as group_norm
    from kandinsky_kernels.ops.group_norm_silu import group_norm_silu as group_norm_silu
    from kandinsky_kernels.ops.qk_norm import rms_norm_rope as rms_norm_rope
    from kandinsky_kernels.ops.nabla import nabla_attention as nabla_attention
    from kandinsky_kernels.ops.nabla import nabla_block_mask as nabla_block_mask
    from kandinsky_kernels.ops.sta import sta_block_mask as sta_block_mask
    from kandinsky_kernels.ops.tile_blend import tile_blend_ as tile_blend_

# name -> submodule defining it.
_EXPORTS = {
    "BlockSparseMask": "kandinsky_kernels.mask",
    "FractalLayout": "kandinsky_kernels.ops.fractal",
    "fractal_flatten": "kandinsky_kernels.ops.fractal",
    "fractal_unflatten": "kandinsky_kernels.ops.fractal",
    "sta_block_mask": "kandinsky_kernels.ops.sta",
    "nabla_block_mask": "kandinsky_kernels.ops.nabla",
    "block_sparse_attention": "kandinsky_kernels.ops.block_sparse_attention",
    "nabla_attention": "kandinsky_kernels.ops.nabla",
    "merge_attention": "kandinsky_kernels.ops.block_sparse_attention",
    "group_norm_silu": "kandinsky_kernels.ops.group_norm_silu",
    "group_norm": "kandinsky_kernels.ops.group_norm_silu",
    "rms_norm_rope": "kandinsky_kernels.ops.qk_norm",
    "causal_conv3d": "kandinsky_kernels.ops.causal_conv3d",
    "causal_pad3d": "kandinsky_kernels.ops.causal_conv3d",
    "tile_blend_": "kandinsky_kernels.ops.tile_blend",
    "scale_shift_layer_norm": "kandinsky_kernels.ops.adaln",
    "gated_residual": "kandinsky_kernels.ops.adaln",
    "use_backend": "kandinsky_kernels.backends",
    "BackendUnavailableError": "kandinsky_kernels.backends",
}

# A literal list: the form type checkers understand.
__all__ = [
    "BackendUnavailableError",
    "BlockSparseMask",
    "FractalLayout",
    "__version__",
    "block_sparse_attention",
    "causal_conv3d",
    "causal_pad3d",
    "fractal_flatten",
    "fractal_unflatten",
    "gated_residual",
    "group_norm",
    "group_norm_silu",
    "merge_attention",
    "nabla_attention",
    "nabla_block_mask",
    "rms_norm_rope",
    "scale_shift_layer_norm",
    "sta_block_mask",
    "tile_blend_",
    "use_backend",
]

if not TYPE_CHECKING:  # hidden from type checkers, which would type every missing name as its result

    def __getattr__(name: str) -> object:
        module = _EXPORTS.get(name)
        if module is None:
            raise AttributeError(f"module 'kandinsky_kernels' has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return list(__all__)
