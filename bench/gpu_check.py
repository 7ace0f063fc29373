"""The one command for the day a GPU is lent: ``make gpu-check`` (``python -m bench.gpu_check``).

On a machine with a CUDA GPU and torch already installed (no network: nothing is installed,
torch is never replaced), in the source tree:

1. build   segnet_ext in place for this GPU only (TORCH_CUDA_ARCH_LIST = its compute capability);
2. tests   the op tests on the GPU against the CPU ops (the tests' "cuda" cases);
3. sanitizer  every CUDA op, both layouts, float32 and bfloat16, under compute-sanitizer's
           memcheck and racecheck (``python -m bench.gpu_check --ops-once`` is the driver);
4. bandwidth  each memory-bound op against a device-to-device copy of the bytes it must move,
           on SegNet's feature-map shapes (target: at least 85% of the copy's speed);
5. conv    conv-BN-ReLU in eval (segnet_ext, as chosen per shape: segnet_ext.kernel_choices(),
           and its tensor-core kernel forced) against the eager Sequential (cuDNN) and cuDNN's
           convolution alone, on SegNet's 3x3 layers;
6. segnet  SegNet-Basic's training step and inference, fused against plain, with peak memory;

then writes bench/RESULTS-gpu.md. Meant to finish in under 8 minutes on an H200.

``--dry`` (the default where no GPU is present) runs steps 4 to 6 on the CPU at tiny sizes
and skips 1 to 3, writing to runs/gpu-check-dry.md: proof that the script works before the
day it is needed. CI runs it (tests/test_bench.py).
"""
import argparse
import os
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "RESULTS-gpu.md")
DRY_RESULTS = os.path.join(ROOT, "runs", "gpu-check-dry.md")
OP_TESTS = ["tests/test_pool.py", "tests/test_pool_torch_conventions.py", "tests/test_conv_bn_relu.py",
            "tests/test_recompute.py"]
# SegNet's feature maps at 360x480 (channels, height, width), stage by stage
SEGNET_MAPS = [(64, 360, 480), (128, 180, 240), (256, 90, 120), (512, 45, 60), (512, 23, 30)]
# SegNet's 3x3 convolutions: (in, out, height, width)
SEGNET_CONVS = [(64, 64, 360, 480), (64, 128, 180, 240), (128, 128, 180, 240), (128, 256, 90, 120),
                (256, 256, 90, 120), (256, 512, 45, 60), (512, 512, 45, 60), (512, 512, 23, 30)]
DRY_MAPS = [(8, 12, 16), (16, 7, 9)]
DRY_CONVS = [(8, 8, 12, 16), (8, 16, 7, 9)]
BANDWIDTH_TARGET = 0.85


def run_step(title, command, timeout, env=None):
    """Runs a subprocess step; returns a report line."""
    start = time.perf_counter()
    print(f"[gpu-check] {title}: {' '.join(command)}", flush=True)
    try:
        done = subprocess.run(command, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=timeout,
                              capture_output=True, text=True)
        status = "passed" if done.returncode == 0 else f"FAILED (exit {done.returncode})"
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
    except subprocess.TimeoutExpired:
        status, tail = f"FAILED (over {timeout} s)", []
    seconds = time.perf_counter() - start
    print(f"[gpu-check] {title}: {status} in {seconds:.0f} s", flush=True)
    if not status.startswith("passed"):
        print("\n".join(tail), flush=True)
    return f"| {title} | {status} | {seconds:.0f} s | `{' '.join(command)}` |"


# ---- timing ----------------------------------------------------------------------------------

def device_ms(fn, device, runs=20):
    """Milliseconds per call of fn: CUDA events around `runs` calls after a warm-up (wall
    clock on the CPU)."""
    fn()
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(runs):
            fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / runs
    begin = time.perf_counter()
    for _ in range(runs):
        fn()
    return (time.perf_counter() - begin) * 1e3 / runs


def paired_ms(fns, device, rounds=5, runs=20):
    """Median ms per call of each fn, timed in alternating rounds."""
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, t in zip(fns, times):
            t.append(device_ms(fn, device, runs))
    return [sorted(t)[len(t) // 2] for t in times]


@contextmanager
def conv_policy(policy):
    """$SEGNET_EXT_CONV set to `policy` (csrc/common/kernel_choice.h) for the block."""
    before = os.environ.get("SEGNET_EXT_CONV")
    os.environ["SEGNET_EXT_CONV"] = policy
    try:
        yield
    finally:
        os.environ.pop("SEGNET_EXT_CONV")
        if before is not None:
            os.environ["SEGNET_EXT_CONV"] = before


# ---- 3: every op once (the sanitizer's driver) -------------------------------------------------

def ops_once(device):
    """Every segnet_ext op and its backward once, on small odd shapes, both layouts,
    float32 and bfloat16."""
    from segnet_ext import fused

    ops = torch.ops.segnet_ext

    for dtype in (torch.float32, torch.bfloat16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            # 24 channels: whole 16-byte vectors, so that our convolution takes the channels_last case
            x = torch.randn(2, 24, 13, 11, device=device, dtype=dtype).contiguous(memory_format=fmt)
            for ceil_mode in (False, True):
                values, packed = ops.max_pool2x2(x, ceil_mode)
                y = ops.max_unpool2x2(values, packed, list(x.shape[2:]))
                ops.max_unpool2x2_backward(y, packed, list(values.shape[2:]))
            gamma, beta = torch.rand(24, device=device) + 0.5, torch.randn(24, device=device)
            y, scale, shift, mean, _, invstd, count = fused.bn_relu_forward(x, gamma, beta, 1e-5, True)
            fused.bn_relu_backward(torch.randn_like(x), x, scale, shift, mean, invstd, count, True)
            ops.scale_shift_relu(x, scale, shift, True, torch.randn_like(x))
            w = torch.randn(7, 24, 3, 3, device=device, dtype=dtype)
            for policy in ("vendor", "segnet"):  # both convolutions, whatever the timing would choose
                with conv_policy(policy):
                    ops.conv2d_scale_shift_relu(x, w, scale[:7].contiguous(), shift[:7].contiguous(), [1, 1],
                                                [1, 1], [1, 1], 1, True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print("every op ran")


# ---- 4: memory-bound ops against a copy of their bytes ------------------------------------------

def bandwidth_rows(device, maps, batch):
    from segnet_ext import fused

    ops = torch.ops.segnet_ext

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            for C, H, W in maps:
                x = torch.randn(batch, C, H, W, device=device, dtype=dtype).contiguous(memory_format=fmt)
                values, packed = ops.max_pool2x2(x)
                full, quarter, idx = x.numel() * x.element_size(), values.numel() * values.element_size(), packed.numel()
                scale, shift, mean = (torch.randn(C, device=device) for _ in range(3))
                k = [torch.randn(C, device=device) for _ in range(3)]
                dy = torch.randn_like(x)
                cases = {
                    "max_pool2x2": (lambda: ops.max_pool2x2(x), full + quarter + idx),
                    "max_unpool2x2": (lambda: ops.max_unpool2x2(values, packed, [H, W]), quarter + idx + full),
                    "max_unpool2x2_backward": (lambda: ops.max_unpool2x2_backward(dy, packed, list(values.shape[2:])),
                                               full + idx + quarter),
                    "scale_shift_relu": (lambda: ops.scale_shift_relu(x, scale, shift, True), 2 * full),
                    "bn_stats": (lambda: ops.bn_stats(x), full),
                    "bn_relu_backward_reduce": (lambda: ops.bn_relu_backward_reduce(dy, x, scale, shift, mean, True),
                                                2 * full),
                    "bn_relu_backward_apply": (lambda: ops.bn_relu_backward_apply(dy, x, scale, shift, mean, *k, True),
                                               3 * full),
                }
                for name, (fn, nbytes) in cases.items():
                    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
                    dst = torch.empty_like(src)
                    op_ms, copy_ms = paired_ms([fn, lambda: dst.copy_(src)], device)
                    rows.append(dict(op=name, dtype=str(dtype).replace("torch.", ""),
                                     layout="channels_last" if fmt == torch.channels_last else "NCHW",
                                     shape=f"{batch}x{C}x{H}x{W}", mb=nbytes / 1e6, op_ms=op_ms,
                                     gbs=nbytes / op_ms / 1e6, of_copy=copy_ms / op_ms))
    return rows


# ---- 5: conv-BN-ReLU in eval against cuDNN ------------------------------------------------------

def conv_rows(device, convs, batch):
    import segnet_ext

    rows = []
    for dtype, fmt in ((torch.bfloat16, torch.channels_last), (torch.float32, torch.contiguous_format)):
        for cin, cout, H, W in convs:
            plain = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
            with torch.no_grad():
                plain[1].running_mean.uniform_(-0.5, 0.5)
                plain[1].running_var.uniform_(0.5, 2)
            fused = segnet_ext.fuse(plain, inplace=False)
            plain, fused = (m.to(device, dtype).to(memory_format=fmt).eval() for m in (plain, fused))
            x = torch.randn(batch, cin, H, W, device=device, dtype=dtype).contiguous(memory_format=fmt)
            with torch.no_grad():
                ours_ms, cudnn_ms, conv_ms = paired_ms([lambda: fused(x), lambda: plain(x), lambda: plain[0](x)],
                                                       device, runs=5)
                err = (fused(x).float() - plain(x).float()).abs().max().item()
                with conv_policy("segnet"):  # our tensor-core kernel forced, where it takes the shape
                    [kernel_ms] = paired_ms([lambda: fused(x)], device, runs=5)
            rows.append(dict(layer=f"{cin}->{cout} {H}x{W}", dtype=str(dtype).replace("torch.", ""),
                             layout="channels_last" if fmt == torch.channels_last else "NCHW",
                             ours_ms=ours_ms, cudnn_ms=cudnn_ms, ratio=ours_ms / cudnn_ms, max_err=err,
                             kernel_ms=kernel_ms, of_conv=conv_ms / kernel_ms))
    return rows, segnet_ext.kernel_choices()


# ---- 6: SegNet, fused against plain -------------------------------------------------------------

def segnet_rows(device, size, batch):
    import torch.nn.functional as F

    from segnet.model import build_model

    rows = []
    x = torch.randn(batch, 3, *size, device=device)
    target = torch.randint(0, 11, (batch, *size), device=device)
    for amp in ("none", "bf16"):
        def precision():
            return torch.autocast(device.type, dtype=torch.bfloat16) if amp == "bf16" else nullcontext()

        result = {}
        for backend in ("segnet_ext", "torch"):
            torch.manual_seed(0)
            model = build_model("segnet_basic", backend=backend).to(device)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

            def step():
                opt.zero_grad(set_to_none=True)
                with precision():
                    loss = F.cross_entropy(model(x), target)
                loss.backward()
                opt.step()

            def infer():
                with torch.no_grad(), precision():
                    model(x)

            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            step()
            peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
            model.train()
            train_ms = device_ms(step, device, runs=5)
            model.eval()
            infer_ms = device_ms(infer, device, runs=5)
            result[backend] = (train_ms, infer_ms, peak)
        (ot, oi, op), (tt, ti, tp) = result["segnet_ext"], result["torch"]
        rows.append(dict(amp=amp, step_ratio=ot / tt, infer_ratio=oi / ti, step_ms=(ot, tt), infer_ms=(oi, ti),
                         peak_mb=(op, tp)))
    return rows


# ---- the report ---------------------------------------------------------------------------------

def report(device, steps, bandwidth, convs, choices, segnet, command, size, batch):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run: tiny sizes)"
    lines = [f"# GPU check: {name}", "",
             f"`{command}` on {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, CUDA {torch.version.cuda}.",
             ""]
    if steps:
        lines += ["## Build, tests, sanitizer", "", "| step | result | time | command |", "|---|---|---:|---|",
                  *steps, ""]
    below = [r for r in bandwidth if r["of_copy"] < BANDWIDTH_TARGET]
    lines += ["## Memory-bound ops against a device-to-device copy of the same bytes", "",
              f"Target: at least {BANDWIDTH_TARGET:.0%} of the copy's speed; {len(below)} of {len(bandwidth)} "
              "cases below it.", "",
              "| op | dtype | layout | shape | MB moved | ms | GB/s | of copy |", "|---|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['op']} | {r['dtype']} | {r['layout']} | {r['shape']} | {r['mb']:.3g} | {r['op_ms']:.3f} | "
              f"{r['gbs']:.0f} | {r['of_copy']:.0%} |" for r in bandwidth]
    lines += ["", f"## Conv-BN-ReLU in eval against the eager Sequential (cuDNN), batch {batch}", "",
              "segnet_ext as chosen per shape, and its tensor-core kernel forced (SEGNET_EXT_CONV=segnet; "
              "cuDNN where the kernel does not take the shape: NCHW, or float without TF32); its speed "
              "against cuDNN's convolution alone (target for bf16 channels_last, 64 to 256 channels: "
              ">= 0.8x) and against the eager Sequential (target: faster).", "",
              "| layer | dtype | layout | segnet_ext ms | eager ms | ratio | max abs diff | kernel forced ms | "
              "cuDNN conv / kernel | eager / kernel |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['layer']} | {r['dtype']} | {r['layout']} | {r['ours_ms']:.3f} | {r['cudnn_ms']:.3f} | "
              f"{r['ratio']:.2f}x | {r['max_err']:.2g} | {r['kernel_ms']:.3f} | {r['of_conv']:.2f}x | "
              f"{r['cudnn_ms'] / r['kernel_ms']:.2f}x |" for r in convs]
    lines += ["", "The per-shape choices (`segnet_ext.kernel_choices()`):", "", "```", *choices, "```", "",
              f"## SegNet-Basic at {size[0]}x{size[1]}, batch {batch}: fused against plain", "",
              "| precision | step ratio | step ms (fused, plain) | inference ratio | inference ms | peak MiB |",
              "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['amp']} | {r['step_ratio']:.2f}x | {r['step_ms'][0]:.1f}, {r['step_ms'][1]:.1f} | "
              f"{r['infer_ratio']:.2f}x | {r['infer_ms'][0]:.1f}, {r['infer_ms'][1]:.1f} | "
              f"{r['peak_mb'][0]:.0f}, {r['peak_mb'][1]:.0f} |" for r in segnet]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="run on the CPU at tiny sizes (the default without a GPU)")
    parser.add_argument("--ops-once", action="store_true", help="run every op once on the GPU and exit "
                                                                "(the sanitizer's driver)")
    parser.add_argument("--skip-build", action="store_true", help="use the segnet_ext already built")
    parser.add_argument("--output", help=f"the report (default: {RESULTS}; dry: {DRY_RESULTS})")
    args = parser.parse_args(argv)
    dry = args.dry or not torch.cuda.is_available()
    device = torch.device("cpu" if dry else "cuda")
    if args.ops_once:
        ops_once(device)
        return
    steps = []
    if not dry:
        major, minor = torch.cuda.get_device_capability()
        if not args.skip_build:
            steps.append(run_step("build", [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], 420,
                                  env={"TORCH_CUDA_ARCH_LIST": f"{major}.{minor}", "MAX_JOBS": str(os.cpu_count())}))
        steps.append(run_step("op tests on the GPU", [sys.executable, "-m", "pytest", "-q", "-x", "-k", "cuda",
                                                      "-p", "no:cacheprovider", *OP_TESTS], 240))
        sanitizer = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "compute-sanitizer")
        for tool in ("memcheck", "racecheck"):
            if os.path.exists(sanitizer):
                steps.append(run_step(f"compute-sanitizer {tool}",
                                      [sanitizer, "--tool", tool, "--error-exitcode", "1", sys.executable, "-m",
                                       "bench.gpu_check", "--ops-once"], 180))
            else:
                steps.append(f"| compute-sanitizer {tool} | skipped: {sanitizer} not found | | |")
    print(f"[gpu-check] measuring on {device}", flush=True)
    batch, size = (1, (24, 32)) if dry else (4, (360, 480))
    bandwidth = bandwidth_rows(device, DRY_MAPS if dry else SEGNET_MAPS, 1 if dry else 2)
    convs, choices = conv_rows(device, DRY_CONVS if dry else SEGNET_CONVS, batch)
    segnet = segnet_rows(device, size, batch)
    command = "python -m bench.gpu_check" + (" --dry" if dry else "")
    text = report(device, steps, bandwidth, convs, choices, segnet, command, size, batch)
    output = args.output or (DRY_RESULTS if dry else RESULTS)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        f.write(text)
    print(text)
    print(f"[gpu-check] written to {output}")
    if any("FAILED" in s for s in steps):
        sys.exit(1)


if __name__ == "__main__":
    main()
