"""What the memory-bound CUDA kernels move: 32-byte sectors counted in the CPU emulator.

    python -m bench.memory_traffic            # prints the table (SegNet's maps, rows cropped)
    python -m bench.memory_traffic --full     # ... on the full maps (minutes)
    python -m bench.memory_traffic --write    # ... and writes it into bench/RESULTS.md

Each op runs as the library launches it (256 threads, at most 8192 blocks) on the maps that
SegNet's encoder pools at 360x480 input (64x360x480 down to 512x23x30, batch 1), in both
memory formats, float32 and bfloat16, with the emulator counting per warp instruction the
distinct 32-byte sectors its lanes touch (tests/cuda_emu/cuda_emu.h: what an L1 requests
from L2 / DRAM when nothing is cached). "Ideal" is the bytes the op must move (each tensor it
reads or writes once, per-channel parameters included) / 32. By default the maps above 2M
elements keep their channels and width and 8 + H % 8 rows: the per-row pattern of every
kernel repeats (plane and row offsets modulo 32 bytes and windows modulo 4 depend on H only
through H % 8), and costs fixed per plane or channel (parameters, partial sums) weigh more
on the cropped map than on the full one, so the ratio is the full map's or above; --full
runs the full maps.
"""
import argparse
import math
import os

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
SEGNET_MAPS = [(64, 360, 480), (128, 180, 240), (256, 90, 120), (512, 45, 60), (512, 23, 30)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FORMATS = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}
THREADS, MAX_BLOCKS = 256, 8192  # the library's LaunchConfig


def cropped(C, H, W):
    return (C, 8 + H % 8, W) if C * H * W > 2_000_000 else (C, H, W)


def _sectors(*tensors_or_bytes):
    total = 0
    for t in tensors_or_bytes:
        nbytes = t.numel() * t.element_size() if isinstance(t, torch.Tensor) else t
        total += math.ceil(nbytes / 32)
    return total


def _cases(emu, x):
    """(op, run, ideal sectors) for a map x [1, C, H, W] in its format and dtype."""
    C, H, W = x.shape[1:]
    acc = torch.float32
    param = lambda: torch.rand(C, dtype=acc) + 0.5  # noqa: E731
    scale, shift, mean, k1, k2, k3 = (param() for _ in range(6))
    values, packed = emu.max_pool2x2(x, True, THREADS, MAX_BLOCKS)
    dy = torch.randn_like(x)
    gv = torch.randn_like(values)
    return [
        ("max_pool2x2", lambda: emu.max_pool2x2(x, True, THREADS, MAX_BLOCKS), _sectors(x, values, packed)),
        ("max_unpool2x2", lambda: emu.max_unpool2x2(values, packed, [H, W], THREADS, MAX_BLOCKS),
         _sectors(values, packed, x)),
        ("max_unpool2x2_backward", lambda: emu.max_unpool2x2_backward(x, packed, list(values.shape[2:]), THREADS,
                                                                      MAX_BLOCKS), _sectors(x, packed, gv)),
        ("bn_stats", lambda: emu.bn_stats(x, THREADS, MAX_BLOCKS), _sectors(x, 8 * C)),
        ("scale_shift_relu", lambda: emu.scale_shift_relu(x, scale, shift, True, None, THREADS, MAX_BLOCKS),
         _sectors(x, x, 8 * C)),
        ("bn_relu_backward_reduce", lambda: emu.bn_relu_backward_reduce(dy, x, scale, shift, mean, True, THREADS,
                                                                        MAX_BLOCKS), _sectors(dy, x, 20 * C)),
        ("bn_relu_backward_apply", lambda: emu.bn_relu_backward_apply(dy, x, scale, shift, mean, k1, k2, k3, True,
                                                                      THREADS, MAX_BLOCKS), _sectors(dy, x, x, 24 * C)),
    ]


def measure(emu, maps=None, full=False, dtypes=DTYPES, formats=FORMATS, ops=None):
    """Rows: op, map, format, dtype, load and store sectors, ideal sectors, ratio."""
    rows = []
    torch.manual_seed(0)
    for C, H, W in maps or SEGNET_MAPS:
        shape = (C, H, W) if full else cropped(C, H, W)
        for fmt_name, fmt in formats.items():
            for dt_name, dt in dtypes.items():
                x = torch.randn(1, *shape).to(dt).contiguous(memory_format=fmt)
                for op, run, ideal in _cases(emu, x):
                    if ops and op not in ops:
                        continue
                    emu.count_traffic(True)
                    try:
                        run()
                        t = emu.traffic()
                    finally:
                        emu.count_traffic(False)
                    moved = t["load_sectors"] + t["store_sectors"]
                    rows.append(dict(op=op, map=f"{C}x{H}x{W}", rows=shape[1], format=fmt_name, dtype=dt_name,
                                     load_sectors=t["load_sectors"], store_sectors=t["store_sectors"], ideal=ideal,
                                     ratio=moved / ideal))
    return rows


def table(rows) -> str:
    lines = ["| op | map (rows counted) | format | dtype | sectors loaded | sectors stored | ideal | moved / ideal |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['op']}` | {r['map']} ({r['rows']}) | {r['format']} | {r['dtype']} | {r['load_sectors']} | "
                     f"{r['store_sectors']} | {r['ideal']} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def summary(rows) -> str:
    """Worst ratio per op and format."""
    worst = {}
    for r in rows:
        key = (r["op"], r["format"])
        worst[key] = max(worst.get(key, 0), r["ratio"])
    lines = ["| op | NCHW worst | NHWC worst |", "|---|---:|---:|"]
    for op in dict.fromkeys(r["op"] for r in rows):
        lines.append(f"| `{op}` | {worst.get((op, 'NCHW'), float('nan')):.2f} | {worst.get((op, 'NHWC'), float('nan')):.2f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="full maps (else 8 + H %% 8 rows above 2M elements)")
    parser.add_argument("--write", action="store_true", help="write the tables into bench/RESULTS.md")
    args = parser.parse_args(argv)
    from tests.cuda_emu.build import build_emulator

    rows = measure(build_emulator(), full=args.full)
    text = (f"### Memory traffic of the CUDA kernels (emulated)\n\n`python -m bench.memory_traffic"
            f"{' --full' if args.full else ''}`: 32-byte sectors per warp instruction, counted by the CPU emulator; "
            f"ideal = bytes the op must move / 32; the test (tests/cuda_emu/test_memory_traffic.py) holds "
            f"moved / ideal <= 1.10.\n\nWorst per op:\n\n{summary(rows)}\n\n<details><summary>every map</summary>\n\n"
            f"{table(rows)}\n\n</details>\n")
    print(text)
    if args.write:
        from bench.common import replace_section

        replace_section(RESULTS, "memory-traffic", text)


if __name__ == "__main__":
    main()
