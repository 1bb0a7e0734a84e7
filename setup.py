"""Build kandinsky_kernels and its optional compiled extension ``kandinsky_kernels._C``.

Environment switches
--------------------
KANDINSKY_SKIP_EXT=1       pure-Python install: no ``_C`` (every op still works via Triton or the reference).
KANDINSKY_CPU_ARCH=ARCH    opt-in -march=ARCH for every C++ file (e.g. native). Default: none. The build
                           is portable: the attention kernels carry one path per ISA (csrc/attention/isa_*.cpp,
                           each compiled for its instruction set by a target pragma) and pick the fastest
                           one the CPU runs at run time, so a wheel built here runs on any x86-64 CPU.
MAX_JOBS=N                 ninja parallelism (read by torch.utils.cpp_extension).

The extension holds C++ (OpenMP) CPU kernels only; GPU kernels are Triton, compiled at run time.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("KANDINSKY_SKIP_EXT"):
        return [], {}
    from torch.utils import cpp_extension

    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cxx = ["-O3", "-fopenmp", "-ffp-contract=fast"]
    march = os.environ.get("KANDINSKY_CPU_ARCH", "")
    if march:
        cxx.append(f"-march={march}")
    ext = cpp_extension.CppExtension(
        name="kandinsky_kernels._C",
        sources=sources,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()

setup(
    name="kandinsky-kernels",
    version="0.1.0",
    description="Kernels, model and training harness for Kandinsky 5.0 video diffusion transformers",
    packages=find_packages(include=["kandinsky_kernels*", "kandinsky_model*", "training*"]),
    package_data={"kandinsky_kernels": ["py.typed"]},  # PEP 561: the package ships its annotations
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy", "safetensors", "triton>=3.2; platform_system == 'Linux'"],
    extras_require={
        "triton": ["triton>=3.2"],
        "train": ["tqdm", "fsspec", "s3fs", "matplotlib"],
        "dev": ["pytest>=8", "pytest-benchmark>=4", "ninja", "triton>=3.2"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
