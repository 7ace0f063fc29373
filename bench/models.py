"""``fuse`` on the models people have: torchvision's and this package's SegNet, each against
its unfused self, side by side in one process.

    python -m bench.models                    # prints the table (eager)
    python -m bench.models --compile          # ... with torch.compile'd rows too
    python -m bench.models --write            # ... and writes it into bench/RESULTS.md, in the
                                              #     section of this CPU's ISA level (with --compile:
                                              #     its own section)
    python -m bench.models --models resnet50  # some models only

Per model (random weights, BN parameters and running statistics drawn away from their
defaults, dropout off):

- Conv-BN pairs in the model, and the patterns ``fuse`` fused (from its report);
- exactness against the unfused model in float64, one training step at 64x64: the largest
  difference of the outputs, the input gradient and every running statistic afterwards, each
  relative to that tensor's largest magnitude, and of every parameter gradient relative to
  the largest parameter gradient;
- saved-for-backward bytes of one training forward (distinct storages seen by
  ``saved_tensors_hooks``, less the parameters', which are kept anyway), fused / unfused;
  copies of parameters in another layout (a compiled model's channels_last weights) are
  counted apart and shown beside the ratio;
- peak tensor memory of a training step, fused / unfused: the most that the CPU allocator
  holds at once during one step (after a warm-up step, gradients set to None as an
  optimizer's zero_grad does) beyond what it held before, from the profiler's memory events
  (``torch.profiler.profile(profile_memory=True)``), the CPU's counterpart of
  ``torch.cuda.max_memory_allocated``; in a fresh process per model and variant (within one
  process the profiler's count carried over from one profiled step to the next, and the
  steps timed after profiling ran slower). It counts what saved activations do not:
  parameter gradients and the backward's own tensors (rebuilt activations, activation
  gradients);
- time of a training step (forward, mean of the output, backward) and of an eval forward
  (no_grad), fused / unfused: the median over rounds of the per-round ratio, the two timed in
  alternation (bench.common.interleaved_ms); under the large-block malloc thresholds that
  ``segnet`` sets (segnet.malloc), and the training step again in a child process under
  glibc's defaults (``--allocator``), where a backward that allocates more than it frees
  page-faults the difference back in every step.
"""
import argparse
import copy
import json
import os
import sys
import tempfile
from typing import Tuple

import torch
from torch import nn

import segnet_ext
from bench.common import (add_allocator_arguments, child_json, cpu_level, interleaved_ms, machine_description,
                          median_ratio, replace_section, start_under_allocator, under_default_allocator)
from segnet import malloc

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
# model: (input size (H, W), batch) of the timed rows; resnet50's is the issue's target case
SIZES = {
    "resnet18": ((224, 224), 2),
    "resnet50": ((512, 512), 2),
    "vgg16_bn": ((224, 224), 2),
    "mobilenet_v2": ((224, 224), 2),
    "fcn_resnet50": ((256, 256), 1),
    "deeplabv3_resnet50": ((256, 256), 2),  # its ASPP pooling branch: BN over 1x1 maps needs a batch of 2
    "segnet_basic": ((360, 480), 1),
}


def build(name: str) -> nn.Module:
    if name == "segnet_basic":
        from segnet.model import build_model

        return build_model("segnet_basic", backend="torch")
    import torchvision

    if name in ("fcn_resnet50", "deeplabv3_resnet50"):
        return getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None, aux_loss=False)
    return getattr(torchvision.models, name)(weights=None)


def prepared(model: nn.Module) -> nn.Module:
    """BN parameters and running statistics away from their defaults; dropout off."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            elif isinstance(m, nn.Dropout):
                m.p = 0.0
    return model


def output_of(y):
    return y["out"] if isinstance(y, dict) else y


def exactness(plain: nn.Module, fused: nn.Module) -> float:
    """The largest relative difference after one float64 training step (see the module doc)."""
    plain, fused = copy.deepcopy(plain).double().train(), copy.deepcopy(fused).double().train()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = []
    for m in (plain, fused):
        xi = x.clone().requires_grad_()
        y = output_of(m(xi))
        y.square().mean().backward()
        results.append(([y, xi.grad] + list(m.buffers()), [p.grad for p in m.parameters()]))
    diff = lambda a, b: (a.double() - b.double()).abs().max().item()
    size = lambda t: t.double().abs().max().item() if t.numel() else 0.0
    (tensors_f, grads_f), (tensors_p, grads_p) = results[1], results[0]
    worst = max(diff(a, b) / max(size(b), 1e-30) for a, b in zip(tensors_f, tensors_p) if b.numel())
    # parameter gradients relative to the largest one: a convolution's bias gradient before a
    # training-mode BN is 0 in exact arithmetic (BN cancels it), so its own scale is rounding
    largest = max(size(g) for g in grads_p if g is not None)
    return max([worst] + [diff(a, b) / largest for a, b in zip(grads_f, grads_p) if b is not None])


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> Tuple[int, int]:
    """(bytes of the distinct storages a training forward saves, parameters and copies of
    them left out; bytes of those copies). A compiled model keeps a copy of each
    convolution weight in another layout (channels_last) for its backward."""
    params = {}
    for p in model.parameters():
        params.setdefault((tuple(p.shape), p.dtype), []).append(p)
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    activations, copies = {}, {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:  # a parameter (or a view of one): kept anyway
            with torch.no_grad():
                copy_of_param = any(torch.equal(t, q) for q in params.get((tuple(t.shape), t.dtype), []))
            (copies if copy_of_param else activations)[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x.clone().requires_grad_())  # noqa: F841  (its graph holds what was saved)
    return sum(activations.values()), sum(copies.values())


def step(model: nn.Module, x: torch.Tensor):
    def run():
        output_of(model(x)).mean().backward()
    return run


def forward_no_grad(model: nn.Module, x: torch.Tensor):
    def run():
        with torch.no_grad():
            model(x)
    return run


def step_peak_mib(name: str, mode: str, variant: str, size) -> float:
    """Peak tensor MiB of a training step of model ``name``, ``variant`` "fused" or "plain",
    ``mode`` "eager" or "compiled", at ``size`` ((H, W), batch), measured in a fresh process
    (see the module doc)."""
    (h, w), batch = size
    return child_json("bench.models", ["--peak-worker", name, mode, variant, h, w, batch])


def _peak_worker(name, mode, variant, h, w, batch):
    model = prepared(build(name))
    if variant == "fused":
        model = segnet_ext.fuse(model)
    if mode == "compiled":
        model = torch.compile(model)
    x = torch.randn(int(batch), 3, int(h), int(w), generator=torch.Generator().manual_seed(2))
    run = step(model.train(), x)
    run()  # the warm-up (and the compilation)
    model.zero_grad(set_to_none=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e["args"] for e in json.load(f)["traceEvents"]
                      if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    before = events[0]["Total Allocated"] - events[0]["Bytes"] if events else 0
    print(json.dumps(max((e["Total Allocated"] - before for e in events), default=0) / 2**20))


def measure(name: str, compile_too: bool, repeat: int, size=None) -> dict:
    """One row of the table; ``size``: ((H, W), batch) of the timed rows, else SIZES's."""
    plain = prepared(build(name))
    fused, report = segnet_ext.fuse(copy.deepcopy(plain), report=True)
    pairs = sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    row = {"model": name, "pairs": pairs, "fused": len(report.fused), "left": list(report.left),
           "exact": exactness(plain, fused)}
    size = size or SIZES[name]
    (h, w), batch = size
    x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(2))
    row["input"] = f"{batch}x3x{h}x{w}"
    variants = [("eager", plain, fused)]
    if compile_too:
        variants.append(("compiled", torch.compile(plain), torch.compile(fused)))
    for mode, p, f in variants:
        p.train(), f.train()
        saved = [saved_activation_bytes(m, x) for m in (f, p)]
        row[f"{mode} saved MiB"] = [b / 2**20 for b, _ in saved]
        row[f"{mode} weight copies MiB"] = [c / 2**20 for _, c in saved]
        ours, theirs = interleaved_ms([step(f, x), step(p, x)], repeat=repeat, warmup=2)
        row[f"{mode} step ms"] = [min(ours), min(theirs)]
        row[f"{mode} step ratio"] = median_ratio(ours, theirs)
        row[f"{mode} step peak MiB"] = [step_peak_mib(name, mode, v, size) for v in ("fused", "plain")]
        p.eval(), f.eval()
        ours, theirs = interleaved_ms([forward_no_grad(f, x), forward_no_grad(p, x)], repeat=repeat, warmup=1)
        row[f"{mode} eval ratio"] = median_ratio(ours, theirs)
        p.zero_grad(set_to_none=True), f.zero_grad(set_to_none=True)
    return row


def table(rows, modes, default_malloc: bool) -> str:
    head = "| model | input (timed) | Conv-BN pairs | fused | max rel. diff, float64 step |"
    rule = "|---|---|---:|---:|---:|"
    for mode in modes:
        head += (f" {mode}: saved activations MiB, fused / plain (ratio) | {mode}: train step peak tensor MiB, fused /"
                 f" plain (ratio) | {mode}: train step ratio | {mode}: eval ratio |")
        rule += "---:|---:|---:|---:|"
    if default_malloc:
        head += " eager: train step ratio, glibc's default malloc |"
        rule += "---:|"
    lines = [head, rule]
    for r in rows:
        line = f"| {r['model']} | {r['input']} | {r['pairs']} | {r['fused']} | {r['exact']:.1e} |"
        for mode in modes:
            f, p = r[f"{mode} saved MiB"]
            copies = r.get(f"{mode} weight copies MiB", [0, 0])
            kept = f" (+ weight copies {copies[0]:.0f} / {copies[1]:.0f})" if max(copies) >= 0.5 else ""
            line += f" {f:.0f} / {p:.0f} ({f / p:.2f}x){kept} |"
            f, p = r[f"{mode} step peak MiB"]
            line += (f" {f:.0f} / {p:.0f} ({f / p:.2f}x) | {r[f'{mode} step ratio']:.3f}x"
                     f" ({r[f'{mode} step ms'][1]:.0f} ms plain) | {r[f'{mode} eval ratio']:.3f}x |")
        if default_malloc:
            line += f" {r['default malloc step ratio']:.3f}x ({r['default malloc step ms'][1]:.0f} ms plain) |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--peak-worker"]:
        return _peak_worker(*argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--compile", action="store_true", help="also torch.compile both models (minutes per model)")
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds per measurement")
    parser.add_argument("--write", action="store_true", help=f"write the table into {RESULTS}")
    add_allocator_arguments(parser)
    args = parser.parse_args(argv)
    start_under_allocator(args)
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        rows.append(measure(name, args.compile, args.repeat))
        print(f"{name}: done", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows))
        return
    default_malloc = args.allocator == "both"
    if default_malloc:  # the eager rows again, in a child process under glibc's defaults
        for row, other in zip(rows, under_default_allocator("bench.models", ["--models", *args.models,
                                                                             "--repeat", args.repeat])):
            row["default malloc step ratio"], row["default malloc step ms"] = other["eager step ratio"], \
                other["eager step ms"]
    modes = ["eager"] + (["compiled"] if args.compile else [])
    command = "python -m bench.models " + " ".join(a for a in argv if a != "--write")
    text = (f"## fuse on torchvision's models and SegNet{', compiled' if args.compile else ''} (CPU kernels at"
            f" {cpu_level().upper()})\n\n`{command.strip()}` on {machine_description()}, "
            f"torch {torch.__version__}. Allocator: {malloc.describe()} (set by the script; what `segnet` uses)"
            + ("; the last column in a child process under glibc's defaults" if default_malloc else "")
            + ".\n\n" + table(rows, modes, default_malloc))
    left = [f"- {r['model']}: {line}" for r in rows for line in r["left"]]
    if left:
        text += "\n\nLeft unfused (fuse's report):\n" + "\n".join(left)
    print(text)
    if args.write:
        replace_section(RESULTS, f"models{'-compiled' if args.compile else ''}-cpu-{cpu_level()}", text)
        print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
