"""ATen's convolution, forward and backward, as segnet_ext's layers call it, with the CPU
geometries that oneDNN gets wrong rewritten into equivalent ones it gets right:

- **no output sees the input** along a dimension (every tap of every output position falls
  in the zero padding: a 1-wide input with padding 1 under a 1x1 kernel at stride 2; a
  1-high input with padding 2 under 2 taps at dilation 3). oneDNN's bfloat16 and float16
  convolutions (on CPUs with AVX-512 BF16 or AMX) read through a null pointer there, forward
  and backward, and kill the process. Rewritten: the padding made explicit (zeros in the
  input, padding 0);
- **one output along a strided dimension** (a 3x3 kernel at stride 2 over 3 or 4 columns,
  or over 1 or 2 with padding 1). oneDNN's bfloat16 convolution on AMX returns garbage
  there (values of 1e19) when the other dimension is long or the channels many, and
  garbage weight gradients. Rewritten: stride 1 along that dimension (at most one more
  output), then the first output kept (in the backward, the gradient extended with zeros).

Both found in torch 2.13 and 2.14 (tests/test_conv_bn_relu.py has the cases).
csrc/cpu/conv_bn_relu.cpp rewrites the native ops' forward convolutions the same way.
Everywhere else (other geometries, other devices) these are F.conv2d and
aten.convolution_backward unchanged."""
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._prims_common import suggest_memory_format
from torch.nn.modules.utils import _pair


def extent(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Outputs along one dimension of a convolution."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _sees_no_input(size: int, kernel: int, stride: int, padding: int, dilation: int) -> bool:
    for o in range(extent(size, kernel, stride, padding, dilation)):
        if o * stride - padding >= size:  # this and later outputs start past the input
            break
        if any(0 <= o * stride - padding + j * dilation < size for j in range(kernel)):
            return False
    return True


class Rewrite(NamedTuple):
    explicit_padding: Optional[Tuple[int, int]]  # (height, width) to pad x with, then padding 0
    stride: Tuple[int, int]
    output_size: Tuple[int, int]  # the original's: the first outputs of the rewritten one


def rewrite(x: Tensor, weight: Tensor, stride, padding, dilation) -> Optional[Rewrite]:
    """How to convolve x on the CPU where the geometry as given is one of oneDNN's bad ones;
    None where it is not (and for padding given as a string, or a geometry that F.conv2d
    refuses: its error stays its own)."""
    if x.device.type != "cpu" or isinstance(padding, str) or x.dim() != 4 or weight.dim() != 4:
        return None
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    if len(stride + padding + dilation) != 6 or min(stride) < 1 or min(padding) < 0 or min(dilation) < 1:
        return None
    sizes, kernels = x.shape[2:], weight.shape[2:]
    if min(kernels) < 1 or any(n + 2 * p < d * (k - 1) + 1 for n, k, p, d in zip(sizes, kernels, padding, dilation)):
        return None
    out = tuple(extent(*g) for g in zip(sizes, kernels, stride, padding, dilation))
    blind = any(_sees_no_input(*g) for g in zip(sizes, kernels, stride, padding, dilation))
    strides = tuple(1 if o == 1 else s for o, s in zip(out, stride))
    if not blind and strides == stride:
        return None
    return Rewrite(padding if blind else None, strides, out)


def _padded(x: Tensor, explicit: Tuple[int, int]) -> Tensor:
    return F.pad(x, [explicit[1], explicit[1], explicit[0], explicit[0]])


def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int) -> Tensor:
    """F.conv2d (differentiable)."""
    r = rewrite(x, weight, stride, padding, dilation)
    if r is None:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if r.explicit_padding is not None:
        x, padding = _padded(x, r.explicit_padding), 0
    y = F.conv2d(x, weight, bias, r.stride, padding, dilation, groups)
    H, W = r.output_size
    return y if y.shape[2:] == (H, W) else y[..., :H, :W].contiguous(memory_format=suggest_memory_format(y))


def convolution_backward(grad: Tensor, x: Tensor, weight: Tensor, bias_sizes: Optional[List[int]], stride, padding,
                         dilation, groups: int, output_mask: List[bool]) -> Tuple[Optional[Tensor], ...]:
    """aten.convolution_backward of a (not transposed) convolution."""
    r = rewrite(x, weight, stride, padding, dilation)
    stride, padding, dilation = list(_pair(stride)), list(_pair(padding)), list(_pair(dilation))
    if r is None:
        return _aten_convolution_backward(grad, x, weight, bias_sizes, stride, padding, dilation, groups, output_mask)
    x_in = x if r.explicit_padding is None else _padded(x, r.explicit_padding)
    if r.explicit_padding is not None:
        padding = [0, 0]
    full = [extent(*g) for g in zip(x_in.shape[2:], weight.shape[2:], r.stride, padding, dilation)]
    if list(grad.shape[2:]) != full:  # the outputs the rewritten convolution adds get no gradient
        extended = grad.new_zeros((*grad.shape[:2], *full)).contiguous(memory_format=suggest_memory_format(grad))
        extended[..., :grad.shape[2], :grad.shape[3]] = grad
        grad = extended
    grad_x, grad_w, grad_b = _aten_convolution_backward(grad, x_in, weight, bias_sizes, list(r.stride), padding,
                                                        dilation, groups, output_mask)
    if grad_x is not None and r.explicit_padding is not None:
        (ph, pw), (H, W) = r.explicit_padding, x.shape[2:]
        grad_x = grad_x[..., ph:ph + H, pw:pw + W]
    return grad_x, grad_w, grad_b


def _aten_convolution_backward(grad: Tensor, x: Tensor, weight: Tensor, bias_sizes: Optional[List[int]],
                               stride: List[int], padding: List[int], dilation: List[int], groups: int,
                               output_mask: List[bool]) -> Tuple[Optional[Tensor], ...]:
    """aten.convolution_backward; where the input gradient and the weight (or bias) gradient
    are both asked for, in two calls, the weight's first: ATen's oneDNN backward, asked for
    both at once, holds the working copies of both at once (on a 64-channel 360x480 float32
    layer three activation-sized tensors, the input gradient among them, against two for
    either alone, for the same work), and that was the peak of SegNet-Basic's training step."""
    def call(mask):
        return torch.ops.aten.convolution_backward(grad, x, weight, bias_sizes, stride, padding, dilation, False,
                                                   [0, 0], groups, mask)
    if output_mask[0] and (output_mask[1] or output_mask[2]):
        _, grad_w, grad_b = call([False, output_mask[1], output_mask[2]])
        return call([True, False, False])[0], grad_w, grad_b
    return call(output_mask)
