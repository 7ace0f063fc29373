"""SegNet end to end: memory and speed of segnet_ext against what users would run instead.

    python -m bench.report            # SegNet, 360x480, batch 1 and 4, plus scaling; prints the tables
    python -m bench.report --write    # ... and writes bench/RESULTS.md, bench/results/report.json and the PNGs

Variants, same weights and inputs, timed in alternation in one process:
  ours         SegNet(backend="segnet_ext"): fused conv-BN-ReLU blocks, 2-bit pooling indices
  torch        SegNet(backend="torch"): Conv2d/BatchNorm2d/ReLU, MaxPool2d(return_indices)/MaxUnpool2d (a)
  torch+sac    (a) with selective activation checkpointing, one region per SegNet stage, its
               policy saving convolution outputs and recomputing everything else (b)
  torch+compile (a) under torch.compile (c), where it works on this machine
  ours+compile ours under torch.compile

Training: saved-for-backward bytes (exact: distinct storages autograd saves, seen by
saved_tensors_hooks; for torch+sac, whose regions those hooks cannot see into, the region
inputs plus the convolution outputs its policy keeps), step time (forward, backward, SGD
step), and peak process memory (ru_maxrss of a fresh process running the step).
Inference: latency per image (eval mode, no_grad) and peak process memory.
"""
import argparse
import functools
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from bench.common import interleaved_ms, machine_description, median_ratio, replace_section, saved_storages
from segnet import malloc
from segnet_ext.aten_conv import extent

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
OUT = HERE / "results"
VARIANTS = ("ours", "torch", "torch+sac", "torch+compile", "ours+compile")
TARGETS = {"saved_vs_torch": 0.5, "saved_vs_sac": 1.02, "step_vs_torch": 1.0, "step_vs_sac": 0.9,
           "inference_vs_torch": 0.85}


# ---- the variants ---------------------------------------------------------------------------

def _sac_policy(counter, ctx, op, *args, **kwargs):
    if op == torch.ops.aten.convolution.default:
        if not ctx.is_recompute and counter is not None:
            counter.conv_output(*args)
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


class _SacCounter:
    """Bytes a selective-checkpoint forward keeps: region inputs and saved conv outputs."""

    def __init__(self):
        self.storages = {}

    def region_input(self, x):
        self.storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()

    def conv_output(self, x, weight, bias, stride, padding, dilation, *rest):
        H, W = (extent(*g) for g in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation))
        self.storages[("conv", len(self.storages))] = x.shape[0] * weight.shape[0] * H * W * x.element_size()


# torch >= 2.14 asks whether a checkpoint applies the saved_tensors_hooks around it to what it
# saves (the counter above counts that instead); older releases do not, and take no such argument.
_IGNORE_OUTER_HOOKS = ({"respect_saved_tensors_hooks": False}
                       if "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters else {})


def sac_forward(model, x, counter=None):
    """SegNet's forward with each stage's conv-BN-ReLU blocks as one checkpointed region."""
    context = functools.partial(create_selective_checkpoint_contexts, functools.partial(_sac_policy, counter))

    def region(stage, h):
        if counter is not None:
            counter.region_input(h)
        return checkpoint(stage, h, use_reentrant=False, context_fn=context, **_IGNORE_OUTER_HOOKS)

    skips = []
    for stage, pool in zip(model.encoder, model.pools):
        x = region(stage, x)
        size = x.shape
        x, indices = pool(x)
        skips.append((indices, size))
    for stage, unpool in zip(model.decoder, model.unpools):
        indices, size = skips.pop()
        x = region(stage, unpool(x, indices, size))
    return model.classifier(x)


def build(variant, model_name, seed=0):
    from segnet.model import build_model

    torch.manual_seed(seed)
    model = build_model(model_name, backend="segnet_ext" if variant.startswith("ours") else "torch")
    forward = model
    if variant == "torch+sac":
        forward = functools.partial(sac_forward, model)
    elif variant.endswith("+compile"):
        forward = torch.compile(model)
    return model, forward


def training_step(model, forward, optimizer, x, target):
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(forward(x), target, ignore_index=11)
    loss.backward()
    optimizer.step()
    return loss


def activation_bytes(variant, model, forward, x):
    counter = _SacCounter() if variant == "torch+sac" else None
    storages, _ = saved_storages(lambda: sac_forward(model, x, counter) if counter is not None else forward(x))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    activations = sum(n for ptr, n in storages.items() if ptr not in params)
    if counter is not None:
        activations += sum(n for key, n in counter.storages.items() if key not in storages and key not in params)
    return activations


def index_bytes(model_name, size, batch):
    """Pooling-index bytes of one forward: packed 2-bit vs int64."""
    from segnet.model import build_model

    model = build_model(model_name, backend="segnet_ext").eval()
    windows = []
    x = torch.zeros(batch, 3, *size)
    with torch.no_grad():
        for stage, pool in zip(model.encoder, model.pools):
            x, packed = pool(stage(x))
            windows.append((x.numel(), packed.numel()))
    return sum(p for _, p in windows), sum(w for w, _ in windows) * 8


# ---- measurements -------------------------------------------------------------------------

def measure_training(model_name, size, batch, repeat, variants):
    torch.manual_seed(1)
    x = torch.randn(batch, 3, *size)
    target = torch.randint(0, 12, (batch, *size))
    built, rows = {}, {}
    for v in variants:
        model, forward = build(v, model_name)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        try:
            start = time.perf_counter()
            training_step(model, forward, opt, x, target)  # warm-up (and compilation)
            warmup_s = time.perf_counter() - start
        except Exception as e:  # torch.compile may not work on every machine
            rows[v] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            continue
        built[v] = (model, forward, opt)
        rows[v] = {"saved_bytes": activation_bytes(v, model, forward, x), "warmup_s": warmup_s}
    names = list(built)
    times = interleaved_ms([functools.partial(training_step, *built[v][:2], built[v][2], x, target) for v in names],
                           repeat=repeat, warmup=0)
    for v, t in zip(names, times):
        rows[v].update(step_ms=statistics.median(t), rounds=dict(step_ms=t))
    return rows


def measure_inference(model_name, size, batch, repeat, variants):
    torch.manual_seed(1)
    x = torch.randn(batch, 3, *size)
    fns, rows = {}, {}
    for v in variants:
        if v == "torch+sac":
            continue  # checkpointing only matters for training
        model, forward = build(v, model_name)
        model.eval()
        try:
            with torch.no_grad():
                forward(x)
        except Exception as e:
            rows[v] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            continue
        fns[v] = functools.partial(_infer, forward, x)
    names = list(fns)
    times = interleaved_ms([fns[v] for v in names], repeat=repeat, warmup=1)
    for v, t in zip(names, times):
        per_image = [ms / batch for ms in t]
        rows[v] = {"ms_per_image": statistics.median(per_image), "rounds": {"ms_per_image": per_image}}
    return rows


@torch.no_grad()
def _infer(forward, x):
    return forward(x)


def peak_memory(kind, variant, model_name, size, batch):
    """Peak resident memory (MB) of a fresh process running one training step (after a
    warm-up step) or two inferences."""
    cmd = [sys.executable, "-m", "bench.report", "--peak-worker", kind, variant, model_name,
           str(size[0]), str(size[1]), str(batch)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **malloc.THRESHOLDS))
    if done.returncode != 0:
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]


def _peak_worker(kind, variant, model_name, H, W, batch):
    x = torch.randn(batch, 3, H, W)
    model, forward = build(variant, model_name)
    if kind == "train":
        target = torch.randint(0, 12, (batch, H, W))
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        for _ in range(2):
            training_step(model, forward, opt, x, target)
    else:
        model.eval()
        for _ in range(2):
            _infer(forward, x)
    print(json.dumps({"peak_mb": _peak_rss_mb()}))


def _peak_rss_mb() -> float:
    # VmHWM: this process's own high-water mark (ru_maxrss would include the parent's
    # resident set at fork, which Linux carries across exec)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- the report ---------------------------------------------------------------------------

def run(model_name, size, batches, scaling_sizes, repeat, variants, peak=True):
    result = {"model": model_name, "size": list(size), "variants": list(variants), "repeat": repeat,
              "machine": machine_description("cpu"), "torch": torch.__version__, "training": {}, "inference": {},
              "scaling": {}, "index_bytes": {}}
    for batch in batches:
        key = f"batch {batch}"
        result["training"][key] = measure_training(model_name, size, batch, repeat, variants)
        result["inference"][key] = measure_inference(model_name, size, batch, repeat, variants)
        packed, int64 = index_bytes(model_name, size, batch)
        result["index_bytes"][key] = {"packed": packed, "int64": int64}
        if peak:
            for v in variants:
                if "error" not in result["training"][key].get(v, {}):
                    result["training"][key][v]["peak_mb"] = peak_memory("train", v, model_name, size, batch)
                if v in result["inference"][key] and "error" not in result["inference"][key][v]:
                    result["inference"][key][v]["peak_mb"] = peak_memory("infer", v, model_name, size, batch)
    scaling_variants = [v for v in variants if not v.endswith("+compile")]
    for s in scaling_sizes:
        result["scaling"][f"{s[0]}x{s[1]}"] = measure_training(model_name, s, 1, max(2, repeat // 2), scaling_variants)
    return result


def ratios(rows):
    """ours / each variant; times as the median of per-round ratios (bench.common.median_ratio)."""
    ours = rows.get("ours", {})
    out = {}
    for v, r in rows.items():
        if v == "ours" or "error" in r or "error" in ours:
            continue
        out[v] = {k: ours[k] / r[k] for k in ("saved_bytes", "step_ms", "peak_mb", "ms_per_image")
                  if r.get(k) and ours.get(k)}
        for k, t in r.get("rounds", {}).items():
            if k in ours.get("rounds", {}):
                out[v][k] = median_ratio(ours["rounds"][k], t)
    return out


def _ratio(q, key, target=None, mark=None):
    if key not in q:
        return ""
    text = f"{q[key]:.2f}"
    return text + (f" (<= {target}){mark(q[key] <= target)}" if target is not None else "")


def report(result, command):
    mark = lambda ok: "" if ok else " **missed**"  # noqa: E731
    mb = lambda b: f"{b / 1e6:,.0f}"  # noqa: E731
    lines = [
        "## SegNet end to end",
        "",
        f"`{command}` on {result['machine']}, torch {result['torch']}, {result['model']} at "
        f"{result['size'][0]}x{result['size'][1]}, float32, random weights and inputs (the same for every variant), "
        f"{result['repeat']} steps of each timed in alternation in one process: medians of the times, and of "
        f"the ratios within each round. Allocator: {malloc.describe()}. Variants: **ours** = `backend=\"segnet_ext\"`; "
        "**torch** (a) = `backend=\"torch\"`; **torch+sac** (b) = (a) with selective activation checkpointing, one "
        "region per stage, saving convolution outputs and recomputing BN/ReLU; **torch+compile** (c) = (a) under "
        "`torch.compile` (default inductor); **ours+compile** = ours under `torch.compile`. Saved bytes are exact (distinct storages autograd saves; for (b) the "
        "region inputs plus the convolution outputs its policy keeps, since hooks cannot see inside its regions). "
        "Peak memory is the resident-set peak of a fresh process running two steps (model, optimiser and "
        "libraries included).",
        "",
        "### Training (forward, backward, SGD step)",
        "",
        "| batch | variant | saved MB | step ms | peak MB | ours / it: saved | ours / it: step | ours / it: peak |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, rows in result["training"].items():
        rel = ratios(rows)
        for v in result["variants"]:
            r = rows.get(v, {})
            if "error" in r:
                lines.append(f"| {key} | {v} | - | - | - | not available here: {r['error']} | | |")
                continue
            q = rel.get(v, {})
            target_saved = {"torch": TARGETS["saved_vs_torch"], "torch+sac": TARGETS["saved_vs_sac"]}.get(v)
            target_step = {"torch": TARGETS["step_vs_torch"], "torch+sac": TARGETS["step_vs_sac"]}.get(v)
            saved = _ratio(q, "saved_bytes", target_saved, mark)
            step = _ratio(q, "step_ms", target_step, mark)
            peak = f"{q['peak_mb']:.2f}" if "peak_mb" in q else ""
            peak_abs = f"{r['peak_mb']:,.0f}" if r.get("peak_mb") else "-"
            lines.append(f"| {key} | {v} | {mb(r['saved_bytes'])} | {r['step_ms']:,.0f} | {peak_abs} | {saved} | {step} | {peak} |")
    lines += ["", "### Inference (eval mode, no_grad)", "",
              "| batch | variant | ms per image | peak MB | ours / it: time (target <= 0.85 vs torch) | ours / it: peak |",
              "|---|---|---:|---:|---:|---:|"]
    for key, rows in result["inference"].items():
        rel = ratios(rows)
        for v, r in rows.items():
            if "error" in r:
                lines.append(f"| {key} | {v} | - | - | not available here: {r['error']} | |")
                continue
            q = rel.get(v, {})
            t = _ratio(q, "ms_per_image", TARGETS["inference_vs_torch"] if v == "torch" else None, mark)
            peak_abs = f"{r['peak_mb']:,.0f}" if r.get("peak_mb") else "-"
            lines.append(f"| {key} | {v} | {r['ms_per_image']:,.0f} | {peak_abs} | {t} | {_ratio(q, 'peak_mb')} |")
    lines += ["", "### Pooling indices", "", "| batch | packed (ours) | int64 (torch) | ratio |", "|---|---:|---:|---:|"]
    for key, r in result["index_bytes"].items():
        lines.append(f"| {key} | {r['packed']:,} B | {r['int64']:,} B | 1/{r['int64'] / r['packed']:.1f} |")
    lines += ["", "### Scaling with image size (batch 1, training step)", "",
              "| size | variant | saved MB | step ms | ours / it: saved | ours / it: step |", "|---|---|---:|---:|---:|---:|"]
    for key, rows in result["scaling"].items():
        rel = ratios(rows)
        for v, r in rows.items():
            q = rel.get(v, {})
            lines.append(f"| {key} | {v} | {mb(r['saved_bytes'])} | {r['step_ms']:,.0f} | "
                         f"{q.get('saved_bytes', 0):.2f} | {q.get('step_ms', 0):.2f} |" if v != "ours" else
                         f"| {key} | {v} | {mb(r['saved_bytes'])} | {r['step_ms']:,.0f} | | |")
    lines += ["", "Charts: [memory](results/memory.png), [time](results/time.png), [scaling](results/scaling.png); "
              "every number: [results/report.json](results/report.json). Op-level rows: the pooling and "
              "conv-BN-ReLU sections above."]
    return "\n".join(lines)


def plot(result, folder):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for metric, label, name in (("saved_bytes", "saved for backward (MB)", "memory"), ("step_ms", "training step (s)", "time")):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        keys = list(result["training"])
        width = 0.8 / len(result["variants"])
        for i, v in enumerate(result["variants"]):
            values = [result["training"][k].get(v, {}).get(metric) for k in keys]
            values = [0 if x is None else (x / 1e6 if metric == "saved_bytes" else x / 1e3) for x in values]
            ax.bar([j + i * width for j in range(len(keys))], values, width, label=v)
        ax.set_xticks([j + width * (len(result["variants"]) - 1) / 2 for j in range(len(keys))], keys)
        ax.set(ylabel=label, title=f"SegNet {result['size'][0]}x{result['size'][1]}: {label}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / f"{name}.png", dpi=100)
        plt.close(fig)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    sizes = list(result["scaling"])
    pixels = [int(s.split("x")[0]) * int(s.split("x")[1]) / 1e6 for s in sizes]
    for v in result["scaling"][sizes[0]]:
        a1.plot(pixels, [result["scaling"][s][v]["saved_bytes"] / 1e6 for s in sizes], marker="o", label=v)
        a2.plot(pixels, [result["scaling"][s][v]["step_ms"] / 1e3 for s in sizes], marker="o", label=v)
    a1.set(xlabel="megapixels", ylabel="saved for backward (MB)", title="memory, batch 1")
    a2.set(xlabel="megapixels", ylabel="training step (s)", title="time, batch 1")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(folder / "scaling.png", dpi=100)
    plt.close(fig)


def profile(model_name, size, batch, variants=("ours", "torch")):
    """Where a training step's time goes: torch.profiler's table per variant, and the share
    of the convolutions (forward and backward)."""
    torch.manual_seed(1)
    x, target = torch.randn(batch, 3, *size), torch.randint(0, 12, (batch, *size))
    shares = {}
    for v in variants:
        model, forward = build(v, model_name)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        training_step(model, forward, opt, x, target)
        with torch.profiler.profile() as prof:
            training_step(model, forward, opt, x, target)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        conv = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mkldnn_convolution", "aten::convolution_backward"))
        shares[v] = conv / total
        print(f"{v}: convolutions (forward + backward) take {100 * conv / total:.1f}% of the step's CPU time")
        print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=44))
    return shares


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--peak-worker"]:
        kind, variant, model_name, H, W, batch = argv[1:7]
        return _peak_worker(kind, variant, model_name, int(H), int(W), int(batch))
    malloc.use_allocator(tuned=True)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="segnet", choices=["segnet", "segnet_basic"])
    parser.add_argument("--size", type=int, nargs=2, default=[360, 480], metavar=("H", "W"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--scaling", default="180x240,360x480,720x960", help="sizes for the scaling rows ('' for none)")
    parser.add_argument("--repeat", type=int, default=3, help="timed steps per variant (median)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--no-peak", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--write", action="store_true", help="write RESULTS.md, results/report.json and the charts")
    parser.add_argument("--profile", action="store_true", help="only profile one training step of ours and torch's (batch 1)")
    args = parser.parse_args(argv)
    if args.profile:
        return profile(args.model, tuple(args.size), 1)
    scaling = [tuple(int(v) for v in s.split("x")) for s in args.scaling.split(",") if s]
    command = "python -m bench.report " + " ".join(a for a in argv if a != "--write")
    result = run(args.model, tuple(args.size), args.batches, scaling, args.repeat, args.variants.split(","),
                 peak=not args.no_peak)
    result["ratios"] = {section: {key: ratios(rows) for key, rows in result[section].items()}
                        for section in ("training", "inference", "scaling")}
    text = report(result, command.strip())
    print(text)
    if args.write:
        OUT.mkdir(exist_ok=True)
        (OUT / "report.json").write_text(json.dumps(result, indent=2))
        plot(result, OUT)
        replace_section(RESULTS, "segnet-report-cpu", text)
        print(f"\nwritten to {RESULTS}, {OUT}/report.json and {OUT}/*.png")
    return result


if __name__ == "__main__":
    main()
