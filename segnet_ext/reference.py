"""Pure-PyTorch versions of every op: slow, obvious, and the oracle the tests trust.

They follow the documented contract, not the kernels: windows are reshaped out of
the input, the arg-max rule is applied element by element, and the 2-bit codes are
packed with plain tensor arithmetic.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

_SHIFTS = (0, 2, 4, 6)
_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(x: Tensor) -> Tensor:
    """A float tensor's bits, as the integer dtype of its size (other dtypes as they are)."""
    return x.view(_BITS[x.dtype]) if x.dtype in _BITS else x


def pack_codes(codes: Tensor) -> Tensor:
    """2-bit codes (any shape, logical order) -> uint8 [ceil(numel / 4)]: code k in
    byte k // 4 at bits 2 * (k % 4); bits past the last code are zero."""
    flat = codes.reshape(-1).to(torch.int32)
    flat = F.pad(flat, (0, -flat.numel() % 4)).view(-1, 4)
    packed = flat[:, 0] | (flat[:, 1] << 2) | (flat[:, 2] << 4) | (flat[:, 3] << 6)
    return packed.to(torch.uint8)


def unpack_codes(packed: Tensor, windows: int) -> Tensor:
    """uint8 [ceil(windows / 4)] -> int64 codes [windows]."""
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=packed.device)
    codes = (packed.to(torch.int32).unsqueeze(1) >> shifts) & 3
    return codes.reshape(-1)[:windows].to(torch.int64)


def _windows(x: Tensor, Ho: int, Wo: int, fill: float) -> Tensor:
    """[N, C, H, W] -> [N, C, Ho, Wo, 4] in row-major window order, cropped or padded
    with `fill` to exactly 2*Ho x 2*Wo."""
    H, W = x.shape[-2:]
    x = x[..., : 2 * Ho, : 2 * Wo]
    x = F.pad(x, (0, 2 * Wo - min(W, 2 * Wo), 0, 2 * Ho - min(H, 2 * Ho)), value=fill)
    N, C = x.shape[:2]
    return x.reshape(N, C, Ho, 2, Wo, 2).permute(0, 1, 2, 4, 3, 5).reshape(N, C, Ho, Wo, 4)


def max_pool2x2(x: Tensor, ceil_mode: bool = False):
    """x [N, C, H, W] -> (values [N, C, Ho, Wo], packed_indices uint8)."""
    H, W = x.shape[-2:]
    Ho, Wo = ((H + 1) // 2, (W + 1) // 2) if ceil_mode else (H // 2, W // 2)
    # -inf padding never wins under the rule below, so partial windows behave as torch's.
    win = _windows(x, Ho, Wo, float("-inf"))
    values, codes = win[..., 0], torch.zeros(win.shape[:-1], dtype=torch.int64, device=x.device)
    for k in range(1, 4):
        v = win[..., k]
        wins = (v > values) | torch.isnan(v)  # torch's rule: strictly greater, or NaN
        values = torch.where(wins, v, values)
        codes = torch.where(wins, k, codes)
    return values, pack_codes(codes)


def max_unpool2x2(values: Tensor, packed_indices: Tensor, output_size) -> Tensor:
    """values [N, C, Ho, Wo] -> [N, C, H, W], zero except at each window's arg-max."""
    N, C, Ho, Wo = values.shape
    H, W = output_size[-2:]
    codes = unpack_codes(packed_indices, values.numel()).view(N, C, Ho, Wo)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    win = torch.stack([torch.where(codes == k, values, zero) for k in range(4)], dim=-1)
    full = win.view(N, C, Ho, Wo, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(N, C, 2 * Ho, 2 * Wo)
    full = full[..., :H, :W]
    return F.pad(full, (0, W - full.shape[-1], 0, H - full.shape[-2]))


def max_unpool2x2_backward(grad_output: Tensor, packed_indices: Tensor, pooled_size) -> Tensor:
    """grad_output [N, C, H, W] -> grad_values [N, C, Ho, Wo]: grad_output at each arg-max."""
    Ho, Wo = pooled_size
    N, C = grad_output.shape[:2]
    codes = unpack_codes(packed_indices, N * C * Ho * Wo).view(N, C, Ho, Wo, 1)
    # the bits are gathered: torch's gather rewrites bf16 NaNs (0x7FC0 -> 0xFFFF)
    return _windows(bits(grad_output), Ho, Wo, 0).gather(-1, codes).squeeze(-1).view(grad_output.dtype)


def max_pool2x2_backward(grad_values: Tensor, packed_indices: Tensor, input_size) -> Tensor:
    """The gradient of max_pool2x2: each window's gradient at its arg-max."""
    return max_unpool2x2(grad_values, packed_indices, input_size)


# ---- batch norm + ReLU (rules: csrc/common/bn_relu.h) ----

def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_channel(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def bn_stats(x: Tensor):
    """x [N, C, H, W] -> mean, biased var per channel (computed in float64); a channel with
    no elements has mean 0 and var 0."""
    xd = x.double()
    if xd.numel() == 0:
        zeros = torch.zeros(x.shape[1], dtype=_acc(x), device=x.device)
        return zeros, zeros.clone()
    mean, var = xd.mean((0, 2, 3)), xd.var((0, 2, 3), unbiased=False)
    return mean.to(_acc(x)), var.to(_acc(x))


def _fused_multiply_add_sign(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """float64 tensors -> a value with the sign of a * b + c rounded once (exact: Dekker's
    product error, then the sum's), as the kernels' fused multiply-add rounds it; NaN where it is NaN."""
    p = a * b
    split = 134217729.0  # 2**27 + 1: Veltkamp's split into halves whose products are exact
    a_hi = split * a - (split * a - a)
    b_hi = split * b - (split * b - b)
    a_lo, b_lo = a - a_hi, b - b_hi
    e = ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo  # a * b = p + e exactly
    s = p + c
    v = s - p
    t = (p - (s - v)) + (c - v)  # p + c = s + t exactly
    exact = s + (t + e)  # where s cancels, t is 0 and e decides
    return torch.where(torch.isfinite(p), exact, s)  # inf or NaN: no rounding to tell apart


def _passes(x: Tensor, scale: Tensor, shift: Tensor, relu: bool) -> Tensor:
    """Where the ReLU passes: x * scale + shift > 0 as the kernels decide it, rounded once (a
    fused multiply-add), so that a sum within rounding of 0 falls on the kernels' side."""
    if not relu:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    u = _fused_multiply_add_sign(x.to(scale.dtype).double(), _per_channel(scale).double(), _per_channel(shift).double())
    return ~(u <= 0)


def scale_shift_relu(x: Tensor, scale: Tensor, shift: Tensor, relu: bool, residual: Optional[Tensor] = None) -> Tensor:
    u = x.to(scale.dtype) * _per_channel(scale) + _per_channel(shift)
    if residual is not None:
        u = u + residual.to(scale.dtype)
    return (torch.where(u <= 0, torch.zeros_like(u), u) if relu else u).to(x.dtype)


def bn_relu_backward_reduce(grad_y: Tensor, x: Tensor, scale: Tensor, shift: Tensor, mean: Tensor, relu: bool):
    g = torch.where(_passes(x, scale, shift, relu), grad_y.double(), torch.zeros((), dtype=torch.float64))
    centred = x.double() - _per_channel(mean.double())
    return g.sum((0, 2, 3)).to(scale.dtype), (g * centred).sum((0, 2, 3)).to(scale.dtype)


def bn_relu_backward_apply(grad_y, x, scale, shift, mean, k1, k2, k3, relu: bool) -> Tensor:
    acc = scale.dtype
    g = torch.where(_passes(x, scale, shift, relu), grad_y.to(acc), torch.zeros((), dtype=acc))
    dx = _per_channel(k1) * g + _per_channel(k2) * (x.to(acc) - _per_channel(mean)) + _per_channel(k3)
    return dx.to(x.dtype)
