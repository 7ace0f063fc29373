"""Builds the emulated CUDA kernels (tests/cuda_emu/emu_ext.cpp) as a CPU extension."""
import os

from torch.utils.cpp_extension import load

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def build_emulator(verbose: bool = False):
    return load(
        name="segnet_cuda_emu",
        sources=[os.path.join(HERE, "emu_ext.cpp")],
        extra_include_paths=[os.path.join(ROOT, "csrc"), HERE],
        extra_cflags=["-std=c++20", "-O1", "-Wall"],
        verbose=verbose,
    )
