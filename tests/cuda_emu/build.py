"""Builds the emulated CUDA kernels (tests/cuda_emu/emu_ext.cpp) as a CPU extension; with
SEGNET_EXT_SANITIZE=1, under AddressSanitizer and UndefinedBehaviorSanitizer (the process
must then have the ASan runtime preloaded: see tests/test_sanitizers.py)."""
import contextlib
import fcntl
import os
import sys

import torch
from torch.utils.cpp_extension import load

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
with open(os.path.join(ROOT, "csrc", "sanitize_flags.txt")) as f:  # the library's sanitizer build uses them too
    SANITIZE_FLAGS = [line.strip() for line in f if line.strip() and not line.startswith("#")]


def build_directory(name: str) -> str:
    """build/cuda_emu/ of this checkout, a folder per Python and torch (whose headers it
    compiles against), rather than torch's default ~/.cache/torch_extensions, which every
    checkout and torch install on the machine shares."""
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return os.path.join(ROOT, "build", "cuda_emu", f"{name}-{python}-torch{torch.__version__}")


def build_emulator(verbose: bool = False):
    sanitize = os.environ.get("SEGNET_EXT_SANITIZE") == "1"
    name = "segnet_cuda_emu" + ("_sanitized" if sanitize else "")
    directory = build_directory(name)
    os.makedirs(directory, exist_ok=True)
    preload = os.environ.pop("LD_PRELOAD", None)  # the compiler needs no sanitizer runtime
    try:
        # torch's load() waits, forever, while its "lock" file exists, and a build killed
        # midway (a session's end, ^C) leaves it behind. Builds here take this lock first,
        # which the kernel releases when its process dies: whoever holds it builds alone,
        # so a "lock" file it finds is a dead build's.
        with open(os.path.join(directory, "build.flock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, "lock"))
            return load(
                name=name,
                sources=[os.path.join(HERE, "emu_ext.cpp")],
                extra_include_paths=[os.path.join(HERE, "shim"), os.path.join(ROOT, "csrc"), HERE],
                extra_cflags=["-std=c++20", "-O1", "-Wall"] + (SANITIZE_FLAGS if sanitize else []),
                extra_ldflags=SANITIZE_FLAGS if sanitize else [],
                build_directory=directory,
                verbose=verbose,
            )
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload
