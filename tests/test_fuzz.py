"""Property-based fuzzing (hypothesis) of every op and layer against reference.py and plain
PyTorch: random shapes including 0 and 1, every dtype, ceil and floor mode, ties, NaN and
inf, and random layouts (contiguous, channels_last, transposed, strided slices, storage
offsets, expanded inputs with stride 0). Each case must equal its reference (bit for bit
for pooling, within the dtype's tolerance for arithmetic) or raise the documented error.

Outputs are poisoned: torch's deterministic mode fills every tensor the ops allocate with
NaN (integers with their maximum) before the kernel runs, so an element a kernel forgets
to write differs from the reference. The number of cases run is printed at the end of the
session (conftest.py); SEGNET_FUZZ_EXAMPLES sets the cases per test (default 100)."""
import collections
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import segnet_ext
from segnet_ext import reference

ops = torch.ops.segnet_ext
CASES = collections.Counter()
FUZZ = settings(max_examples=int(os.environ.get("SEGNET_FUZZ_EXAMPLES", "100")), deadline=None,
                suppress_health_check=list(HealthCheck))
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "transposed", "strided", "offset", "expanded"]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True, scope="module")
def poisoned_outputs():
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    assert torch.empty(8).isnan().all(), "torch no longer poisons new tensors in deterministic mode"
    yield
    torch.use_deterministic_algorithms(was)


def arrange(x: torch.Tensor, layout: str, dim: int) -> torch.Tensor:
    """The values of x (or, for "expanded", x broadcast along `dim`) in the given layout."""
    if layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "transposed" and x.dim() >= 2:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":  # every other element of a larger buffer, in every dimension
        big = torch.full([2 * s + 1 for s in x.shape], 7.0, dtype=x.dtype)
        view = big[tuple(slice(1, None, 2) for _ in x.shape)]
        return view.copy_(x)
    if layout == "offset":
        return torch.full((x.numel() + 5,), 7.0, dtype=x.dtype)[5:].view(x.shape).copy_(x)
    if layout == "expanded" and x.shape[dim] > 0:
        return x.narrow(dim, 0, 1).expand(x.shape)
    return x.contiguous()


@st.composite
def tensors(draw, shape, dtype, specials=True):
    """Random values of `shape`: normal, many ties, or with NaN/inf; in a random layout."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["normal", "ties", "special"] if specials else ["normal", "ties"]))
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "ties":
        x = x.mul(2).round()
    if kind == "special":
        pick = torch.randint(0, 10, shape, generator=g)
        x[pick == 0], x[pick == 1], x[pick == 2] = float("nan"), float("inf"), float("-inf")
    dim = draw(st.integers(0, len(shape) - 1))
    return arrange(x.to(dtype), draw(st.sampled_from(LAYOUTS)), dim)


def same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    a, b = reference.bits(got.contiguous()), reference.bits(want.contiguous())
    assert torch.equal(a, b), f"differs at {(a != b).nonzero()[:5].tolist()}"


def close(got, want, dtype=None):
    tol = TOL[dtype or want.dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True)


def pooled(extent: int, ceil_mode: bool) -> int:
    return (extent + 1) // 2 if ceil_mode else extent // 2


sizes = st.integers(0, 3)
extents = st.integers(1, 9)


# ---- pooling ops ----

@FUZZ
@given(data=st.data(), N=sizes, C=sizes, H=extents, W=extents, ceil_mode=st.booleans(), dtype=st.sampled_from(DTYPES))
def test_max_pool2x2(data, N, C, H, W, ceil_mode, dtype):
    CASES["max_pool2x2"] += 1
    x = data.draw(tensors((N, C, H, W), dtype))
    if pooled(H, ceil_mode) == 0 or pooled(W, ceil_mode) == 0:
        with pytest.raises(ValueError, match=r"max_pool2x2: x of shape .* is smaller than the 2x2 window"):
            ops.max_pool2x2(x, ceil_mode)
        return
    values, packed = ops.max_pool2x2(x, ceil_mode)
    want_values, want_packed = reference.max_pool2x2(x, ceil_mode)
    same_bits(values, want_values)
    same_bits(packed, want_packed)


@FUZZ
@given(data=st.data(), N=sizes, C=sizes, Ho=st.integers(1, 5), Wo=st.integers(1, 5), dh=st.integers(-2, 2),
       dw=st.integers(-2, 2), dtype=st.sampled_from(DTYPES), corrupt=st.sampled_from([None, "short", "dtype"]))
def test_max_unpool2x2_and_backward(data, N, C, Ho, Wo, dh, dw, dtype, corrupt):
    CASES["max_unpool2x2 and its backward"] += 1
    H, W = 2 * Ho + dh, 2 * Wo + dw  # valid: 2*Ho - 1 .. 2*Ho + 1
    values = data.draw(tensors((N, C, Ho, Wo), dtype))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    packed = reference.pack_codes(torch.randint(0, 4, (N * C * Ho * Wo,), generator=g))  # codes past a border too
    if corrupt == "short" and packed.numel() == 0:
        corrupt = None  # nothing to cut
    if corrupt == "short":
        packed = packed[:-1]
    elif corrupt == "dtype":
        packed = packed.to(torch.int32)
    fits = abs(dh) <= 1 and abs(dw) <= 1 and H >= 1 and W >= 1
    if corrupt is not None or not fits:
        with pytest.raises((ValueError, TypeError), match=r"max_unpool2x2: (packed_indices|output_size)"):
            ops.max_unpool2x2(values, packed, [H, W])
        return
    same_bits(ops.max_unpool2x2(values, packed, [H, W]), reference.max_unpool2x2(values, packed, (H, W)))
    grad_output = data.draw(tensors((N, C, H, W), dtype))
    same_bits(ops.max_unpool2x2_backward(grad_output, packed, [Ho, Wo]),
              reference.max_unpool2x2_backward(grad_output, packed, (Ho, Wo)))


# ---- BN + ReLU ops ----

def channel_vectors(data, C, acc, count=3):
    """Per-channel float vectors, some of them non-contiguous."""
    out = []
    for _ in range(count):
        v = data.draw(tensors((C,), acc, specials=False))
        out.append(v if C == 0 else v.abs() + 0.1 if len(out) == 0 else v)
    return out


@FUZZ
@given(data=st.data(), N=sizes, C=sizes, H=st.integers(0, 7), W=st.integers(0, 7), dtype=st.sampled_from(DTYPES), relu=st.booleans())
def test_bn_relu_ops(data, N, C, H, W, dtype, relu):
    CASES["bn_stats, scale_shift_relu, bn_relu_backward_reduce/apply"] += 1
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = data.draw(tensors((N, C, H, W), dtype, specials=False)) * 3 + 1
    x = arrange(x, data.draw(st.sampled_from(LAYOUTS)), data.draw(st.integers(0, 3)))
    dy = data.draw(tensors((N, C, H, W), dtype, specials=False))
    scale, shift, mean = channel_vectors(data, C, acc)
    k1, k2, k3 = channel_vectors(data, C, acc)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for got, want in zip(ops.bn_stats(x), reference.bn_stats(x)):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    close(ops.scale_shift_relu(x, scale, shift, relu), reference.scale_shift_relu(x, scale, shift, relu), dtype)
    for got, want in zip(ops.bn_relu_backward_reduce(dy, x, scale, shift, mean, relu),
                         reference.bn_relu_backward_reduce(dy, x, scale, shift, mean, relu)):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(1, x.numel()))
    close(ops.bn_relu_backward_apply(dy, x, scale, shift, mean, k1, k2, k3, relu),
          reference.bn_relu_backward_apply(dy, x, scale, shift, mean, k1, k2, k3, relu), dtype)


@FUZZ
@given(data=st.data(), x=st.sampled_from(["x", "dy"]), C=st.integers(1, 3), dtype=st.sampled_from(DTYPES), relu=st.booleans())
def test_bn_relu_ops_propagate_special_values(data, x, C, dtype, relu):
    # NaN and inf in the activations reach the outputs where the reference puts them
    CASES["BN+ReLU ops with NaN/inf"] += 1
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    xs = data.draw(tensors((2, C, 3, 5), dtype, specials=(x == "x")))
    dy = data.draw(tensors((2, C, 3, 5), dtype, specials=(x == "dy")))
    scale, shift, mean = channel_vectors(data, C, acc)
    got, want = ops.scale_shift_relu(xs, scale, shift, relu), reference.scale_shift_relu(xs, scale, shift, relu)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    k1, k2, k3 = channel_vectors(data, C, acc)
    got = ops.bn_relu_backward_apply(dy, xs, scale, shift, mean, k1, k2, k3, relu)
    want = reference.bn_relu_backward_apply(dy, xs, scale, shift, mean, k1, k2, k3, relu)
    assert torch.equal(got.isnan(), want.isnan())


@FUZZ
@given(data=st.data(), N=st.integers(0, 2), cin=st.integers(1, 4), cout=st.integers(1, 4), H=st.integers(1, 8),
       W=st.integers(1, 8), k=st.sampled_from([1, 3]), stride=st.integers(1, 2), padding=st.integers(0, 2),
       dilation=st.integers(1, 2), groups=st.sampled_from([1, 2]), dtype=st.sampled_from(DTYPES), relu=st.booleans())
def test_conv2d_scale_shift_relu(data, N, cin, cout, H, W, k, stride, padding, dilation, groups, dtype, relu):
    CASES["conv2d_scale_shift_relu"] += 1
    cin, cout = cin * groups, cout * groups
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = data.draw(tensors((N, cin, H, W), dtype, specials=False))
    weight = data.draw(tensors((cout, cin // groups, k, k), dtype, specials=False))
    scale, shift = channel_vectors(data, cout, acc, 2)
    args = ([stride] * 2, [padding] * 2, [dilation] * 2, groups)
    if H + 2 * padding < dilation * (k - 1) + 1 or W + 2 * padding < dilation * (k - 1) + 1:
        with pytest.raises((ValueError, RuntimeError)):
            ops.conv2d_scale_shift_relu(x, weight, scale, shift, *args, relu)
        return
    got = ops.conv2d_scale_shift_relu(x, weight, scale, shift, *args, relu)
    z = F.conv2d(x.to(acc), weight.to(acc), None, stride, padding, dilation, groups)
    want = reference.scale_shift_relu(z, scale, shift, relu).to(dtype)
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * (1 + want.abs().max().item() if want.numel() else 1))


# ---- layers ----

@FUZZ
@given(data=st.data(), N=st.integers(1, 3), C=st.integers(1, 3), H=st.integers(2, 9), W=st.integers(2, 9),
       ceil_mode=st.booleans(), dtype=st.sampled_from(DTYPES))
def test_pool_and_unpool_layers_equal_torch_forward_and_backward(data, N, C, H, W, ceil_mode, dtype):
    CASES["MaxPool2x2 + MaxUnpool2x2 layers"] += 1
    x = data.draw(tensors((N, C, H, W), dtype, specials=False))
    grad = data.draw(tensors((N, C, H, W), dtype, specials=False))
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    values, packed = segnet_ext.nn.MaxPool2x2(ceil_mode, return_indices=True)(ours)
    y = segnet_ext.nn.MaxUnpool2x2()(values, packed, (H, W))
    torch.use_deterministic_algorithms(False)  # torch's max_unpool2d refuses deterministic mode
    try:
        t_values, indices = F.max_pool2d(theirs, 2, 2, ceil_mode=ceil_mode, return_indices=True)
        t_y = F.max_unpool2d(t_values, indices, 2, 2, output_size=(H, W))
        t_y.backward(grad)
    finally:
        torch.use_deterministic_algorithms(True)
    same_bits(values, t_values)
    same_bits(y, t_y)
    y.backward(grad)
    # equal values; the sign of a zero may differ: torch's pooling backward adds each
    # gradient to +0 (so -0 becomes +0), ours puts it in place
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=0, equal_nan=True)


@FUZZ
@given(data=st.data(), N=st.integers(1, 3), cin=st.integers(1, 4), cout=st.integers(1, 5), H=st.integers(1, 7),
       W=st.integers(1, 7), k=st.sampled_from([1, 3]), padding=st.integers(0, 1), bias=st.booleans(), relu=st.booleans(),
       train=st.booleans(), channels_last=st.booleans())
def test_conv_bn_relu_block_equals_the_sequential(data, N, cin, cout, H, W, k, padding, bias, relu, train, channels_last):
    CASES["ConvBNReLU2d (train and eval, forward and backward)"] += 1
    if H + 2 * padding < k or W + 2 * padding < k:
        return
    torch.manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    block = segnet_ext.ConvBNReLU2d(cin, cout, k, 1, padding, bias=bias, relu=relu).double()
    with torch.no_grad():
        block.bn.weight.uniform_(0.5, 2)
        block.bn.bias.normal_()
        block.bn.running_mean.normal_()
        block.bn.running_var.uniform_(0.5, 2)
    plain = nn.Sequential(nn.Conv2d(cin, cout, k, 1, padding, bias=bias), nn.BatchNorm2d(cout),
                          *([nn.ReLU()] if relu else [])).double()
    plain.load_state_dict(block.state_dict())
    block.train(train), plain.train(train)
    x = data.draw(tensors((N, cin, H, W), torch.float64, specials=False))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    Ho, Wo = H + 2 * padding - k + 1, W + 2 * padding - k + 1
    if train and N * Ho * Wo == 1:
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
            block(x)
        return
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, t_y = block(ours), plain(theirs)
    close(y, t_y)
    grad = torch.randn_like(y)
    y.backward(grad)
    t_y.backward(grad)
    close(ours.grad, theirs.grad)
    for (name, p), q in zip(block.named_parameters(), plain.parameters()):
        close(p.grad, q.grad)
    for (name, b), c in zip(block.named_buffers(), plain.buffers()):
        close(b.double(), c.double())


@FUZZ
@given(data=st.data(), N=st.integers(1, 2), cin=st.integers(1, 4), cout=st.integers(1, 4), H=st.integers(1, 6),
       W=st.integers(1, 6), k=st.sampled_from([1, 3]), bias=st.booleans())
def test_recipe_aware_conv2d_equals_nn_conv2d(data, N, cin, cout, H, W, k, bias):
    CASES["segnet_ext.nn.Conv2d"] += 1
    torch.manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    ours = segnet_ext.nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias).double()
    theirs = nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias).double()
    theirs.load_state_dict(ours.state_dict())
    x = data.draw(tensors((N, cin, H, W), torch.float64, specials=False))
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, t_y = ours(a), theirs(b)
    close(y, t_y)
    y.sum().backward()
    t_y.sum().backward()
    close(a.grad, b.grad)
    close(ours.weight.grad, theirs.weight.grad)
