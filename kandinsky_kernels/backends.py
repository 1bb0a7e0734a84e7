"""One small backend registry shared by every op.

Backends
--------
``reference``  pure torch (``kandinsky_kernels.reference``); runs anywhere, slow, the ground truth.
``triton``     Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (tests only).
``cpu``        C++/OpenMP kernels from the compiled ``kandinsky_kernels._C``; CPU tensors.

Selection
---------
Automatic: CUDA tensors take ``triton`` > ``reference``; CPU tensors take ``cpu`` > ``reference`` (the
Triton interpreter is never picked automatically: it is a testing tool). An op that lacks a kernel for a
backend simply skips it.

Forced: ``KANDINSKY_KERNELS_BACKEND=reference|triton|cpu`` (read at every call), or the
:func:`use_backend` context manager, which takes precedence. A forced backend that cannot run the
call raises :class:`BackendUnavailableError` naming the op, the device and the reason; it never falls
back silently.

Where the choice is made (the rule every op follows)
----------------------------------------------------
Inside the op's ``torch.library`` custom op, each time it runs: the custom op's body calls
:func:`select_backend` first; the public function only validates and calls the custom op, and no
backend name is an argument of a custom op. The fake implementations do not depend on the backend,
and the data-dependent checks (mask contents, ``cu_seqlens``) run in the custom ops next to the
kernels, so a compiled graph cannot skip them.

Why at run time: ``torch.compile`` sees each custom op as one opaque node, so a compiled graph holds no
backend, and ``use_backend`` or the environment variable applies to every later call of an already
compiled function, without a recompile, raising there when the forced backend cannot run. A choice
made while tracing would be baked into the graph, and since dynamo guards on neither the ContextVar
nor the environment it would silently outlive a change of either.

A backward that needs its forward's kernels (block-sparse attention: the saved ``out`` and ``lse``
are the forward backend's) does not choose again: the forward custom op also returns the backend it
ran as a tag (:func:`_backend_tag`, a CPU int8 scalar, read without a device sync) and the backward
custom op runs that one, also outside the forward's ``use_backend`` block or on an autograd worker
thread, which does not see the ContextVar. The fractal ops' backward is the inverse custom op, which
chooses again when it runs (a permutation: every backend gives the same bits). Put ``use_backend``
around the call of a compiled function: inside it, dynamo cannot trace ``ContextVar.set``.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator, Mapping

import torch

from kandinsky_kernels import _ext, _triton

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "BackendUnavailableError",
    "available_backends",
    "forced_backend",
    "select_backend",
    "use_backend",
]

BACKENDS = ("reference", "triton", "cpu")
ENV_VAR = "KANDINSKY_KERNELS_BACKEND"

_AUTO_ORDER = {
    "cuda": ("triton", "reference"),
    "cpu": ("cpu", "reference"),
}

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("kk_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run this call (missing build, wrong device, op not implemented)."""


def _check_name(name: str, source: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a backend; expected one of {', '.join(BACKENDS)}")
    return name


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` or the environment, or ``None`` for automatic."""
    name = _override.get()
    if name is not None:
        return name
    env = os.environ.get(ENV_VAR, "").strip()
    if not env or env.lower() == "auto":
        return None
    return _check_name(env, ENV_VAR)


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force ``name`` for every op called inside the block (``None`` or ``"auto"``: automatic)."""
    if name is not None and name.lower() == "auto":
        name = None
    token = _override.set(None if name is None else _check_name(name, "use_backend"))
    try:
        yield
    finally:
        _override.reset(token)


def _why_not(backend: str, device_type: str, implemented: bool) -> str | None:
    """``None`` if ``backend`` can run on ``device_type``, else the reason it cannot."""
    if not implemented:
        if backend == "cpu" and _ext.EXT is None:
            return f"the compiled extension is not available ({_ext.EXT_ERROR})"
        return "this op has no kernel for that backend in this build"
    if backend == "reference":
        return None
    if backend == "triton":
        return None if _triton.triton_runs_on(device_type) else _triton.why_not(device_type)
    if backend == "cpu":
        if _ext.EXT is None:
            return f"the compiled extension is not available ({_ext.EXT_ERROR})"
        return None if device_type == "cpu" else f"the cpu backend takes CPU tensors, got {device_type}"
    raise AssertionError(backend)


def select_backend(op: str, device: torch.device | str, implemented: Mapping[str, bool]) -> str:
    """Pick the backend that runs ``op`` on ``device``.

    ``implemented`` maps backend name -> whether this op has a kernel for it in this build (for
    ``cpu``: whether the compiled op exists). ``reference`` is always assumed implemented.
    """
    device_type = torch.device(device).type
    impl = {"reference": True, **implemented}
    forced = forced_backend()
    if forced is not None:
        reason = _why_not(forced, device_type, impl.get(forced, False))
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {forced!r} was forced (via {ENV_VAR} or use_backend) but cannot run {op} "
                f"on {device_type} tensors: {reason}"
            )
        return forced
    for backend in _AUTO_ORDER.get(device_type, ("reference",)):
        if _why_not(backend, device_type, impl.get(backend, False)) is None:
            return backend
    return "reference"


def available_backends(op: str, device: torch.device | str, implemented: Mapping[str, bool]) -> list[str]:
    """Every backend that could run ``op`` on ``device`` right now (for tests and benchmarks)."""
    device_type = torch.device(device).type
    impl = {"reference": True, **implemented}
    return [b for b in BACKENDS if _why_not(b, device_type, impl.get(b, False)) is None]


def _backend_tag(name: str) -> torch.Tensor:
    """``name`` as a CPU int8 scalar: an output with which a forward custom op tells its backward
    custom op the backend it ran (see the module doc); CPU even for CUDA inputs, so reading it back
    (:func:`_backend_of_tag`) never waits for the device."""
    return torch.tensor(BACKENDS.index(name), dtype=torch.int8)


def _fake_backend_tag() -> torch.Tensor:
    """What :func:`_backend_tag` returns, for fake (meta) implementations: no value."""
    return torch.empty((), dtype=torch.int8)


def _backend_of_tag(tag: torch.Tensor) -> str:
    """The backend name a :func:`_backend_tag` holds."""
    return BACKENDS[int(tag)]
