"""Fused conv-BN-ReLU against the unfused PyTorch layers, side by side in one process.

    python -m bench.conv_bn_relu            # prints the tables
    python -m bench.conv_bn_relu --write    # ... and writes them into bench/RESULTS.md, in the
                                            # section of the ISA level segnet_ext's kernels ran at

1. BN+ReLU training forward + backward on [4, 64, 360, 480]: segnet_ext's four ops, as
   ConvBNReLU2d runs them (statistics, output; gradient sums, input gradient), against
   ``BatchNorm2d`` + ``ReLU(inplace=True)`` through autograd; with the bytes floor (the
   activation-sized tensors the fused ops must move: 8, at the copy bandwidth of this run);
   under segnet.malloc's thresholds, and again in a child process under glibc's defaults.
2. A stack of 4 ConvBNReLU2d (64 channels, 3x3) at 360x480, one training step (forward,
   backward): saved-for-backward bytes (exact: unique storages seen by
   ``saved_tensors_hooks``) and step time, against the unfused Sequential.
3. Inference, conv-BN-ReLU 64 -> 64 at 360x480, eval mode, both memory formats.
4. The CPU's Winograd F(2x2, 3x3) convolution against oneDNN's direct one (conv + bias +
   ReLU fused in both) on SegNet's 3x3 layer shapes: the measurements behind
   ``segnet_ext.fused.winograd_pays_off``.
"""
import argparse
import json
import os
import sys
from statistics import median

import torch
from torch import nn

import segnet_ext
from segnet_ext import fused
from bench.common import (add_allocator_arguments, bandwidth_gbs, cpu_level, interleaved_ms, machine_description,
                          median_ratio, replace_section, saved_bytes, start_under_allocator, under_default_allocator)
from segnet import malloc

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
TARGETS = {"bn_relu": 1.5, "over_floor": 1.5, "saved": 0.6, "step": 1.05, "inference": 1.1}


def unfused_block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def bn_relu_rows(shape, repeat, device):
    _, copy_bw = bandwidth_gbs(device=device, repeat=repeat)
    rows = []
    for channels_last in (False, True):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        z = torch.randn(shape, device=device).contiguous(memory_format=fmt)
        dy = torch.randn_like(z)
        gamma, beta = torch.rand(shape[1], device=device) + 0.5, torch.randn(shape[1], device=device)

        def ours():
            y, scale, shift, mean, _, invstd, count = fused.bn_relu_forward(z, gamma, beta, 1e-5, True)
            return fused.bn_relu_backward(dy, z, scale, shift, mean, invstd, count, True)

        bn = nn.BatchNorm2d(shape[1]).to(device)
        zg = z.detach().clone().requires_grad_()

        def theirs():
            y = torch.relu_(bn(zg))
            return torch.autograd.grad(y, [zg, bn.weight, bn.bias], dy)

        src, dst = z, torch.empty_like(z)
        ours_t, torch_t, copy_t = interleaved_ms([ours, theirs, lambda: dst.copy_(src)], repeat)
        floor_t = [8 / 2 * t for t in copy_t]  # 8 activation transfers; the copy is 2
        rows.append(dict(layout="channels_last" if channels_last else "NCHW", torch_ms=median(torch_t),
                         ours_ms=median(ours_t), speedup=median_ratio(torch_t, ours_t), floor_ms=median(floor_t),
                         over_floor=median_ratio(ours_t, floor_t)))
    return dict(copy_gbs=copy_bw, rows=rows)


def stack_rows(size, repeat, device):
    rows = []
    for channels_last in (False, True):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        torch.manual_seed(0)
        plain = nn.Sequential(*[unfused_block(64, 64) for _ in range(4)]).to(device).to(memory_format=fmt)
        ours = segnet_ext.fuse(nn.Sequential(*[unfused_block(64, 64) for _ in range(4)])).to(device).to(memory_format=fmt)
        ours.load_state_dict(plain.state_dict())
        x = torch.randn(1, 64, *size, device=device).contiguous(memory_format=fmt)
        bytes_plain, _ = saved_bytes(lambda: plain(x))
        bytes_ours, _ = saved_bytes(lambda: ours(x))

        def step(model):
            def run():
                model.zero_grad(set_to_none=True)
                model(x).sum().backward()
            return run

        ours_t, torch_t = interleaved_ms([step(ours), step(plain)], repeat)
        rows.append(dict(layout="channels_last" if channels_last else "NCHW", torch_mb=bytes_plain / 1e6,
                         ours_mb=bytes_ours / 1e6, saved_ratio=bytes_ours / bytes_plain, torch_ms=median(torch_t),
                         ours_ms=median(ours_t), time_ratio=median_ratio(ours_t, torch_t),
                         activation_mb=x.numel() * 4 / 1e6))
    return rows


def inference_rows(size, repeat, device):
    rows = []
    for channels_last in (False, True):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        plain = unfused_block(64, 64).to(device).to(memory_format=fmt)
        with torch.no_grad():
            plain[1].running_mean.uniform_(-1, 1)
            plain[1].running_var.uniform_(0.5, 2)
        plain.eval()
        ours = segnet_ext.fuse(unfused_block(64, 64)).to(device).to(memory_format=fmt)
        ours.load_state_dict(plain.state_dict())
        ours.eval()
        x = torch.randn(1, 64, *size, device=device).contiguous(memory_format=fmt)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), plain(x), rtol=1e-3, atol=1e-3)
            ours_t, torch_t = interleaved_ms([lambda: ours(x), lambda: plain(x)], repeat)
        rows.append(dict(layout="channels_last" if channels_last else "NCHW", torch_ms=median(torch_t),
                         ours_ms=median(ours_t), speedup=median_ratio(torch_t, ours_t)))
    return rows


# SegNet's 3x3 convolutions on a 360x480 image: (in channels, out channels, height, width)
SEGNET_LAYERS = [(64, 64, 360, 480), (128, 128, 180, 240), (256, 256, 90, 120), (512, 512, 45, 60),
                 (512, 512, 22, 30)]


def winograd_rows(repeat, layers=SEGNET_LAYERS):
    rows = []
    for cin, cout, h, w in layers:
        for channels_last in (False, True):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            x = torch.randn(1, cin, h, w).contiguous(memory_format=fmt)
            weight, bias = torch.randn(cout, cin, 3, 3) / (3 * cin ** 0.5), torch.randn(cout)
            ones = torch.ones(cout)
            args = ([1, 1], [1, 1], [1, 1], 1)

            def winograd():
                return torch.ops.segnet_ext.conv2d_scale_shift_relu(x, weight, ones, bias, *args, True)

            def onednn():
                return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, [1, 1], [1, 1], [1, 1], 1, "relu",
                                                               [None], "")
            torch.testing.assert_close(winograd(), onednn(), rtol=1e-4, atol=1e-4)
            wino_t, onednn_t = interleaved_ms([winograd, onednn], repeat)
            rows.append(dict(shape=f"{cin} -> {cout}, {h}x{w}", layout="channels_last" if channels_last else "NCHW",
                             onednn_ms=median(onednn_t), winograd_ms=median(wino_t),
                             speedup=median_ratio(onednn_t, wino_t),
                             chosen=fused.winograd_pays_off(x, weight, args)))
    return rows


def report(result, command, device):
    mark = lambda ok: "" if ok else " **missed**"  # noqa: E731
    shape, size = result["bn_shape"], result["size"]
    lines = [
        "## Fused conv-BN-ReLU" + (f" (CPU kernels at {cpu_level().upper()})" if device == "cpu" else ""),
        "",
        f"`{command}` on {machine_description(device)}, torch {torch.__version__}, float32, "
        f"{result['repeat']} rounds timed in alternation: medians of the times, and of the ratios within each "
        f"round. Allocator: {malloc.describe()} (set by the script; what `segnet` uses).",
        "",
        f"BN+ReLU training forward + backward on {shape} (ours: the four ops as ConvBNReLU2d runs them; torch: "
        f"`BatchNorm2d` + `ReLU(inplace=True)` through autograd). Floor: the 8 activation-sized transfers the fused "
        f"ops must make (statistics: read; output: read + write; gradient sums: read 2; input gradient: read 2 + "
        f"write) at the speed of a copy timed beside them ({result['bn']['copy_gbs']:.1f} GB/s at the start).",
    ]
    default = {r["layout"]: r for r in result["default"]["rows"]} if result.get("default") else {}
    if default:
        lines[-1] += (" Last columns: the same in a child process under glibc's defaults, where every new "
                      "output above 32 MB is page-faulted in, on both sides.")
    lines += ["", "| layout | torch ms | ours ms | speed-up (target 1.5x) | floor ms | ours / floor (target 1.5x) |"
              + (" default malloc: torch ms | ours ms | speed-up (target 1.0x) |" if default else ""),
              "|---|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if default else "")]
    for r in result["bn"]["rows"]:
        line = (f"| {r['layout']} | {r['torch_ms']:.1f} | {r['ours_ms']:.1f} | {r['speedup']:.2f}x"
                f"{mark(r['speedup'] >= TARGETS['bn_relu'])} | {r['floor_ms']:.1f} | {r['over_floor']:.2f}x"
                f"{mark(r['over_floor'] <= TARGETS['over_floor'])} |")
        if default:
            d = default[r["layout"]]
            line += f" {d['torch_ms']:.1f} | {d['ours_ms']:.1f} | {d['speedup']:.2f}x{mark(d['speedup'] >= 1.0)} |"
        lines.append(line)
    lines += [
        "",
        f"A stack of 4 conv-BN-ReLU blocks (64 channels, 3x3) on [1, 64, {size[0]}, {size[1]}], one training step "
        f"(forward + backward). Saved bytes are exact (distinct storages seen by `saved_tensors_hooks`); one "
        f"activation is {result['stack'][0]['activation_mb']:.1f} MB.",
        "",
        "| layout | unfused saved MB | ours saved MB | ratio (target <= 0.6) | unfused ms | ours ms | ratio (target <= 1.05) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["stack"]:
        lines.append(f"| {r['layout']} | {r['torch_mb']:.1f} | {r['ours_mb']:.1f} | {r['saved_ratio']:.2f}"
                     f"{mark(r['saved_ratio'] <= TARGETS['saved'])} | {r['torch_ms']:.0f} | {r['ours_ms']:.0f} | "
                     f"{r['time_ratio']:.2f}{mark(r['time_ratio'] <= TARGETS['step'])} |")
    lines += [
        "",
        f"Inference, conv-BN-ReLU 64 -> 64 on [1, 64, {size[0]}, {size[1]}], eval mode (ours: BN folded once, "
        "then on the CPU the Winograd F(2x2, 3x3) convolution with bias and ReLU fused into its output transform, "
        "on CUDA the implicit-GEMM kernel; torch: the eager Sequential, oneDNN's direct convolution then BN and "
        "ReLU).",
        "",
        "| layout | torch ms | ours ms | speed-up (target 1.1x) |",
        "|---|---:|---:|---:|",
    ]
    for r in result["inference"]:
        lines.append(f"| {r['layout']} | {r['torch_ms']:.1f} | {r['ours_ms']:.1f} | {r['speedup']:.2f}x"
                     f"{mark(r['speedup'] >= TARGETS['inference'])} |")
    if result.get("winograd"):
        lines += [
            "",
            "The CPU's convolutions with bias and ReLU fused, batch 1, on SegNet's 3x3 layer shapes: segnet_ext's "
            "Winograd F(2x2, 3x3) (transforms by hand, its 16 GEMMs by ATen's BLAS) against oneDNN's direct "
            "convolution (`mkldnn._convolution_pointwise`). The last column is what the eval path "
            "(`segnet_ext.fused.winograd_pays_off`) runs.",
            "",
            "| layer | layout | oneDNN ms | Winograd ms | speed-up | eval path |",
            "|---|---|---:|---:|---:|---|",
        ]
        for r in result["winograd"]:
            lines.append(f"| {r['shape']} | {r['layout']} | {r['onednn_ms']:.1f} | {r['winograd_ms']:.1f} | "
                         f"{r['speedup']:.2f}x | {'Winograd' if r['chosen'] else 'oneDNN'} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bn-shape", type=int, nargs=4, default=[4, 64, 360, 480], metavar=("N", "C", "H", "W"))
    parser.add_argument("--size", type=int, nargs=2, default=[360, 480], metavar=("H", "W"))
    parser.add_argument("--repeat", type=int, default=9, help="timed runs per case (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--write", action="store_true", help=f"write the tables into {RESULTS}")
    add_allocator_arguments(parser)  # --json: the BN+ReLU table's figures only
    args = parser.parse_args(argv)
    start_under_allocator(args)
    bn = bn_relu_rows(args.bn_shape, args.repeat, args.device)
    if args.json:
        print(json.dumps(bn))
        return bn
    command = "python -m bench.conv_bn_relu " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if a != "--write")
    result = dict(bn_shape=args.bn_shape, size=args.size, repeat=args.repeat, bn=bn,
                  stack=stack_rows(args.size, max(3, args.repeat // 3), args.device),
                  inference=inference_rows(args.size, args.repeat, args.device),
                  winograd=winograd_rows(args.repeat) if args.device == "cpu" else [])
    if args.allocator == "both" and args.device == "cpu":
        result["default"] = under_default_allocator(
            "bench.conv_bn_relu", ["--bn-shape", *args.bn_shape, "--repeat", args.repeat, "--device", args.device])
    text = report(result, command.strip(), args.device)
    print(text)
    if args.write:
        section = f"conv-bn-relu-{args.device}" + (f"-{cpu_level()}" if args.device == "cpu" else "")
        replace_section(RESULTS, section, text)
        print(f"\nwritten to {RESULTS}")
    return result


if __name__ == "__main__":
    main()
