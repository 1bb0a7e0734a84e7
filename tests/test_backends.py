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
        ("cpu", {}, "cpu"),
        ("triton", {"triton": False}, "no kernel"),
    ],
)
def test_forcing_an_impossible_backend_raises(forced, implemented, match):
    with use_backend(forced):
        with pytest.raises(BackendUnavailableError, match=match):
            select_backend("some_op", "cpu", implemented)


def test_cpu_backend_rejects_cuda_tensors_even_when_built(monkeypatch):
    monkeypatch.setattr(backends._ext, "EXT", object())
    with use_backend("cpu"):
        with pytest.raises(BackendUnavailableError, match="takes CPU tensors"):
            select_backend("some_op", torch.device("cuda"), {"cpu": True})


def test_there_is_no_cuda_backend(monkeypatch):
    # No CUDA op exists (GPU kernels are Triton): forcing `cuda` is a name error listing the real
    # backends, and CUDA tensors choose Triton, then the reference.
    assert backends.BACKENDS == ("reference", "triton", "cpu")
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="'cuda' is not a backend; expected one of reference, triton, cpu$"):
        select_backend("op", "cuda", {"cuda": True, "triton": True})
    with pytest.raises(ValueError, match="not a backend"):
        with use_backend("cuda"):
            pass
    monkeypatch.delenv(backends.ENV_VAR)
    monkeypatch.setattr(backends._triton, "triton_runs_on", lambda device_type: device_type == "cuda")
    assert select_backend("op", "cuda", {"cuda": True, "triton": True}) == "triton"
    assert select_backend("op", "cuda", {"triton": False}) == "reference"
    assert not hasattr(backends._ext, "has_cuda_kernels")


@pytest.mark.skipif(os.environ.get("KANDINSKY_SKIP_EXT") == "1", reason="pure-Python install requested")
def test_extension_is_built_here():
    # make test builds the extension; without this check a failed build would silently leave the C++
    # backend untested.
    from kandinsky_kernels import _ext

    assert _ext.EXT is not None, _ext.EXT_ERROR
    assert _ext.EXT.omp_threads() >= 1
    # The op tests skip a backend whose op is missing; here a missing op fails instead.
    for op in ("bsa_fwd", "bsa_bwd", "nabla_block_mask", "fractal_flatten", "fractal_unflatten"):
        assert _ext.cpp_op(op) is not None, f"the built extension lacks {op}"
    assert not hasattr(_ext.EXT, "with_cuda")  # no CUDA kernels exist, so the build reports none


def _numpy_rejects_int_of_1_element_arrays() -> bool:
    import warnings

    import numpy as np

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            int(np.ones(1))
        return False
    except TypeError:
        return True


def test_interpreter_defect_of_old_triton_with_new_numpy(monkeypatch):
    # Triton 3.6's interpreter fails every kernel with a loaded loop bound under NumPy 2.4: the CPU
    # interpreter must then be unavailable with the reason, not fail 65 tests with an InterpreterError.
    from kandinsky_kernels import _triton

    for fixed in ("3.7.0", "3.9.1", "3.10.0+git1234", "4.0.0", "nightly"):
        assert _triton.interpreter_defect(fixed) is None, fixed
    defect = _triton.interpreter_defect("3.6.0")
    assert (defect is not None) == _numpy_rejects_int_of_1_element_arrays()
    if defect is not None:
        assert "Triton 3.6.0" in defect and "triton>=3.7" in defect
    monkeypatch.setattr(_triton, "HAS_TRITON", True)
    monkeypatch.setattr(_triton, "INTERPRET", True)
    monkeypatch.setattr(_triton, "_INTERPRETER_DEFECT", "the interpreter of Triton 3.6.0 cannot ...")
    assert not _triton.triton_runs_on("cpu")
    with use_backend("triton"):
        with pytest.raises(BackendUnavailableError, match="Triton 3.6.0"):
            select_backend("some_op", "cpu", {"triton": True})
