"""What the speed choices of the CamVid recipe (python/segnet/recipes/camvid_segnet_basic.json)
buy: SegNet-Basic training steps (forward, class-weighted loss, backward, Adam step) in
images per second, the variants timed in alternation in one process.

    python -m bench.recipe            # prints the table
    python -m bench.recipe --write    # ... and writes it into bench/RESULTS.md

Variants: float32 NCHW and channels_last, bf16 autocast NCHW and channels_last, each on
the recipe's 192x256 crops, and the last also on whole 360x480 images (what training
without crops would cost per image), there without and with the input's local contrast
normalisation (`--input-norm lcn`, what it costs per step); the bf16 ones only where oneDNN has bf16 kernels for
the CPU (AVX-512). Under the malloc thresholds the segnet command sets
(segnet.malloc), and again in a child process under glibc's defaults: what they save.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

from bench.common import (add_allocator_arguments, cpu_level, interleaved_median_ms, machine_description,
                          replace_section, start_under_allocator, under_default_allocator)
from segnet import malloc
from segnet.evaluate import cpu_runs_bf16_fast
from segnet.model import build_model

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def variants(crop=(192, 256), full=(360, 480), bf16=True):
    """(name, bf16, channels_last, (H, W), input_norm) of each variant; bf16=False: the float32 ones only."""
    c, f = "x".join(map(str, crop)), "x".join(map(str, full))
    return [
        (f"float32, NCHW, {c} crops", False, False, crop, "none"),
        (f"float32, channels_last, {c} crops", False, True, crop, "none"),
    ] + ([
        (f"bf16 autocast, NCHW, {c} crops", True, False, crop, "none"),
        (f"bf16 autocast, channels_last, {c} crops (the recipe)", True, True, crop, "none"),
        (f"bf16 autocast, channels_last, whole {f} images", True, True, full, "none"),
        (f"bf16 autocast, channels_last, whole {f} images, `--input-norm lcn`", True, True, full, "lcn"),
        (f"bf16 autocast, channels_last, whole {f} images, `--input-norm rgb+lcn`", True, True, full, "rgb+lcn"),
    ] if bf16 else [])


def training_step(bf16: bool, channels_last: bool, size, batch: int, input_norm: str = "none"):
    torch.manual_seed(0)
    model = build_model("segnet_basic", input_norm=input_norm).train()
    x, y = torch.randn(batch, 3, *size), torch.randint(0, 11, (batch, *size))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    weights = torch.rand(11) + 0.2
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, weight=weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def measure(batch: int, repeat: int, crop=(192, 256), full=(360, 480), bf16=True):
    """Median ms per step of each variant."""
    steps = [training_step(b, cl, size, batch, norm) for _, b, cl, size, norm in variants(crop, full, bf16)]
    return interleaved_median_ms(steps, repeat=repeat, warmup=1)


def report(ms, batch: int, repeat: int, command: str, crop=(192, 256), full=(360, 480), default_ms=None,
           bf16=True) -> str:
    """The table, as markdown; default_ms: the same under glibc's default allocator."""
    rate = [batch * 1e3 / t for t in ms]
    lines = [f"SegNet-Basic training step, batch {batch}, median of {repeat} (`{command}`; {machine_description()}; "
             f"allocator: {malloc.describe()}, as `segnet train` sets it"
             + ("; last columns: the same steps in a child process under glibc's defaults" if default_ms else "")
             + "):", "",
             "| variant | ms / step | images / s | vs float32 |" + (" default malloc ms / step | time saved |" if default_ms else ""),
             "|---|---|---|---|" + ("---|---|" if default_ms else "")]
    for i, ((name, *_), t, r) in enumerate(zip(variants(crop, full, bf16), ms, rate)):
        line = f"| {name} | {t:.0f} | {r:.2f} | {r / rate[0]:.2f}x |"
        if default_ms:
            line += f" {default_ms[i]:.0f} | {1 - t / default_ms[i]:.0%} |"
        lines.append(line)
    if not bf16:
        lines += ["", "bf16 autocast variants left out: this CPU has no oneDNN bf16 kernels (no AVX-512), and "
                  "PyTorch's bf16 convolutions here take minutes per step (`segnet.evaluate.cpu_runs_bf16_fast`)."]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5, help="timed steps per variant (median reported)")
    parser.add_argument("--write", action="store_true", help=f"write the table into {RESULTS}")
    add_allocator_arguments(parser)
    args = parser.parse_args(argv)
    start_under_allocator(args)
    bf16 = cpu_runs_bf16_fast()
    ms = measure(args.batch_size, args.repeat, bf16=bf16)
    if args.json:
        print(json.dumps(ms))
        return
    default_ms = under_default_allocator("bench.recipe", ["--batch-size", args.batch_size, "--repeat", args.repeat]) \
        if args.allocator == "both" else None
    command = "python -m bench.recipe " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]) if a != "--write")
    text = report(ms, args.batch_size, args.repeat, command.strip(), default_ms=default_ms, bf16=bf16)
    print(text)
    if args.write:
        replace_section(RESULTS, f"camvid-recipe-cpu-{cpu_level()}", text)
        print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
