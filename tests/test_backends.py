"""The backend registry: automatic choice, forcing, and loud failure of impossible forcing."""
import os

import pytest
import torch

from kandinsky_kernels import backends
from kandinsky_kernels.backends import BackendUnavailableError, select_backend, use_backend


def test_auto_prefers_compiled_cpu_kernels(monkeypatch):
    monkeypatch.setattr(backends._ext, "EXT", object())  # as if the extension were built
    assert select_backend("op", "cpu", {"cpu": True, "triton": True}) == "cpu"
    assert select_backend("op", "cpu", {"cpu": False, "triton": True}) == "reference"


def test_use_backend_forces_and_restores():
    with use_backend("reference"):
        assert select_backend("op", "cpu", {"cpu": True}) == "reference"
    assert backends._override.get() is None


def test_env_var_forces(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert select_backend("op", "cpu", {"cpu": True}) == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "auto")
    assert backends.forced_backend() is None


def test_unknown_backend_name_is_a_value_error(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match="'tpu' is not a backend"):
        select_backend("op", "cpu", {})
    with pytest.raises(ValueError, match="not a backend"):
        with use_backend("fast"):
            pass


@pytest.mark.parametrize(
    "forced, implemented, match",
    [
        ("cuda", {"cuda": True}, "cuda"),
        ("cpu", {}, "cpu"),
        ("triton", {"triton": False}, "no kernel"),
    ],
)
def test_forcing_an_impossible_backend_raises(forced, implemented, match):
    with use_backend(forced):
        with pytest.raises(BackendUnavailableError, match=match):
            select_backend("some_op", "cpu", implemented)


def test_cuda_backend_rejects_cpu_tensors_even_when_built(monkeypatch):
    monkeypatch.setattr(backends._ext, "has_cuda_kernels", lambda: True)
    with use_backend("cuda"):
        with pytest.raises(BackendUnavailableError, match="takes CUDA tensors"):
            select_backend("some_op", torch.device("cpu"), {"cuda": True})


@pytest.mark.skipif(os.environ.get("KANDINSKY_SKIP_EXT") == "1", reason="pure-Python install requested")
def test_extension_is_built_here():
    # make test builds the extension; without this check a failed build would silently leave the C++
    # backend untested.
    from kandinsky_kernels import _ext

    assert _ext.EXT is not None, _ext.EXT_ERROR
    assert _ext.EXT.omp_threads() >= 1
