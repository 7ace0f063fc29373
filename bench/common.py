"""Timing, bandwidth and report helpers shared by the benchmarks."""
import os
import platform
import re
import statistics
import sys
import time

import torch


# glibc returns every freed block above 32 MB to the OS, so each fresh activation-sized
# output is page-faulted (and zeroed by the kernel) again: ~55 ms per 177 MB here, more than
# the ops themselves. Raising the thresholds makes freed memory reusable, as the tcmalloc /
# jemalloc that PyTorch's CPU performance guides recommend do. Both sides run under it.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 34), "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}


def ensure_allocator_env():
    """Re-runs this process with ALLOCATOR_ENV set (glibc reads it only at start-up)."""
    if all(os.environ.get(k) == v for k, v in ALLOCATOR_ENV.items()):
        return
    os.environ.update(ALLOCATOR_ENV)
    os.execv(sys.executable, sys.orig_argv)


def median_ms(fn, repeat=9, warmup=3):
    """Median wall time of fn() in milliseconds (CUDA work is synchronised)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def interleaved_ms(fns, repeat=15, warmup=3):
    """Each fn's times in ms over `repeat` rounds, timed in alternation (a b c a b c ...) so
    that a drift in the machine's speed (a busy neighbour, memory clock) hits all of them alike."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = [[] for _ in fns]
    for i in range(warmup + repeat):
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                t.append((time.perf_counter() - start) * 1e3)
    return times


def interleaved_median_ms(fns, repeat=15, warmup=3):
    """Median ms of each fn, timed in alternation (see interleaved_ms)."""
    return [statistics.median(t) for t in interleaved_ms(fns, repeat, warmup)]


def median_ratio(numerator, denominator):
    """The median over rounds of numerator[i] / denominator[i]: the ratio of two things timed
    side by side. This VM switches between a fast and a slow memory regime for seconds at a
    time; two medians taken apart can then come from different regimes, a ratio per round
    cannot."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def bandwidth_gbs(numel=4 * 64 * 360 * 480, device="cpu", repeat=7):
    """This machine's memory bandwidth now, in GB/s: (read, copy = read + write)."""
    x = torch.randn(numel, device=device)
    y = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    read_ms = median_ms(lambda: x.sum(), repeat)
    copy_ms = median_ms(lambda: y.copy_(x), repeat)
    return nbytes / read_ms / 1e6, 2 * nbytes / copy_ms / 1e6


def machine_description(device="cpu"):
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    except (OSError, AttributeError):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"


def replace_section(path, name, text):
    """Writes text between <!-- name:begin --> and <!-- name:end --> in path (appended if absent)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    try:
        with open(path) as f:
            doc = f.read()
    except FileNotFoundError:
        doc = "# Benchmark results\n"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in doc and end in doc:
        doc = doc[: doc.index(begin)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(doc)


def saved_storages(fn):
    """({storage pointer: bytes} of the distinct storages autograd saves while ``fn`` runs,
    fn's result)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return storages, out


def saved_bytes(fn):
    """(bytes of the distinct storages autograd saves while ``fn`` runs, fn's result)."""
    storages, out = saved_storages(fn)
    return sum(storages.values()), out
