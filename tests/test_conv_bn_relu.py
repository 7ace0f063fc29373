"""The BN+ReLU ops, ConvBNReLU2d against the unfused Sequential, memory (fuse / unfuse: test_fusion.py)."""
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segnet_ext
from segnet_ext import ConvBNReLU2d, aten_conv, fuse, reference, unfuse
from segnet_ext.fused import RECIPE
from bench.common import saved_bytes
from tests.conftest import DEVICES

ops = torch.ops.segnet_ext
FORMATS = [torch.contiguous_format, torch.channels_last]
SHAPES = [(2, 3, 5, 7), (1, 5, 1, 9), (3, 1, 4, 1), (2, 70, 9, 13), (4, 16, 33, 65)]


def special(x: torch.Tensor) -> torch.Tensor:
    flat = x.view(-1)
    flat[:: max(1, flat.numel() // 3)] = float("nan")
    flat[1 :: max(1, flat.numel() // 2)] = float("inf")
    return x


def per_channel_inputs(x, relu=True):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    C = x.shape[1]
    scale, shift, mean = torch.randn(C, dtype=acc), torch.randn(C, dtype=acc), torch.randn(C, dtype=acc)
    return scale, shift, mean


def close(a, b, dtype):
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True)


# ---- the ops against reference.py ----

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_ops_match_the_reference(shape, fmt, dtype):
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 5).to(dtype).contiguous(memory_format=fmt)
    dy = torch.randn(shape, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)
    for got, want in zip(ops.bn_stats(x), reference.bn_stats(x)):  # float32 accumulation: ~1e-5 of the spread
        torch.testing.assert_close(got, want, rtol=1e-12 if dtype == torch.float64 else 5e-5, atol=1e-12 if dtype == torch.float64 else 1e-5)
    scale, shift, mean = per_channel_inputs(x)
    for relu in (True, False):
        y = ops.scale_shift_relu(x, scale, shift, relu)
        assert y.is_contiguous(memory_format=fmt) or x.is_contiguous()
        close(y, reference.scale_shift_relu(x, scale, shift, relu), dtype)
        sums = ops.bn_relu_backward_reduce(dy, x, scale, shift, mean, relu)
        for got, want in zip(sums, reference.bn_relu_backward_reduce(dy, x, scale, shift, mean, relu)):
            torch.testing.assert_close(got, want, rtol=1e-4 if dtype != torch.float64 else 1e-10, atol=1e-3 * x.numel() ** 0.5)
        k1, k2, k3 = per_channel_inputs(x)
        dx = ops.bn_relu_backward_apply(dy, x, scale, shift, mean, k1, k2, k3, relu)
        close(dx, reference.bn_relu_backward_apply(dy, x, scale, shift, mean, k1, k2, k3, relu), dtype)
        # ResNet's add: the residual in the other memory format (read in x's)
        other = torch.channels_last if fmt == torch.contiguous_format else torch.contiguous_format
        residual = torch.randn(shape, dtype=torch.float64).to(dtype).contiguous(memory_format=other)
        y = ops.scale_shift_relu(x, scale, shift, relu, residual)
        assert y.is_contiguous(memory_format=fmt) or x.is_contiguous()
        close(y, reference.scale_shift_relu(x, scale, shift, relu, residual), dtype)


def test_stats_are_stable_for_large_counts_and_offsets():
    x = (torch.randn(4, 3, 360, 480, dtype=torch.float64) * 1e-2 + 1e4).float()
    mean, var = ops.bn_stats(x)
    want_mean, want_var = reference.bn_stats(x)
    torch.testing.assert_close(mean, want_mean, rtol=1e-7, atol=0)
    torch.testing.assert_close(var, want_var, rtol=1e-3, atol=0)  # float32 inputs near 1e4: var ~1e-4
    xcl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ops.bn_stats(xcl)[1], want_var, rtol=1e-3, atol=0)


def test_special_values_propagate():
    x = special(torch.randn(2, 3, 4, 5))
    scale, shift, mean = per_channel_inputs(x)
    y = ops.scale_shift_relu(x, scale, shift, True)
    assert torch.equal(torch.isnan(y), torch.isnan(reference.scale_shift_relu(x, scale, shift, True)))
    residual = special(torch.randn(2, 3, 4, 5)).flip(-1).contiguous()  # NaN and inf elsewhere than x's
    y = ops.scale_shift_relu(x, scale, shift, True, residual)
    want = reference.scale_shift_relu(x, scale, shift, True, residual)
    torch.testing.assert_close(y, want, equal_nan=True)
    assert torch.isnan(y).any() and torch.isinf(y).any()
    mean_x, var_x = ops.bn_stats(x)
    assert torch.isnan(mean_x).all()  # every channel has a NaN in it here


def test_op_errors_name_the_argument():
    x = torch.randn(2, 3, 4, 5)
    ok = torch.randn(3)
    with pytest.raises(ValueError, match=r"scale_shift_relu: scale must have shape \[C\] = \[3\]"):
        ops.scale_shift_relu(x, torch.randn(4), ok, True)
    with pytest.raises(TypeError, match="scale_shift_relu: shift must be Float for Float x, got Double"):
        ops.scale_shift_relu(x, ok, ok.double(), True)
    with pytest.raises(ValueError, match=r"scale_shift_relu: residual must have the shape of x \[2, 3, 4, 5\], got \[2, 3, 4, 1\]"):
        ops.scale_shift_relu(x, ok, ok, True, torch.randn(2, 3, 4, 1))
    with pytest.raises(TypeError, match=r"scale_shift_relu: residual must have the dtype of x \(Float\), got Double"):
        ops.scale_shift_relu(x, ok, ok, True, x.double())
    with pytest.raises(ValueError, match="bn_stats: x must be a 4-D tensor"):
        ops.bn_stats(torch.randn(3, 4))
    with pytest.raises(TypeError, match="bn_stats: x must be float32, float64, float16 or bfloat16, got Int"):
        ops.bn_stats(torch.ones(1, 2, 3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"grad_y must have the shape of x \[2, 3, 4, 5\]"):
        ops.bn_relu_backward_reduce(torch.randn(2, 3, 4, 4), x, ok, ok, ok, True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck(fmt):
    x = torch.randn(2, 3, 5, 6).contiguous(memory_format=fmt)
    scale, shift, mean = per_channel_inputs(x)
    dy = torch.randn_like(x)
    torch.library.opcheck(ops.bn_stats, (x,))
    torch.library.opcheck(ops.scale_shift_relu, (x, scale, shift, True))
    torch.library.opcheck(ops.scale_shift_relu, (x, scale, shift, True, torch.randn(2, 3, 5, 6)))
    torch.library.opcheck(ops.bn_relu_backward_reduce, (dy, x, scale, shift, mean, True))
    torch.library.opcheck(ops.bn_relu_backward_apply, (dy, x, scale, shift, mean, scale, shift, mean, False))


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("fmt", FORMATS)
def test_scale_shift_relu_is_differentiable(relu, with_residual, fmt):
    """Its registered autograd (the op is public: any model may train through it) against gradcheck
    and against the reference's autograd, with values at the ReLU's kink (u == 0)."""
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64).contiguous(memory_format=fmt)
    scale, shift, _ = per_channel_inputs(x)
    residual = torch.randn_like(x) if with_residual else None
    shift[0] = 0.0
    x[:, 0, ::2] = 0.0  # u == 0 exactly, however it is rounded
    if with_residual:
        residual[:, 0, ::2] = 0.0
    leaves = [t.requires_grad_() for t in (x, scale, shift) + ((residual,) if with_residual else ())]
    fn = lambda x, scale, shift, *r: ops.scale_shift_relu(x, scale, shift, relu, *r)
    dy = torch.randn_like(x)
    got = torch.autograd.grad(fn(*leaves), leaves, dy)
    want = torch.autograd.grad(reference.scale_shift_relu(x, scale, shift, relu, residual), leaves, dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    smooth = [t.detach().clone().requires_grad_() for t in leaves]
    with torch.no_grad():  # gradcheck's finite differences: every u at least 0.05 from the kink
        per_channel = lambda v: v.view(1, -1, 1, 1)
        u = x * per_channel(scale) + per_channel(shift) + (residual if with_residual else 0)
        smooth[0].add_(torch.where(u.abs() < 0.05, torch.where(u < 0, -0.1, 0.1) / per_channel(scale), 0.0))
    torch.autograd.gradcheck(fn, smooth)
    torch.library.opcheck(ops.scale_shift_relu, (*leaves[:3], relu, *leaves[3:]))


# ---- ConvBNReLU2d against nn.Sequential(Conv2d, BatchNorm2d, ReLU) ----

def pair(cin, cout, dtype=torch.float64, relu=True, **kw):
    bn_kw = {k: kw.pop(k) for k in ("eps", "momentum", "affine", "track_running_stats") if k in kw}
    seq = nn.Sequential(nn.Conv2d(cin, cout, kw.pop("kernel_size", 3), kw.pop("stride", 1), kw.pop("padding", 1),
                                  bias=kw.pop("bias", True)),
                        nn.BatchNorm2d(cout, **bn_kw), *([nn.ReLU()] if relu else []))
    with torch.no_grad():
        for m in seq.modules():
            if isinstance(m, nn.BatchNorm2d) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    seq = seq.to(dtype)
    block = ConvBNReLU2d.from_modules(copy.deepcopy(seq[0]), copy.deepcopy(seq[1]), relu=relu)
    return seq, block


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("options", [
    dict(), dict(relu=False), dict(bias=False), dict(momentum=None), dict(affine=False),
    dict(kernel_size=1, padding=0), dict(stride=2, kernel_size=3, padding=1), dict(track_running_stats=False),
])
def test_block_equals_the_sequential(dtype, tol, fmt, options):
    seq, block = pair(3, 6, dtype, **dict(options))
    for step in range(3):  # several steps: running statistics and num_batches_tracked too
        x = (torch.randn(2 + step, 3, 7 + step, 9, dtype=dtype) * 2 + 1).contiguous(memory_format=fmt)
        xs, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ys, yb = seq(xs), block(xb)
        torch.testing.assert_close(yb, ys, rtol=tol, atol=tol)
        assert yb.is_contiguous(memory_format=fmt)
        g = torch.randn_like(ys)
        ys.backward(g)
        yb.backward(g)
        torch.testing.assert_close(xb.grad, xs.grad, rtol=tol * 10, atol=tol * 10)
        for (name, p), q in zip(seq.named_parameters(), block.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=tol * 10, atol=tol * 100, msg=name)
        assert seq.state_dict().keys() == block.state_dict().keys()
        for k, v in seq.state_dict().items():
            torch.testing.assert_close(block.state_dict()[k], v, rtol=tol, atol=tol, msg=k)
    seq.eval(), block.eval()
    x = torch.randn(2, 3, 8, 5, dtype=dtype).contiguous(memory_format=fmt)
    with torch.no_grad():
        torch.testing.assert_close(block(x), seq(x), rtol=tol * 10, atol=tol * 10)


def test_gradcheck():
    block = ConvBNReLU2d(2, 3).double()
    x = torch.randn(3, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    params = [block.conv.weight, block.conv.bias, block.bn.weight, block.bn.bias]
    fn = lambda x, w, b, g, h: segnet_ext.fused.ConvBNReLUFunction.apply(x, w, b, g, h, None, block._conv_args(), 1e-5, True, None)[0]
    torch.autograd.gradcheck(fn, (x, *params))
    fn_conv_bn = lambda x, w, b, g, h: segnet_ext.fused.ConvBNReLUFunction.apply(x, w, b, g, h, None, block._conv_args(), 1e-5, False, None)[0]
    torch.autograd.gradcheck(fn_conv_bn, (x, *params))
    # ResNet's block end, relu(bn(conv(x)) + residual), and without the ReLU
    residual = torch.randn(3, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    for relu in (True, False):
        fn_residual = lambda x, w, b, g, h, r: segnet_ext.fused.ConvBNReLUFunction.apply(
            x, w, b, g, h, r, block._conv_args(), 1e-5, relu, None)[0]
        torch.autograd.gradcheck(fn_residual, (x, *params, residual))


def test_state_dict_loads_both_ways():
    seq, block = pair(4, 5)
    fresh = ConvBNReLU2d(4, 5).double()
    fresh.load_state_dict(seq.state_dict())
    seq2 = copy.deepcopy(seq)
    seq2.load_state_dict(fresh.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(seq2.state_dict().values(), seq.state_dict().values()))


def test_batch_of_one_pixel_raises_like_torch():
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        ConvBNReLU2d(3, 4)(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match="expects 3 input channels, got 2"):
        ConvBNReLU2d(3, 4)(torch.randn(2, 2, 4, 4))


def test_eval_fold_is_cached_and_invalidated():
    block = ConvBNReLU2d(3, 4).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        y1 = block(x)
        cached = block._folded
        assert block(x) is not None and block._folded is cached
        block.bn.running_var.mul_(4)  # a buffer changes: the fold must follow
        y2 = block(x)
    assert block._folded is not cached
    seq = unfuse(copy.deepcopy(block)).eval()
    with torch.no_grad():
        torch.testing.assert_close(y2, seq(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(y1, y2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_eval_in_every_dtype_matches_the_sequential(device, fmt, dtype):
    """Low-precision inference on any CPU: on one without AVX-512 BF16, oneDNN's fused
    convolution refuses bfloat16, and the fused layer must take another path."""
    seq = nn.Sequential(nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU())
    with torch.no_grad():
        seq[1].running_mean.uniform_(-1, 1)
        seq[1].running_var.uniform_(0.5, 2)
    block = fuse(copy.deepcopy(seq))
    seq, block = (m.to(device, dtype).to(memory_format=fmt).eval() for m in (seq, block))
    x = torch.randn(2, 6, 9, 11, device=device, dtype=dtype).contiguous(memory_format=fmt)
    with torch.no_grad():
        tol = 1e-5 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(block(x), seq(x), rtol=tol, atol=tol)


# ---- memory: the output is recomputed, not stored ----

@pytest.mark.parametrize("fmt", FORMATS)
def test_chain_saves_one_activation_per_block_and_gradients_match(fmt):
    torch.manual_seed(0)
    seqs = [pair(8, 8, torch.float32)[0] for _ in range(4)]
    for s in seqs:
        s[2] = nn.ReLU(inplace=True)
    plain = nn.Sequential(*seqs, nn.MaxPool2d(2, 2))
    fused_model = fuse(copy.deepcopy(plain))
    assert all(isinstance(fused_model[i], ConvBNReLU2d) for i in range(4))
    x = torch.randn(2, 8, 32, 48).contiguous(memory_format=fmt)
    activation = x.numel() * 4
    plain_bytes, yp = saved_bytes(lambda: plain(x.clone().requires_grad_()))
    xf = x.clone().requires_grad_()
    fused_bytes, yf = saved_bytes(lambda: fused_model(xf))
    assert fused_bytes <= 4.2 * activation + activation  # one z per block + the input
    assert fused_bytes <= 0.6 * plain_bytes
    torch.testing.assert_close(yf, yp, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(yp)
    yf.backward(g)
    xp = x.clone().requires_grad_()
    plain(xp).backward(g)
    torch.testing.assert_close(xf.grad, xp.grad, rtol=1e-4, atol=1e-5)
    # conv-bias gradients are 0 in exact arithmetic (train-mode BN cancels them): compare
    # all gradients at 1e-5 of the largest one
    scale = max(p.grad.abs().max().item() for p in plain.parameters())
    for (name, p), q in zip(plain.named_parameters(), fused_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_recomputation_is_bit_identical_and_respects_in_place_changes():
    # float64: what is checked is which tensor the next block saves; in float32 the weight
    # gradient's sum cancels to ~1e-2 on some seeds and differs by 2e-5 (SEGNET_TEST_SEED=391759250)
    a, b = ConvBNReLU2d(3, 4).double(), ConvBNReLU2d(4, 4).double()
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    y = a(x)
    assert torch.equal(getattr(y, RECIPE).recompute(), y)
    # modified in place after the block: the next block must save the modified tensor
    y2 = a(x)
    y2.mul_(2)
    out = b(y2)
    out.sum().backward()
    ref_a, ref_b = unfuse(copy.deepcopy(a)), unfuse(copy.deepcopy(b))
    xr = x.detach().clone().requires_grad_()
    yr = ref_a(xr)
    yr = yr * 2
    ref_b(yr).sum().backward()
    torch.testing.assert_close(b.conv.weight.grad, ref_b[0].weight.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_block_runs_on_every_device(device):
    block = ConvBNReLU2d(3, 4).to(device)
    y = block(torch.randn(2, 3, 5, 5, device=device))
    y.sum().backward()
    assert block.conv.weight.grad is not None


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("geometry", [dict(), dict(stride=[2, 1], padding=[0, 2], dilation=[1, 2])])
def test_conv_epilogue_op(fmt, geometry):
    x = torch.randn(2, 4, 9, 10).contiguous(memory_format=fmt)
    w, scale, shift = torch.randn(6, 4, 3, 3), torch.randn(6), torch.randn(6)
    args = [geometry.get("stride", [1, 1]), geometry.get("padding", [1, 1]), geometry.get("dilation", [1, 1]), 1]
    y = ops.conv2d_scale_shift_relu(x, w, scale, shift, *args, True)
    want = (F.conv2d(x, w, None, *args) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).clamp_min(0)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=fmt)
    torch.library.opcheck(ops.conv2d_scale_shift_relu, (x, w, scale, shift, *args, False))
    with pytest.raises(ValueError, match="x has 4 channels but weight of shape"):
        ops.conv2d_scale_shift_relu(x, torch.randn(6, 3, 3, 3), scale, shift, *args, True)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("geometry", [dict(), dict(stride=[2, 1], padding=[0, 2], dilation=[1, 2], groups=2)])
def test_conv_bn_stats_op(fmt, dtype, geometry):
    x = torch.randn(2, 4, 9, 10).to(dtype).contiguous(memory_format=fmt)
    groups = geometry.get("groups", 1)
    w, b = torch.randn(6, 4 // groups, 3, 3).to(dtype), torch.randn(6).to(dtype)
    args = [geometry.get("stride", [1, 1]), geometry.get("padding", [1, 1]), geometry.get("dilation", [1, 1]), groups]
    for bias in (b, None):
        z, mean, var = ops.conv2d_bn_stats(x, w, bias, *args)
        want = F.conv2d(x, w, bias, *args)
        torch.testing.assert_close(z, want, rtol=0, atol=0)
        assert z.is_contiguous(memory_format=fmt)
        for got, ref in zip((mean, var), reference.bn_stats(want)):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        torch.library.opcheck(ops.conv2d_bn_stats, (x, w, bias, *args))
    with pytest.raises(ValueError, match=r"bias must have shape \[Cout\] = \[6\], got \[5\]"):
        ops.conv2d_bn_stats(x, w, b[:5], *args)
    with pytest.raises(TypeError, match="bias must have the dtype of x"):
        ops.conv2d_bn_stats(x, w, b.to(torch.float16), *args)


# ---- the geometries oneDNN gets wrong (segnet_ext/aten_conv.py) ----

# (C, H, W, kernel, stride, padding, dilation). BLIND: along one dimension every tap of
# every output falls in the zero padding; each killed the process in torch's own bfloat16
# or float16 F.conv2d, forward or backward (oneDNN reads through a null pointer). ONE_OUTPUT:
# a strided dimension with one output; torch's bfloat16 F.conv2d returned garbage (1e19) for
# each of the first four (along the width), and garbage weight gradients for some; the last
# checks the rewrite along the height. Both in torch 2.14 on a Xeon with AMX; the first
# found by test_fuzz.py under the sanitizers, the second by a sweep against float64.
BLIND = [(4, 5, 1, 1, 2, 1, 2), (4, 3, 1, 1, 2, 1, 3), (4, 1, 5, 2, 1, 2, 3), (4, 1, 8, 2, 2, 2, 3),
         (4, 2, 3, 2, 1, 1, 3)]
ONE_OUTPUT = [(16, 8, 1, 2, 2, 1, 1), (16, 24, 1, 3, 2, 1, 1), (16, 64, 3, 3, 2, 0, 1), (64, 24, 2, 3, 2, 2, 2),
              (16, 1, 33, 3, 2, 1, 1)]


def test_rewrite_finds_exactly_the_geometries_to_rewrite():
    rewritten = 0
    for size, k, s, p, d in itertools.product(range(1, 6), range(1, 4), range(1, 4), range(3), range(1, 4)):
        out = (size + 2 * p - d * (k - 1) - 1) // s + 1
        if out < 1:
            continue
        blind = not any(0 <= o * s - p + j * d < size for o in range(out) for j in range(k))
        restride = out == 1 and s > 1
        rewritten += blind or restride
        for dim in (0, 1):  # along the height, then the width (the other dimension is plain)
            def along(v, other):
                return (v, other) if dim == 0 else (other, v)
            x, w = torch.empty(1, 1, *along(size, 4)), torch.empty(1, 1, *along(k, 1))
            got = aten_conv.rewrite(x, w, along(s, 1), along(p, 0), along(d, 1))
            want = aten_conv.Rewrite(along(p, 0) if blind else None, along(1 if restride else s, 1), along(out, 4))
            assert got == (want if blind or restride else None), (size, k, s, p, d, dim)
    assert rewritten >= 40  # the sweep has some of each kind


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mask", [m for m in itertools.product([False, True], repeat=3) if any(m)])
def test_convolution_backward_takes_the_weight_gradients_and_then_the_input_gradient(mask, fmt):
    """aten_conv.convolution_backward returns ATen's gradients, asking ATen for the weight (and
    bias) gradients and for the input gradient in separate calls, the weight's first: ATen's
    oneDNN backward holds the working copies of both at once when asked for both."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Masks(TorchDispatchMode):
        asked = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution_backward.default:
                Masks.asked.append(list(args[-1]))
            return func(*args, **(kwargs or {}))

    x, w = torch.randn(2, 5, 9, 11).contiguous(memory_format=fmt), torch.randn(6, 5, 3, 3)
    grad = torch.randn(2, 6, 5, 6).contiguous(memory_format=fmt)
    args = [2, 2], [1, 1], [1, 1]
    want = torch.ops.aten.convolution_backward(grad, x, w, [6], *args, False, [0, 0], 1, list(mask))
    with Masks():
        got = aten_conv.convolution_backward(grad, x, w, [6], *args, 1, list(mask))
    for g, t in zip(got, want):
        assert (g is None) == (t is None) and (g is None or torch.equal(g, t))
    weights = [False, mask[1], mask[2]]
    assert Masks.asked == ([weights, [True, False, False]] if mask[0] and any(weights) else [list(mask)])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("geometry", BLIND + ONE_OUTPUT)
def test_geometries_that_onednn_gets_wrong(fmt, dtype, geometry):
    C, H, W, k, s, p, d = geometry
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    x = torch.randn(2, C, H, W).to(dtype).contiguous(memory_format=fmt)
    w, b = torch.randn(8, C, k, k).to(dtype), torch.randn(8).to(dtype)
    args = [[s, s], [p, p], [d, d], 1]
    # float64: ATen's own kernel, not oneDNN; tolerances relative to the sum of magnitudes
    want = F.conv2d(x.double(), w.double(), b.double(), *args)
    magnitude = F.conv2d(x.double().abs(), w.double().abs(), b.double().abs(), *args) + 1

    def check(got, want, magnitude):
        assert got.shape == want.shape
        assert ((got.double() - want).abs() <= tol * magnitude).all(), (got - want).abs().max()
    # the ops
    z, mean, var = ops.conv2d_bn_stats(x, w, b, *args)
    check(z, want, magnitude)
    assert z.is_contiguous(memory_format=fmt)
    scale, shift = torch.rand(8) + 0.5, torch.randn(8)
    y = ops.conv2d_scale_shift_relu(x, w, scale, shift, *args, False)
    per_channel = [v.double().view(1, -1, 1, 1) for v in (b, scale, shift)]
    check(y, (want - per_channel[0]) * per_channel[1] + per_channel[2], magnitude * 2 + per_channel[2].abs())
    assert y.is_contiguous(memory_format=fmt)
    # the layers, training (forward and backward) and inference (BN folded into the convolution),
    # against torch's in float64: a conv-BN of this geometry, and an nn.Conv2d of it behind a
    # 3x3 conv-BN (so that its input has a recipe and it takes segnet_ext's own backward).
    # No ReLU: in bfloat16 a value near 0 may fall on the other side of its kink and move a
    # gradient by a whole term. (A blind convolution's output is constant per channel: eps=1
    # keeps its BN's backward, which divides by sqrt(var + eps), well conditioned.)
    theirs = nn.ModuleList([nn.Sequential(nn.Conv2d(C, 8, k, s, p, d), nn.BatchNorm2d(8, eps=1.0)),
                            nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C),
                                          nn.Conv2d(C, 8, k, s, p, d))]).double()
    ours = segnet_ext.nn.Conv2d(C, 8, k, s, p, d)
    ours.load_state_dict(theirs[1][2].state_dict())
    ours = nn.ModuleList([ConvBNReLU2d.from_modules(*copy.deepcopy(theirs[0]), relu=False),
                          nn.Sequential(ConvBNReLU2d.from_modules(*copy.deepcopy(theirs[1][:2]), relu=False), ours)])
    ours = ours.to(dtype).to(memory_format=fmt)
    for train in (True, False):
        ours.train(train), theirs.train(train)
        xo, xt = x.clone().requires_grad_(train), x.double().requires_grad_(train)
        with torch.set_grad_enabled(train):
            got, want = [m(xo) for m in ours], [m(xt) for m in theirs]
        for g, t in zip(got, want):
            torch.testing.assert_close(g.double(), t, rtol=tol * 10, atol=tol * 10)
        if train:
            weights = [torch.randn_like(t) for t in want]
            sum((g.double() * r).sum() for g, r in zip(got, weights)).backward()
            sum((t * r).sum() for t, r in zip(want, weights)).backward()
            torch.testing.assert_close(xo.grad.double(), xt.grad, rtol=tol * 10, atol=tol * 10)
            for q, r in zip(ours.parameters(), theirs.parameters()):
                atol = tol * 10 * (1 + r.grad.abs().max())
                torch.testing.assert_close(q.grad.double(), r.grad, rtol=tol * 10, atol=atol)


# ---- the CPU's Winograd F(2x2, 3x3) path of conv2d_scale_shift_relu ----

def direct_epilogue(x, w, scale, shift, relu):
    """float64 direct convolution + epilogue, and what a Winograd F(2x2, 3x3) rounding error is
    proportional to: the transforms mix every input of an output's 4x4 tile with every tap of
    its filter, so the bound is sum over channels of (sum |x| over the 5x5 neighbourhood that
    holds either parity's tile) * (sum |w| over the 3x3 taps), times |scale|."""
    xd, wd = x.double(), w.double()
    z = F.conv2d(xd, wd, None, 1, 1)
    cin = x.shape[1]
    tile_sum = F.conv2d(xd.abs(), xd.new_ones(cin, 1, 5, 5), None, 1, 2, 1, cin) if cin else xd.abs()
    bound = F.conv2d(tile_sum, wd.abs().sum((2, 3), keepdim=True)) * scale.double().abs().view(1, -1, 1, 1)
    return reference.scale_shift_relu(z, scale.double(), shift.double(), relu), bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (2, 3, 5, 2, 3), (1, 17, 19, 7, 9), (3, 16, 16, 1, 8),
                                   (1, 8, 4, 6, 1), (0, 4, 4, 3, 3), (2, 5, 3, 11, 130), (1, 4, 4, 3, 1101),
                                   (1, 200, 256, 3, 131)])
def test_winograd_equals_the_direct_convolution(dtype, fmt, shape):
    N, cin, cout, H, W = shape  # the last two: several blocks per tile row
    x = torch.randn(N, cin, H, W, dtype=dtype).contiguous(memory_format=fmt)
    w = torch.randn(cout, cin, 3, 3, dtype=dtype)
    scale, shift = torch.rand(cout, dtype=dtype) + 0.5, torch.randn(cout, dtype=dtype)
    for relu in (True, False):
        y = ops.conv2d_scale_shift_relu(x, w, scale, shift, [1, 1], [1, 1], [1, 1], 1, relu)
        want, bound = direct_epilogue(x, w, scale, shift, relu)
        assert y.dtype == dtype and y.shape == want.shape and (y.is_contiguous(memory_format=fmt) or not y.numel())
        eps = torch.finfo(dtype).eps
        err = (y.double() - want).abs()
        assert (err <= 8 * eps * (bound + shift.double().abs().view(1, -1, 1, 1))).all(), err.max()


def test_winograd_with_no_input_channels_gives_the_shift():
    x, w = torch.randn(2, 0, 5, 6), torch.randn(3, 0, 3, 3)
    scale, shift = torch.rand(3), torch.randn(3)
    y = ops.conv2d_scale_shift_relu(x, w, scale, shift, [1, 1], [1, 1], [1, 1], 1, False)
    torch.testing.assert_close(y, shift.view(1, 3, 1, 1).expand(2, 3, 5, 6), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_winograd_propagates_nan_and_inf_to_every_output_they_reach(fmt):
    # Every output the direct convolution makes non-finite is non-finite; outputs whose 2x2
    # tile reads only finite inputs are unchanged. (Within a tile that reads one, an output
    # may be NaN where the direct convolution gives a number or inf, as in any Winograd
    # convolution, cuDNN's and oneDNN's included.)
    torch.manual_seed(0)
    x = torch.randn(1, 16, 12, 14)
    x[0, 3, 5, 6], x[0, 7, 0, 13], x[0, 1, 11, 0] = float("nan"), float("inf"), float("-inf")
    x = x.contiguous(memory_format=fmt)
    w, scale, shift = torch.randn(16, 16, 3, 3), torch.rand(16) + 0.5, torch.randn(16)
    y = ops.conv2d_scale_shift_relu(x, w, scale, shift, [1, 1], [1, 1], [1, 1], 1, False)
    want, _ = direct_epilogue(x, w, scale, shift, False)
    assert (~torch.isfinite(y))[~torch.isfinite(want)].all()
    bad = (~torch.isfinite(x)).any(1, keepdim=True).double()
    patch_bad = F.max_pool2d(F.pad(bad, (1, 1, 1, 1)), 4, 2)  # tile (i, j) reads input rows 2i-1 .. 2i+2
    tile_bad = F.interpolate(patch_bad, scale_factor=2)[..., :12, :14].bool().expand_as(y)
    assert tile_bad.any() and not tile_bad.all()
    torch.testing.assert_close(y[~tile_bad], want[~tile_bad].float(), rtol=1e-5, atol=1e-4)


def test_eval_uses_winograd_where_it_pays_off():
    from segnet_ext.fused import winograd_pays_off

    args = ((1, 1), (1, 1), (1, 1), 1)
    assert winograd_pays_off(torch.empty(1, 64, 8, 64), torch.empty(64, 64, 3, 3), args)
    assert not winograd_pays_off(torch.empty(1, 3, 8, 64), torch.empty(64, 3, 3, 3), args)  # too few channels
    assert not winograd_pays_off(torch.empty(1, 512, 8, 64), torch.empty(512, 512, 3, 3), args)  # U too large
    assert not winograd_pays_off(torch.empty(1, 64, 8, 32), torch.empty(64, 64, 3, 3), args)  # rows too short
    assert not winograd_pays_off(torch.empty(1, 64, 8, 64, dtype=torch.bfloat16),
                                 torch.empty(64, 64, 3, 3, dtype=torch.bfloat16), args)
    assert not winograd_pays_off(torch.empty(1, 64, 8, 64), torch.empty(64, 64, 3, 3), ((2, 2), (1, 1), (1, 1), 1))
    block = ConvBNReLU2d(32, 32).eval()
    x = torch.randn(2, 32, 9, 70)
    with torch.no_grad():
        block.bn.running_mean.uniform_(-1, 1)
        block.bn.running_var.uniform_(0.5, 2)
        plain = unfuse(copy.deepcopy(block))
        torch.testing.assert_close(block(x), plain(x), rtol=1e-5, atol=1e-5)
