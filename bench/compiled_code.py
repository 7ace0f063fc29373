"""What a GPU would run: the CUDA kernels of the built library, read from its SASS.

    python -m bench.compiled_code            # prints the table
    python -m bench.compiled_code --write    # ... and writes it into bench/RESULTS.md

Per kernel (each template instance; "32-bit" / "64-bit": the index type, 64-bit only from
2^31 elements on): registers, stack, local memory (spills), static shared
memory, instructions, subroutine calls (in these kernels, 64-bit integer division and
remainder: dozens of instructions each), global loads and stores and how many are 128-bit,
tensor-core instructions (HMMA). Read with ``cuobjdump`` (the PyPI package
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
    for term, tag in (("GradTerm", "backward sums"), ("StatsTerm", "statistics")):
        if term in rest:
            tags.append(tag)
    # then, where the kernel has them: the accumulation type, the index type (j: unsigned, l:
    # int64) and a bool (the layout)
    m = re.match(r"(?:[fd](?=[jl]))?([jl])?(?:Lb([01])E)?", rest)
    if m.group(1):
        tags.append("32-bit" if m.group(1) == "j" else "64-bit")
    if m.group(2):
        tags.append("channels_last" if m.group(2) == "1" else "NCHW")
    return f"{name}<{', '.join(tags)}>"


def read(lib: str):
    """{kernel: dict(registers, stack, local, shared, instructions, calls, global_accesses, wide_accesses, hmma)}"""
    if not tools_available():
        raise FileNotFoundError("cuobjdump and nvdisasm not found: pip install nvidia-cuda-cuobjdump "
                                "nvidia-cuda-nvdisasm (or install triton, which ships nvdisasm)")
    usage, sass = _run("-res-usage", lib), _run("-sass", lib)
    kernels = defaultdict(dict)
    for name, fields in re.findall(r"Function (\S+):\n\s+(.*)", usage):
        values = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", fields))
        kernels[name].update(registers=int(values["REG"]), stack=int(values["STACK"]), local=int(values["LOCAL"]),
                             shared=int(values["SHARED"]))
    for name, body in re.findall(r"Function : (\S+)\n(.*?)(?=\n\s+\.+\n|\n\s+Function : |\Z)", sass, re.S):
        lines = [line for line in body.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/", line)]
        accesses = [line for line in lines if re.search(r"\b(LDG|STG)\.", line)]
        kernels[name].update(instructions=len(lines), calls=sum("CALL.REL" in line for line in lines),
                             global_accesses=len(accesses), wide_accesses=sum(".128" in line for line in accesses),
                             hmma=sum("HMMA" in line for line in lines))
    return dict(kernels)


def table(kernels) -> str:
    rows = ["| kernel | registers | stack + local bytes | shared bytes | instructions | subroutine calls | "
            "global accesses (128-bit) | HMMA |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in sorted(kernels, key=short_name):
        k = kernels[name]
        rows.append(f"| `{short_name(name)}` | {k.get('registers', '?')} | {k.get('stack', 0) + k.get('local', 0)} | "
                    f"{k.get('shared', 0)} | {k.get('instructions', '?')} | {k.get('calls', '?')} | "
                    f"{k.get('global_accesses', '?')} ({k.get('wide_accesses', '?')}) | {k.get('hmma', 0)} |")
    return "\n".join(rows)


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
            f"and remainder.\n\n{table(kernels)}\n")
    print(text)
    if args.write:
        from bench.common import replace_section

        replace_section(RESULTS, "compiled-code", text)


if __name__ == "__main__":
    main()
