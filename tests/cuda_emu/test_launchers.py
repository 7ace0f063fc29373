"""The CUDA ops of csrc/cuda/*.cu, host code included: run on CPU tensors against the CUDA
runtime shim (tests/cuda_emu/shim/), so their argument checks, layouts, empty-tensor paths,
guards and launch checks are tested, not only compiled; and the per-shape choice between
our convolution kernel and cuDNN (csrc/common/kernel_choice.h), timed by a fake timer."""
import re

import pytest
import torch

import segnet_ext

ops = torch.ops.segnet_ext
FORMATS = [torch.contiguous_format, torch.channels_last]
CONV_ARGS = ([1, 1], [1, 1], [1, 1], 1)


@pytest.fixture
def launcher(emu, monkeypatch):
    monkeypatch.delenv("SEGNET_EXT_CONV", raising=False)
    emu.clear_kernel_choices()
    emu.take_recording()
    yield emu
    emu.set_block_order("forward")


def check_launches_are_guarded_and_checked(events):
    """A guard before the first launch; every launch followed, before the op returns, by a launch check."""
    launches = [i for i, e in enumerate(events) if e.startswith("launch_")]
    assert launches, events
    assert events[0].startswith("guard "), events
    for i in launches:
        assert "launch check" in events[i + 1:], f"launch {events[i]!r} is never checked: {events}"


def randn(shape, dtype, fmt=torch.contiguous_format):
    return torch.randn(shape, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("order", ["forward", "reverse", "shuffled"])
def test_pool_ops_launch_as_the_cpu_ops_compute(launcher, dtype, fmt, order):
    launcher.set_block_order(order)
    x = randn((2, 37, 9, 13), dtype, fmt)
    for ceil_mode in (False, True):
        values, packed = launcher.cuda_max_pool2x2(x, ceil_mode)
        check_launches_are_guarded_and_checked(launcher.take_recording())
        want_values, want_packed = ops.max_pool2x2(x, ceil_mode)
        assert torch.equal(values, want_values) and torch.equal(packed, want_packed)
        assert values.is_contiguous(memory_format=fmt)
        y = launcher.cuda_max_unpool2x2(values, packed, [9, 13])
        check_launches_are_guarded_and_checked(launcher.take_recording())
        assert torch.equal(y, ops.max_unpool2x2(values, packed, [9, 13]))
        g = launcher.cuda_max_unpool2x2_backward(y, packed, list(values.shape[2:]))
        assert torch.equal(g, ops.max_unpool2x2_backward(y, packed, list(values.shape[2:])))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_bn_relu_ops_launch_as_the_cpu_ops_compute(launcher, dtype, fmt):
    x, dy = randn((3, 33, 5, 7), dtype, fmt), randn((3, 33, 5, 7), dtype, fmt)
    scale, shift, mean, k1, k2, k3 = (torch.randn(33) for _ in range(6))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    for got, want in zip(launcher.cuda_bn_stats(x), ops.bn_stats(x)):
        torch.testing.assert_close(got, want, **tol)
    check_launches_are_guarded_and_checked(launcher.take_recording())
    residual = randn(x.shape, dtype)
    got = launcher.cuda_scale_shift_relu(x, scale, shift, True, residual)
    check_launches_are_guarded_and_checked(launcher.take_recording())
    torch.testing.assert_close(got, ops.scale_shift_relu(x, scale, shift, True, residual), **tol)
    assert got.is_contiguous(memory_format=fmt)
    for got, want in zip(launcher.cuda_bn_relu_backward_reduce(dy, x, scale, shift, mean, True),
                         ops.bn_relu_backward_reduce(dy, x, scale, shift, mean, True)):
        torch.testing.assert_close(got, want, **tol)
    got = launcher.cuda_bn_relu_backward_apply(dy, x, scale, shift, mean, k1, k2, k3, True)
    torch.testing.assert_close(got, ops.bn_relu_backward_apply(dy, x, scale, shift, mean, k1, k2, k3, True), **tol)


def test_empty_tensors_launch_nothing(launcher):
    x = torch.randn(0, 4, 6, 6)
    values, packed = launcher.cuda_max_pool2x2(x, False)
    assert values.shape == (0, 4, 3, 3) and packed.numel() == 0
    assert launcher.cuda_scale_shift_relu(x, torch.ones(4), torch.zeros(4), True, None).shape == x.shape
    mean, var = launcher.cuda_bn_stats(torch.randn(2, 0, 3, 3))
    assert mean.shape == var.shape == (0,)
    y = launcher.cuda_conv2d_scale_shift_relu(x, torch.randn(5, 4, 3, 3), torch.ones(5), torch.zeros(5),
                                              *CONV_ARGS, True)
    assert y.shape == (0, 5, 6, 6) and launcher.timings() == 0
    assert not [e for e in launcher.take_recording() if e.startswith("launch_")]


@pytest.mark.parametrize("call, message", [
    (lambda e: e.cuda_max_pool2x2(torch.randn(4, 6, 6), False), "4-D"),
    (lambda e: e.cuda_max_unpool2x2(torch.randn(1, 2, 3, 3), torch.zeros(4, dtype=torch.uint8), [6, 6]),
     "packed_indices"),
    (lambda e: e.cuda_scale_shift_relu(torch.randn(1, 3, 2, 2), torch.ones(4), torch.zeros(3), True, None),
     "scale must have shape"),
    (lambda e: e.cuda_conv2d_scale_shift_relu(torch.randn(1, 3, 5, 5), torch.randn(4, 2, 3, 3), torch.ones(4),
                                              torch.zeros(4), *CONV_ARGS, True), "channels"),
])
def test_cuda_ops_reject_bad_arguments_as_the_cpu_ops_do(launcher, call, message):
    with pytest.raises((ValueError, RuntimeError), match=message):
        call(launcher)
    assert not [e for e in launcher.take_recording() if e.startswith("launch_")]


# ---- the per-shape choice between our convolution and cuDNN ----

def conv_inputs(dtype=torch.float32, fmt=torch.channels_last, cin=8, cout=6):
    x = randn((2, cin, 7, 9), dtype, fmt)
    w = randn((cout, cin, 3, 3), dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return x, w, torch.rand(cout, dtype=acc) + 0.5, torch.randn(cout, dtype=acc)


def ran(events):
    """Which convolution produced the result: the launches after the last timing."""
    launches = [e.split()[0] for e in events if e.startswith("launch_")]
    return "segnet" if launches[-1] == "launch_conv3x3_scale_shift_relu" else "vendor"


@pytest.mark.parametrize("vendor_ms, ours_ms, winner", [(2.0, 1.0, "segnet"), (1.0, 2.0, "vendor"),
                                                        (1.0, 1.0, "vendor"), (1.0, 0.97, "vendor")])
def test_convolution_runs_what_was_timed_faster_and_cudnn_wins_ties(launcher, vendor_ms, ours_ms, winner):
    x, w, scale, shift = conv_inputs()
    launcher.queue_times([vendor_ms, ours_ms])  # timed in this order
    y = launcher.cuda_conv2d_scale_shift_relu(x, w, scale, shift, *CONV_ARGS, True)
    assert launcher.timings() == 2
    assert ran(launcher.take_recording()) == winner
    tol = dict(rtol=1e-2, atol=5e-2) if winner == "segnet" else dict(rtol=1e-5, atol=1e-5)  # TF32 or cuDNN's float
    torch.testing.assert_close(y, ops.conv2d_scale_shift_relu(x, w, scale, shift, *CONV_ARGS, True), **tol)
    assert y.is_contiguous(memory_format=torch.channels_last)
    [line] = launcher.kernel_choices()
    assert re.fullmatch(rf"conv2d_scale_shift_relu x\[2, 8, 7, 9\] weight\[6, 8, 3, 3\] Float channels_last tf32.* relu "
                        rf"cuda:-?\d+: vendor {vendor_ms:g} ms, segnet {ours_ms:g} ms -> {winner}", line), line


def test_the_choice_is_cached_per_shape_dtype_and_layout(launcher):
    x, w, scale, shift = conv_inputs()
    launcher.queue_times([2.0, 1.0])
    launcher.cuda_conv2d_scale_shift_relu(x, w, scale, shift, *CONV_ARGS, True)
    launcher.cuda_conv2d_scale_shift_relu(torch.randn_like(x), w, scale, shift, *CONV_ARGS, True)
    assert launcher.timings() == 2 and ran(launcher.take_recording()) == "segnet"
    for other in (conv_inputs(torch.bfloat16), conv_inputs(torch.float16), conv_inputs(cin=16), conv_inputs(cout=7)):
        launcher.queue_times([1.0, 2.0])
        launcher.cuda_conv2d_scale_shift_relu(*other, *CONV_ARGS, True)
        assert launcher.timings() == 2 and ran(launcher.take_recording()) == "vendor"
    assert len(launcher.kernel_choices()) == 5


def misaligned(t):
    """t's values at a storage offset of one element (not 16-byte aligned), same strides."""
    out = torch.empty(t.numel() + 1, dtype=t.dtype)[1:].as_strided(t.shape, t.stride())
    return out.copy_(t)


@pytest.mark.parametrize("inputs", [
    lambda: conv_inputs(fmt=torch.contiguous_format),  # NCHW: cuDNN (our kernel is channels_last)
    lambda: conv_inputs(torch.float64),
    lambda: conv_inputs(cin=6),  # input channels not whole 16-byte vectors
    lambda: (misaligned(conv_inputs()[0]),) + conv_inputs()[1:]])
def test_inputs_our_kernel_does_not_take_run_cudnn_untimed(launcher, inputs):
    x, w, scale, shift = inputs()
    launcher.queue_times([])
    y = launcher.cuda_conv2d_scale_shift_relu(x, w, scale, shift, *CONV_ARGS, True)
    assert launcher.timings() == 0 and ran(launcher.take_recording()) == "vendor"
    torch.testing.assert_close(y, ops.conv2d_scale_shift_relu(x, w, scale, shift, *CONV_ARGS, True),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vendor_ms, ours_ms, winner", [(2.0, 1.0, "segnet"), (1.0, 2.0, "vendor")])
def test_training_forward_statistics_run_what_was_timed_faster(launcher, vendor_ms, ours_ms, winner):
    x, w, _, _ = conv_inputs(torch.bfloat16)
    bias = torch.randn(6).to(torch.bfloat16)
    launcher.queue_times([vendor_ms, ours_ms])
    z, mean, var = launcher.cuda_conv2d_bn_stats(x, w, bias, *CONV_ARGS)
    assert launcher.timings() == 2
    launches = [e.split()[0] for e in launcher.take_recording() if e.startswith("launch_")]
    assert (launches[-1] == "launch_conv3x3_bn_stats") == (winner == "segnet"), launches  # else cuDNN + bn_stats
    want = ops.conv2d_bn_stats(x, w, bias, *CONV_ARGS)
    torch.testing.assert_close(z, want[0], rtol=2e-2, atol=5e-2)
    for got, ref in zip((mean, var), want[1:]):
        torch.testing.assert_close(got, ref, rtol=2e-2, atol=5e-2)
    [line] = launcher.kernel_choices()
    assert line.startswith("conv2d_bn_stats x[2, 8, 7, 9] weight[6, 8, 3, 3] BFloat16 channels_last") and \
        line.endswith(f"-> {winner}"), line


def test_float_inputs_use_our_tf32_kernel_only_where_torch_allows_tf32(launcher):
    x, w, scale, shift = conv_inputs()
    before = torch.backends.cudnn.allow_tf32
    try:
        for allow in (True, False):
            torch.backends.cudnn.allow_tf32 = allow
            launcher.queue_times([2.0, 1.0])
            launcher.cuda_conv2d_scale_shift_relu(x, w, scale, shift, *CONV_ARGS, True)
            assert launcher.timings() == (2 if allow else 0)
            assert ran(launcher.take_recording()) == ("segnet" if allow else "vendor")
    finally:
        torch.backends.cudnn.allow_tf32 = before
    [line] = launcher.kernel_choices()
    assert " Float channels_last tf32 " in line


@pytest.mark.parametrize("policy, winner", [("vendor", "vendor"), ("segnet", "segnet")])
def test_environment_overrides_the_choice_without_timing(launcher, monkeypatch, policy, winner):
    monkeypatch.setenv("SEGNET_EXT_CONV", policy)
    x, w, scale, shift = conv_inputs()
    launcher.queue_times([])
    y = launcher.cuda_conv2d_scale_shift_relu(x, w, scale, shift, *CONV_ARGS, False)
    assert launcher.timings() == 0 and ran(launcher.take_recording()) == winner
    tol = dict(rtol=1e-2, atol=5e-2) if winner == "segnet" else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, ops.conv2d_scale_shift_relu(x, w, scale, shift, *CONV_ARGS, False), **tol)


def test_an_unknown_policy_is_an_error_naming_the_variable(launcher, monkeypatch):
    monkeypatch.setenv("SEGNET_EXT_CONV", "fastest")
    with pytest.raises(ValueError, match='SEGNET_EXT_CONV must be auto, vendor or segnet, got "fastest"'):
        launcher.cuda_conv2d_scale_shift_relu(*conv_inputs(), *CONV_ARGS, True)


@pytest.mark.parametrize("kernel_size, conv_args", [
    (3, ([2, 2], [1, 1], [1, 1], 1)), (3, ([1, 1], [0, 0], [1, 1], 1)), (3, ([1, 1], [2, 2], [2, 2], 1)),
    (1, ([1, 1], [0, 0], [1, 1], 1)), (3, ([1, 1], [1, 1], [1, 1], 2))])
def test_shapes_our_kernel_does_not_cover_run_cudnn_untimed(launcher, kernel_size, conv_args):
    groups = conv_args[3]
    x = torch.randn(2, 8, 9, 8).contiguous(memory_format=torch.channels_last)
    w, scale, shift = torch.randn(6, 8 // groups, kernel_size, kernel_size), torch.rand(6) + 0.5, torch.randn(6)
    launcher.queue_times([])
    y = launcher.cuda_conv2d_scale_shift_relu(x, w, scale, shift, *conv_args, True)
    assert launcher.timings() == 0 and ran(launcher.take_recording()) == "vendor"
    torch.testing.assert_close(y, ops.conv2d_scale_shift_relu(x, w, scale, shift, *conv_args, True),
                               rtol=1e-5, atol=1e-5)


def test_segnet_ext_lists_the_choices_of_the_library(launcher):
    """The library's own list (empty until a CUDA convolution ran): one entry point for users."""
    assert isinstance(segnet_ext.kernel_choices(), list)
