"""max_pool2x2 / max_unpool2x2 and their backwards against torch's int64-index pair,
side by side in one process, with the memory bandwidth measured in the same run.

    python -m bench.pool                 # [4, 64, 360, 480] float32, prints the table
    python -m bench.pool --write         # ... and writes it into bench/RESULTS.md, in the
                                         # section of the ISA level segnet_ext's kernels ran at
    python -m bench.pool --dtype bfloat16 --write   # the dtype bf16 autocast gives them (its own section)

The table is measured under glibc with the large-block thresholds of segnet.malloc (what
the segnet command uses), and again, in a child process, under glibc's defaults (how a
user's own program runs unless told otherwise): ours must beat torch under both.

Both sides run through autograd the same way for the backwards. The bytes floor of an
op is the bytes it must move (read + write, at the element size, indices included)
divided by the copy bandwidth measured in this run.
"""
import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

import segnet_ext
from bench.common import (add_allocator_arguments, bandwidth_gbs, cpu_level, interleaved_ms, machine_description,
                          median_ratio, replace_section, start_under_allocator, under_default_allocator)
from segnet import malloc

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def cases(shape, channels_last, device="cpu", dtype=torch.float32):
    """Yields (name, ours, torch's, bytes ours must move, bytes torch's must move)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    H, W = shape[-2:]
    values, packed = segnet_ext.max_pool2x2(x)
    tvalues, indices = F.max_pool2d(x, 2, 2, return_indices=True)
    es, big, small = x.element_size(), x.numel(), values.numel()
    packed_bytes, index_bytes = packed.numel(), indices.numel() * 8

    yield ("pool forward", lambda: segnet_ext.max_pool2x2(x), lambda: F.max_pool2d(x, 2, 2, return_indices=True),
           big * es + small * es + packed_bytes, big * es + small * es + index_bytes)

    xg = x.detach().clone().requires_grad_()
    ours_out, torch_out = segnet_ext.max_pool2x2(xg)[0], F.max_pool2d(xg, 2, 2, return_indices=True)[0]
    g = torch.randn_like(values)
    yield ("pool backward", lambda: torch.autograd.grad(ours_out, xg, g, retain_graph=True),
           lambda: torch.autograd.grad(torch_out, xg, g, retain_graph=True),
           small * es + packed_bytes + big * es, small * es + index_bytes + big * es)

    v = torch.randn_like(values)
    yield ("unpool forward", lambda: segnet_ext.max_unpool2x2(v, packed, (H, W)),
           lambda: F.max_unpool2d(v, indices, 2, 2, output_size=(H, W)),
           small * es + packed_bytes + big * es, small * es + index_bytes + big * es)

    vg = v.detach().clone().requires_grad_()
    ours_y = segnet_ext.max_unpool2x2(vg, packed, (H, W))
    torch_y = F.max_unpool2d(vg, indices, 2, 2, output_size=(H, W))
    gy = torch.randn_like(x)
    yield ("unpool backward", lambda: torch.autograd.grad(ours_y, vg, gy, retain_graph=True),
           lambda: torch.autograd.grad(torch_y, vg, gy, retain_graph=True),
           big * es + packed_bytes + small * es, big * es + index_bytes + small * es)


# The project's targets on its 2-core CPU: speed-up over torch, and at most 1.5x the bytes floor.
TARGET_SPEEDUP = {("pool forward", "NCHW"): 3.0, ("pool forward", "channels_last"): 1.3,
                  ("pool backward", "NCHW"): 2.0, ("pool backward", "channels_last"): 2.0}
DEFAULT_TARGET_SPEEDUP, TARGET_OVER_FLOOR = 1.2, 1.5


def run(shape, repeat=9, device="cpu", dtype=torch.float32):
    read_bw, copy_bw = bandwidth_gbs(device=device, repeat=repeat)
    src = torch.randn(shape, device=device)
    dst = torch.empty_like(src)
    copy_bytes = 2 * src.numel() * src.element_size()
    rows = []
    for channels_last in (False, True):
        for name, ours, theirs, ours_bytes, torch_bytes in cases(shape, channels_last, device, dtype):
            # the copy that sets the floor is timed in alternation with the two ops
            ours_t, torch_t, copy_t = interleaved_ms([ours, theirs, lambda: dst.copy_(src)], repeat)
            floor_t = [ours_bytes / copy_bytes * t for t in copy_t]
            rows.append(dict(op=name, layout="channels_last" if channels_last else "NCHW",
                             torch_ms=statistics.median(torch_t), ours_ms=statistics.median(ours_t),
                             speedup=median_ratio(torch_t, ours_t), floor_ms=statistics.median(floor_t),
                             over_floor=median_ratio(ours_t, floor_t),
                             ours_mb=ours_bytes / 1e6, torch_mb=torch_bytes / 1e6))
    return dict(read_gbs=read_bw, copy_gbs=copy_bw, rows=rows, repeat=repeat, dtype=str(dtype).split(".")[-1])


def report(result, shape, device, command):
    dtype = result.get("dtype", "float32")
    lines = [
        "## 2x2 arg-max pooling and unpooling" + (f", {dtype}" if dtype != "float32" else "")
        + (f" (CPU kernels at {cpu_level().upper()})" if device == "cpu" else ""),
        "",
        f"`{command}` on {machine_description(device)}, torch {torch.__version__}, "
        f"input {list(shape)} {dtype}, {result['repeat']} rounds of ours, torch's and a copy timed in alternation: "
        "medians of the times, and of the ratios within each round (speed-up, ours / floor). Memory bandwidth at "
        f"the start of the run: read {result['read_gbs']:.1f} GB/s, copy "
        f"{result['copy_gbs']:.1f} GB/s (read + write). Floor: the bytes the op must move at the speed of the copy "
        "timed beside it (a float32 copy of the input: read + write). Backwards are timed through autograd on both sides. "
        f"Allocator: {malloc.describe()} (set by the script; what `segnet` uses), so freed outputs are reused "
        "instead of page-faulted back, for both sides."
        + (" Last columns: the same ops in a child process under glibc's defaults, where every new output "
           "above 32 MB is page-faulted in, on both sides." if result.get("default") else ""),
        "",
    ]
    default = {(r["op"], r["layout"]): r for r in result["default"]["rows"]} if result.get("default") else {}
    header = ("| op | layout | torch ms | ours ms | speed-up (target) | bytes floor ms | ours / floor (target 1.5x) "
              "| MB moved: ours / torch |")
    if default:
        header += " default malloc: torch ms | ours ms | speed-up (target 1.0x) |"
    lines += [header, "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if default else "")]
    mark = lambda ok: "" if ok else " **missed**"  # noqa: E731
    for r in result["rows"]:
        target = TARGET_SPEEDUP.get((r["op"], r["layout"]), DEFAULT_TARGET_SPEEDUP)
        line = (f"| {r['op']} | {r['layout']} | {r['torch_ms']:.1f} | {r['ours_ms']:.1f} | "
                f"{r['speedup']:.2f}x (>= {target}x){mark(r['speedup'] >= target)} | {r['floor_ms']:.1f} | "
                f"{r['over_floor']:.2f}x{mark(r['over_floor'] <= TARGET_OVER_FLOOR)} | "
                f"{r['ours_mb']:.0f} / {r['torch_mb']:.0f} |")
        if default:
            d = default[(r["op"], r["layout"])]
            line += f" {d['torch_ms']:.1f} | {d['ours_ms']:.1f} | {d['speedup']:.2f}x{mark(d['speedup'] >= 1.0)} |"
        lines.append(line)
    windows = shape[0] * shape[1] * (shape[2] // 2) * (shape[3] // 2)
    lines += ["", f"Index memory for this input: {(windows + 3) // 4:,} bytes packed vs {windows * 8:,} bytes of "
              f"int64 indices: exactly 1/32."]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=4, default=[4, 64, 360, 480], metavar=("N", "C", "H", "W"))
    parser.add_argument("--repeat", type=int, default=15, help="timed runs per op (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--write", action="store_true", help=f"write the table into {RESULTS}")
    add_allocator_arguments(parser)
    args = parser.parse_args(argv)
    start_under_allocator(args)
    result = run(args.shape, args.repeat, args.device, getattr(torch, args.dtype))
    if args.json:
        print(json.dumps(result))
        return result
    if args.allocator == "both" and args.device == "cpu":
        result["default"] = under_default_allocator(
            "bench.pool", ["--shape", *args.shape, "--repeat", args.repeat, "--device", args.device, "--dtype", args.dtype])
    command = "python -m bench.pool " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]) if a != "--write")
    text = report(result, args.shape, args.device, command.strip())
    print(text)
    if args.write:
        section = (f"pool-{args.device}" + (f"-{cpu_level()}" if args.device == "cpu" else "")
                   + (f"-{args.dtype}" if args.dtype != "float32" else ""))
        replace_section(RESULTS, section, text)
        print(f"\nwritten to {RESULTS}")
    return result


if __name__ == "__main__":
    main()
