"""What ``_C`` reports about its build must match what was compiled in.

``_C.cpu_bf16_dot()`` says whether the attention kernels take bf16 through AVX512-BF16 dot products. It
must be true only where ``-march`` gave the compiler AVX512-BF16 and AVX512BW (``KK_BF16_DOT`` in
csrc/block_sparse_attention.cpp is always defined, as 0 or 1, so an ``#ifdef`` on it reported true
everywhere). Two builds are checked: the in-place one (``-march=native``: true exactly where the CPU has
both features) and one for an AVX2-only target (``-march=x86-64-v3``: always false), compiled here.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch  # noqa: F401  (loads libc10 etc. before _C)

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def _cpu_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def test_in_place_build_reports_bf16_dot_exactly_where_native_has_it():
    from kandinsky_kernels import _ext

    if _ext.EXT is None:
        pytest.skip(f"the extension is not built ({_ext.EXT_ERROR})")
    march = os.environ.get("KANDINSKY_CPU_ARCH", "native")
    if march != "native":
        pytest.skip(f"KANDINSKY_CPU_ARCH={march}: the in-place build was not made for this CPU")
    flags = _cpu_flags()
    if not X86_64 or flags is None:
        pytest.skip("needs an x86-64 Linux CPU (/proc/cpuinfo flags)")
    # gcc's -march=native enables __AVX512BF16__ and __AVX512BW__ exactly when the CPU has both.
    expected = {"avx512_bf16", "avx512bw"} <= flags
    assert _ext.EXT.cpu_bf16_dot() is expected


def _cxx_targets(march: str) -> str | None:
    """``None`` if the compiler that torch uses can target ``-march=<march>``, else why not."""
    cxx = os.environ.get("CXX", "c++")
    try:
        r = subprocess.run([cxx, f"-march={march}", "-x", "c++", "-E", "-"], input="", capture_output=True,
                           text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{cxx} cannot run: {e}"
    return None if r.returncode == 0 else f"{cxx} cannot target -march={march}: {r.stderr.strip()[-300:]}"


# Run in a fresh interpreter that never imports kandinsky_kernels: the probe registers the same
# kandinsky_kernels_C operators as the real _C, which would clash in one process.
_PROBE = textwrap.dedent("""
    import json, sys
    import torch
    from torch.utils.cpp_extension import load

    sources, march, build_dir = json.loads(sys.argv[1])
    m = load(name="kk_avx2_probe", sources=sources, build_directory=build_dir, verbose=False,
             extra_cflags=["-O0", "-fopenmp", f"-march={march}", "-ffp-contract=fast"],
             extra_ldflags=["-fopenmp"])
    print("PROBE " + json.dumps({"cpu_bf16_dot": bool(m.cpu_bf16_dot())}))
""")


def build_probe(csrc: Path, march: str, build_dir: Path) -> dict:
    """Compile ``csrc/*.cpp`` like setup.py does (but -O0, to keep it short) and report its flags."""
    sources = [str(p) for p in sorted(csrc.glob("*.cpp"))]
    env = {**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))}
    r = subprocess.run([sys.executable, "-c", _PROBE, json.dumps([sources, march, str(build_dir)])],
                       capture_output=True, text=True, timeout=900, env=env, cwd=build_dir)
    assert r.returncode == 0, f"probe build failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("PROBE "))
    return json.loads(line[len("PROBE "):])


@pytest.mark.slow  # 40-60 s on 2 cores (an -O0 compile of csrc/); runs by default (-m "not slow")
def test_avx2_only_build_reports_no_bf16_dot(tmp_path):
    if not X86_64:
        pytest.skip(f"x86-64-v3 is an x86-64 target; this machine is {platform.machine()}")
    why = _cxx_targets("x86-64-v3")
    if why is not None:
        pytest.skip(why)
    assert build_probe(CSRC, "x86-64-v3", tmp_path) == {"cpu_bf16_dot": False}
