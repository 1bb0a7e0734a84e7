"""Build kandinsky_kernels and its optional compiled extension ``kandinsky_kernels._C``.

Environment switches
--------------------
KANDINSKY_SKIP_EXT=1         pure-Python install: no ``_C`` (every op still works via Triton or the reference).
KANDINSKY_SKIP_CUDA_BUILD=1  build only the C++ CPU kernels, even where torch has CUDA and nvcc exists.
KANDINSKY_CUDA_ARCHS="90"    CUDA architectures (falls back to TORCH_CUDA_ARCH_LIST, then 8.0;9.0).
KANDINSKY_CPU_ARCH=native    value of -march for the C++ kernels (default native: this is a source build
                             for the machine that runs it; set e.g. x86-64-v3 for a portable build).
MAX_JOBS=N                   ninja parallelism (read by torch.utils.cpp_extension).
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("KANDINSKY_SKIP_EXT"):
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    cuda_sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    nvcc = cpp_extension.CUDA_HOME is not None and shutil.which(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    )
    with_cuda = bool(torch.version.cuda) and bool(nvcc) and bool(cuda_sources)
    with_cuda = with_cuda and not _flag("KANDINSKY_SKIP_CUDA_BUILD")

    march = os.environ.get("KANDINSKY_CPU_ARCH", "native")
    cxx = ["-O3", "-fopenmp", f"-march={march}", "-ffp-contract=fast"]
    extra = {"cxx": cxx}
    define_macros = []
    if with_cuda:
        archs = os.environ.get("KANDINSKY_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs.replace(",", ";")
        extra["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo"]
        define_macros.append(("KANDINSKY_WITH_CUDA", "1"))
        ext_cls = cpp_extension.CUDAExtension
        sources = cpu_sources + cuda_sources
    else:
        ext_cls = cpp_extension.CppExtension
        sources = cpu_sources
    ext = ext_cls(
        name="kandinsky_kernels._C",
        sources=sources,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        define_macros=define_macros,
    )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()

setup(
    name="kandinsky-kernels",
    version="0.1.0",
    description="Kernels, model and training harness for Kandinsky 5.0 video diffusion transformers",
    packages=find_packages(include=["kandinsky_kernels*", "kandinsky_model*", "training*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy", "safetensors", "triton>=3.2; platform_system == 'Linux'"],
    extras_require={
        "triton": ["triton>=3.2"],
        "dev": ["pytest>=8", "pytest-benchmark>=4", "ninja", "triton>=3.2"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
