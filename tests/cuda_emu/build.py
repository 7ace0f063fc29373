"""Builds the emulated CUDA kernels (tests/cuda_emu/emu_ext.cpp) as a CPU extension; with
SEGNET_EXT_SANITIZE=1, under AddressSanitizer and UndefinedBehaviorSanitizer (the process
must then have the ASan runtime preloaded: see tests/test_sanitizers.py)."""
import os

from torch.utils.cpp_extension import load

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
with open(os.path.join(ROOT, "csrc", "sanitize_flags.txt")) as f:  # the library's sanitizer build uses them too
    SANITIZE_FLAGS = [line.strip() for line in f if line.strip() and not line.startswith("#")]


def build_emulator(verbose: bool = False):
    sanitize = os.environ.get("SEGNET_EXT_SANITIZE") == "1"
    preload = os.environ.pop("LD_PRELOAD", None)  # the compiler needs no sanitizer runtime
    try:
        return load(
            name="segnet_cuda_emu" + ("_sanitized" if sanitize else ""),
            sources=[os.path.join(HERE, "emu_ext.cpp")],
            extra_include_paths=[os.path.join(HERE, "shim"), os.path.join(ROOT, "csrc"), HERE],
            extra_cflags=["-std=c++20", "-O1", "-Wall"] + (SANITIZE_FLAGS if sanitize else []),
            extra_ldflags=SANITIZE_FLAGS if sanitize else [],
            verbose=verbose,
        )
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload
