"""The fused pooling layers called exactly as torch's nn.MaxPool2d(return_indices=True) /
nn.MaxUnpool2d are: torch's own test cases, ported to 2x2/stride-2 windows (its OpInfo
samples for max_pool2d / max_unpool2d, test/nn's test_MaxUnpool2d_output_size and
test_max_unpool2d_nhwc), plus every form of output_size torch takes."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck

import segnet_ext
from segnet_ext.nn import MaxPool2x2, MaxUnpool2x2


def torch_pair(ceil_mode):
    return nn.MaxPool2d(2, 2, return_indices=True, ceil_mode=ceil_mode), nn.MaxUnpool2d(2, 2)


def torch_unpool_at(values, indices, input_width, size):
    """torch's unpooling of torch's indices into an output of ``size``: its flat indices are
    h * W_in + w, so they are re-based to the output's width first (what the 2-bit indices,
    relative to their window, mean by construction)."""
    rebased = indices // input_width * size[-1] + indices % input_width
    return F.max_unpool2d(values, rebased, 2, 2, output_size=size)


# torch's _TestParamsMaxPool2d shapes: batch 1, 2 or none; 2 channels; H 3 or 6; W 6; both
# memory formats for 4-D; ceil_mode and return_indices both ways; stride 2 or None.
SAMPLES = [
    (shape, fmt, ceil_mode, stride)
    for batch, H in itertools.product((1, 2, None), (3, 6))
    for shape in [((batch,) if batch else ()) + (2, H, 6)]
    for fmt in ((torch.contiguous_format, torch.channels_last) if len(shape) == 4 else (torch.contiguous_format,))
    for ceil_mode in (True, False)
    for stride in (2, None)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, fmt, ceil_mode, stride", SAMPLES)
def test_opinfo_samples_of_max_pool2d_and_max_unpool2d(shape, fmt, ceil_mode, stride, dtype):
    x = torch.testing.make_tensor(shape, dtype=dtype, device="cpu").contiguous(memory_format=fmt).requires_grad_()
    ref = x.detach().clone().requires_grad_()
    for return_indices in (False, True):
        pool = MaxPool2x2(ceil_mode=ceil_mode, return_indices=return_indices, kernel_size=2, stride=stride)
        want = F.max_pool2d(ref, 2, stride, ceil_mode=ceil_mode, return_indices=return_indices)
        got = pool(input=x)
        torch.testing.assert_close(got[0] if return_indices else got, want[0] if return_indices else want, rtol=0, atol=0)
    values, packed = MaxPool2x2(ceil_mode, True)(x)
    ref_values, ref_indices = F.max_pool2d(ref, 2, 2, ceil_mode=ceil_mode, return_indices=True)
    # as the OpInfo does: output_size = the pooled input's full size
    y = MaxUnpool2x2(2, stride)(input=values, indices=packed, output_size=x.size())
    batched = ref_values if ref_values.dim() == 4 else ref_values[None]
    want = F.max_unpool2d(batched, ref_indices if ref_indices.dim() == 4 else ref_indices[None], 2, 2,
                          output_size=x.shape[-2:])
    want = want if x.dim() == 4 else want[0]
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    assert y.is_contiguous(memory_format=fmt)
    grad = torch.randn_like(y)
    y.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(x.grad, ref.grad, rtol=0, atol=0)


def test_maxunpool2d_output_size():
    # test/nn's test_MaxUnpool2d_output_size with 2x2 windows: a 5x5 input pools to 2x2
    # (default output 4x4); torch accepts 3..5 per dimension (the full 4-D size too) and
    # raises ValueError for the rest, and so do the fused layers, with torch's message.
    small = torch.rand(1, 1, 5, 5)
    for i, j in itertools.product((0, 2), repeat=2):
        small[:, :, i, j] = 100  # the maxima stay inside every output size torch accepts
    values, packed = MaxPool2x2(return_indices=True)(small)
    ref_values, ref_indices = nn.MaxPool2d(2, return_indices=True)(small)
    for h, w in itertools.product(range(1, 10), repeat=2):
        size = (1, 1, h, w) if h == 4 else (h, w)
        if 3 <= h <= 5 and 3 <= w <= 5:
            got = MaxUnpool2x2()(values, packed, output_size=size)
            torch.testing.assert_close(got, torch_unpool_at(ref_values, ref_indices, 5, size), rtol=0, atol=0)
            if w == 5:  # torch's flat indices need no re-basing at the input's own width
                torch.testing.assert_close(got, nn.MaxUnpool2d(2)(ref_values, ref_indices, size), rtol=0, atol=0)
        else:
            with pytest.raises(ValueError) as torch_error:
                nn.MaxUnpool2d(2)(ref_values, ref_indices, size)
            with pytest.raises(ValueError) as ours:
                MaxUnpool2x2()(values, packed, size)
            assert str(ours.value) == str(torch_error.value)


@pytest.mark.parametrize("form", [lambda s: s[-2:], lambda s: s, lambda s: list(s), lambda s: tuple(s),
                                  lambda s: tuple(s[-2:]), lambda s: list(s[-2:])],
                         ids=["Size_hw", "Size_nchw", "list_nchw", "tuple_nchw", "tuple_hw", "list_hw"])
def test_every_form_of_output_size_torch_takes(form):
    x = torch.randn(2, 3, 7, 10)
    values, packed = MaxPool2x2(ceil_mode=True, return_indices=True)(x)
    ref_values, ref_indices = nn.MaxPool2d(2, ceil_mode=True, return_indices=True)(x)
    want = nn.MaxUnpool2d(2)(ref_values, ref_indices, output_size=form(x.size()))
    torch.testing.assert_close(MaxUnpool2x2()(values, packed, output_size=form(x.size())), want, rtol=0, atol=0)
    torch.testing.assert_close(MaxUnpool2x2()(values, packed, form(x.size())), want, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_default_size_and_the_row_past_the_windows(fmt):
    x = torch.randn(2, 3, 8, 10).contiguous(memory_format=fmt)
    values, packed = MaxPool2x2(return_indices=True)(x)
    ref_values, ref_indices = nn.MaxPool2d(2, return_indices=True)(x)
    torch.testing.assert_close(MaxUnpool2x2()(values, packed), nn.MaxUnpool2d(2)(ref_values, ref_indices), rtol=0, atol=0)
    # 2h + 1 rows (torch's upper bound): the last row is zeros; the width stays, so torch's
    # flat indices mean the same positions
    y = MaxUnpool2x2()(values, packed, (9, 10))
    torch.testing.assert_close(y, nn.MaxUnpool2d(2)(ref_values, ref_indices, (9, 10)), rtol=0, atol=0)
    assert y.is_contiguous(memory_format=fmt) and not y[..., 8, :].any()
    y = MaxUnpool2x2()(values, packed, (9, 11))  # one more column too: zeros past the windows
    torch.testing.assert_close(y, torch_unpool_at(ref_values, ref_indices, 10, (9, 11)), rtol=0, atol=0)


def test_gradients_through_the_extra_row_and_column():
    x = torch.randn(1, 2, 5, 7, dtype=torch.float64, requires_grad=True)

    def f(x):
        values, packed = MaxPool2x2(ceil_mode=True, return_indices=True)(x)
        return MaxUnpool2x2()(values, packed, (7, 9))

    assert gradcheck(f, (x,))


def test_max_unpool2d_nhwc():
    # test/nn's test_max_unpool2d_nhwc_cpu with 2x2 windows: channels_last in and out,
    # the values and gradients of the contiguous torch layers
    x = torch.randn(2, 10, 9, 9).contiguous(memory_format=torch.channels_last).requires_grad_()
    ref = x.detach().clone().contiguous().requires_grad_()
    out, packed = MaxPool2x2(return_indices=True)(x)
    ref_out, ref_ind = nn.MaxPool2d(2, return_indices=True)(ref)
    y = MaxUnpool2x2()(out, packed, output_size=x.size())
    ref_y = nn.MaxUnpool2d(2)(ref_out, ref_ind, output_size=ref.size())
    y.sum().backward()
    ref_y.sum().backward()
    assert y.is_contiguous(memory_format=torch.channels_last) and ref_y.is_contiguous()
    torch.testing.assert_close(y, ref_y, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, ref.grad, rtol=0, atol=0)


def test_three_dimensional_inputs():
    x = torch.randn(3, 7, 6)
    values, packed = MaxPool2x2(ceil_mode=True, return_indices=True)(x)
    ref_values, ref_indices = nn.MaxPool2d(2, ceil_mode=True, return_indices=True)(x[None])
    assert values.shape == (3, 4, 3)
    want = nn.MaxUnpool2d(2)(ref_values, ref_indices, (7, 6))[0]
    for size in [(7, 6), torch.Size([7, 6]), [1, 3, 7, 6]]:
        torch.testing.assert_close(MaxUnpool2x2()(values, packed, size), want, rtol=0, atol=0)


def test_indices_of_the_other_kind_are_refused_with_a_clear_error():
    x = torch.randn(1, 2, 6, 6)
    _, torch_indices = nn.MaxPool2d(2, return_indices=True)(x)
    values, packed = MaxPool2x2(return_indices=True)(x)
    with pytest.raises(TypeError, match=r"uint8 packed indices of segnet_ext.nn.MaxPool2x2, got torch.int64 .torch's "
                                        r"nn.MaxPool2d indices: .* segnet_ext.pack_indices"):
        MaxUnpool2x2()(values, torch_indices)
    converted = segnet_ext.pack_indices(torch_indices, (6, 6))
    torch.testing.assert_close(MaxUnpool2x2()(values, converted), nn.MaxUnpool2d(2)(values, torch_indices), rtol=0, atol=0)


@pytest.mark.parametrize("layer, kwargs, message", [
    (MaxPool2x2, {"kernel_size": 3}, "kernel_size must be 2, got 3"),
    (MaxPool2x2, {"stride": 1}, "stride must be 2, got 1"),
    (MaxPool2x2, {"padding": 1}, "padding must be 0, got 1"),
    (MaxPool2x2, {"dilation": 2}, "dilation must be 1, got 2"),
    (MaxUnpool2x2, {"kernel_size": (2, 3)}, r"kernel_size must be 2, got \(2, 3\)"),
    (MaxUnpool2x2, {"stride": 3}, "stride must be 2, got 3"),
])
def test_torch_keywords_other_than_2x2_stride_2_are_refused(layer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        layer(**kwargs)
    layer(**{k: (2 if k in ("kernel_size", "stride") else 0 if k == "padding" else 1) for k in kwargs})  # the 2x2 values pass
