"""Builds ntkcl_fast._C: always the CPU kernels, plus the CUDA kernels when torch has CUDA and
nvcc is found (or when forced). Install with `pip install --no-build-isolation .` so the
extension is built against the torch you already have.

Environment switches:
  NTKCL_FORCE_CUDA=1        build the CUDA kernels even when no GPU/CUDA torch is detected
  NTKCL_SKIP_CUDA=1         never build the CUDA kernels
  NTKCL_CUDA_ARCH_LIST      compute capabilities, default "8.0;9.0" (A100, H100/H200)
  NTKCL_CPU_ISA             "avx2" (default on x86-64 CPUs that have it) or "generic"
  MAX_JOBS                  parallel compile jobs for ninja (default: number of cores)
"""
from __future__ import annotations

import glob
import os
import platform
import shutil
import site
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _guess_cuda_home() -> None:
    """torch looks for nvcc under CUDA_HOME; point it at the toolkit that the nvcc on PATH belongs to."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    real = os.path.realpath(nvcc)
    with open(real, "rb") as f:  # some systems install nvcc as a wrapper script that execs the real one
        head = f.read(512)
    if head.startswith(b"#!"):
        for word in head.decode(errors="ignore").split():
            if word.endswith("/bin/nvcc") and os.path.exists(word):
                real = word
                break
    os.environ["CUDA_HOME"] = os.path.dirname(os.path.dirname(real))


_guess_cuda_home()

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda() -> tuple[bool, str]:
    if _flag("NTKCL_SKIP_CUDA"):
        return False, "NTKCL_SKIP_CUDA=1"
    if _flag("NTKCL_FORCE_CUDA"):
        return True, "NTKCL_FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"torch {torch.__version__} has CUDA {torch.version.cuda}, nvcc in {CUDA_HOME}"


def _pip_cuda_includes() -> list[str]:
    """Headers that pip's nvidia-* wheels carry (cuBLAS, cuSPARSE, ...) when the toolkit lacks them."""
    roots = site.getsitepackages() + [site.getusersitepackages()]
    found = []
    for root in roots:
        found += glob.glob(os.path.join(root, "nvidia", "cu1*", "include"))  # CUDA 13 layout
        found += glob.glob(os.path.join(root, "nvidia", "*", "include"))  # CUDA 12 layout
    have = set()
    if CUDA_HOME:
        have = {os.path.basename(p) for p in glob.glob(os.path.join(CUDA_HOME, "include", "*.h"))}
    # only add a pip include dir that supplies a header the toolkit is missing
    return sorted({d for d in found if {os.path.basename(p) for p in glob.glob(os.path.join(d, "*.h"))} - have})


def _cpu_isa_flags() -> list[str]:
    isa = os.environ.get("NTKCL_CPU_ISA")
    if isa is None:
        isa = "generic"
        if platform.machine() in ("x86_64", "AMD64") and os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as f:
                flags = f.read()
            if all(f" {x}" in flags for x in ("avx2", "fma", "f16c")):
                isa = "avx2"
    if isa == "avx2":  # same capability macros ATen's own AVX2 kernels are compiled with
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    if isa != "generic":
        sys.exit(f"NTKCL_CPU_ISA must be 'avx2' or 'generic', got {isa!r}")
    return []


def _gencode(arch_list: str) -> list[str]:
    flags = []
    for arch in arch_list.replace(",", ";").split(";"):
        arch = arch.strip()
        if not arch:
            continue
        num = arch.replace(".", "").replace("+PTX", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def extensions():
    with_cuda, why = _want_cuda()
    print(f"ntkcl_fast: CUDA kernels {'on' if with_cuda else 'off'} ({why})", flush=True)
    sources = [os.path.relpath(p, HERE) for p in
               sorted(glob.glob(os.path.join(HERE, "csrc", "*.cpp")) + glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))]
    macros = [("NTKCL_PYTHON_MODULE", None), ("NTKCL_BUILT_WITH_TORCH", f'"{torch.__version__}"')]
    # no -std flag: torch adds the standard its headers need (C++17 up to 2.9, C++20 after)
    # at::parallel_for is an inline OpenMP region (ATen/ParallelOpenMP.h): without -fopenmp it runs serially
    # -ffp-contract=off: GCC would fuse `a * b + c` into one FMA in some loops (vectorized or not,
    # depending on aliasing and alignment) and not others, so an element's rounding would depend on
    # where its chunk or shard starts; the kernels write the FMAs they want explicitly
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"] + _cpu_isa_flags()
    link = ["-fopenmp"]
    if not with_cuda:
        return [CppExtension("ntkcl_fast._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx},
                             extra_link_args=link)]
    archs = os.environ.get("NTKCL_CUDA_ARCH_LIST", "8.0;9.0")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", archs)  # keeps torch from probing a GPU for it
    sources += [os.path.relpath(p, HERE) for p in sorted(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))]
    macros += [("NTKCL_WITH_CUDA", None), ("NTKCL_CUDA_ARCHS", f'"{archs}"')]
    # --fmad=false: as -ffp-contract=off for the C++ (nvcc contracts `a * b + c` by default), so the
    # CUDA kernels round as the CPU kernels do; the FMAs they want are written as fma()
    nvcc = ["-O3", "-lineinfo", "--fmad=false"] + _gencode(archs)
    return [CUDAExtension("ntkcl_fast._C", sources, define_macros=macros, include_dirs=_pip_cuda_includes(),
                          extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)]


setup(  # name, version and packages come from pyproject.toml
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
