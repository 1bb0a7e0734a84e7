"""The compiled extension, imported once and optional.

``EXT`` is the ``kandinsky_kernels._C`` module or ``None``; ``EXT_ERROR`` keeps the reason when the
import failed, so a forced ``cpu`` backend can say why it cannot run. Operators compiled into
the extension are looked up with :func:`cpp_op`, which returns ``None`` for an op that this build lacks.
"""
from __future__ import annotations

from typing import Any

import torch

try:
    from kandinsky_kernels import _C as EXT  # type: ignore[attr-defined]

    EXT_ERROR: str | None = None
except Exception as exc:  # ImportError, or an ABI mismatch surfacing as OSError / RuntimeError
    EXT = None
    EXT_ERROR = f"{type(exc).__name__}: {exc}"

NAMESPACE = "kandinsky_kernels_C"


def cpp_op(name: str) -> Any:
    """The compiled operator ``torch.ops.kandinsky_kernels_C.<name>``, or ``None`` if not built."""
    if EXT is None:
        return None
    ns = getattr(torch.ops, NAMESPACE)
    try:
        return getattr(ns, name)
    except (AttributeError, RuntimeError):
        return None


# Instruction-set paths of the C++ CPU kernels, fastest first. One build carries all of them; the
# extension picks the fastest one the CPU runs, by CPUID, at every call unless KANDINSKY_CPU_ISA
# names one (then it raises if this CPU or build cannot run it).
CPU_ISAS = ("amx", "avx512_bf16", "avx512", "avx2", "baseline")


def cpu_isas() -> list[str]:
    """The ISA paths of the C++ kernels this CPU and build can run, fastest first ([] without ``_C``)."""
    op = cpp_op("cpu_isas")
    return list(op()) if op is not None else []


def cpu_isa() -> str | None:
    """The ISA path the C++ kernels take now (``KANDINSKY_CPU_ISA`` honoured), or ``None`` without ``_C``.

    Raises ``RuntimeError`` when ``KANDINSKY_CPU_ISA`` names a path this CPU or build cannot run.
    """
    op = cpp_op("cpu_isa")
    return str(op()) if op is not None else None
