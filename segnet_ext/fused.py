"""Fused conv-BN-ReLU: the training computation (an autograd.Function over the BN+ReLU
ops) and the inference one (BN folded into the convolution, ReLU fused).

Training memory: a block saves its convolution input (or that input's recipe, see
:mod:`segnet_ext.recompute`), the pre-normalisation convolution output z and per-channel
statistics (a residual block also its identity, or the identity's recipe); its own output
y is not stored but carries a recipe from which the next segnet_ext layer recomputes it
bit for bit in its backward. A chain of blocks thus stores one activation-sized tensor per
block (its z), not two.
"""
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.modules.utils import _pair

from . import aten_conv, reference
from .ops import cuda_kernels_available
from .recompute import RECIPE, SavedInput, ScaleShiftReLU, attach  # noqa: F401  (RECIPE: for tests)
from .recompute import autocast_operands, dtypes, grads_as

_ops = torch.ops.segnet_ext


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def batch_statistics(z: Tensor, group=None) -> Tuple[Tensor, Tensor, int]:
    """Per-channel mean and biased variance of z over N, H, W, and their count; over all
    processes of ``group`` when given (exact combination of the per-process moments)."""
    mean, var = _ops.bn_stats(z)
    count = z.numel() // max(z.shape[1], 1)
    if group is None:
        return mean, var, count
    local = torch.stack([torch.full_like(mean, count), mean, var * count]).double()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    n, means, m2 = torch.stack(parts).unbind(1)  # each [world, C]
    total = n.sum(0)
    global_mean = (n * means).sum(0) / total
    global_m2 = (m2 + n * (means - global_mean) ** 2).sum(0)
    return global_mean.to(mean.dtype), (global_m2 / total).to(var.dtype), int(total[0].item()) if total.numel() else 0


def bn_relu_forward(z: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], eps: float, relu: bool,
                    group=None, residual: Optional[Tensor] = None, stats: Optional[Tuple[Tensor, Tensor]] = None):
    """Training BN (+ residual) (+ ReLU) of z: returns y and what the backward needs,
    (y, scale, shift, mean, var, invstd, count). ``stats``: z's (mean, var), where the
    convolution computed them (conv2d_bn_stats; not under data parallelism)."""
    if stats is not None and group is None:
        mean, var, count = *stats, z.numel() // max(z.shape[1], 1)
    else:
        mean, var, count = batch_statistics(z, group)
    invstd, scale, shift = _normalisation(z, mean, var, count, bn_weight, bn_bias, eps)
    return _ops.scale_shift_relu(z, scale, shift, relu, residual), scale, shift, mean, var, invstd, count


def _normalisation(z: Tensor, mean: Tensor, var: Tensor, count: int, bn_weight: Optional[Tensor],
                   bn_bias: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(invstd, scale, shift) of training BN from z's batch statistics over ``count`` values
    per channel (more than one, as nn.BatchNorm2d requires)."""
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(z.shape)}")
    acc = _acc_dtype(z)
    invstd = torch.rsqrt(var + eps)
    scale = invstd * bn_weight.to(acc) if bn_weight is not None else invstd
    shift = (bn_bias.to(acc) if bn_bias is not None else torch.zeros_like(scale)) - mean * scale
    return invstd, scale, shift


def bn_relu_backward(grad_y: Tensor, z: Tensor, scale: Tensor, shift: Tensor, mean: Tensor, invstd: Tensor,
                     count: int, relu: bool, group=None):
    """(grad_z, grad_bn_weight, grad_bn_bias): one reduction pass, one output pass. Under
    data parallelism the input gradient uses the global sums and the parameter gradients
    this process's share (DDP averages them), as nn.SyncBatchNorm."""
    sum_g, sum_gc = _ops.bn_relu_backward_reduce(grad_y, z, scale, shift, mean, relu)
    grad_bn_bias, grad_bn_weight = sum_g, invstd * sum_gc
    if group is not None:
        both = torch.stack([sum_g, sum_gc])
        dist.all_reduce(both, group=group)
        sum_g, sum_gc = both.unbind(0)
    k1 = scale
    k2 = -scale * invstd * invstd * sum_gc / count
    k3 = -scale * sum_g / count
    grad_z = _ops.bn_relu_backward_apply(grad_y, z, scale, shift, mean, k1, k2, k3, relu)
    return grad_z, grad_bn_weight, grad_bn_bias


class ConvBNReLUFunction(torch.autograd.Function):
    """y = relu(BN_train(conv2d(x, weight, bias)) (+ residual)); returns (y, batch mean,
    unbiased batch var). The residual (ResNet's identity, the shape and dtype of the
    convolution output, or None) is saved as its recipe where it has one; the backward
    rebuilds y from (z, scale, shift, residual) for the ReLU's mask."""

    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, residual, conv_args, eps: float, relu: bool, group):
        stride, padding, dilation, groups = conv_args
        device = x.device.type
        x_c, w_c, b_c = autocast_operands(device, x, weight, bias)  # as nn.Conv2d's under autocast
        with torch.autocast(device, enabled=False):
            if group is None and not isinstance(padding, str):  # the statistics with the convolution
                z, *stats = _ops.conv2d_bn_stats(x_c, w_c, b_c, _pair(stride), _pair(padding), _pair(dilation), groups)
            else:
                z, stats = aten_conv.conv2d(x_c, w_c, b_c, stride, padding, dilation, groups), None
        y, scale, shift, mean, var, invstd, count = bn_relu_forward(z, bn_weight, bn_bias, eps, relu, group, residual,
                                                                    stats)

        recipe = ScaleShiftReLU(z, scale, shift, relu, residual)
        attach(y, recipe)
        ctx.output = recipe if residual is not None and relu else None  # for the ReLU's mask
        if ctx.output is not None:
            recipe.expect()
        # the recipe refers to its tensors weakly: a residual (or its recipe's tensors) lives while this block may
        # still rebuild its output, for its own mask or for a consumer saving the recipe
        output_part = recipe.tensors() if residual is not None else []
        SavedInput.save(ctx, [x_c, residual], w_c, z, scale, shift, mean, invstd, *output_part)
        ctx.conv_args, ctx.relu, ctx.group, ctx.count = conv_args, relu, group, count
        ctx.has_bias, ctx.dtypes = bias is not None, dtypes(x, weight, bias, bn_weight, bn_bias, residual)
        ctx.has_residual = residual is not None
        unbiased = var * (count / (count - 1))
        ctx.mark_non_differentiable(mean, unbiased)
        return y, mean, unbiased

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        others = SavedInput.others(ctx)
        (w_c, z, scale, shift, mean, invstd), output_part = others[:6], others[6:]
        grad_y, relu = grad_y.to(z.dtype), ctx.relu and not ctx.has_residual
        if ctx.output is not None:  # the ReLU's mask from the rebuilt output (rebuilt once: see Recipe)
            grad_y = torch.ops.aten.threshold_backward(grad_y, ctx.output.use(output_part), 0)
        grad_z, grad_bn_weight, grad_bn_bias = bn_relu_backward(
            grad_y, z, scale, shift, mean, invstd, ctx.count, relu, ctx.group)
        stride, padding, dilation, groups = ctx.conv_args
        needs = ctx.needs_input_grad
        (x, _), _ = SavedInput.load(ctx)  # rebuilt where need be, just before it is needed
        grad_x, grad_w, grad_b = aten_conv.convolution_backward(
            grad_z, x, w_c, [w_c.shape[0]] if ctx.has_bias else None, stride, padding, dilation, groups,
            [needs[0], needs[1], needs[2] and ctx.has_bias])
        grad_bn = (grad_bn_weight if needs[3] else None, grad_bn_bias if needs[4] else None)
        grad_residual = grad_y if ctx.has_residual and needs[5] else None
        return (*grads_as((grad_x, grad_w, grad_b, *grad_bn, grad_residual), ctx.dtypes), None, None, None, None)


def conv_bn_relu_traced(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                       bn_bias: Optional[Tensor], residual: Optional[Tensor], conv_args, eps: float, relu: bool):
    """What :class:`ConvBNReLUFunction` computes, as differentiable ATen ops for torch.compile
    to trace (an autograd.Function is opaque to the recompute policy of
    :func:`~segnet_ext.recompute.compiled_region`): Inductor fuses the statistics, the
    normalisation, the residual and the ReLU (``scale_shift_relu``'s reference) forward and
    backward, and the policy recomputes y in the backward instead of saving it."""
    z = aten_conv.conv2d(x, weight, bias, *conv_args)
    count = z.numel() // max(z.shape[1], 1)
    var, mean = torch.var_mean(z.to(_acc_dtype(z)), dim=(0, 2, 3), correction=0)
    _, scale, shift = _normalisation(z, mean, var, count, bn_weight, bn_bias, eps)
    y = reference.scale_shift_relu(z, scale, shift, relu, residual)
    return y, mean.detach(), (var * (count / (count - 1))).detach()


def fold_bn(weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
            running_mean: Tensor, running_var: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """The convolution weight and bias with an eval-mode BN folded in."""
    acc = _acc_dtype(weight)
    scale = torch.rsqrt(running_var.to(acc) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(acc)
    b = (bias.to(acc) if bias is not None else torch.zeros_like(scale)) - running_mean.to(acc)
    shift = b * scale + (bn_bias.to(acc) if bn_bias is not None else 0)
    return (weight.to(acc) * scale.view(-1, 1, 1, 1)).to(weight.dtype), shift.to(weight.dtype)


def _mkldnn_conv_relu_dtypes() -> Tuple[torch.dtype, ...]:
    """The dtypes oneDNN's convolution with a fused ReLU runs on this CPU: float32, and
    bfloat16 where the CPU has the instructions it needs (AVX-512 BF16 or AVX-NE-CONVERT;
    on AVX2 alone it raises)."""
    supported = []
    for dtype in (torch.float32, torch.bfloat16):
        try:
            x, w = torch.ones(1, 1, 3, 3, dtype=dtype), torch.ones(1, 1, 1, 1, dtype=dtype)
            torch.ops.mkldnn._convolution_pointwise(x, w, None, [0, 0], [1, 1], [1, 1], 1, "relu", [None], "")
            supported.append(dtype)
        except (AttributeError, RuntimeError):
            pass
    return tuple(supported)


_MKLDNN_CONV_RELU = _mkldnn_conv_relu_dtypes()


def winograd_pays_off(x: Tensor, weight: Tensor, conv_args) -> bool:
    """Whether the CPU's Winograd F(2x2, 3x3) path of conv2d_scale_shift_relu beats oneDNN's
    direct convolution for this input: 3x3 / stride 1 / padding 1 in float32 or float64,
    with 16 to 256 channels in and out and rows of at least 64 pixels. Measured with
    ``python -m bench.conv_bn_relu`` (its Winograd table): outside these bounds its GEMMs are
    too narrow (few channels, short rows) or its transformed weights too large for the cache."""
    stride, padding, dilation, groups = conv_args
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.dim() == 4
            and tuple(weight.shape[2:]) == (3, 3) and tuple(stride) == (1, 1) and tuple(padding) == (1, 1)
            and tuple(dilation) == (1, 1) and groups == 1 and 16 <= weight.shape[0] <= 256
            and 16 <= weight.shape[1] <= 256 and x.shape[3] >= 64)


def conv_bias_relu(x: Tensor, weight: Tensor, bias: Tensor, conv_args, relu: bool) -> Tensor:
    """conv2d + bias (+ ReLU) in one pass where no gradient is needed: segnet_ext's
    conv2d_scale_shift_relu on CUDA (cuDNN + the fused epilogue, or our implicit-GEMM kernel
    for the 3x3/stride 1/padding 1 shapes where it was timed faster) and on the CPU where its Winograd path pays off;
    otherwise on the CPU oneDNN's convolution with the ReLU fused; otherwise (gradients,
    autocast) ATen's convolution and an in-place ReLU."""
    stride, padding, dilation, groups = conv_args
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)
    if not needs_grad and not torch.is_autocast_enabled(x.device.type):
        if (x.is_cuda and cuda_kernels_available()) or winograd_pays_off(x, weight, conv_args):
            scale = torch.ones_like(bias, dtype=_acc_dtype(x))
            return _ops.conv2d_scale_shift_relu(x, weight, scale, bias.to(scale.dtype), list(stride), list(padding),
                                                list(dilation), groups, relu)
        if (relu and x.device.type == "cpu" and x.dtype in _MKLDNN_CONV_RELU
                and aten_conv.rewrite(x, weight, stride, padding, dilation) is None):
            return torch.ops.mkldnn._convolution_pointwise(
                x, weight, bias, list(padding), list(stride), list(dilation), groups, "relu", [None], "")
    y = aten_conv.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return torch.relu_(y) if relu else y
