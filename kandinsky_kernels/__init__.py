"""kandinsky-kernels: fast, checked kernels for video diffusion transformers (Kandinsky 5.0).

Public ops (each with a pure-torch reference in ``kandinsky_kernels.reference``, Triton kernels and
C++ CPU kernels, chosen by :mod:`kandinsky_kernels.backends`):

- :func:`fractal_flatten`, :func:`fractal_unflatten`, :class:`FractalLayout`: Kandinsky 5 token order
  (frame, 8x8 tile, row-major inside the tile), with padding for any H, W.
- :func:`sta_block_mask`: sliding-tile block mask in fractal block order.
- :func:`nabla_block_mask`: NABLA adaptive block mask (pooled Q/K, CDF threshold, STA union).
- :class:`BlockSparseMask`: the compact block-sparse mask every attention kernel consumes.
- :func:`block_sparse_attention`: fused block-sparse attention, forward and backward, packed
  variable-length batches and padded grids; :func:`nabla_attention`: mask and attention in one call.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> submodule defining it. Loaded on first access, so importing the package stays cheap and
# touches no device.
_EXPORTS = {
    "BlockSparseMask": "kandinsky_kernels.mask",
    "FractalLayout": "kandinsky_kernels.ops.fractal",
    "fractal_flatten": "kandinsky_kernels.ops.fractal",
    "fractal_unflatten": "kandinsky_kernels.ops.fractal",
    "sta_block_mask": "kandinsky_kernels.ops.sta",
    "nabla_block_mask": "kandinsky_kernels.ops.nabla",
    "block_sparse_attention": "kandinsky_kernels.ops.block_sparse_attention",
    "nabla_attention": "kandinsky_kernels.ops.nabla",
    "use_backend": "kandinsky_kernels.backends",
    "BackendUnavailableError": "kandinsky_kernels.backends",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kandinsky_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
