"""max_pool2x2 / max_unpool2x2 / their backwards against torch and the pure-PyTorch reference."""
import itertools
import os
import platform
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import segnet_ext
from segnet_ext import reference
from tests.conftest import DEVICES
from tests.pool_cases import FLOAT_DTYPES, KINDS, assert_bitwise_equal, keeps_format, make_input

SMALL = list(itertools.product(range(1, 10), range(1, 10)))  # every H, W in 1..9
LARGE_ODD = [(101, 77), (37, 250), (361, 479)]


def torch_pool(x, ceil_mode):
    return F.max_pool2d(x, 2, 2, ceil_mode=ceil_mode, return_indices=True)


def floor_ok(H, W, ceil_mode):
    return ceil_mode or (H >= 2 and W >= 2)


def check_forward(x, ceil_mode, what):
    H, W = x.shape[-2:]
    values, packed = segnet_ext.max_pool2x2(x, ceil_mode)
    tv, ti = torch_pool(x, ceil_mode)
    assert_bitwise_equal(values, tv, f"values {what}")
    assert packed.dtype == torch.uint8 and packed.shape == ((tv.numel() + 3) // 4,)
    assert_bitwise_equal(packed, segnet_ext.pack_indices(ti, (H, W)), f"packed vs torch {what}")
    rv, rp = reference.max_pool2x2(x, ceil_mode)
    assert_bitwise_equal(packed, rp, f"packed vs reference {what}")
    assert_bitwise_equal(values, rv, f"values vs reference {what}")
    assert keeps_format(values, x), what
    return values, packed, ti


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_forward_every_small_size(device, kind, channels_last, ceil_mode):
    for H, W in SMALL:
        if floor_ok(H, W, ceil_mode):
            x = make_input((2, 3, H, W), kind=kind, channels_last=channels_last, device=device)
            check_forward(x, ceil_mode, f"H={H} W={W}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_forward_channels_last_rows_of_whole_bytes(kind, ceil_mode):
    # channels_last float32 rows of 4k full windows with C % 8 == 0 take the loop that writes
    # packed bytes directly (CPU); the other rows of the same tensors (a partial last row in
    # ceil mode, Wo % 4 != 0) take the per-window loop
    for shape in [(2, 8, 6, 8), (1, 16, 7, 16), (1, 24, 4, 32), (1, 24, 5, 17), (2, 64, 9, 24), (1, 8, 3, 9)]:
        x = make_input(shape, torch.float32, kind, channels_last=True)
        check_forward(x, ceil_mode, f"{kind} {shape}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_wide_rows_forward_unpool_and_gradient(kind, channels_last, ceil_mode):
    # NCHW float32 rows of more than 512 windows are read in several chunks (CPU AVX2 loops),
    # and tasks of 8192 windows then start mid-row, not always on a byte
    for shape in [(1, 2, 4, 1030), (2, 3, 3, 2101), (1, 1, 2, 4097)]:
        x = make_input(shape, torch.float32, kind, channels_last)
        values, packed, indices = check_forward(x, ceil_mode, f"{kind} {shape}")
        v = make_input(values.shape, torch.float32, kind, channels_last)
        H, W = shape[-2:]
        assert_bitwise_equal(segnet_ext.max_unpool2x2(v, packed, (H, W)),
                             F.max_unpool2d(v, indices, 2, 2, output_size=(H, W)), f"unpool {kind} {shape}")
        g = make_input(shape, torch.float32, kind, channels_last)
        expected = g.flatten(2).gather(2, indices.flatten(2)).view_as(values)
        assert_bitwise_equal(torch.ops.segnet_ext.max_unpool2x2_backward(g, packed, list(values.shape[-2:])),
                             expected, f"unpool backward {kind} {shape}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_forward_dtypes_and_large_odd_sizes(device, dtype, channels_last, ceil_mode):
    for (H, W), kind in itertools.product(LARGE_ODD + [(5, 7), (8, 16)], KINDS):
        x = make_input((1, 5, H, W), dtype, kind, channels_last, device)
        check_forward(x, ceil_mode, f"{dtype} {kind} H={H} W={W}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1, 4, 4), (0, 3, 4, 4), (1, 1, 1, 1), (3, 7, 2, 2), (1, 64, 9, 8)])
def test_forward_edge_shapes(device, shape):
    for ceil_mode, channels_last in itertools.product([False, True], repeat=2):
        if floor_ok(shape[2], shape[3], ceil_mode):
            x = make_input(shape, channels_last=channels_last, device=device)
            check_forward(x, ceil_mode, f"{shape} ceil={ceil_mode} cl={channels_last}")


def test_zero_channels():
    # torch's max_pool2d rejects C = 0; ours returns empty outputs of the right shapes.
    values, packed = segnet_ext.max_pool2x2(torch.randn(2, 0, 5, 5), True)
    assert values.shape == (2, 0, 3, 3) and packed.shape == (0,)
    assert segnet_ext.max_unpool2x2(values, packed, (5, 5)).shape == (2, 0, 5, 5)


@pytest.mark.parametrize("device", DEVICES)
def test_three_dimensional_input(device):
    x = make_input((3, 7, 9), device=device)
    values, packed = segnet_ext.max_pool2x2(x, True)
    assert_bitwise_equal(values, F.max_pool2d(x, 2, 2, ceil_mode=True), "3-D values")
    y = segnet_ext.max_unpool2x2(values, packed, (7, 9))
    y4 = segnet_ext.max_unpool2x2(values.unsqueeze(0), packed, (7, 9))
    assert_bitwise_equal(y, y4.squeeze(0), "3-D unpool")


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_views(device):
    base = make_input((3, 8, 13, 12), device=device)
    views = [base[:, ::2], base[..., 1:, 2:], base.transpose(2, 3), base[1:2].permute(0, 1, 3, 2)[..., ::2]]
    for i, x in enumerate(views):
        for ceil_mode in (False, True):
            check_forward(x, ceil_mode, f"view {i}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_unpool_and_its_backward_match_torch(device, dtype, kind, channels_last, ceil_mode):
    # 16-bit floats are moved as their bits (CPU): NaN, infinities and -0.0 must come out as they went in
    for H, W in SMALL + LARGE_ODD[:1]:
        if not floor_ok(H, W, ceil_mode):
            continue
        what = f"{dtype} H={H} W={W}"
        x = make_input((2, 3, H, W), dtype, kind, channels_last, device)
        values, packed, torch_indices = check_forward(x, ceil_mode, what)
        # any values, not only the pooled ones (as in a SegNet decoder)
        v = make_input(values.shape, dtype, kind, channels_last, device)
        y = segnet_ext.max_unpool2x2(v, packed, (H, W))
        expected = F.max_unpool2d(v, torch_indices, 2, 2, output_size=(H, W))
        assert_bitwise_equal(y, expected, f"unpool {what}")
        assert_bitwise_equal(y, reference.max_unpool2x2(v, packed, (H, W)), f"unpool vs reference {what}")
        assert keeps_format(y, v)
        g = make_input(x.shape, dtype, kind, channels_last, device)
        gathered = torch.ops.segnet_ext.max_unpool2x2_backward(g, packed, list(values.shape[-2:]))
        assert_bitwise_equal(gathered, reference.max_unpool2x2_backward(g, packed, values.shape[-2:]),
                             f"unpool backward {what}")
        assert keeps_format(gathered, g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradients_equal_torch(device, dtype, channels_last):
    for (H, W), ceil_mode in itertools.product([(7, 9), (8, 8), (5, 2), (37, 250)], [False, True]):
        x = make_input((2, 3, H, W), dtype, "ties", channels_last, device).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        values, packed = segnet_ext.max_pool2x2(x, ceil_mode)
        tv, ti = F.max_pool2d(x_ref, 2, 2, ceil_mode=ceil_mode, return_indices=True)
        g = make_input(values.shape, dtype, "random", channels_last, device)
        # through pool -> unpool, as SegNet uses them
        y = segnet_ext.max_unpool2x2(values, packed, (H, W))
        ty = F.max_unpool2d(tv, ti, 2, 2, output_size=(H, W))
        gy = make_input(y.shape, dtype, "random", channels_last, device)
        ((values * g).sum() + (y * gy).sum()).backward()
        ((tv * g).sum() + (ty * gy).sum()).backward()
        assert_bitwise_equal(x.grad, x_ref.grad, f"grad {dtype} H={H} W={W} ceil={ceil_mode}")


def test_unpool_backward_is_a_gather():
    values = make_input((2, 3, 4, 5)).requires_grad_()
    packed = segnet_ext.max_pool2x2(make_input((2, 3, 8, 10)))[1]
    y = segnet_ext.max_unpool2x2(values, packed, (8, 10))
    gy = make_input(y.shape)
    (grad,) = torch.autograd.grad(y, values, gy)
    assert_bitwise_equal(grad, reference.max_unpool2x2_backward(gy, packed, (4, 5)), "gather")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_float64(device, channels_last):
    for (H, W), ceil_mode in [((5, 7), True), ((6, 4), False), ((3, 3), False)]:
        x = make_input((2, 3, H, W), torch.float64, "random", channels_last, device).requires_grad_()
        assert torch.autograd.gradcheck(lambda t: segnet_ext.max_pool2x2(t, ceil_mode)[0], (x,))
        assert torch.autograd.gradgradcheck(lambda t: segnet_ext.max_pool2x2(t, ceil_mode)[0], (x,))
        values, packed = segnet_ext.max_pool2x2(x.detach(), ceil_mode)
        v = values.clone().requires_grad_()
        unpool = lambda t: segnet_ext.max_unpool2x2(t, packed, (H, W))  # noqa: E731
        assert torch.autograd.gradcheck(unpool, (v,))
        assert torch.autograd.gradgradcheck(unpool, (v,))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    ops = torch.ops.segnet_ext
    for shape, ceil_mode, channels_last in [((2, 3, 7, 9), True, False), ((2, 3, 8, 6), False, True),
                                            ((1, 4, 5, 5), True, True)]:
        x = make_input(shape, torch.float64, "random", channels_last, device).requires_grad_()
        torch.library.opcheck(ops.max_pool2x2.default, (x, ceil_mode))
        values, packed = ops.max_pool2x2(x.detach(), ceil_mode)
        v = values.clone().requires_grad_()
        torch.library.opcheck(ops.max_unpool2x2.default, (v, packed, list(shape[-2:])))
        g = make_input(shape, torch.float64, "random", channels_last, device).requires_grad_()
        torch.library.opcheck(ops.max_unpool2x2_backward.default, (g, packed, list(values.shape[-2:])))


def test_pack_unpack_roundtrip_with_torch_modules():
    x = make_input((2, 4, 11, 14), kind="ties")
    pool = torch.nn.MaxPool2d(2, 2, ceil_mode=True, return_indices=True)
    values, indices = pool(x)
    packed = segnet_ext.pack_indices(indices, x.shape)
    assert packed.numel() * 32 == (indices.numel() + 3) // 4 * 4 * 8 and packed.element_size() * 8 == indices.element_size()
    assert torch.equal(segnet_ext.unpack_indices(packed, values.shape, x.shape), indices)
    # our indices drive torch's unpooling, and torch's drive ours
    ours_v, ours_p = segnet_ext.max_pool2x2(x, True)
    unpacked = segnet_ext.unpack_indices(ours_p, ours_v.shape, x.shape)
    assert torch.equal(torch.nn.MaxUnpool2d(2, 2)(values, unpacked, output_size=x.shape), segnet_ext.max_unpool2x2(values, packed, x.shape))


def test_index_memory_is_one_32nd_of_int64():
    values, packed = segnet_ext.max_pool2x2(torch.randn(4, 64, 360, 480))
    _, indices = F.max_pool2d(torch.randn(4, 64, 360, 480), 2, 2, return_indices=True)
    assert packed.numel() * packed.element_size() * 32 == indices.numel() * indices.element_size()


def test_pack_indices_rejects_foreign_indices():
    x = torch.randn(1, 2, 8, 8)
    _, overlapping = F.max_pool2d(x, 3, 2, return_indices=True, padding=1)
    with pytest.raises(ValueError, match="not inside their own 2x2 window"):
        segnet_ext.pack_indices(overlapping, x.shape)
    with pytest.raises(ValueError, match="int64"):
        segnet_ext.pack_indices(overlapping.int(), x.shape)
    with pytest.raises(ValueError, match="cannot come from 2x2 pooling"):
        segnet_ext.pack_indices(F.max_pool2d(x, 2, 2, return_indices=True)[1], (12, 8))


# ---- layers and torch.compile ----

class TinyEncoderDecoder(torch.nn.Module):
    def __init__(self, pool, unpool):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.pool, self.unpool = pool, unpool
        self.conv2 = torch.nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        h = self.conv1(x)
        v, i = self.pool(h)
        return self.conv2(self.unpool(v.relu(), i, output_size=h.shape[-2:]))


def test_layers_are_drop_in_replacements():
    torch_model = TinyEncoderDecoder(torch.nn.MaxPool2d(2, 2, ceil_mode=True, return_indices=True), torch.nn.MaxUnpool2d(2, 2))
    ours = TinyEncoderDecoder(segnet_ext.nn.MaxPool2x2(ceil_mode=True, return_indices=True), segnet_ext.nn.MaxUnpool2x2())
    ours.load_state_dict(torch_model.state_dict())
    x = make_input((2, 3, 11, 13))
    assert_bitwise_equal(ours(x), torch_model(x), "model output")
    ours(x).square().sum().backward()
    torch_model(x).square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), torch_model.parameters()):
        assert_bitwise_equal(p.grad, q.grad, f"grad of {name}")
    assert segnet_ext.nn.MaxPool2x2()(x).shape == (2, 3, 5, 6)
    assert "ceil_mode=True" in repr(ours.pool)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = TinyEncoderDecoder(segnet_ext.nn.MaxPool2x2(ceil_mode=True, return_indices=True), segnet_ext.nn.MaxUnpool2x2())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for shape in [(2, 3, 11, 13), (1, 3, 8, 8)]:
        x = make_input(shape).requires_grad_()
        x_eager = x.detach().clone().requires_grad_()
        out, expected = compiled(x), model(x_eager)
        assert_bitwise_equal(out, expected, f"compiled output {shape}")
        out.sum().backward()
        expected.sum().backward()
        assert_bitwise_equal(x.grad, x_eager.grad, f"compiled input grad {shape}")


# ---- errors ----

def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 3, 8, 8)
    values, packed = segnet_ext.max_pool2x2(x)
    cases = [
        (lambda: segnet_ext.max_pool2x2(torch.randn(8, 8)), ValueError, r"x must be \[N, C, H, W\] or \[C, H, W\].*\(8, 8\)"),
        (lambda: torch.ops.segnet_ext.max_pool2x2(torch.randn(3, 8, 8)), ValueError, r"x must be a 4-D tensor"),
        (lambda: segnet_ext.max_pool2x2(torch.ones(1, 1, 4, 4, dtype=torch.int32)), TypeError, r"x must be float32.*got Int"),
        (lambda: segnet_ext.max_pool2x2(torch.randn(1, 1, 1, 5)), ValueError, r"smaller than the 2x2 window.*ceil_mode=True"),
        (lambda: segnet_ext.max_unpool2x2(values, packed[:-1], (8, 8)), ValueError, r"packed_indices must be 1-D with ceil\(96 windows / 4\) = 24 bytes.*got shape \[23\]"),
        (lambda: segnet_ext.max_unpool2x2(values, packed.int(), (8, 8)), TypeError, r"packed_indices must be uint8.*got Int"),
        (lambda: segnet_ext.max_unpool2x2(values, packed, (8, 11)), ValueError, r"output_size\[1\] = 11 cannot come from 2x2 pooling to values.size\(3\) = 4 \(expected 7, 8 or 9\)"),
        (lambda: segnet_ext.max_unpool2x2(values, packed, (8,)), ValueError, r"output_size must end with \(H, W\)"),
        (lambda: segnet_ext.max_unpool2x2(values.long(), packed, (8, 8)), TypeError, r"values must be float32"),
        (lambda: torch.ops.segnet_ext.max_unpool2x2_backward(x, packed, [4, 6]), ValueError, r"grad_output.size\(3\) = 8 cannot come from 2x2 pooling to pooled_size\[1\] = 6"),
        (lambda: segnet_ext.unpack_indices(packed, values.shape, (9, 12)), ValueError, r"input W = 12 cannot come from 2x2 pooling to 4"),
    ]
    for call, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            call()


def test_tensors_on_different_devices():
    values, packed = segnet_ext.max_pool2x2(torch.randn(1, 2, 4, 4))
    with pytest.raises((ValueError, RuntimeError), match=r"packed_indices is on meta but values is on cpu"):
        torch.ops.segnet_ext.max_unpool2x2(values, packed.to("meta"), [4, 4])


def test_missing_native_library_is_explained(tmp_path):
    # A copy of the Python package without the compiled library.
    import shutil
    pkg = os.path.dirname(segnet_ext.__file__)
    shutil.copytree(pkg, tmp_path / "segnet_ext", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    # (an editable install's import hook would find the real library by name: drop it)
    code = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]; import segnet_ext"
    env = {k: v for k, v in os.environ.items() if k != "SEGNET_EXT_LIBRARY"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={**env, "PYTHONPATH": str(tmp_path)})
    assert result.returncode != 0
    assert "segnet_ext._C was not built" in result.stderr and "pip install --no-build-isolation -e ." in result.stderr


def test_portable_loops_without_avx2():
    # The AVX2 loops serve float32 here; SEGNET_EXT_NO_AVX2 makes a process use the portable
    # loops that CPUs without AVX2 run, which must give the same bits.
    code = """
import itertools, torch, segnet_ext
from segnet_ext import reference
from tests.pool_cases import assert_bitwise_equal, make_input
torch.manual_seed(%d)
for (H, W), ceil_mode, cl, kind in itertools.product([(8, 32), (9, 37), (16, 20), (3, 5)], [False, True],
                                                      [False, True], ["random", "ties", "special"]):
    x = make_input((2, 16, H, W), kind=kind, channels_last=cl)
    values, packed = segnet_ext.max_pool2x2(x, ceil_mode)
    rv, rp = reference.max_pool2x2(x, ceil_mode)
    assert_bitwise_equal(values, rv, "values"); assert_bitwise_equal(packed, rp, "packed")
    assert_bitwise_equal(segnet_ext.max_unpool2x2(values, packed, (H, W)), reference.max_unpool2x2(values, packed, (H, W)), "unpool")
    g = make_input(x.shape, kind=kind, channels_last=cl)
    pooled = list(values.shape[-2:])
    assert_bitwise_equal(torch.ops.segnet_ext.max_unpool2x2_backward(g, packed, pooled),
                         reference.max_unpool2x2_backward(g, packed, pooled), "gather")
print("ok")
""" % int(torch.randint(0, 2**31, ()))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                            env={**os.environ, "SEGNET_EXT_NO_AVX2": "1"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def _cpu_flags():
    with open("/proc/cpuinfo") as f:
        return set(re.search(r"^flags\s*:(.*)$", f.read(), re.M).group(1).split())


@pytest.mark.skipif(platform.machine() != "x86_64" or not os.path.exists("/proc/cpuinfo"), reason="x86-64 Linux")
@pytest.mark.parametrize("switch", [None, "SEGNET_EXT_NO_AVX512", "SEGNET_EXT_NO_AVX2"])
def test_isa_level_follows_the_cpu_and_the_switches(switch):
    # what CI's `make test-isa` relies on to run other CPUs' loops here
    flags = _cpu_flags()
    v3 = {"avx2", "bmi1", "bmi2", "fma", "f16c", "movbe", "abm"} <= flags
    best = "AVX512" if v3 and {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags else \
        "AVX2" if v3 else "DEFAULT"
    expected = {None: best, "SEGNET_EXT_NO_AVX512": "DEFAULT" if best == "DEFAULT" else "AVX2",
                "SEGNET_EXT_NO_AVX2": "DEFAULT"}[switch]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGNET_EXT_NO_")}
    if switch:
        env[switch] = "1"
    result = subprocess.run([sys.executable, "-c", "import segnet_ext; print(segnet_ext.cpu_capability())"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def _thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return re.search(r"\[(\w+)\]", f.read()).group(1)
    except (OSError, AttributeError):
        return None


@pytest.mark.skipif(_thp_mode() != "madvise", reason="needs transparent huge pages in madvise mode")
@pytest.mark.skipif(os.environ.get("SEGNET_EXT_SANITIZE") == "1",
                    reason="under tests/test_sanitizers.py, ASan's allocator places large blocks, not glibc's")
def test_new_outputs_ask_for_huge_pages():
    # under glibc's defaults a 64 MB output is new memory: ours asks for 2 MB pages for it
    # (csrc/cpu/outputs.h), an equally large torch.empty filled by torch does not
    code = """
import re, torch, segnet_ext
def huge_kb():
    with open("/proc/self/smaps_rollup") as f:
        return int(re.search(r"AnonHugePages:\\s+(\\d+) kB", f.read()).group(1))
v = torch.randn(1, 64, 256, 256)
packed = segnet_ext.max_pool2x2(torch.randn(1, 64, 512, 512))[1]
before = huge_kb()
plain = torch.empty(1, 64, 512, 512).fill_(1.0)
after_plain = huge_kb()
y = segnet_ext.max_unpool2x2(v, packed, (512, 512))
print(after_plain - before, huge_kb() - after_plain)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    plain_kb, ours_kb = map(int, result.stdout.split())
    assert plain_kb == 0 and ours_kb >= 32 * 1024
