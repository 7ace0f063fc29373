"""Drop-in layers built on the segnet_ext ops."""
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from . import aten_conv, fused, ops, recompute


def _only(name: str, value, allowed, layer: str) -> None:
    pairs = value if isinstance(value, (tuple, list)) else (value, value)
    if value not in allowed and not (len(pairs) == 2 and all(v in allowed for v in pairs)):
        raise ValueError(f"{layer} is 2x2 pooling with stride 2: {name} must be {allowed[0]}, got {value!r}")


class MaxPool2x2(nn.Module):
    """``nn.MaxPool2d(2, 2, return_indices=..., ceil_mode=...)`` with 2-bit packed indices
    (1/32 of torch's int64 indices). With return_indices, returns (values, packed_indices)
    for :class:`MaxUnpool2x2`. Takes torch's keywords (``kernel_size=2, stride=2 or None,
    padding=0, dilation=1``; other values are refused) and its forward convention
    (``forward(input)``; [N, C, H, W] or [C, H, W])."""

    def __init__(self, ceil_mode: bool = False, return_indices: bool = False, *, kernel_size=2, stride=None,
                 padding=0, dilation=1):
        super().__init__()
        _only("kernel_size", kernel_size, (2,), "MaxPool2x2")
        _only("stride", 2 if stride is None else stride, (2,), "MaxPool2x2")
        _only("padding", padding, (0,), "MaxPool2x2")
        _only("dilation", dilation, (1,), "MaxPool2x2")
        self.ceil_mode = ceil_mode
        self.return_indices = return_indices

    def forward(self, input: Tensor):
        values, packed = ops.max_pool2x2(input, self.ceil_mode)
        return (values, packed) if self.return_indices else values

    def extra_repr(self) -> str:
        return f"ceil_mode={self.ceil_mode}, return_indices={self.return_indices}"


def unpool_output_size(input: Tensor, output_size: Optional[Sequence[int]]) -> Sequence[int]:
    """(H, W) of a 2x2/stride-2 unpooling, from ``output_size`` in every form torch takes
    ((H, W), the full (N, C, H, W), torch.Size, list, tuple; and a 3-D input's full
    (C, H, W), which torch refuses) or torch's default (twice the
    input's), with torch's errors for impossible sizes (``F.max_unpool2d``'s rules: each
    within one of the default, i.e. 2h - 1, 2h or 2h + 1)."""
    default = [2 * s for s in input.shape[-2:]]
    if output_size is None:
        return default
    if len(output_size) == 4 or (len(output_size) == 3 and input.dim() == 3):  # a full size, also of a 3-D input
        output_size = output_size[-2:]
    if len(output_size) != 2:
        raise ValueError("output_size should be a sequence containing 2 or 4 elements, but it has a length of "
                         f"'{len(output_size)}'")
    for d in range(2):
        low, high = default[d] - 2, default[d] + 2
        if not (low < output_size[d] < high):
            raise ValueError(f'invalid output_size "{output_size}" (dim {d} must be between {low} and {high})')
    return [int(s) for s in output_size]


class MaxUnpool2x2(nn.Module):
    """``nn.MaxUnpool2d(2, 2)`` for the packed indices of :class:`MaxPool2x2`, with torch's
    forward convention: ``forward(input, indices, output_size=None)``, ``output_size`` as
    ``nn.MaxUnpool2d`` takes it (default twice the input's size; one more row or column
    than that is zeros, as torch's). Each value goes back to its window's arg-max; where the
    output is wider than the pooled input, torch's flat int64 indices would land elsewhere."""

    def __init__(self, kernel_size=2, stride=None, padding=0):
        super().__init__()
        _only("kernel_size", kernel_size, (2,), "MaxUnpool2x2")
        _only("stride", 2 if stride is None else stride, (2,), "MaxUnpool2x2")
        _only("padding", padding, (0,), "MaxUnpool2x2")

    def forward(self, input: Tensor, indices: Tensor, output_size: Optional[Sequence[int]] = None) -> Tensor:
        if indices.dtype != torch.uint8:
            raise TypeError(
                f"MaxUnpool2x2: indices must be the uint8 packed indices of segnet_ext.nn.MaxPool2x2, got {indices.dtype}"
                + (" (torch's nn.MaxPool2d indices: unpool them with nn.MaxUnpool2d, or convert them with "
                   "segnet_ext.pack_indices(indices, input_size))" if indices.dtype == torch.int64 else ""))
        H, W = unpool_output_size(input, output_size)
        h, w = min(H, 2 * input.shape[-2]), min(W, 2 * input.shape[-1])
        y = recompute.compiled_region(ops.max_unpool2x2, input, indices, constants=((h, w),), first=True)
        if (h, w) != (H, W):  # torch's extra row or column past the windows: zeros
            channels_last = y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
            out = torch.empty((*y.shape[:-2], H, W), dtype=y.dtype, device=y.device,
                              memory_format=torch.channels_last if channels_last else torch.contiguous_format).zero_()
            out[..., :h, :w] = y
            return out
        # a segnet_ext layer consuming y saves (input, indices) instead of y
        return recompute.attach(y, recompute.Unpool(input, indices, (h, w))) if y.dim() == 4 else y


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that, in training, saves a recomputable input (the output of a
    ConvBNReLU2d or MaxUnpool2x2) as its recipe instead of storing it. Same parameters and
    state_dict keys as ``nn.Conv2d``. With zero padding it convolves through
    :mod:`segnet_ext.aten_conv`, which avoids two oneDNN bugs of ``nn.Conv2d`` on the CPU."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        if self.padding_mode != "zeros":
            return super()._conv_forward(x, weight, bias)
        return aten_conv.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        if (self.padding_mode != "zeros" or isinstance(self.padding, str) or not torch.is_grad_enabled()
                or recompute.recipe_of(x) is None):
            return super().forward(x)
        return recompute.Conv2dFunction.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                              self.groups)


class _ConvBN:
    """The conv -> BatchNorm2d (-> ReLU) computation shared by :class:`ConvBNReLU2d` and
    :class:`FusedConv2d`. The BN's own ``training`` flag chooses batch or running
    statistics, as in the unfused model (so ``bn.eval()`` freezes a BN as usual).

    Training: the convolution runs through ATen; BN and ReLU are segnet_ext's fused ops;
    the block saves its input, the pre-normalisation convolution output and per-channel
    statistics, and its output is recomputed (bit for bit) by the next segnet_ext layer
    instead of being stored (see :mod:`segnet_ext.fused`; under torch.compile the compiler
    recomputes it, see :func:`segnet_ext.recompute.compiled_region`). Running statistics
    follow ``nn.BatchNorm2d`` exactly. With running statistics (evaluation), BN is folded into
    the convolution once (cached until a parameter or buffer changes) and the ReLU is fused
    into it."""

    _folded = None

    def _conv_bn(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Tensor, relu: bool, sync_bn: bool = False,
                 residual: Optional[Tensor] = None, recompute_residual: bool = False) -> Tensor:
        """relu(bn(conv(x)) (+ residual)); a residual the fused op cannot take (broadcast,
        another dtype) is added after conv-BN, as the unfused model does.
        ``recompute_residual``: under torch.compile, a residual that is a recomputed output
        (the previous block's) is recomputed in the backward, not kept (see
        :func:`segnet_ext.recompute.compiled_region`)."""
        name = type(self).__name__
        if x.dim() != 4:
            raise ValueError(f"{name} expects [N, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != conv.in_channels:
            raise ValueError(f"{name} expects {conv.in_channels} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        batch_stats = bn.training or not bn.track_running_stats or bn.running_mean is None
        if residual is not None and not (batch_stats and _fusable_residual(conv, x, residual)):
            # evaluation (nothing to save), or an identity the op cannot take: added after
            y = self._conv_bn(conv, bn, x, relu=False, sync_bn=sync_bn) + residual
            return torch.relu(y) if relu else y
        conv_args = (conv.stride, conv.padding, conv.dilation, conv.groups)
        if not batch_stats:
            weight, bias = self._folded_parameters(conv, bn)
            return fused.conv_bias_relu(x, weight, bias, conv_args, relu)
        group = None
        if sync_bn and bn.training and torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            group = torch.distributed.group.WORLD
        if torch.compiler.is_compiling() and torch.is_grad_enabled() and group is None:
            y, mean, unbiased_var = recompute.compiled_region(
                fused.conv_bn_relu_traced, x, conv.weight, conv.bias, bn.weight, bn.bias, residual,
                constants=(conv_args, bn.eps, relu), first=residual is not None and recompute_residual)
        else:
            y, mean, unbiased_var = fused.ConvBNReLUFunction.apply(
                x, conv.weight, conv.bias, bn.weight, bn.bias, residual, conv_args, bn.eps, relu, group)
        if bn.training and bn.track_running_stats and bn.running_mean is not None:
            _update_running_stats(bn, mean, unbiased_var)
        return y

    def _folded_parameters(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        tensors = [t for t in (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var) if t is not None]
        differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        cached = not differentiable and not torch.compiler.is_compiling()  # traced: folded in the graph
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors) + (bn.eps,) if cached else None
        if cached and self._folded is not None and self._folded[0] == key:
            return self._folded[1]
        with torch.set_grad_enabled(differentiable):
            folded = fused.fold_bn(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
        if cached:
            self._folded = (key, folded)
        return folded

    def train(self, mode: bool = True):
        self._folded = None
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self._folded = None
        return super()._apply(fn, recurse)


def _fusable_residual(conv: nn.Conv2d, x: Tensor, residual: Tensor) -> bool:
    """Whether the residual has the convolution output's shape, dtype (under autocast too)
    and device."""
    shape = (x.shape[0], conv.out_channels) + tuple(
        aten_conv.extent(*g) for g in zip(x.shape[2:], conv.kernel_size, conv.stride, conv.padding, conv.dilation))
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) and x.dtype != torch.float64 \
        else x.dtype
    return tuple(residual.shape) == shape and residual.dtype == dtype and residual.device == x.device


@torch.no_grad()
def _update_running_stats(bn: nn.BatchNorm2d, mean: Tensor, unbiased_var: Tensor) -> None:
    bn.num_batches_tracked.add_(1)
    momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    bn.running_mean.mul_(1 - momentum).add_(mean.to(bn.running_mean.dtype), alpha=momentum)
    bn.running_var.mul_(1 - momentum).add_(unbiased_var.to(bn.running_var.dtype), alpha=momentum)


def _check_fusable(conv: nn.Module, bn: nn.Module) -> None:
    if not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"fusion takes nn.Conv2d with zero padding given as numbers, got {conv}")
    if type(bn) is not nn.BatchNorm2d or bn.num_features != conv.out_channels:
        raise ValueError(f"fusion needs an nn.BatchNorm2d over the {conv.out_channels} conv outputs, got {bn}")


class ConvBNReLU2d(_ConvBN, nn.Module):
    """``nn.Sequential(nn.Conv2d, nn.BatchNorm2d, nn.ReLU)`` as one fused block.

    Computes exactly what the Sequential computes in both modes, with the same
    ``state_dict`` keys (``0.weight``, ``0.bias``, ``1.weight``, ``1.bias``,
    ``1.running_mean``, ``1.running_var``, ``1.num_batches_tracked``), so weights load both
    ways; ``self[0]`` / ``self.conv`` is the convolution and ``self[1]`` / ``self.bn`` the BN.
    The computation and its memory: :class:`_ConvBN`. ``relu=False`` gives conv-BN.
    ``sync_bn=True`` (or ``segnet.distributed.convert_sync_batchnorm``) computes the
    statistics over all processes of the default group.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, padding=1, bias: bool = True,
                 eps: float = 1e-5, momentum: Optional[float] = 0.1, relu: bool = True, affine: bool = True,
                 track_running_stats: bool = True, dilation=1, groups: int = 1, sync_bn: bool = False):
        super().__init__()
        self.add_module("0", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias))
        self.add_module("1", nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats))
        self.relu = relu
        self.sync_bn = sync_bn

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool = True) -> "ConvBNReLU2d":
        """A block that uses (not copies) ``conv`` and ``bn``."""
        _check_fusable(conv, bn)
        block = cls.__new__(cls)
        nn.Module.__init__(block)
        block.add_module("0", conv)
        block.add_module("1", bn)
        block.relu, block.sync_bn = relu, False
        return block

    @property
    def conv(self) -> nn.Conv2d:
        return self._modules["0"]

    @property
    def bn(self) -> nn.BatchNorm2d:
        return self._modules["1"]

    def __getitem__(self, index: int) -> nn.Module:
        return self._modules[str(index)]

    def _conv_args(self):
        c = self.conv
        return (c.stride, c.padding, c.dilation, c.groups)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_bn(self.conv, self.bn, x, self.relu, self.sync_bn)

    def extra_repr(self) -> str:
        return f"relu={self.relu}" + (", sync_bn=True" if self.sync_bn else "")


class FusedConv2d(_ConvBN, nn.Conv2d):
    """An ``nn.Conv2d`` that has taken over the ``nn.BatchNorm2d`` (and ReLU) after it: what
    :func:`segnet_ext.fuse` turns a convolution into (the same object: its class changes,
    its parameters, state_dict keys and hooks stay). The BN stays where it was in the
    model, with its keys, and is no longer called; ``self.bn`` refers to it. The
    computation and its memory: :class:`_ConvBN`. ``forward(input, residual)`` is ResNet's
    ``relu(bn(conv(input)) + residual)``, the sum not stored either (rebuilt from z and the
    residual)."""

    bn: nn.BatchNorm2d
    relu: bool
    sync_bn: bool
    recompute_residual: bool = False  # set by fuse: two of every MAX_DEPTH residual blocks, see fusion.py

    @classmethod
    def take_over(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool) -> "FusedConv2d":
        _check_fusable(conv, bn)
        if isinstance(conv, FusedConv2d):
            raise ValueError(f"{conv} is fused already")
        conv.__dict__.update(_unfused_class=type(conv), bn=bn, relu=relu, sync_bn=False, _folded=None)  # bn: not a child
        conv.__class__ = cls
        return conv

    def release(self) -> nn.Conv2d:
        """The convolution again (this object, its class restored)."""
        cls = self._unfused_class
        for name in ("_unfused_class", "bn", "relu", "sync_bn", "_folded", "recompute_residual"):
            self.__dict__.pop(name, None)
        self.__class__ = cls
        return self

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return self._conv_bn(self, self.bn, input, self.relu, self.sync_bn, residual, self.recompute_residual)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bn=BatchNorm2d({self.bn.num_features}), relu={self.relu}"
