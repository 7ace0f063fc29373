"""The CUDA pooling kernels, run on the CPU by the emulator, against the CPU kernels and
the reference: odd sizes, several blocks, partial warps, grid-stride loops, both paths."""
import itertools

import pytest
import torch

import segnet_ext
from segnet_ext import reference
from tests.pool_cases import FLOAT_DTYPES, KINDS, assert_bitwise_equal, make_input

# (threads per block, max blocks): partial warps (48), several blocks, and grids capped
# small enough that every thread loops over several items.
LAUNCHES = [(48, 3), (64, 1), (256, 1024)]
SHAPES = [(2, 3, H, W) for H, W in itertools.product([1, 2, 3, 4, 7, 8], [1, 2, 5, 8, 9, 16])] + [
    (1, 5, 37, 250), (2, 64, 9, 8), (3, 4, 16, 24),  # W % 8 == 0: the vectorised NCHW path
    (2, 40, 5, 7)]  # channels_last tiles of 32 channels, where a packed byte straddles two of them


def cases():
    for shape, ceil_mode, channels_last in itertools.product(SHAPES, [False, True], [False, True]):
        if ceil_mode or (shape[2] >= 2 and shape[3] >= 2):
            yield shape, ceil_mode, channels_last


@pytest.mark.parametrize("threads,max_blocks", LAUNCHES)
@pytest.mark.parametrize("kind", KINDS)
def test_pool_unpool_gather_match_cpu_and_reference(emu, index_bits, threads, max_blocks, kind):
    for shape, ceil_mode, channels_last in cases():
        what = f"{shape} ceil={ceil_mode} cl={channels_last}"
        H, W = shape[-2:]
        x = make_input(shape, kind=kind, channels_last=channels_last)
        values, packed = emu.max_pool2x2(x, ceil_mode, threads, max_blocks)
        cpu_values, cpu_packed = segnet_ext.max_pool2x2(x, ceil_mode)
        assert_bitwise_equal(values, cpu_values, f"values {what}")
        assert_bitwise_equal(packed, cpu_packed, f"packed {what}")
        assert values.stride() == cpu_values.stride(), what

        v = make_input(values.shape, kind=kind, channels_last=channels_last)
        y = emu.max_unpool2x2(v, packed, [H, W], threads, max_blocks)
        assert_bitwise_equal(y, segnet_ext.max_unpool2x2(v, packed, (H, W)), f"unpool {what}")
        assert_bitwise_equal(y, reference.max_unpool2x2(v, packed, (H, W)), f"unpool vs reference {what}")

        g = make_input(shape, kind=kind, channels_last=channels_last)
        pooled = list(values.shape[-2:])
        gv = emu.max_unpool2x2_backward(g, packed, pooled, threads, max_blocks)
        assert_bitwise_equal(gv, torch.ops.segnet_ext.max_unpool2x2_backward(g, packed, pooled), f"gather {what}")
        assert_bitwise_equal(gv, reference.max_unpool2x2_backward(g, packed, pooled), f"gather vs reference {what}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_every_dtype(emu, dtype):
    for shape, ceil_mode, channels_last in [((2, 3, 9, 16), True, False), ((2, 3, 7, 5), True, True),
                                            ((1, 8, 8, 8), False, True), ((1, 3, 6, 7), False, False),
                                            ((3, 16, 7, 5), False, True)]:  # vector tiles, Ho*Wo = 6
        x = make_input(shape, dtype, "special", channels_last)
        values, packed = emu.max_pool2x2(x, ceil_mode, 48, 3)
        rv, rp = reference.max_pool2x2(x, ceil_mode)
        assert_bitwise_equal(values, rv, f"{dtype} {shape}")
        assert_bitwise_equal(packed, rp, f"{dtype} {shape}")
        y = emu.max_unpool2x2(values, packed, list(shape[-2:]), 48, 3)
        assert_bitwise_equal(y, reference.max_unpool2x2(values, packed, shape[-2:]), f"{dtype} {shape}")


def test_misaligned_input_takes_the_scalar_path(emu):
    # A view one element into its storage is not 32-byte aligned: the vector path must not run.
    base = make_input((1 * 2 * 8 * 16 + 1,))
    x = base[1:].view(1, 2, 8, 16)
    values, packed = emu.max_pool2x2(x, False, 64, 2)
    rv, rp = reference.max_pool2x2(x)
    assert_bitwise_equal(values, rv, "misaligned")
    assert_bitwise_equal(packed, rp, "misaligned")


def _view_at(t, offset):
    """t's values in a view `offset` elements into its storage."""
    return torch.empty(t.numel() + offset, dtype=t.dtype)[offset:].view(t.shape).copy_(t)


@pytest.mark.parametrize("offset", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_narrow_maps_from_any_address_match_the_reference(emu, offset, dtype):
    # NCHW maps of at most 64 windows a row run in bands that stage each flat stretch 16 bytes
    # a lane from its first 16-byte boundary, the elements before and after it one a lane:
    # stretches (and views) starting anywhere
    for shape, ceil_mode in [((2, 3, 7, 10), True), ((1, 4, 9, 30), False), ((3, 2, 5, 9), True)]:
        what = f"{shape} {dtype} offset {offset}"
        x = _view_at(make_input(shape, dtype), offset)
        values, packed = emu.max_pool2x2(x, ceil_mode, 64, 2)
        rv, rp = reference.max_pool2x2(x, ceil_mode)
        assert_bitwise_equal(values, rv, f"values {what}")
        assert_bitwise_equal(packed, rp, f"packed {what}")
        v, p = _view_at(make_input(values.shape, dtype), offset), _view_at(packed, offset)
        y = emu.max_unpool2x2(v, p, list(shape[2:]), 64, 2)
        assert_bitwise_equal(y, reference.max_unpool2x2(v, p, shape[2:]), f"unpool {what}")
        g = _view_at(make_input(shape, dtype), offset)
        gv = emu.max_unpool2x2_backward(g, p, list(values.shape[2:]), 64, 2)
        assert_bitwise_equal(gv, reference.max_unpool2x2_backward(g, p, list(values.shape[2:])), f"gather {what}")
