"""ATen's convolution, forward and backward, as segnet_ext's layers call it: with the zero
padding made explicit where no output sees the input along a dimension (every tap of
every output position falls in the padding: a 1-wide input with padding 1 under a 1x1
kernel at stride 2; a 1-high input with padding 2 under 2 taps at dilation 3). There,
oneDNN's bfloat16 and float16 convolutions (torch 2.13 and 2.14, on CPUs with AVX-512 BF16
or AMX) read through a null pointer, forward and backward, and kill the process; explicit
zeros give the same values through a path that does not. csrc/cpu/conv_bn_relu.cpp does the
same for the native ops. Everywhere else these are F.conv2d and
aten.convolution_backward unchanged."""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair


def _sees_no_input(size: int, kernel: int, stride: int, padding: int, dilation: int) -> bool:
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    for o in range(out):
        if o * stride - padding >= size:  # this and later outputs start past the input
            break
        if any(0 <= o * stride - padding + j * dilation < size for j in range(kernel)):
            return False
    return True


def blind_padding(x: Tensor, weight: Tensor, stride, padding, dilation) -> Optional[Tuple[int, int]]:
    """The (height, width) padding to make explicit when no output sees the input along a
    dimension; None otherwise (and for padding given as a string, or a geometry that
    F.conv2d refuses: its error stays its own)."""
    if isinstance(padding, str) or x.dim() != 4 or weight.dim() != 4:
        return None
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    if len(stride + padding + dilation) != 6 or min(stride) < 1 or min(padding) < 0 or min(dilation) < 1:
        return None
    for d in range(2):
        size, kernel = x.shape[2 + d], weight.shape[2 + d]
        if kernel >= 1 and size + 2 * padding[d] >= dilation[d] * (kernel - 1) + 1 and _sees_no_input(
                size, kernel, stride[d], padding[d], dilation[d]):
            return padding
    return None


def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int) -> Tensor:
    """F.conv2d (differentiable)."""
    explicit = blind_padding(x, weight, stride, padding, dilation)
    if explicit is not None:
        (ph, pw), padding = explicit, 0
        x = F.pad(x, [pw, pw, ph, ph])
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def convolution_backward(grad: Tensor, x: Tensor, weight: Tensor, bias_sizes: Optional[List[int]], stride, padding,
                         dilation, groups: int, output_mask: List[bool]) -> Tuple[Optional[Tensor], ...]:
    """aten.convolution_backward of a (not transposed) convolution."""
    explicit = blind_padding(x, weight, stride, padding, dilation)
    args = (list(_pair(stride)), list(_pair(padding)), list(_pair(dilation)), False, [0, 0], groups, output_mask)
    if explicit is None:
        return torch.ops.aten.convolution_backward(grad, x, weight, bias_sizes, *args)
    (ph, pw), (H, W) = explicit, x.shape[2:]
    args = (args[0], [0, 0], *args[2:])
    grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(grad, F.pad(x, [pw, pw, ph, ph]), weight, bias_sizes,
                                                                 *args)
    return (None if grad_x is None else grad_x[..., ph:ph + H, pw:pw + W]), grad_w, grad_b
