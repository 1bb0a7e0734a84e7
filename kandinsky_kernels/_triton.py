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


def interpreter_defect(triton_version: str | None = None) -> str | None:
    """Why this Triton interpreter cannot run our kernels on CPU tensors, or ``None`` if it can.

    Triton < 3.7's interpreter turns a scalar loaded from memory into a Python int with ``int()`` of
    a 1-element NumPy array, which NumPy deprecated in 1.25 and newer releases reject (2.4.6 does).
    Every kernel whose loop bound is loaded (the attention kernels walk ``kv_num_blocks[q_block]``
    blocks, NABLA its key blocks) then fails with "only 0-dimensional arrays can be converted to
    Python scalars"; Triton 3.7 squeezes the array first. Compiled kernels on CUDA are unaffected.
    ``triton_version`` defaults to the installed one.
    """
    if triton_version is None:
        if not HAS_TRITON:
            return None
        triton_version = triton.__version__
    try:
        major, minor = (int(x) for x in triton_version.split(".")[:2])
    except ValueError:  # a dev build such as "3.7.0+git..." parses; anything else: assume fine
        return None
    if (major, minor) >= (3, 7):
        return None
    import warnings

    import numpy as np

    try:
        with warnings.catch_warnings():  # NumPy versions that only deprecate it still work
            warnings.simplefilter("ignore")
            int(np.ones(1, dtype=np.int32))
        return None
    except TypeError:
        return (f"the interpreter of Triton {triton_version} cannot run these kernels with NumPy "
                f"{np.__version__} (it calls int() on 1-element arrays, which this NumPy rejects); "
                "use triton>=3.7 (or an older NumPy) for the CPU interpreter")


_INTERPRETER_DEFECT = interpreter_defect() if INTERPRET else None


def triton_runs_on(device_type: str) -> bool:
    if not HAS_TRITON:
        return False
    if device_type == "cuda":
        return not INTERPRET
    if device_type == "cpu":
        return INTERPRET and _INTERPRETER_DEFECT is None
    return False


def why_not(device_type: str) -> str:
    if not HAS_TRITON:
        return f"triton is not importable ({TRITON_ERROR})"
    if device_type == "cpu":
        if INTERPRET and _INTERPRETER_DEFECT is not None:
            return _INTERPRETER_DEFECT
        return "Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 set before import"
    if device_type == "cuda":
        return "TRITON_INTERPRET=1 is set, so Triton kernels run only on CPU tensors"
    return f"Triton kernels do not run on device type {device_type!r}"
