"""Every Triton kernel of the ops compiles for Hopper (sm_90), with the launches the ops really make.

On CPU the Triton kernels run only through the interpreter, which accepts constructs the real compiler
rejects (an fp64 ``tl.math.div_rn``, say), so a kernel could pass every CPU test and fail on its first
GPU. Here the launches are captured under the interpreter and each distinct specialisation (argument
types, constexprs, divisibility hints, num_warps / num_stages, every autotune config) is compiled ahead
of time, no GPU needed: see tests/triton_aot_capture.py. The block-sparse attention kernels are compiled
by tests/test_bsa_triton.py. With CUDA present the GPU tests run the real kernels, so this is skipped.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import triton_aot_capture as aot

KERNELS = sorted(aot.jit_kernels())
SCRIPT = str(aot.ROOT / "tests" / "triton_aot_capture.py")


def _run(phase: str, env: dict, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, phase], env=env, cwd=aot.ROOT, input=stdin,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def compiled() -> dict:
    """Capture the launches (interpreter), then compile them (no interpreter): ``kernels`` maps each
    kernel to its compilations, ``errors`` lists the workload's op calls that raised."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the GPU tests run the compiled kernels themselves")
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the GPU runs' default, and silences triton 3.9's warning
    cap = _run("capture", dict(env, TRITON_INTERPRET="1"))
    if cap.returncode == 3:
        pytest.skip(f"the Triton interpreter cannot run the ops here: {cap.stderr.strip()}")
    assert cap.returncode == 0, f"capturing the launches failed:\n{cap.stderr[-3000:]}"
    comp = _run("compile", env, stdin=cap.stdout)
    # the conditions under which tests/test_bsa_triton.py's ahead-of-time compiles skip too
    if comp.returncode != 0 and ("ImportError" in comp.stderr or "TypeError: ASTSource" in comp.stderr):
        pytest.skip(f"this triton cannot compile ahead of time here: {comp.stderr.strip().splitlines()[-1]}")
    assert comp.returncode == 0, f"the compile phase failed:\n{comp.stderr[-3000:]}"
    return {"kernels": json.loads(comp.stdout), "errors": json.loads(cap.stdout)["errors"]}


def test_workload_runs_under_the_interpreter(compiled):
    """Every op call of the capture's workload ran: a call that raised may have left launches out."""
    errors = compiled["errors"]
    assert not errors, "op calls that raised under the interpreter:\n" + "\n".join(errors)


def test_every_kernel_is_captured(compiled):
    """The captured launches cover exactly the @triton.jit kernels of kandinsky_kernels: a new kernel
    without a launch in the capture's workload fails here instead of going uncompiled."""
    assert KERNELS, "no @triton.jit kernel found in kandinsky_kernels"
    missing = sorted(set(KERNELS) - set(compiled["kernels"]))
    unknown = sorted(set(compiled["kernels"]) - set(KERNELS))
    assert not missing, f"kernels never launched by the workload in tests/triton_aot_capture.py: {missing}"
    assert not unknown, f"launched kernels not found in the source scan: {unknown}"


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.split(":")[1])
def test_kernel_compiles_for_hopper(compiled, kernel):
    """Each captured specialisation of the kernel compiles for sm_90 and fits a block's shared memory."""
    runs = compiled["kernels"].get(kernel)
    if not runs:
        pytest.fail(f"{kernel}: no launch captured (see test_every_kernel_is_captured)")
    failed = [r for r in runs if "error" in r]
    if failed:
        first = failed[0]
        pytest.fail(f"{kernel}: {len(failed)} of {len(runs)} specialisations fail to compile; first: "
                    f"signature {first['signature']}, constexprs {first['constexprs']}, options "
                    f"{first['options']}:\n{first['error']}", pytrace=False)
    too_big = [(r["constexprs"], r["options"], r["shared"]) for r in runs if r["shared"] > aot.SHARED_LIMIT]
    assert not too_big, f"{kernel}: shared memory over {aot.SHARED_LIMIT} bytes: {too_big}"
