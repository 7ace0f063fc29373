"""Inputs and comparisons shared by the pooling tests."""
import torch

from segnet_ext.reference import bits

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
KINDS = ["random", "ties", "special"]


def make_input(shape, dtype=torch.float32, kind="random", channels_last=False, device="cpu"):
    """random: distinct normal values; ties: few distinct values, so windows tie often;
    special: normal values with NaN, +inf, -inf and -0.0 sprinkled in (-0.0 ties +0.0 as a float
    but not as bits), and some all-equal windows."""
    if kind == "ties":
        x = torch.randint(-2, 2, shape).to(dtype)
    else:
        x = torch.randn(shape, dtype=torch.float64).to(dtype)
    if kind == "special":
        u = torch.rand(shape)
        x[u < 0.1] = float("nan")
        x[(u >= 0.1) & (u < 0.2)] = float("inf")
        x[(u >= 0.2) & (u < 0.3)] = float("-inf")
        x[(u >= 0.3) & (u < 0.35)] = -0.0
        x[(u >= 0.35) & (u < 0.4)] = 0.0
        if x.shape[-1] >= 2 and x.shape[-2] >= 2:
            x[..., :2, :2] = float("-inf")  # an all -inf window
    x = x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def assert_bitwise_equal(actual, expected, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = bits(actual.contiguous()), bits(expected.contiguous())
    if not torch.equal(a.cpu(), e.cpu()):
        bad = (a.cpu() != e.cpu()).nonzero()
        first = tuple(bad[0].tolist())
        raise AssertionError(f"{what}: {len(bad)} elements differ, first at {first}: "
                             f"{actual.cpu()[first].item()} != {expected.cpu()[first].item()}")


def keeps_format(output, source):
    """output is dense in the memory format of source, as torch's own ops keep it."""
    from torch._prims_common import suggest_memory_format
    return output.is_contiguous(memory_format=suggest_memory_format(source))
