"""When a VAE op may skip its ``torch.library`` custom op and run its body directly.

In eager mode the custom op adds nothing the VAE ops need (they choose their backend inside the body
either way, and autograd-recording calls never reach it), but the first call of any Python custom op
imports ``torch._dynamo`` (torch wraps the backend function in ``torch._dynamo.disable`` lazily): on
the project's 2-vCPU host that is ~3 s and ~72 MB of resident memory, paid inside the caller's first
VAE encode. So a plain CPU or CUDA tensor outside ``torch.compile`` goes straight to the body; while
compiling, and for tensor subclasses (fake, functional), the custom op runs as before.
"""
from __future__ import annotations

import torch


def eager(x: torch.Tensor) -> bool:
    """Whether the op may run its body directly for ``x`` (see the module doc)."""
    return type(x) is torch.Tensor and not torch.compiler.is_compiling()
