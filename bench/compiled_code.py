"""What a GPU would run: the CUDA kernels of the built library, read from its SASS.

    python -m bench.compiled_code            # prints the table
    python -m bench.compiled_code --write    # ... and writes it into bench/RESULTS.md

Per kernel (each template instance; "32-bit" / "64-bit": the index type, 64-bit only from
2^31 elements on): registers, stack, local memory (spills), static shared
memory, instructions, subroutine calls (in these kernels, 64-bit integer division and
remainder, dozens of instructions each, and double-precision division) and how many of them
divide integers, global loads and stores and how many are 128-bit,
tensor-core instructions (HMMA), the occupancy its registers and shared memory allow at its
`__launch_bounds__` on an sm_90 SM, and per iteration of each innermost loop that accesses
global memory, its instructions over the global bytes it moves per thread (of the whole
kernel where no loop does). An H200 issues about 1.0e12 warp instructions per second (132 SMs,
4 schedulers, 1.98 GHz), so a loop of X instructions per byte caps near 33 / X TB/s: below 7
to leave the 4.8 TB/s of HBM the limit. Read with ``cuobjdump`` (the PyPI package
``nvidia-cuda-cuobjdump``, or CUDA_HOME/bin) and the ``nvdisasm`` it runs (``nvidia-cuda-nvdisasm``,
triton's copy, or CUDA_HOME/bin) from segnet_ext/_C*.so as built.
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "RESULTS.md")


def _find_tool(name: str):
    """A CUDA binary tool: from the nvidia-* PyPI packages, triton's copy (torch's CUDA builds
    bring triton), CUDA_HOME/bin or PATH; None if absent."""
    places = []
    try:
        import nvidia

        places += [os.path.join(root, "*", "bin", name) for root in nvidia.__path__]
    except ImportError:
        pass
    try:
        import triton

        places.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    except ImportError:
        pass
    places.append(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name))
    for pattern in places:
        found = glob.glob(pattern)
        if found:
            return found[0]
    return shutil.which(name)


def cuobjdump():
    """The cuobjdump executable, or None. Its -sass needs nvdisasm as well (see tools_available)."""
    return _find_tool("cuobjdump")


def tools_available() -> bool:
    return cuobjdump() is not None and _find_tool("nvdisasm") is not None


def _run(*args) -> str:
    nvdisasm = _find_tool("nvdisasm")
    env = dict(os.environ)
    if nvdisasm:  # cuobjdump -sass runs nvdisasm from PATH
        env["PATH"] = os.path.dirname(nvdisasm) + os.pathsep + env.get("PATH", "")
    return subprocess.run([cuobjdump(), *args], capture_output=True, text=True, check=True, env=env).stdout


def library() -> str:
    import segnet_ext

    return glob.glob(os.path.join(os.path.dirname(segnet_ext.__file__), "_C*.so"))[0]


def short_name(mangled: str) -> str:
    """kernel name + template arguments, e.g. "max_unpool2x2_kernel<bf16, 32-bit, channels_last>"."""
    m = re.match(r"_ZN6segnet7kernels(\d+)", mangled)
    if not m:
        return mangled
    n = int(m.group(1))
    name, args = mangled[m.end():m.end() + n], mangled[m.end() + n:]
    m = re.match(r"I(N3c108BFloat16E|N3c104HalfE|f|d)", args)
    if not m:
        return name
    tags = [{"N3c108BFloat16E": "bf16", "N3c104HalfE": "fp16", "f": "fp32", "d": "fp64"}[m.group(1)]]
    rest = args[m.end():]
    m = re.match(r"Li(\d+)E", rest)  # an int argument: the channels a lane takes
    if m:
        tags.append(f"x{m.group(1)}")
        rest = rest[m.end():]
    for term, tag in (("GradTerm", "backward sums"), ("StatsTerm", "statistics")):
        if term in rest:
            tags.append(tag)
    # then, where the kernel has them: the accumulation type, the index type (j: unsigned, l:
    # int64) and a bool (the layout)
    m = re.match(r"(?:[fd](?=[jl]))?([jl])?(?:Lb([01])E)?", rest)
    index = m.group(1) or (re.search(r"Term(?:I\w*?E)E([jl])E", rest) or [None, None])[1]  # after a reduction's term
    if index:
        tags.append("32-bit" if index == "j" else "64-bit")
    if m.group(2):
        tags.append("channels_last" if m.group(2) == "1" else "NCHW")
    return f"{name}<{', '.join(tags)}>"


def read(lib: str):
    """{kernel: dict(registers, stack, local, shared, max_threads, occupancy, instructions, calls,
    integer_division_calls, global_accesses, wide_accesses (128 bits), wide_loads, wide_stores (64 or 128 bits),
    hmma, loop_hmma (the most HMMA in one innermost loop), inner_loops)}"""
    if not tools_available():
        raise FileNotFoundError("cuobjdump and nvdisasm not found: pip install nvidia-cuda-cuobjdump "
                                "nvidia-cuda-nvdisasm (or install triton, which ships nvdisasm)")
    usage, sass, elf = _run("-res-usage", lib), _run("-sass", lib), _run("-elf", lib)
    kernels = defaultdict(dict)
    for name, info in re.findall(r"\n\.nv\.info\.(\S+)\n(.*?)(?=\n\S|\Z)", elf, re.S):
        m = re.search(r"EIATTR_MAX_THREADS\s+Format:\s+\S+\s+Value:\s+(0x[0-9a-f]+) (0x[0-9a-f]+) (0x[0-9a-f]+)", info)
        if m:
            kernels[name]["max_threads"] = int(m.group(1), 16) * int(m.group(2), 16) * int(m.group(3), 16)
    for name, fields in re.findall(r"Function (\S+):\n\s+(.*)", usage):
        values = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", fields))
        kernels[name].update(registers=int(values["REG"]), stack=int(values["STACK"]), local=int(values["LOCAL"]),
                             shared=int(values["SHARED"]))
    for name, body in re.findall(r"Function : (\S+)\n(.*?)(?=\n\s+\.+\n|\n\s+Function : |\Z)", sass, re.S):
        lines = [line for line in body.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/", line)]
        accesses = [line for line in lines if re.search(r"\b(LDG|STG)\.", line)]
        calls = [int(m.group(1), 16) for line in lines for m in [re.search(r"CALL\.REL\S*\s+(0x[0-9a-f]+)", line)] if m]
        kernels[name].update(instructions=len(lines), calls=len(calls),
                             integer_division_calls=sum(not _divides_doubles(lines, target) for target in calls),
                             global_accesses=len(accesses), wide_accesses=sum(".128" in line for line in accesses),
                             wide_loads=sum(bool(re.search(r"\bLDG\.\S*\.(128|64)\b", line)) for line in accesses),
                             wide_stores=sum(bool(re.search(r"\bSTG\.\S*\.(128|64)\b", line)) for line in accesses),
                             hmma=sum("HMMA" in line for line in lines),
                             loop_hmma=max([sum("HMMA" in ins for ins in span) for span in _innermost_loops(lines)[1]],
                                           default=0),
                             inner_loops=_inner_loops(lines))
    for k in kernels.values():
        k["occupancy"] = occupancy(k)
    return dict(kernels)


# An sm_90 SM: 64K registers allocated per warp in units of 256, 64 warps, 32 blocks, 228 KiB
# of shared memory of which each block reserves 1 KiB.
SM90 = dict(registers=65536, register_unit=256, warps=64, blocks=32, shared=228 * 1024, shared_reserved=1024)


def occupancy(k, sm=SM90):
    """Resident warps / the SM's maximum, for blocks of the kernel's __launch_bounds__ (1024
    threads where it has none), as CUDA's occupancy calculator counts them."""
    if "registers" not in k:
        return None
    warps = -(-k.get("max_threads", 1024) // 32)
    per_warp = -(-k["registers"] * 32 // sm["register_unit"]) * sm["register_unit"]
    blocks = min(sm["blocks"], sm["warps"] // warps, sm["registers"] // per_warp // warps)
    if k.get("shared"):
        blocks = min(blocks, sm["shared"] // (k["shared"] + sm["shared_reserved"]))
    return blocks * warps / sm["warps"]


def _access_bytes(instruction: str) -> int:
    suffixes = re.search(r"\b(?:LDG|STG)(\.\S+)", instruction).group(1).split(".")
    return next((width for suffix, width in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1))
                 if suffix in suffixes), 4)


def _innermost_loops(lines):
    """The instructions of each innermost loop (a backward branch's span holding no other)."""
    code = [(int(m.group(1), 16), m.group(2)) for line in lines
            for m in [re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)] if m]
    loops = [(int(m.group(1), 16), at) for at, ins in code for m in [re.search(r"\bBRA\s+(0x[0-9a-f]+)", ins)]
             if m and int(m.group(1), 16) <= at]
    innermost = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    return code, [[ins for at, ins in code if a <= at <= b] for a, b in sorted(innermost)]


def _inner_loops(lines):
    """(instructions, global bytes per thread) per iteration of each innermost loop that
    accesses global memory; of the whole kernel, once, where no loop does."""
    code, spans = _innermost_loops(lines)
    found = []
    for span in spans:
        moved = sum(_access_bytes(ins) for ins in span if re.search(r"\b(LDG|STG)\.", ins))
        if moved:
            found.append((len(span), moved))
    return found or [(len(code), sum(_access_bytes(ins) for _, ins in code if re.search(r"\b(LDG|STG)\.", ins)))]


def _divides_doubles(lines, target: int) -> bool:
    """Whether the subroutine at address `target` of a kernel's SASS is double-precision
    division (its body uses the fp64 units) rather than integer division."""
    body = []
    for line in lines:
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*)", line)
        if m and int(m.group(1), 16) >= target:
            body.append(m.group(2))
            if re.match(r"RET\b", m.group(2)):
                break
    return any(re.search(r"\b(DFMA|DMUL|MUFU\.RCP64H)\b", instruction) for instruction in body)


def table(kernels) -> str:
    rows = ["| kernel | registers | stack + local bytes | shared bytes | instructions | subroutine calls (integer division) | "
            "global accesses (128-bit) | HMMA | occupancy | inner loops: instructions / bytes |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in sorted(kernels, key=short_name):
        k = kernels[name]
        rows.append(f"| `{short_name(name)}` | {k.get('registers', '?')} | {k.get('stack', 0) + k.get('local', 0)} | "
                    f"{k.get('shared', 0)} | {k.get('instructions', '?')} | {k.get('calls', '?')} "
                    f"({k.get('integer_division_calls', '?')}) | "
                    f"{k.get('global_accesses', '?')} ({k.get('wide_accesses', '?')}) | {k.get('hmma', 0)} | "
                    f"{_format(k.get('occupancy'), '.0%')} | "
                    f"{', '.join(f'{i}/{b}' for i, b in k.get('inner_loops', [])) or '?'} |")
    return "\n".join(rows)


def _format(value, spec):
    return "?" if value is None else format(value, spec)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--library", help="the built library (default: segnet_ext/_C*.so)")
    parser.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md")
    args = parser.parse_args(argv)
    lib = args.library or library()
    kernels = read(lib)
    if not kernels:
        sys.exit(f"{lib} holds no CUDA code (a CPU-only build)")
    arches = sorted(set(re.findall(r"arch = (sm_\d+)", _run("-res-usage", lib))))
    text = (f"### Compiled CUDA kernels ({', '.join(arches)})\n\n`python -m bench.compiled_code`, read with "
            f"cuobjdump from the built library. Subroutine calls in these kernels are 64-bit integer division "
            f"and remainder (in parentheses) or double-precision division.\n\n{table(kernels)}\n")
    print(text)
    if args.write:
        from bench.common import replace_section

        replace_section(RESULTS, "compiled-code", text)


if __name__ == "__main__":
    main()
