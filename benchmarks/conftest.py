"""Benchmark session setup and the metadata of ``results.json``.

Without CUDA, Triton kernels can only run on CPU tensors through the interpreter, which must be chosen
before triton is first imported: the GPU suite uses it in smoke mode (``make test``) to test its own
code at a toy shape. The CPU suites never select the Triton backend.

``machine_info`` (pytest-benchmark's, in the JSON) gains:
  ``cpu_model``      "model name" of /proc/cpuinfo (lscpu's "Model name" as a fallback),
  ``isa``            ``{flag: bool}`` for avx2, fma, avx512f, avx512bw, avx512_bf16, amx_tile, amx_bf16,
  ``cpu_isas``       the ISA paths of our C++ kernels this CPU and build can run, fastest first
                     (``kandinsky_kernels._ext.cpu_isas()``; [] where the build does not report them),
  ``cpu_isa``        the path they take in this run (``KANDINSKY_CPU_ISA`` honoured), or None where
                     unknown; ``cpu_isa_error`` the reason when a forced path cannot run here,
  ``cpu_cores``      logical CPUs this process may run on; ``cpu_count`` all of the machine's;
  ``torch_threads``  torch's intra-op thread count,
  ``cpu_linear_fp32`` what the model's large fp32 CPU Linears run on here: ``onednn`` or ``torch`` (MKL)
                     (``kandinsky_model.linear``; ``KANDINSKY_CPU_LINEAR`` honoured),
  ``torch``, ``triton``, ``numpy``  versions (None when not installed),
  ``gpu``            the CUDA device name, or None.
The JSON's top level gains ``kandinsky``: ``{"profile": ...}``. pytest-benchmark itself records the git
commit in ``commit_info`` (id, branch, dirty, time).
"""
import os
from importlib import metadata

import torch

from benchmarks._util import cpu_info

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_tile", "amx_bf16")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def pytest_benchmark_update_machine_info(config, machine_info):
    model, flags = cpu_info()
    machine_info["cpu_model"] = model
    machine_info["isa"] = {f: f in flags for f in ISA_FLAGS}
    from kandinsky_kernels import _ext

    machine_info["cpu_isas"] = _ext.cpu_isas()
    try:
        machine_info["cpu_isa"] = _ext.cpu_isa()
    except RuntimeError as e:  # a forced path this CPU cannot run: the suites skip ours, saying so
        machine_info["cpu_isa"] = None
        machine_info["cpu_isa_error"] = str(e)
    try:
        machine_info["cpu_cores"] = len(os.sched_getaffinity(0))
    except AttributeError:
        machine_info["cpu_cores"] = os.cpu_count()
    machine_info["cpu_count"] = os.cpu_count()
    machine_info["torch_threads"] = torch.get_num_threads()
    from kandinsky_model.linear import fp32_library

    machine_info["cpu_linear_fp32"] = fp32_library()
    machine_info["torch"] = torch.__version__
    machine_info["triton"] = _version("triton")
    machine_info["numpy"] = _version("numpy")
    machine_info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def pytest_benchmark_update_json(config, benchmarks, output_json):
    from benchmarks._util import PROFILE

    output_json["kandinsky"] = {"profile": PROFILE}
