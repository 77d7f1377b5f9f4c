"""Build fastattn._C: the C++ CPU kernels always, the CUDA kernels where torch has CUDA.

CPU vector width is chosen at build time from the build machine (the extension is
built where it runs, like any source install):

    FASTATTN_CPU_ARCH=avx512|avx2|generic   override the detected width
    FASTATTN_FORCE_CUDA=1                   build the CUDA kernels even if no GPU is visible
    FASTATTN_NO_CUDA=1                      never build them
    FASTATTN_ASAN=1                         build with AddressSanitizer (scripts/asan_check.sh)
    FASTATTN_SKIP_EXT=1                     install the Python package only (the Makefile does
                                            this, then builds the extension in place with ninja
                                            so rebuilds are incremental)

The chosen capability is compiled into the module (fastattn._C.cpu_capability) and checked
again at import, so a build moved to an older CPU reports itself unusable instead of dying
on an illegal instruction.
"""

from __future__ import annotations

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_arch() -> str:
    arch = os.environ.get("FASTATTN_CPU_ARCH")
    if arch:
        if arch not in ("avx512", "avx2", "generic"):
            raise SystemExit(f"FASTATTN_CPU_ARCH={arch!r}: expected avx512, avx2 or generic")
        return arch
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "generic"


ARCH_FLAGS = {
    # CPU_CAPABILITY selects ATen's at::vec implementation (and its inline namespace).
    "avx512": [
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mfma",
        "-mf16c",
        "-DCPU_CAPABILITY=AVX512",
        "-DCPU_CAPABILITY_AVX512",
    ],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "generic": ["-DCPU_CAPABILITY=DEFAULT"],
}


def want_cuda() -> bool:
    if os.environ.get("FASTATTN_NO_CUDA") == "1":
        return False
    if torch.version.cuda is None or CUDA_HOME is None:
        return False
    return os.environ.get("FASTATTN_FORCE_CUDA") == "1" or torch.cuda.is_available()


def extension():
    arch = cpu_arch()
    cxx = [
        "-O3",
        "-std=c++17",
        "-fopenmp",
        "-fno-math-errno",
        # No silent a*b+c -> fma contraction: kernels write their FMAs explicitly, so the
        # same formula rounds the same way everywhere (e.g. g - mean(g) is exactly 0 for M=1).
        "-ffp-contract=off",
    ] + ARCH_FLAGS[arch]
    link = ["-fopenmp"]
    if os.environ.get("FASTATTN_ASAN") == "1":
        cxx += ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]
        link += ["-fsanitize=address"]
    sources = ["csrc/ops.cpp", "csrc/autograd.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include = [os.path.join(HERE, "csrc")]
    if want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + ["csrc/cuda/bindings.cpp"]
        nvcc = [
            "-O3",
            "-std=c++17",
            "--use_fast_math",
            "-lineinfo",
            "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_90,code=sm_90",
        ]
        return CUDAExtension(
            "fastattn._C",
            sources,
            include_dirs=include,
            extra_compile_args={"cxx": cxx + ["-DFASTATTN_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=link,
        )
    return CppExtension(
        "fastattn._C",
        sources,
        include_dirs=include,
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )


setup(
    ext_modules=[] if os.environ.get("FASTATTN_SKIP_EXT") == "1" else [extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
