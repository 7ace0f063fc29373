"""The CUDA BN+ReLU kernels, run on the CPU by the emulator, against the CPU kernels and
the reference: both layouts, odd sizes, several blocks, partial warps, grid-stride loops,
the two-stage reductions with several slices."""
import itertools

import pytest
import torch

from segnet_ext import reference

ops = torch.ops.segnet_ext
LAUNCHES = [(48, 3), (64, 1), (256, 1024)]
# the element-wise kernels take vectors wherever the tensors and, in channels_last, the
# parameters are aligned and C a multiple of the channels per vector (misaligned() below: the
# scalar path); NCHW planes of any size (a head and a tail of single elements around the
# whole vectors); channels_last C a multiple of the channels per vector (16, 24; 2 and 70 in
# float64) and not
SHAPES = [(2, 3, 1, 1), (1, 5, 3, 7), (3, 33, 4, 5), (2, 70, 9, 13), (1, 2, 37, 61), (2, 16, 5, 3), (1, 24, 7, 9)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def tol(dtype):
    return {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]


def misaligned(t):
    """t's values at a storage offset of one element (not 16-byte aligned), same strides."""
    out = torch.empty(t.numel() + 1, dtype=t.dtype)[1:].as_strided(t.shape, t.stride())
    return out.copy_(t)


def per_channel(C, dtype):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return [torch.randn(C, dtype=acc) for _ in range(6)]


@pytest.mark.parametrize("threads,max_blocks", LAUNCHES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_relu_kernels_match_cpu_and_reference(emu, index_bits, threads, max_blocks, dtype):
    for shape, channels_last in itertools.product(SHAPES, [False, True]):
        what = f"{shape} channels_last={channels_last}"
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = (torch.randn(shape, dtype=torch.float64) * 2 + 3).to(dtype).contiguous(memory_format=fmt)
        dy = torch.randn(shape, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)
        acc_tol = tol(torch.float64 if dtype == torch.float64 else torch.float32)
        for got, cpu, want in zip(emu.bn_stats(x, threads, max_blocks), ops.bn_stats(x), reference.bn_stats(x)):
            torch.testing.assert_close(got, want, rtol=acc_tol * 10, atol=acc_tol * 10, msg=what)
            torch.testing.assert_close(got, cpu, rtol=acc_tol * 10, atol=acc_tol * 10, msg=what)
        scale, shift, mean, k1, k2, k3 = per_channel(shape[1], dtype)
        # the residual in the other layout: the kernel reads it in x's
        residual = torch.randn(shape, dtype=torch.float64).to(dtype).contiguous(
            memory_format=torch.contiguous_format if channels_last else torch.channels_last)
        inputs = [(x, scale), (misaligned(x), scale), (x, misaligned(scale))]
        for relu, r, (xs, sc) in itertools.product((True, False), (None, residual), inputs):
            # the same fused multiply-adds as the CPU kernel: equal bit for bit (vector or scalar path)
            y = emu.scale_shift_relu(xs, sc, shift, relu, r, threads, max_blocks)
            torch.testing.assert_close(y, ops.scale_shift_relu(x, scale, shift, relu, r), rtol=0, atol=0, msg=what)
            torch.testing.assert_close(y, reference.scale_shift_relu(x, scale, shift, relu, r), rtol=tol(dtype),
                                       atol=tol(dtype), msg=what)
            assert y.stride() == x.stride(), what
        for relu in (True, False):
            sums = emu.bn_relu_backward_reduce(dy, x, scale, shift, mean, relu, threads, max_blocks)
            for got, want in zip(sums, reference.bn_relu_backward_reduce(dy, x, scale, shift, mean, relu)):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * x.numel() ** 0.5, msg=what)
            want = reference.bn_relu_backward_apply(dy, x, scale, shift, mean, k1, k2, k3, relu)
            cpu = ops.bn_relu_backward_apply(dy, x, scale, shift, mean, k1, k2, k3, relu)
            for dys, m in [(dy, mean), (misaligned(dy), mean), (dy, misaligned(mean))]:
                dx = emu.bn_relu_backward_apply(dys, x, scale, shift, m, k1, k2, k3, relu, threads, max_blocks)
                torch.testing.assert_close(dx, want, rtol=tol(dtype), atol=tol(dtype), msg=what)
                torch.testing.assert_close(dx, cpu, rtol=0, atol=0, msg=what)


def test_reductions_are_deterministic_and_use_many_slices(emu):
    x = torch.randn(4, 3, 40, 50)
    runs = [emu.bn_stats(x, 64, 4096) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    # float64 data: the two-stage reduction loses nothing against the reference
    x64 = x.double() * 1e-3 + 1e3
    for got, want in zip(emu.bn_stats(x64, 48, 4096), reference.bn_stats(x64)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # both reductions in both layouts through several slices and the second stage (8000 values
    # per channel: 8 slices NCHW, 8 channels_last at 64 threads)
    scale, shift, mean = (torch.randn(3) for _ in range(3))
    dy = torch.randn_like(x)
    for fmt in (torch.contiguous_format, torch.channels_last):
        xf, dyf = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
        for got, want in zip(emu.bn_stats(xf, 64, 4096), reference.bn_stats(xf)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        sums = emu.bn_relu_backward_reduce(dyf, xf, scale, shift, mean, True, 64, 4096)
        for got, want in zip(sums, reference.bn_relu_backward_reduce(dyf, xf, scale, shift, mean, True)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


def tf32(t):
    """t rounded to TF32 (10 mantissa bits, to nearest, ties away from zero), as
    __float_to_tf32 rounds a tensor core's float operands."""
    bits = t.float().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


# (N, Cin, H, W, Cout): partial pixel tiles (of 128) and output-channel tiles (of 64), several
# of each, Cout not a multiple of the output vector (scalar stores), Cin not a multiple of
# the pipeline's step (32 channels in 16-bit types, 16 in float), odd H and W, a 1x1 image
CONV_SHAPES = [(1, 8, 1, 1, 3), (2, 8, 5, 7, 5), (1, 40, 9, 13, 70), (2, 16, 11, 9, 64), (1, 24, 3, 50, 136)]
DEPTHS = {torch.float32: 4, torch.bfloat16: 8, torch.float16: 8}  # channels per 16-byte vector


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensor_core_conv3x3_matches_the_reference(emu, dtype):
    for (N, Cin, H, W, Cout) in CONV_SHAPES:
        what = f"{(N, Cin, H, W, Cout)}"
        x = torch.randn(N, Cin, H, W).to(dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(Cout, Cin, 3, 3).to(dtype)
        scale, shift = torch.randn(Cout), torch.randn(Cout)
        # the operands as the tensor cores read them: TF32 for float, exact for 16-bit types
        xr, wr = (tf32(x), tf32(w)) if dtype == torch.float32 else (x, w)
        z = torch.nn.functional.conv2d(xr.double(), wr.double(), padding=1)
        for relu in (True, False):
            y = emu.conv3x3_scale_shift_relu(x, w, scale, shift, relu)
            want = z * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
            want = want.clamp_min(0) if relu else want
            # float accumulation of up to 9 * Cin products, then the output's rounding
            ulp = {torch.float32: 2 ** -23, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
            torch.testing.assert_close(y.double(), want, rtol=ulp, atol=1e-5 * (9 * Cin) ** 0.5 * scale.abs().max().item(),
                                       msg=what)
            assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last), what


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensor_core_conv3x3_split_k_adds_the_splits_to_the_same_result(emu, dtype):
    # 18 K steps in 16-bit types, 36 in float; 5 splits leave the last one shorter; Cout 70:
    # partial channel tiles and the split epilogue's scalar path, 68: its vector path
    for Cout in (70, 68):
        x = torch.randn(1, 64, 5, 7).to(dtype).contiguous(memory_format=torch.channels_last)
        w, scale, shift = torch.randn(Cout, 64, 3, 3).to(dtype), torch.randn(Cout), torch.randn(Cout)
        whole = emu.conv3x3_scale_shift_relu(x, w, scale, shift, False)
        for splits in (2, 5):
            split = emu.conv3x3_scale_shift_relu(x, w, scale, shift, False, splits)
            ulp = {torch.float32: 2 ** -20, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
            torch.testing.assert_close(split.double(), whole.double(), rtol=ulp, atol=1e-4 * scale.abs().max().item(),
                                       msg=f"Cout {Cout}, {splits} splits")
            assert split.is_contiguous(memory_format=torch.channels_last)


def test_split_k_only_where_the_grid_fills_less_than_half_a_wave(emu):
    # bf16, batch 1, SegNet's layers on 132 SMs (528 blocks a wave): 48 blocks split 11 ways,
    # 176 blocks 3 ways, 340 blocks and more not at all
    assert [emu.conv3x3_splits(1, cin, h, w, cout, 132, 2) for cin, cout, h, w in [
        (512, 512, 23, 30), (512, 512, 45, 60), (256, 512, 45, 60), (256, 256, 90, 120), (64, 64, 360, 480)]] == \
        [11, 3, 3, 1, 1]
    assert emu.conv3x3_splits(1, 8, 23, 30, 512, 132, 2) == 2  # 9 K steps: at least 4 a split


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensor_core_conv3x3_training_epilogue_gives_z_and_its_statistics(emu, dtype):
    """z (the bias added) and its batch statistics from the tiles' moments, as bn_stats(z) gives
    them: several pixel tiles (the last partial) and channel tiles, with and without a bias."""
    for (N, Cin, H, W, Cout) in [(2, 16, 11, 9, 64), (1, 24, 3, 50, 70), (1, 8, 1, 1, 3)]:
        what = f"{(N, Cin, H, W, Cout)}"
        x = (torch.randn(N, Cin, H, W) + 1).to(dtype).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(Cout, Cin, 3, 3).to(dtype), (torch.randn(Cout) * 3).to(dtype)
        for bias in (b, None):
            z, mean, var = emu.conv3x3_bn_stats(x, w, bias)
            assert z.dtype == dtype and z.is_contiguous(memory_format=torch.channels_last), what
            xr, wr = (tf32(x), tf32(w)) if dtype == torch.float32 else (x, w)
            want = torch.nn.functional.conv2d(xr.double(), wr.double(), None if bias is None else bias.double(),
                                              padding=1)
            ulp = {torch.float32: 2 ** -23, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
            torch.testing.assert_close(z.double(), want, rtol=ulp, atol=1e-5 * (9 * Cin) ** 0.5, msg=what)
            # the statistics of z as written (combined in double: the float32 result's rounding)
            for got, ref in zip((mean, var), reference.bn_stats(z.double())):
                torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6, msg=what)


@pytest.mark.parametrize("schedule", ["warps_forward", "warps_reverse"])
def test_tensor_core_conv3x3_pipeline_waits_and_synchronises(emu, schedule):
    """Under the schedules that make a missing __syncthreads read a stage before another warp's
    copies arrived (and the blocks in reverse order), the result is still exact."""
    x = torch.randn(1, 40, 9, 13).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w, scale, shift = torch.randn(70, 40, 3, 3).to(torch.bfloat16), torch.randn(70), torch.randn(70)
    want = emu.conv3x3_scale_shift_relu(x, w, scale, shift, True)
    emu.set_schedule(schedule)
    emu.set_block_order("reverse")
    try:
        got = emu.conv3x3_scale_shift_relu(x, w, scale, shift, True)
    finally:
        emu.set_schedule("free")
        emu.set_block_order("forward")
    assert torch.equal(got, want)


def test_tensor_core_conv3x3_reads_shared_memory_without_bank_conflicts(emu):
    for dtype in DEPTHS:
        x = torch.randn(1, 64, 6, 10).to(dtype).contiguous(memory_format=torch.channels_last)
        w, scale, shift = torch.randn(64, 64, 3, 3).to(dtype), torch.randn(64), torch.randn(64)
        emu.bank_traffic()
        emu.conv3x3_scale_shift_relu(x, w, scale, shift, True)
        wavefronts, ideal = emu.bank_traffic()
        assert ideal > 0 and wavefronts == ideal, (dtype, wavefronts, ideal)


def test_tensor_core_conv3x3_refuses_what_it_cannot_take(emu):
    with pytest.raises(ValueError, match="Cin 6 is not whole vectors"):
        emu.conv3x3_scale_shift_relu(torch.randn(1, 6, 4, 4).half(), torch.randn(2, 6, 3, 3).half(),
                                     torch.ones(2), torch.zeros(2), True)
    with pytest.raises(ValueError, match="float64"):
        emu.conv3x3_scale_shift_relu(torch.randn(1, 8, 4, 4).double(), torch.randn(2, 8, 3, 3).double(),
                                     torch.ones(2).double(), torch.zeros(2).double(), True)
