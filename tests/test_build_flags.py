"""What the extension says about its ISA paths must match the CPU it runs on.

The build is portable (no -march unless KANDINSKY_CPU_ARCH asks for one): every path is compiled in
and chosen at run time by CPUID. ``cpu_isas()`` must list a path exactly where /proc/cpuinfo shows its
instructions (the OS enabling them shows there too: Linux hides flags whose state it does not save).
"""
from __future__ import annotations

import platform
from pathlib import Path

import pytest

from kandinsky_kernels import _ext

X86_64 = platform.machine().lower() in ("x86_64", "amd64")
NEEDS = {
    "avx2": {"avx2", "fma", "f16c", "bmi1", "bmi2"},
    "avx512": {"avx2", "fma", "f16c", "bmi1", "bmi2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"},
}
NEEDS["avx512_bf16"] = NEEDS["avx512"] | {"avx512_bf16"}
NEEDS["amx"] = NEEDS["avx512_bf16"] | {"amx_tile", "amx_bf16"}


def _cpu_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


@pytest.mark.skipif(_ext.EXT is None, reason=f"the extension is not built ({_ext.EXT_ERROR})")
def test_paths_listed_exactly_where_the_cpu_has_them():
    flags = _cpu_flags()
    if not X86_64 or flags is None:
        pytest.skip("needs an x86-64 Linux CPU (/proc/cpuinfo flags)")
    got = _ext.cpu_isas()
    assert got[-1] == "baseline" and got == [i for i in _ext.CPU_ISAS if i in got], got
    for isa, needs in NEEDS.items():
        assert (isa in got) == (needs <= flags), f"{isa}: listed={isa in got}, cpu has {sorted(needs & flags)}"
    # the default is the fastest available path
    assert _ext.cpu_isa() == got[0]


def test_setup_builds_portable_by_default():
    """No -march unless asked for: a wheel built here must run on any x86-64 CPU."""
    text = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    assert 'os.environ.get("KANDINSKY_CPU_ARCH", "")' in text
    assert '"-march=native"' not in text


@pytest.mark.skipif(_ext.EXT is None, reason=f"the extension is not built ({_ext.EXT_ERROR})")
@pytest.mark.skipif(not X86_64, reason="x86-64 function multiversioning only")
def test_nabla_logits_are_multiversioned():
    """The portable build compiles the NABLA logits loop once per x86 level (KK_CLONES): built for the
    baseline alone it has no FMA, std::fma is a libm call per element, and the mask was 8x slower
    (bench: 0.90x the official algorithm instead of >= 3x). GCC names the clones in the symbol table."""
    import shutil
    import subprocess

    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    so = Path(_ext.EXT.__file__)
    blob = so.read_bytes()
    if b"GCC: (" not in blob or b"clang version" in blob:
        pytest.skip("not a GCC build: KK_CLONES is empty for other compilers")
    syms = subprocess.run([nm, "-C", str(so)], capture_output=True, text=True, check=True).stdout
    if not syms.strip():
        pytest.skip("the extension's symbol table is stripped")
    for clone in ("arch_x86_64_v3", "arch_x86_64_v4", "default"):
        assert f"tile_logits(float const*, float const*, long, long, long, float*) [clone .{clone}]" in syms
