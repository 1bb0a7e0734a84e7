"""Boundary checks of the model, the loader and the sampler: every failure is a ValueError naming the
argument, what was passed and what is accepted."""
from __future__ import annotations

import math
from numbers import Real
from typing import Sequence, Union

import torch

Dim = Union[int, str, "tuple[str, int]"]

_KINDS = {
    "float": ("floating-point", lambda t: t.is_floating_point()),
    "real": ("floating-point or integer", lambda t: not (t.dtype == torch.bool or t.is_complex())),
    "mask": ("bool (or 0/1 integer)", lambda t: not (t.is_floating_point() or t.is_complex())),
}


def check_tensor(
    name: str, x, dims: Sequence[Dim], *, kind: str = "float", finite: bool = False
) -> torch.Tensor:
    """``x`` must be a tensor of dtype ``kind`` ("float", "real" or "mask") shaped like ``dims``: per
    dimension an int (that exact size), a label such as ``"L"`` (any size >= 1) or ``(label, size)``
    (that size, shown as ``label=size``). ``finite`` also rejects NaN/inf; it reads the data (a device
    sync), so it is for one-off inputs, never on a compiled path. Returns ``x``."""
    spec = "(" + ", ".join(f"{d[0]}={d[1]}" if isinstance(d, tuple) else str(d) for d in dims) + ")"
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of shape {spec}, got {type(x).__name__}")
    sizes = [d[1] if isinstance(d, tuple) else d for d in dims]
    if x.dim() != len(dims) or any(s < 1 if isinstance(w, str) else s != w for s, w in zip(x.shape, sizes)):
        raise ValueError(f"{name} must have shape {spec}, got shape {tuple(x.shape)}")
    what, ok = _KINDS[kind]
    if not ok(x):
        raise ValueError(f"{name} must be a {what} tensor, got dtype {str(x.dtype).replace('torch.', '')}")
    if finite and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds NaN or infinite values")
    return x


def check_number(
    name: str, value, *, gt: float | None = None, ge: float | None = None, le: float | None = None
) -> float:
    """``value`` as a float: a finite real number (not a bool) with ``value > gt``, ``>= ge``, ``<= le``."""
    bounds = [(op, b) for op, b in ((">", gt), (">=", ge), ("<=", le)) if b is not None]
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and all(value > b if op == ">" else value >= b if op == ">=" else value <= b
                       for op, b in bounds)):
        want = " ".join(["a finite number", " and ".join(f"{op} {b:g}" for op, b in bounds)]).rstrip()
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return float(value)


def check_int(name: str, value, *, ge: int = 1, multiple_of: int | None = None) -> int:
    """``value`` an int (not a bool) ``>= ge`` and, when given, a multiple of ``multiple_of``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < ge:
        want = "a positive int" if ge == 1 else f"an int >= {ge}"
        raise ValueError(f"{name} must be {want}, got {value!r}")
    if multiple_of is not None and value % multiple_of:
        raise ValueError(f"{name} must be a multiple of {multiple_of}, got {value}")
    return value


def check_ints(name: str, value, n: int = 3, *, ge: int = 1, what: str = "positive ints") -> tuple[int, ...]:
    """``value`` a list or tuple of ``n`` ints (not bools) ``>= ge``, returned as a tuple."""
    if (not isinstance(value, (list, tuple)) or len(value) != n
            or any(isinstance(v, bool) or not isinstance(v, int) or v < ge for v in value)):
        raise ValueError(f"{name} must be {n} {what}, got {value!r}")
    return tuple(value)


def check_numbers(name: str, value, n: int = 3) -> tuple[float, ...]:
    """``value`` a list or tuple of ``n`` positive finite numbers, returned as a tuple of floats."""
    if (not isinstance(value, (list, tuple)) or len(value) != n
            or any(isinstance(v, bool) or not isinstance(v, Real) or not (math.isfinite(v) and v > 0)
                   for v in value)):
        raise ValueError(f"{name} must be {n} positive finite numbers, got {value!r}")
    return tuple(float(v) for v in value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
