"""Triton import, once and optional.

Triton kernels run on CUDA tensors, and on CPU tensors only under the interpreter
(``TRITON_INTERPRET=1``, which must be set before triton is first imported). The interpreter computes
bf16 multiplies and ``tl.dot`` wrongly, so every kernel upcasts to fp32 before arithmetic.
"""
from __future__ import annotations

import os

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
    TRITON_ERROR: str | None = None
except Exception as exc:  # not installed, or broken install
    triton = None
    tl = None
    HAS_TRITON = False
    TRITON_ERROR = f"{type(exc).__name__}: {exc}"

# Read once: triton decides at decoration time whether @triton.jit functions are interpreted.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device_type: str) -> bool:
    if not HAS_TRITON:
        return False
    if device_type == "cuda":
        return not INTERPRET
    if device_type == "cpu":
        return INTERPRET
    return False


def why_not(device_type: str) -> str:
    if not HAS_TRITON:
        return f"triton is not importable ({TRITON_ERROR})"
    if device_type == "cpu":
        return "Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 set before import"
    if device_type == "cuda":
        return "TRITON_INTERPRET=1 is set, so Triton kernels run only on CPU tensors"
    return f"Triton kernels do not run on device type {device_type!r}"
