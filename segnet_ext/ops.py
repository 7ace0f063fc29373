"""Python entry points of the native ops, with their fake (meta) kernels and autograd.

Autograd is registered once, here, and every backward is itself a registered op, so
the same graph works on every device, under torch.compile, and to any order:
max_pool2x2's backward is max_unpool2x2, whose backward is max_unpool2x2_backward,
whose backward is max_unpool2x2 again. scale_shift_relu's backward (first order) is the
BN+ReLU backward ops with a zero mean.
"""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from .aten_conv import extent
from .reference import pack_codes, unpack_codes

_ops = torch.ops.segnet_ext
_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key("segnet_ext::max_pool2x2", "CUDA")


def cuda_kernels_available() -> bool:
    """Whether this build of segnet_ext._C has CUDA kernels."""
    return _CUDA_KERNELS


def cpu_capability() -> str:
    """The x86-64 level segnet_ext's CPU kernels run at in this process: "AVX512", "AVX2" or
    "DEFAULT" (baseline x86-64), as ``torch.backends.cpu.get_cpu_capability()`` names ATen's.
    The best the CPU has, lowered by SEGNET_EXT_NO_AVX512=1 (to AVX2) or SEGNET_EXT_NO_AVX2=1
    (to DEFAULT), read once, when the first kernel runs."""
    return _ops.cpu_capability()


def kernel_choices() -> List[str]:
    """The per-shape choices the CUDA ops made in this process between segnet_ext's kernel and
    cuDNN, one line each: the shape, dtype, layout and settings, both times, the winner.
    Made by timing both on first use (cuDNN wins ties); SEGNET_EXT_CONV=vendor or =segnet
    forces one side, TORCH_CPP_LOG_LEVEL=INFO logs each choice as it is made."""
    return list(_ops.kernel_choices())


def _check_device(t: Tensor, name: str, op: str) -> None:
    if t.is_cuda and not _CUDA_KERNELS:
        raise RuntimeError(
            f"{op}: {name} is on {t.device}, but this build of segnet_ext has no CUDA kernels "
            "(it was built CPU-only). Rebuild with `SEGNET_EXT_CUDA=1 pip install --no-build-isolation -e .` "
            "where a CUDA toolkit matching torch.version.cuda is installed."
        )


def _pair(size: Sequence[int], name: str, op: str) -> Tuple[int, int]:
    size = tuple(size)
    if len(size) < 2:
        raise ValueError(f"{op}: {name} must end with (H, W), got {size}")
    return size[-2], size[-1]


def max_pool2x2(x: Tensor, ceil_mode: bool = False) -> Tuple[Tensor, Tensor]:
    """2x2, stride-2 max pooling that records each window's arg-max in 2 bits.

    Args:
        x: [N, C, H, W] or [C, H, W]; float32, float64, float16 or bfloat16; any
            memory format (the values keep x's).
        ceil_mode: keep the partial windows of an odd H or W, as torch's ceil_mode.

    Returns:
        (values, packed_indices): values equal ``F.max_pool2d(x, 2, 2, ceil_mode=...)``
        bit for bit (NaN propagates; ties keep the first maximum in row-major order).
        packed_indices is uint8 of ceil(values.numel() / 4) bytes: window k (the k-th
        value in logical NCHW order) has its code 2*dy + dx in byte k // 4, bits
        2*(k % 4), where (2*oh + dy, 2*ow + dx) is its maximum.
    """
    if x.dim() not in (3, 4):
        raise ValueError(f"max_pool2x2: x must be [N, C, H, W] or [C, H, W], got shape {tuple(x.shape)}")
    _check_device(x, "x", "max_pool2x2")
    if x.dim() == 3:
        values, packed = _ops.max_pool2x2(x.unsqueeze(0), ceil_mode)
        return values.squeeze(0), packed
    return _ops.max_pool2x2(x, ceil_mode)


def max_unpool2x2(values: Tensor, packed_indices: Tensor, output_size: Sequence[int]) -> Tensor:
    """Puts each value back at its window's arg-max, zeros elsewhere.

    Args:
        values: [N, C, Ho, Wo] or [C, Ho, Wo] (any memory format; the output keeps it).
        packed_indices: from :func:`max_pool2x2` (or :func:`pack_indices`).
        output_size: the pooled input's size, (H, W) or the full shape.

    Equals ``F.max_unpool2d(values, indices, 2, 2, output_size=...)`` with torch's own
    indices, bit for bit. A code pointing past the output (only corrupt indices do) is dropped.
    """
    if values.dim() not in (3, 4):
        raise ValueError(
            f"max_unpool2x2: values must be [N, C, Ho, Wo] or [C, Ho, Wo], got shape {tuple(values.shape)}")
    _check_device(values, "values", "max_unpool2x2")
    size = _pair(output_size, "output_size", "max_unpool2x2")
    if values.dim() == 3:
        return _ops.max_unpool2x2(values.unsqueeze(0), packed_indices, size).squeeze(0)
    return _ops.max_unpool2x2(values, packed_indices, size)


def unpack_indices(packed_indices: Tensor, pooled_shape: Sequence[int], input_size: Sequence[int]) -> Tensor:
    """packed_indices -> torch's int64 indices (flat h * W + w per plane), of shape pooled_shape,
    for ``nn.MaxUnpool2d`` / ``F.max_unpool2d``. input_size: the pooled input's (H, W)."""
    H, W = _pair(input_size, "input_size", "unpack_indices")
    Ho, Wo = _pair(pooled_shape, "pooled_shape", "unpack_indices")
    _check_extents(H, W, Ho, Wo, "unpack_indices")
    windows = 1
    for s in pooled_shape:
        windows *= s
    if packed_indices.dtype != torch.uint8 or packed_indices.numel() != (windows + 3) // 4:
        raise ValueError(
            f"unpack_indices: packed_indices must be uint8 with ceil({windows} / 4) = {(windows + 3) // 4} "
            f"bytes for pooled_shape {tuple(pooled_shape)}, got {packed_indices.dtype} with "
            f"{packed_indices.numel()} elements")
    codes = unpack_codes(packed_indices.reshape(-1), windows).view(tuple(pooled_shape))
    device = packed_indices.device
    h = 2 * torch.arange(Ho, device=device).view(Ho, 1) + codes // 2
    w = 2 * torch.arange(Wo, device=device) + codes % 2
    if bool(((h >= H) | (w >= W)).any()):
        raise ValueError(f"unpack_indices: packed_indices has codes pointing outside an input of size {(H, W)}")
    return h * W + w


def pack_indices(indices: Tensor, input_size: Sequence[int]) -> Tensor:
    """torch's int64 indices (from ``nn.MaxPool2d(2, 2, return_indices=True)``) -> packed_indices.
    input_size: the pooled input's (H, W). Raises if an index is not inside its own 2x2 window."""
    if indices.dtype != torch.int64 or indices.dim() < 2:
        raise ValueError(
            f"pack_indices: indices must be int64 [..., Ho, Wo], got {indices.dtype} of shape {tuple(indices.shape)}")
    H, W = _pair(input_size, "input_size", "pack_indices")
    Ho, Wo = indices.shape[-2:]
    _check_extents(H, W, Ho, Wo, "pack_indices")
    device = indices.device
    dy = indices.div(W, rounding_mode="floor") - 2 * torch.arange(Ho, device=device).view(Ho, 1)
    dx = indices.remainder(W) - 2 * torch.arange(Wo, device=device)
    bad = (indices < 0) | (indices >= H * W) | (dy < 0) | (dy > 1) | (dx < 0) | (dx > 1)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"pack_indices: {int(bad.sum())} indices are not inside their own 2x2 window of an input of "
            f"size {(H, W)} (first at position {first}: {int(indices[first])}); only 2x2, stride-2, "
            "unpadded pooling indices can be packed")
    return pack_codes(2 * dy + dx)


def _check_extents(H: int, W: int, Ho: int, Wo: int, op: str) -> None:
    for full, pooled, name in ((H, Ho, "H"), (W, Wo, "W")):
        if not (pooled >= 1 and 2 * pooled - 1 <= full <= 2 * pooled + 1):
            raise ValueError(f"{op}: input {name} = {full} cannot come from 2x2 pooling to {pooled}")


# ---- fake kernels: shapes, dtypes and memory formats, for torch.compile and meta tensors ----

def _check_activation(t: Tensor, name: str, op: str) -> None:
    torch._check(t.dim() == 4, lambda: f"{op}: {name} must be a 4-D tensor [N, C, H, W], got shape {tuple(t.shape)}")
    torch._check(t.dtype in _FLOATING,
                 lambda: f"{op}: {name} must be float32, float64, float16 or bfloat16, got {t.dtype}")


def _empty_like_format(like: Tensor, shape) -> Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=suggest_memory_format(like))


def _check_packed(packed: Tensor, windows, like: Tensor, like_name: str, op: str) -> None:
    torch._check(packed.device == like.device,
                 lambda: f"{op}: packed_indices is on {packed.device} but {like_name} is on {like.device}")
    torch._check(packed.dtype == torch.uint8, lambda: f"{op}: packed_indices must be uint8, got {packed.dtype}")
    torch._check(packed.dim() == 1 and packed.shape[0] == (windows + 3) // 4,
                 lambda: f"{op}: packed_indices must be 1-D with ceil({windows} / 4) bytes, got {tuple(packed.shape)}")


@torch.library.register_fake("segnet_ext::max_pool2x2")
def _max_pool2x2_fake(x: Tensor, ceil_mode: bool = False):
    _check_activation(x, "x", "max_pool2x2")
    N, C, H, W = x.shape
    Ho, Wo = ((H + 1) // 2, (W + 1) // 2) if ceil_mode else (H // 2, W // 2)
    torch._check(Ho >= 1 and Wo >= 1, lambda: f"max_pool2x2: x of shape {tuple(x.shape)} is smaller than the 2x2 window")
    values = _empty_like_format(x, (N, C, Ho, Wo))
    return values, x.new_empty(((N * C * Ho * Wo + 3) // 4,), dtype=torch.uint8)


@torch.library.register_fake("segnet_ext::max_unpool2x2")
def _max_unpool2x2_fake(values: Tensor, packed_indices: Tensor, output_size):
    _check_activation(values, "values", "max_unpool2x2")
    N, C, Ho, Wo = values.shape
    _check_packed(packed_indices, N * C * Ho * Wo, values, "values", "max_unpool2x2")
    return _empty_like_format(values, (N, C, output_size[0], output_size[1]))


@torch.library.register_fake("segnet_ext::max_unpool2x2_backward")
def _max_unpool2x2_backward_fake(grad_output: Tensor, packed_indices: Tensor, pooled_size):
    _check_activation(grad_output, "grad_output", "max_unpool2x2_backward")
    N, C = grad_output.shape[:2]
    _check_packed(packed_indices, N * C * pooled_size[0] * pooled_size[1], grad_output, "grad_output",
                  "max_unpool2x2_backward")
    return _empty_like_format(grad_output, (N, C, pooled_size[0], pooled_size[1]))


# ---- autograd ----

def _pool_setup(ctx, inputs, output):
    x, _ = inputs
    ctx.input_size = (x.shape[2], x.shape[3])
    ctx.save_for_backward(output[1])


def _pool_backward(ctx, grad_values, _grad_packed):
    (packed,) = ctx.saved_tensors
    return _ops.max_unpool2x2(grad_values, packed, ctx.input_size), None


def _unpool_setup(ctx, inputs, output):
    values, packed, _ = inputs
    ctx.pooled_size = (values.shape[2], values.shape[3])
    ctx.save_for_backward(packed)


def _unpool_backward(ctx, grad_y):
    (packed,) = ctx.saved_tensors
    return _ops.max_unpool2x2_backward(grad_y, packed, ctx.pooled_size), None, None


def _gather_setup(ctx, inputs, output):
    grad_output, packed, _ = inputs
    ctx.output_size = (grad_output.shape[2], grad_output.shape[3])
    ctx.save_for_backward(packed)


def _gather_backward(ctx, grad):
    (packed,) = ctx.saved_tensors
    return _ops.max_unpool2x2(grad, packed, ctx.output_size), None, None


def masked_by_rebuilt_relu(grad_y: Tensor, x: Tensor, scale: Tensor, shift: Tensor, residual: Tensor) -> Tensor:
    """grad_y where relu(x * scale + shift + residual) passes, the mask taken from the rebuilt
    output as torch.relu's backward takes it (the BN+ReLU backward ops take it from x alone)."""
    return torch.ops.aten.threshold_backward(grad_y, _ops.scale_shift_relu(x, scale, shift, True, residual), 0)


def _scale_shift_relu_setup(ctx, inputs, output):
    x, scale, shift, relu, residual = inputs
    ctx.relu = relu
    ctx.save_for_backward(x, scale, shift, residual)  # not the output: rebuilt where the mask needs it


def _scale_shift_relu_backward(ctx, grad_y):
    """(grad_x, grad_scale, grad_shift, grad_residual) with the fused BN+ReLU backward ops:
    g = grad_y where the output passes the ReLU; grad_x = scale * g, grad_scale = sum(g * x),
    grad_shift = sum(g), grad_residual = g (per channel sums over N, H, W)."""
    x, scale, shift, residual = ctx.saved_tensors
    relu, needs = ctx.relu, ctx.needs_input_grad
    grad_y = grad_y.to(x.dtype)
    if residual is not None:
        if relu:
            grad_y = masked_by_rebuilt_relu(grad_y, x, scale, shift, residual)
        relu = False
    zero = torch.zeros_like(scale)
    grad_x = _ops.bn_relu_backward_apply(grad_y, x, scale, shift, zero, scale, zero, zero, relu) if needs[0] else None
    grad_scale = grad_shift = None
    if needs[1] or needs[2]:
        grad_shift, grad_scale = _ops.bn_relu_backward_reduce(grad_y, x, scale, shift, zero, relu)
    grad_residual = grad_y if residual is not None and needs[4] else None
    return grad_x, grad_scale, grad_shift, None, grad_residual


torch.library.register_autograd("segnet_ext::max_pool2x2", _pool_backward, setup_context=_pool_setup)
torch.library.register_autograd("segnet_ext::max_unpool2x2", _unpool_backward, setup_context=_unpool_setup)
torch.library.register_autograd("segnet_ext::max_unpool2x2_backward", _gather_backward, setup_context=_gather_setup)
torch.library.register_autograd("segnet_ext::scale_shift_relu", _scale_shift_relu_backward,
                                setup_context=_scale_shift_relu_setup)


# ---- batch norm + ReLU (training); composed into ConvBNReLU2d by segnet_ext/fused.py ----

def _check_channel_vector(v: Tensor, name: str, x: Tensor, op: str) -> None:
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    torch._check(v.dim() == 1 and v.shape[0] == x.shape[1],
                 lambda: f"{op}: {name} must have shape [C] = [{x.shape[1]}] for x of shape {tuple(x.shape)}, got {tuple(v.shape)}")
    torch._check(v.dtype == acc, lambda: f"{op}: {name} must be {acc} for {x.dtype} x, got {v.dtype}")


def _bn_format_like(x: Tensor) -> Tensor:
    fmt = torch.contiguous_format if x.is_contiguous() else suggest_memory_format(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)


@torch.library.register_fake("segnet_ext::bn_stats")
def _bn_stats_fake(x: Tensor):
    _check_activation(x, "x", "bn_stats")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((x.shape[1],), dtype=acc), x.new_empty((x.shape[1],), dtype=acc)


@torch.library.register_fake("segnet_ext::scale_shift_relu")
def _scale_shift_relu_fake(x: Tensor, scale: Tensor, shift: Tensor, relu: bool, residual: Optional[Tensor] = None):
    _check_activation(x, "x", "scale_shift_relu")
    _check_channel_vector(scale, "scale", x, "scale_shift_relu")
    _check_channel_vector(shift, "shift", x, "scale_shift_relu")
    if residual is not None:
        torch._check(residual.shape == x.shape and residual.dtype == x.dtype, lambda: (
            f"scale_shift_relu: residual must have the shape and dtype of x {tuple(x.shape)} {x.dtype}, "
            f"got {tuple(residual.shape)} {residual.dtype}"))
    return _bn_format_like(x)


@torch.library.register_fake("segnet_ext::bn_relu_backward_reduce")
def _bn_relu_backward_reduce_fake(grad_y: Tensor, x: Tensor, scale: Tensor, shift: Tensor, mean: Tensor, relu: bool):
    _check_activation(x, "x", "bn_relu_backward_reduce")
    return scale.new_empty(scale.shape), scale.new_empty(scale.shape)


@torch.library.register_fake("segnet_ext::bn_relu_backward_apply")
def _bn_relu_backward_apply_fake(grad_y, x, scale, shift, mean, k1, k2, k3, relu: bool):
    _check_activation(x, "x", "bn_relu_backward_apply")
    return _bn_format_like(x)


def _conv_output_like(x, weight, stride, padding, dilation):
    Ho, Wo = (extent(*g) for g in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation))
    return torch.empty((x.shape[0], weight.shape[0], Ho, Wo), dtype=x.dtype, device=x.device,
                       memory_format=suggest_memory_format(x))


@torch.library.register_fake("segnet_ext::conv2d_scale_shift_relu")
def _conv2d_scale_shift_relu_fake(x, weight, scale, shift, stride, padding, dilation, groups: int, relu: bool):
    _check_activation(x, "x", "conv2d_scale_shift_relu")
    return _conv_output_like(x, weight, stride, padding, dilation)


@torch.library.register_fake("segnet_ext::conv2d_bn_stats")
def _conv2d_bn_stats_fake(x, weight, bias, stride, padding, dilation, groups: int):
    _check_activation(x, "x", "conv2d_bn_stats")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    C = weight.shape[0]
    return (_conv_output_like(x, weight, stride, padding, dilation), x.new_empty((C,), dtype=acc),
            x.new_empty((C,), dtype=acc))
