"""Timing, bandwidth and report helpers shared by the benchmarks."""
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch

from segnet import malloc


def add_allocator_arguments(parser):
    parser.add_argument("--allocator", choices=["both", "tuned", "default"], default="both",
                        help="glibc's malloc with the large-block thresholds of segnet.malloc (tuned), with its "
                             "defaults, or both: tuned here and the defaults in a child process (default: both)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")


def start_under_allocator(args):
    """Re-executes this process under the allocator args.allocator asks for (glibc reads the
    thresholds only at start-up): the defaults for "default", the tuned thresholds otherwise."""
    malloc.use_allocator(args.allocator != "default")


def under_default_allocator(module, argv):
    """The JSON result of ``python -m module *argv --allocator default --json``, run in a
    child process under glibc's defaults: how a user runs the op unless told otherwise."""
    env = {k: v for k, v in os.environ.items() if k not in malloc.THRESHOLDS}
    return child_json(module, [*argv, "--allocator", "default", "--json"], env)


def child_json(module, argv, env=None):
    """The JSON line that ``python -m module *argv`` prints last, run in a child process
    (environment ``env``, else this one's); an error with its stderr where it fails."""
    cmd = [sys.executable, "-m", module, *map(str, argv)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"python -m {module} {' '.join(cmd[3:])} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


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


def cpu_isa(cpuinfo: str) -> str:
    """The vector ISA a /proc/cpuinfo text lists: AVX-512 (with BF16, AMX where present), or AVX2."""
    match = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
    flags = set(match.group(1).split()) if match else set()
    if "avx512f" in flags:
        extras = [name for flag, name in (("avx512_bf16", "BF16"), ("amx_tile", "AMX")) if flag in flags]
        return " + ".join(["AVX-512", *extras])
    return "AVX2 (no AVX-512)" if "avx2" in flags else "no AVX2"


def cpu_level():
    """The ISA level segnet_ext's CPU kernels run at, lower case ("avx512", "avx2", "default"):
    RESULTS.md keeps one section of each CPU table per level."""
    import segnet_ext

    return segnet_ext.cpu_capability().lower()


def machine_description(device="cpu"):
    """The CPU, its ISA and the levels ATen's and segnet_ext's kernels run at (which
    ATEN_CPU_CAPABILITY and SEGNET_EXT_NO_AVX512 / SEGNET_EXT_NO_AVX2 can lower)."""
    import segnet_ext

    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu, isa = platform.processor() or platform.machine(), "ISA unknown"
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        cpu, isa = re.search(r"model name\s*:\s*(.*)", text).group(1), cpu_isa(text)
    except (OSError, AttributeError):
        pass
    return (f"{cpu} ({isa}), {torch.get_num_threads()} threads, kernels at: ATen "
            f"{torch.backends.cpu.get_cpu_capability()}, segnet_ext {segnet_ext.cpu_capability()}")


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
