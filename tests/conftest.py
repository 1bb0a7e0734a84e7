"""Test-wide setup and the ONE tolerance policy of the project.

Tolerance policy
----------------
A kernel's output at dtype ``d`` is compared with the fp32 (or fp64) reference, and so is plain
torch computing the same thing at dtype ``d``. The kernel passes when

    max|kernel - ref|  <=  K * max|torch_d - ref|  +  ATOL[d] * max(1, max|ref|)

with K = 2 for outputs and 3 for gradients (flash-attention's rule). The small ATOL floor keeps the
check meaningful when plain torch happens to be exact. Exact ops (permutations, masks) use
:func:`assert_exact`. Use :func:`assert_close_to_reference`; do not pass ad-hoc tolerances in tests.

End to end through a deep, randomly initialised network, one fp32 run's error is a single draw from a
wide distribution (rounding is amplified chaotically: a tiny random VAE's error changes 3x between inputs
one ulp apart), so plain torch's error is then the largest over a few such inputs, each against its own
reference (:func:`max_error_over_draws`, passed as ``torch_error``).
"""
from __future__ import annotations

import os
import platform
import sys

# The Triton interpreter computes tl.dot with numpy's matmul, i.e. OpenBLAS. OpenBLAS's Haswell / Zen sgemm
# kernels (taken on AVX2-only CPUs and on CPUs it does not know, e.g. an AMD Zen 5) round a @ b.T and
# (b @ a.T).T differently; the backward kernels recompute the forward's scores as k @ q.T, so there the
# recomputed P was off by ulps of the scores (12x torch's error in dv at fp32 with inputs x16). A GPU's
# fp32 dot and OpenBLAS's other kernels are symmetric. Pin a symmetric kernel that every x86-64 CPU runs
# (SSE4.2), so the interpreter's arithmetic is the same on every machine, overriding a machine-wide
# setting (this project's CI hosts set OPENBLAS_CORETYPE=Haswell). Only numpy is affected (torch has its
# own BLAS), and only when set before numpy loads (torch imports it).
if "numpy" not in sys.modules and platform.machine().lower() in ("x86_64", "amd64"):
    os.environ["OPENBLAS_CORETYPE"] = "Nehalem"

import pytest
import torch

# The Triton interpreter must be chosen before triton is imported anywhere. Without a GPU the Triton
# kernels are tested on CPU tensors through the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_rounds_bf16_to_nearest_even() -> bool:
    """Make the Triton interpreter round fp32 -> bf16 to nearest even, as a GPU's cvt.rn.bf16.f32 does.

    The interpreter (triton 3.x, runtime/interpreter.py) converts fp32 -> bf16 by truncating the mantissa
    whenever no rounding mode is named, and an implicit store or ``.to(tl.bfloat16)`` names none; with
    "rtne" named it rounds ties away from zero and mishandles a carry out of the mantissa. Either way its
    bf16 results carry up to twice the rounding error of the GPU's, so the bf16 cases of our Triton
    kernels were skipped on CPU, and only a GPU session could check them. Our kernels compute in fp32
    and round only where they load and store, so with the rounding fixed the interpreter gives the GPU's
    bf16 results. Only the fp32 -> bf16 conversion is replaced (``test_interpreter_rounds_bf16_like_torch``
    checks it bit for bit against torch); returns False where the interpreter's internals are not the
    ones this was written for (the bf16 cases are then skipped as before)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter as ti
    except ImportError:
        return False
    builder = getattr(ti, "InterpreterBuilder", None)
    handle = getattr(ti, "TensorHandle", None)
    if builder is None or handle is None or not all(
            hasattr(builder, f) for f in ("cast_impl", "create_fp_to_fp")):
        return False
    if getattr(builder, "_kandinsky_bf16_rne", False):
        return True

    def to_bf16(data):
        bits = np.array(data, dtype=np.float32).view(np.uint32).astype(np.uint64)  # keeps 0-d shapes
        out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        quiet_nan = ((bits >> 16) | 0x40).astype(np.uint16)  # keep NaN a NaN (rounding could make it inf)
        return np.where(np.isnan(data), quiet_nan, out)

    cast_impl, fp_to_fp = builder.cast_impl, builder.create_fp_to_fp

    def patched_cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return handle(to_bf16(src.data), dst_type.scalar)
        return cast_impl(self, src, dst_type)

    def patched_fp_to_fp(self, src, dst_type, rounding_mode):
        rtz = getattr(getattr(ti, "_ir", None), "ROUNDING_MODE", None)
        rtz = getattr(rtz, "RTZ", object())
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16 and rounding_mode != rtz:
            return handle(to_bf16(src.data), dst_type.scalar)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    builder.cast_impl = patched_cast_impl
    builder.create_fp_to_fp = patched_fp_to_fp
    builder._kandinsky_bf16_rne = True
    return True


INTERPRETER_BF16_RNE = _interpreter_rounds_bf16_to_nearest_even()


def skip_interpreted_bf16(device, dtype) -> None:
    """Skip a bf16 case of a Triton kernel run by the interpreter (CPU tensors) where the rounding patch
    above could not be installed."""
    if str(device) == "cpu" and dtype == torch.bfloat16 and not INTERPRETER_BF16_RNE:
        pytest.skip("this triton's interpreter truncates fp32 -> bf16 and tests/conftest.py could not fix it")

K_OUTPUT = 2.0
K_GRAD = 3.0
ATOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_reference(
    out: torch.Tensor,
    ref: torch.Tensor,
    torch_out: torch.Tensor | None = None,
    *,
    grad: bool = False,
    name: str = "output",
    torch_error: float | None = None,
) -> None:
    """Check ``out`` against the high-precision ``ref`` under the project policy (see module doc).

    ``torch_out`` is plain torch's result at ``out.dtype``; when omitted, ``ref`` rounded to
    ``out.dtype`` stands in for it (the error of merely storing the exact answer in that dtype).
    ``torch_error`` (instead of ``torch_out``): plain torch's max error measured elsewhere, e.g. by
    :func:`max_error_over_draws`.
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values in kernel output"
    if torch_out is None and torch_error is None:
        torch_out = ref.to(out.dtype)
    k = K_GRAD if grad else K_OUTPUT
    err = _max_abs(out, ref)
    base = torch_error if torch_error is not None else _max_abs(torch_out, ref)
    scale = max(1.0, ref.double().abs().max().item()) if ref.numel() else 1.0
    allowed = k * base + ATOL[out.dtype] * scale
    if err > allowed:
        idx = (out.double() - ref.double()).abs().flatten().argmax().item()
        raise AssertionError(
            f"{name} ({out.dtype}): max error {err:.3e} > allowed {allowed:.3e} "
            f"(= {k} x torch's {base:.3e} + atol); worst at flat index {idx}: "
            f"got {out.flatten()[idx].item():.6g}, ref {ref.flatten()[idx].item():.6g}"
        )


def max_error_over_draws(run, ref_run, x: torch.Tensor, draws: int = 7, seed: int = 1234) -> float:
    """Plain torch's error for an end-to-end check (see module doc): the max of |run(x') - ref_run(x')| over
    x' = x and ``draws`` copies of x with every element moved one ulp up or down at random."""
    g = torch.Generator().manual_seed(seed)
    worst = _max_abs(run(x), ref_run(x))
    for _ in range(draws):
        away = torch.where(torch.rand(x.shape, generator=g) < 0.5, -torch.inf, torch.inf).to(x.dtype)
        xp = torch.nextafter(x, away)
        worst = max(worst, _max_abs(run(xp), ref_run(xp)))
    return worst


def assert_exact(out: torch.Tensor, ref: torch.Tensor, name: str = "output") -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype} != reference {ref.dtype}"
    if not torch.equal(out, ref):
        diff = (out != ref) if out.dtype == torch.bool else ~torch.isclose(out, ref, rtol=0, atol=0)
        where = diff.nonzero()[:5].tolist()
        raise AssertionError(f"{name}: {int(diff.sum())} elements differ, first at {where}")


def assert_same_bits_across_threads(fn) -> None:
    """fn() -> a sequence of tensors; equal bit for bit with 1 thread and with 2 (or all) threads, e.g. for
    a reduction that promises a fixed order."""
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            runs.append(list(fn()))
    finally:
        torch.set_num_threads(threads)
    for i, (a, b) in enumerate(zip(*runs)):
        assert_exact(b, a, f"result {i} with {max(2, threads)} threads vs 1")


def capturing_aot_backend():
    """(backend, graphs): a torch.compile backend running aot_autograd with eager compilers that keep the
    code of each forward graph in graphs["fw"] and of each backward graph in graphs["bw"]."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {"fw": [], "bw": []}

    def capture(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm.code)
            return make_boxed_func(gm.forward)
        return compiler

    return aot_autograd(fw_compiler=capture("fw"), bw_compiler=capture("bw")), graphs


HAS_CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_FAILURE_LOG = os.environ.get("KANDINSKY_TEST_FAILURE_LOG")


def pytest_runtest_logreport(report):
    """With KANDINSKY_TEST_FAILURE_LOG=FILE, append each failure's test id and traceback to FILE as it
    happens. scripts/gpu_check.sh sets it: its time limits kill pytest before the end-of-run summary, and
    the first H200 run (2026-12-04) lost the tracebacks of ~45 failures that way. Under pytest-xdist
    the controller writes (the workers' reports reach it), the workers do not."""
    if not _FAILURE_LOG or not report.failed or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    text = report.longreprtext.splitlines()
    with open(_FAILURE_LOG, "a") as f:
        f.write(f"=== FAILED ({report.when}) {report.nodeid} [{report.duration:.1f} s]\n")
        f.write("\n".join(text[-40:] if len(text) > 40 else text) + "\n")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def triton_device() -> str:
    """Device on which the Triton kernels run in this session (CPU means the interpreter)."""
    from kandinsky_kernels import _triton

    if not _triton.triton_runs_on(TRITON_DEVICE):
        pytest.skip(_triton.why_not(TRITON_DEVICE))
    return TRITON_DEVICE


def backend_and_device(request, cpp_op: str) -> tuple[str, str]:
    """For a fixture parametrized over backends ("reference", "cpu", "triton"): (backend name, device its
    tensors live on), skipping with the reason where it cannot run (``cpp_op``: the compiled op the
    ``cpu`` backend needs)."""
    from kandinsky_kernels import _ext

    name = request.param
    if name == "cpu" and _ext.cpp_op(cpp_op) is None:
        pytest.skip(f"compiled {cpp_op} not available ({_ext.EXT_ERROR})")
    return name, (request.getfixturevalue("triton_device") if name == "triton" else "cpu")
