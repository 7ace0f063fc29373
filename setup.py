"""Builds segnet_ext._C: CPU kernels always, CUDA kernels when they can be built.

SEGNET_EXT_CUDA=1 or 0 forces the choice; TORCH_CUDA_ARCH_LIST picks the GPU
architectures (default: sm_80 and sm_90, plus PTX); MAX_JOBS caps ninja's jobs.
SEGNET_EXT_SANITIZE=1 builds the CPU kernels only, under AddressSanitizer and
UndefinedBehaviorSanitizer: run Python with the ASan runtime preloaded, as README.md says.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"


def default_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`, which a wrapper script in /usr/local/bin
    fools; prefer the toolkit's usual home when the environment names none."""
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        if os.path.exists("/usr/local/cuda/bin/nvcc"):
            os.environ["CUDA_HOME"] = "/usr/local/cuda"


default_cuda_home()

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def nvcc_major():
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+)\.", out)
    return int(match.group(1)) if match else None


def cuda_build_problem():
    """Why CUDA kernels cannot be built here, or None if they can."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    major = nvcc_major()
    if major is None:
        return "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    torch_major = int(torch.version.cuda.split(".")[0])
    if major != torch_major:
        return f"nvcc is CUDA {major} but torch {torch.__version__} was built with CUDA {torch.version.cuda}"
    return None


SANITIZE = os.environ.get("SEGNET_EXT_SANITIZE") == "1"


def sanitize_flags():
    """csrc/sanitize_flags.txt (shared with the emulator's build), at -O1."""
    with open(os.path.join(ROOT, "csrc", "sanitize_flags.txt")) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")] + ["-O1"]


def with_cuda():
    if SANITIZE:
        print("segnet_ext: SEGNET_EXT_SANITIZE=1, building CPU kernels only, with sanitizers")
        return False
    forced = os.environ.get("SEGNET_EXT_CUDA")
    problem = cuda_build_problem()
    if forced == "0":
        print("segnet_ext: SEGNET_EXT_CUDA=0, building CPU kernels only")
        return False
    if problem is None:
        return True
    if forced == "1":
        sys.exit(f"segnet_ext: SEGNET_EXT_CUDA=1 but CUDA kernels cannot be built: {problem}")
    print(f"segnet_ext: building CPU kernels only: {problem}")
    return False


def extension():
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is inline OpenMP code in torch's headers; without it, it runs serially.
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    if not with_cuda():
        cxx, link = (cxx + sanitize_flags(), ["-fopenmp"] + sanitize_flags()) if SANITIZE else (cxx, ["-fopenmp"])
        return CppExtension("segnet_ext._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                            extra_compile_args={"cxx": cxx}, extra_link_args=link)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    print(f"segnet_ext: building CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']}")
    return CUDAExtension(
        "segnet_ext._C", sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]},
        extra_link_args=["-fopenmp"])


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
