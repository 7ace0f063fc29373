"""glibc's malloc, set up for activation-sized blocks.

glibc gives every freed block above its mmap threshold (32 MB at most) back to the
operating system, so each new activation-sized tensor (a [4, 64, 360, 480] float32 map is
177 MB) is mapped afresh and page-faulted, the kernel zeroing it page by page: about 55 ms
per 177 MB on a 2-core VM, more than the ops that fill it. With the mmap and trim
thresholds raised, freed blocks stay in the heap and are reused, as tcmalloc and jemalloc
(which PyTorch's CPU performance guide recommends) would do, with no extra package. glibc
takes thresholds above 32 MB only from the environment at start-up (``mallopt`` refuses
them), so a process that wants them re-executes itself once with them set.

``segnet train``, ``eval`` and ``predict`` do so by default; ``SEGNET_MALLOC=default`` keeps
glibc's defaults, and thresholds the user set, or another allocator in ``LD_PRELOAD``, are
left alone.
"""
import os
import platform
import sys
from typing import Dict

THRESHOLDS = {"MALLOC_MMAP_THRESHOLD_": str(1 << 34), "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}
SWITCH = "SEGNET_MALLOC"  # "default": glibc's defaults


def is_tuned(env: Dict[str, str] = os.environ) -> bool:
    return all(env.get(k) == v for k, v in THRESHOLDS.items())


def describe() -> str:
    """What this process runs under, for benchmark reports."""
    if is_tuned():
        return "glibc with " + ", ".join(f"{k}={v}" for k, v in THRESHOLDS.items())
    return "glibc's defaults"


def _glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _reexec(env: Dict[str, str]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def use_tuned_malloc() -> None:
    """Re-runs this process, same arguments, with THRESHOLDS set, unless they are set
    already, SEGNET_MALLOC=default, the user set either threshold or preloads another
    allocator, or the C library is not glibc. Call it first thing in a program's entry."""
    if (is_tuned() or os.environ.get(SWITCH) == "default" or not _glibc()
            or any(k in os.environ for k in THRESHOLDS)
            or any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc"))):
        return
    _reexec({**os.environ, **THRESHOLDS})


def use_allocator(tuned: bool) -> None:
    """For benchmarks: makes this process run under the tuned thresholds (tuned=True) or
    glibc's defaults, re-executing it once if it does not."""
    if (is_tuned() if tuned else not any(k in os.environ for k in THRESHOLDS)):
        return
    env = {k: v for k, v in os.environ.items() if k not in THRESHOLDS}
    _reexec({**env, **THRESHOLDS} if tuned else env)
