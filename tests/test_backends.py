"""The backend registry: automatic choice, forcing, and loud failure of impossible forcing; and the
dispatch rule of every op (chosen inside its custom op when it runs, eager and compiled; attention's
backward on its forward's backend), checked by spying on the kernels that actually run."""
import os

import pytest
import torch

import kandinsky_kernels as kk
from kandinsky_kernels import _ext, _triton, backends
from kandinsky_kernels.backends import BackendUnavailableError, select_backend, use_backend
from kandinsky_kernels.mask import BlockSparseMask
from kandinsky_kernels import mask as mask_mod
from kandinsky_kernels.ops import _bsa_triton
from kandinsky_kernels.ops import block_sparse_attention as bsa_ops
from kandinsky_kernels.ops import fractal as fractal_ops
from kandinsky_kernels.ops import nabla as nabla_ops


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


# ------------------------------------------------------------------------------------------------
# Where every op chooses its backend (the rule in kandinsky_kernels.backends): inside its custom op,
# each time it runs, eager and compiled alike; attention's backward runs on its forward's backend.
# A spy on every kernel entry point records which backend actually ran.

OPS = ("fractal", "nabla", "attention")
# The kernel entry points each op may run, per direction: (module, attribute, direction, backend).
_KERNELS = [
    (fractal_ops, "fractal_flatten_ref", "fwd", "reference"),
    (fractal_ops, "fractal_unflatten_ref", "bwd", "reference"),
    (fractal_ops, "_fractal_flatten_triton", "fwd", "triton"),
    (fractal_ops, "_fractal_unflatten_triton", "bwd", "triton"),
    (nabla_ops, "_nabla_reference", "fwd", "reference"),
    (nabla_ops, "_nabla_block_mask_forward", "fwd", "triton"),
    (bsa_ops, "block_sparse_attention_with_lse", "fwd", "reference"),
    (bsa_ops, "block_sparse_attention_backward_reference", "bwd", "reference"),
    (_bsa_triton, "bsa_forward_triton", "fwd", "triton"),
    (_bsa_triton, "bsa_backward_triton", "bwd", "triton"),
]
# C++ ops, looked up by name when an op runs (fractal keeps its two in a table).
_CPP_DIRECTION = {"fractal_flatten": "fwd", "fractal_unflatten": "bwd", "nabla_block_mask": "fwd",
                  "bsa_fwd": "fwd", "bsa_bwd": "bwd"}


@pytest.fixture
def ran(monkeypatch):
    """A list of (direction, backend), one per kernel call, for the ops of one test."""
    calls = []

    def spy(fn, direction, backend):
        def wrapper(*args, **kwargs):
            calls.append((direction, backend))
            return fn(*args, **kwargs)

        return wrapper

    for module, name, direction, backend in _KERNELS:
        monkeypatch.setattr(module, name, spy(getattr(module, name), direction, backend))
    real_cpp_op = _ext.cpp_op

    def cpp_op(name):
        fn = real_cpp_op(name)
        if fn is None or name not in _CPP_DIRECTION:  # mask utilities (the transpose): not a backend's kernel
            return fn
        return spy(fn, _CPP_DIRECTION[name], "cpu")

    monkeypatch.setattr(_ext, "cpp_op", cpp_op)
    for name, fn in fractal_ops._CPP.items():
        if fn is not None:
            monkeypatch.setitem(fractal_ops._CPP, name, spy(fn, _CPP_DIRECTION[name], "cpu"))
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    return calls


def _runnable_on_cpu() -> list[str]:
    """The backends every one of the three ops can run on CPU tensors here."""
    ops = {"fractal_flatten": fractal_ops._CPP["fractal_flatten"] is not None,
           "nabla_block_mask": _ext.cpp_op("nabla_block_mask") is not None,
           "bsa": _ext.cpp_op("bsa_fwd") is not None and _ext.cpp_op("bsa_bwd") is not None}
    def runs(backend, op, has_cpu):
        implemented = {"cpu": has_cpu, "triton": _triton.HAS_TRITON}
        return backend in backends.available_backends(op, "cpu", implemented)

    return [b for b in backends.BACKENDS if all(runs(b, op, has_cpu) for op, has_cpu in ops.items())]


def _auto_on_cpu() -> str:
    return "cpu" if "cpu" in _runnable_on_cpu() else "reference"


def _other_than(backend: str) -> str:
    others = [b for b in _runnable_on_cpu() if b != backend]
    if not others:
        pytest.skip(f"only the {backend} backend runs here")
    return others[0]


def _call(op: str):
    """(function of tensors -> loss through the op, its inputs); the loss's backward runs the op's
    backward where it has one. Small CPU shapes."""
    g = torch.Generator().manual_seed(0)
    if op == "fractal":
        x = torch.randn(1, 2, 9, 10, 4, generator=g, requires_grad=True)
        w = torch.randn(1, 2 * 16 * 16, 4, generator=g)
        return (lambda x: (kk.fractal_flatten(x) * w).sum()), (x,)
    if op == "nabla":
        q, k = (torch.randn(1, 256, 2, 32, generator=g) for _ in range(2))

        def mask_sum(q, k):
            mask = kk.nabla_block_mask(q, k, 0.5)
            return mask.kv_ptr.sum() + mask.kv_cols.sum()

        return mask_sum, (q, k)
    q, k, v = (torch.randn(1, 256, 2, 32, generator=g, requires_grad=True) for _ in range(3))
    blocks = (torch.rand(4, 4, generator=g) < 0.5) | torch.eye(4, dtype=torch.bool)
    mask = BlockSparseMask.from_dense_blocks(blocks)
    return (lambda q, k, v: kk.block_sparse_attention(q, k, v, mask).square().sum()), (q, k, v)


def _compiled(fn):
    """``fn`` under torch.compile(fullgraph=True) through AOTAutograd (eager kernels: no C++ compiler
    needed), and the counter of its compilations."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(fn, backend=counter, fullgraph=True), counter


def _run(fn, args):
    loss = fn(*args)
    if loss.requires_grad:
        loss.backward()
    return loss


def _expect(op: str, backend: str) -> list[tuple[str, str]]:
    """The kernel calls of one _call(op) forward (+ backward) on ``backend``."""
    return [("fwd", backend)] if op == "nabla" else [("fwd", backend), ("bwd", backend)]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("op", OPS)
def test_auto_backend_runs(op, compiled, ran):
    fn, args = _call(op)
    if compiled:
        fn, _ = _compiled(fn)
    _run(fn, args)
    assert ran == _expect(op, _auto_on_cpu())


@pytest.mark.parametrize("how", ["use_backend", "env"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("backend", backends.BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_forced_backend_runs(op, backend, compiled, how, ran, monkeypatch):
    if backend not in _runnable_on_cpu():
        pytest.skip(f"{backend} cannot run on CPU tensors here")
    fn, args = _call(op)
    if compiled:
        fn, _ = _compiled(fn)
    if how == "env":
        monkeypatch.setenv(backends.ENV_VAR, backend)
        _run(fn, args)
    else:
        with use_backend(backend):
            _run(fn, args)
    assert ran == _expect(op, backend)


@pytest.mark.parametrize("op", OPS)
def test_compiled_function_follows_each_call(op, ran, monkeypatch):
    """Forcing changes between calls of one compiled function: every call runs what is forced at that
    call (a backend chosen at trace time would stay baked into the graph), and nothing recompiles."""
    auto = _auto_on_cpu()
    other = _other_than(auto)
    fn, args = _call(op)
    fn, counter = _compiled(fn)
    want = []
    _run(fn, args)
    want += _expect(op, auto)
    with use_backend(other):
        _run(fn, args)
    want += _expect(op, other)
    monkeypatch.setenv(backends.ENV_VAR, other)
    _run(fn, args)
    want += _expect(op, other)
    with use_backend(auto):  # use_backend takes precedence over the environment
        _run(fn, args)
    want += _expect(op, auto)
    monkeypatch.delenv(backends.ENV_VAR)
    _run(fn, args)
    want += _expect(op, auto)
    assert ran == want
    assert counter.frame_count == 1


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("op", OPS)
def test_forcing_a_backend_that_cannot_run_raises(op, compiled, ran, monkeypatch):
    fn, args = _call(op)
    if compiled:
        fn, counter = _compiled(fn)
        _run(fn, args)  # compiled while the automatic backend runs; the failure comes at run time
    monkeypatch.setattr(_triton, "triton_runs_on", lambda device_type: False)
    monkeypatch.setattr(_triton, "why_not", lambda device_type: "triton switched off by the test")
    with use_backend("triton"), pytest.raises(BackendUnavailableError, match="switched off by the test"):
        _run(fn, args)
    monkeypatch.setattr(_ext, "cpp_op", lambda name: None)
    monkeypatch.setitem(fractal_ops._CPP, "fractal_flatten", None)
    monkeypatch.setattr(_ext, "EXT", None)
    monkeypatch.setattr(_ext, "EXT_ERROR", "no extension in this test")
    monkeypatch.setenv(backends.ENV_VAR, "cpu")
    with pytest.raises(BackendUnavailableError, match="no extension in this test"):
        _run(fn, args)
    if compiled:
        assert counter.frame_count == 1


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_attention_backward_runs_on_the_forward_backend(compiled, ran):
    """Forced forward, backward outside the use_backend block, and the reverse: the backward always
    runs the forward's backend (its lse and saved outputs are that backend's)."""
    auto = _auto_on_cpu()
    other = _other_than(auto)
    fn, args = _call("attention")
    if compiled:
        fn, _ = _compiled(fn)
    with use_backend(other):
        loss = fn(*args)
    loss.backward()
    assert ran == [("fwd", other), ("bwd", other)]
    ran.clear()
    loss = fn(*args)
    with use_backend(other):
        loss.backward()
    assert ran == [("fwd", auto), ("bwd", auto)]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_data_dependent_checks_run_in_the_ops(backend, compiled, ran):
    """The checks that read values (mask contents, cu_seqlens) run inside the custom ops on every
    backend that does not repeat them in C++, also compiled; they raise before any kernel runs."""
    if backend not in _runnable_on_cpu():
        pytest.skip(f"{backend} cannot run on CPU tensors here")
    q, k, v = (torch.randn(1, 256, 2, 32) for _ in range(3))
    bad = BlockSparseMask.from_dense_blocks(torch.eye(4, dtype=torch.bool))
    bad.kv_cols[1] = 7  # out of range, after the mask was checked on construction
    cu = torch.tensor([0, 100, 256], dtype=torch.int32)  # 100: not a multiple of NABLA's block

    def nabla(q, k, cu):
        return kk.nabla_block_mask(q, k, 0.5, cu_seqlens=cu)

    attention = kk.block_sparse_attention
    if compiled:
        attention, _ = _compiled(attention)
        nabla = torch.compile(nabla, backend="aot_eager", fullgraph=True)
    with use_backend(backend):
        with pytest.raises(ValueError, match="block ids must lie in"):
            attention(q, k, v, bad)
        with pytest.raises(ValueError, match=r"cu_seqlens\[1\]=100 is not a multiple"):
            nabla(q, k, cu)
    assert ran == []


@pytest.mark.parametrize("backend", backends.BACKENDS)
def test_custom_ops_pass_opcheck_on_every_backend(backend):
    """One fake implementation per op serves every backend (the graph holds no backend): schema, fake
    tensors, autograd registration and AOT dispatch agree with each backend's real outputs."""
    if backend not in _runnable_on_cpu():
        pytest.skip(f"{backend} cannot run on CPU tensors here")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 128, 2, 32, generator=g, requires_grad=True) for _ in range(3))
    mask = BlockSparseMask.from_dense_blocks(torch.tensor([[True, False], [True, True]]))
    x = torch.randn(1, 2, 9, 10, 4, generator=g, requires_grad=True)
    cases = [
        (bsa_ops._fwd_op, (q, k, v, mask.kv_ptr, mask.kv_cols, 64, 0.2, None, None)),
        (mask_mod._transpose_op, (mask.kv_ptr, mask.kv_cols, 2)),
        (nabla_ops._nabla_block_mask_op, (q.detach(), k.detach(), 0.9, None, 64, None, None)),
        (fractal_ops._fractal_flatten_op, (x, 8)),
    ]
    with use_backend(backend):
        for op, args in cases:
            torch.library.opcheck(op, args)


# --------------------------------------------------------------------------------- typed surface
_PUBLIC_MODULES = ("kandinsky_kernels.mask", "kandinsky_kernels.backends", "kandinsky_kernels.ops.fractal",
                   "kandinsky_kernels.ops.nabla", "kandinsky_kernels.ops.sta",
                   "kandinsky_kernels.ops.block_sparse_attention", "kandinsky_kernels.ops.group_norm_silu",
                   "kandinsky_kernels.ops.causal_conv3d", "kandinsky_kernels.ops.tile_blend",
                   "kandinsky_kernels.ops.adaln", "kandinsky_kernels.ops.qk_norm")


def test_package_ships_py_typed():
    """PEP 561: the marker file exists and setup.py lists it as package data (so wheels carry it)."""
    import pathlib

    pkg = pathlib.Path(kk.__file__).parent
    assert (pkg / "py.typed").is_file()
    setup = (pkg.parent / "setup.py").read_text()
    assert 'package_data={"kandinsky_kernels": ["py.typed"]}' in setup


def test_init_exports_are_visible_to_type_checkers():
    """Type checkers see every exported name through a TYPE_CHECKING import (a module __getattr__ made
    them untyped); __all__ is a literal list, and each name is, at run time, the object its module
    defines."""
    import ast
    import importlib
    import pathlib

    tree = ast.parse(pathlib.Path(kk.__file__).read_text())
    checked_imports, all_literal = {}, None
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom)
                for alias in imp.names:
                    assert alias.asname == alias.name, "re-export form `import x as x`"
                    checked_imports[alias.name] = imp.module
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            all_literal = ast.literal_eval(node.value)
        if isinstance(node, ast.FunctionDef):
            assert node.name != "__getattr__", "__getattr__ must be hidden from type checkers"
    assert all_literal is not None, "__all__ must be a literal list"
    assert set(checked_imports) == set(all_literal) - {"__version__"}
    assert checked_imports == kk._EXPORTS
    for name, module in checked_imports.items():
        assert getattr(kk, name) is getattr(importlib.import_module(module), name)
    assert sorted(dir(kk)) == sorted(all_literal)


def test_import_is_cheap_and_touches_no_device():
    """import kandinsky_kernels loads no op module, no Triton, no compiled extension, and no CUDA."""
    import subprocess
    import sys

    code = ("import sys, torch, kandinsky_kernels as kk; "
            "heavy = ('triton', 'kandinsky_kernels._C', 'kandinsky_kernels.ops.nabla'); "
            "bad = [m for m in heavy if m in sys.modules]; "
            "assert not bad, bad; kk.BlockSparseMask; assert not torch.cuda.is_initialized()")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("TRITON_INTERPRET", None)
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_public_functions_have_return_annotations():
    import importlib
    import inspect

    for name in kk.__all__:
        obj = getattr(kk, name)
        if inspect.isfunction(obj):
            assert inspect.signature(obj).return_annotation is not inspect.Signature.empty, name
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                fn = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
                if attr.startswith("_") or not inspect.isfunction(fn):
                    continue
                annotation = inspect.signature(fn).return_annotation
                assert annotation is not inspect.Signature.empty, f"{name}.{attr}"
    for module_name in _PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for attr in module.__all__:
            fn = getattr(module, attr)
            if inspect.isfunction(fn):
                assert inspect.signature(fn).return_annotation is not inspect.Signature.empty, attr


def test_helpers_that_are_not_public_are_underscored():
    """Every function or class a public module defines is in its __all__ or starts with '_'."""
    import importlib
    import inspect

    for module_name in _PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        public = set(module.__all__)
        for attr, obj in vars(module).items():
            if attr.startswith("_") or getattr(obj, "__module__", None) != module_name:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                assert attr in public, f"{module_name}.{attr} is neither in __all__ nor underscored"


def test_readme_api_section_lists_every_public_name():
    import pathlib
    import re

    readme = (pathlib.Path(kk.__file__).parent.parent / "README.md").read_text()
    section = readme.split("\n## API\n", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(\w+)` \|", section, flags=re.M))
    assert listed == set(kk.__all__), f"missing {set(kk.__all__) - listed}, extra {listed - set(kk.__all__)}"
