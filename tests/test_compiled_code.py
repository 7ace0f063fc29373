"""The compiled CUDA kernels, read from the built library's SASS (bench/compiled_code.py):
no spills, registers within a budget per kernel. Skipped for a CPU-only build or where
cuobjdump or nvdisasm is missing (pip install nvidia-cuda-cuobjdump; torch's CUDA builds bring
triton, which ships nvdisasm)."""
import pytest

from bench import compiled_code

pytestmark = pytest.mark.skipif(not compiled_code.tools_available(), reason="cuobjdump or nvdisasm not installed")

# registers per thread: the convolution's accumulators (64 floats a thread) and fragments are
# held in registers (4 blocks of 128 threads per SM, as its shared memory allows anyway);
# everything else is memory-bound and must stay small enough for full occupancy at 256
# threads per block
BUDGETS = {"conv3x3_scale_shift_relu_kernel": 168}
DEFAULT_BUDGET = 64
# the memory-bound kernels: their 32-bit index instances (every tensor under 2^31 elements)
# and the reduction's second stage divide integers by multiply-high and shift, never by a
# 64-bit division subroutine (the BN statistics do call double-precision division, per channel)
MEMORY_BOUND = ("max_pool2x2_nchw_vec_kernel", "max_pool2x2_nchw_band_kernel", "max_pool2x2_nchw_kernel",
                "max_pool2x2_nhwc_tile_kernel", "max_unpool2x2_nchw_vec_kernel", "max_unpool2x2_nchw_band_kernel",
                "max_unpool2x2_nchw_kernel", "max_unpool2x2_nhwc_tile_kernel",
                "max_unpool2x2_backward_nchw_vec_kernel", "max_unpool2x2_backward_nchw_band_kernel",
                "max_unpool2x2_backward_nchw_kernel", "max_unpool2x2_backward_nhwc_tile_kernel", "zero_kernel",
                "scale_shift_relu_kernel", "bn_relu_backward_apply_kernel", "channel_partials_nchw",
                "channel_partials_nhwc", "stats_finish", "sums_finish")

# the kernels that move 16-byte vectors where the layout allows (a scalar peel and tail
# otherwise): each 32-bit index instance (every tensor under 2^31 elements) moves 128 bits at
# a time on one side and at least 64 on the other (2x2 pooling halves a row: 16 bytes of a
# bf16 row give 8 of output, 8 bytes of values unpool to 16 per row). nvcc splits the
# element-wise kernels' vector stores in their 64-bit instances.
VECTORISED = ("max_pool2x2_nchw_vec_kernel", "max_unpool2x2_nchw_vec_kernel", "max_unpool2x2_backward_nchw_vec_kernel",
              "max_pool2x2_nchw_band_kernel", "max_unpool2x2_nchw_band_kernel",
              "max_unpool2x2_backward_nchw_band_kernel", "scale_shift_relu_kernel", "bn_relu_backward_apply_kernel")


@pytest.fixture(scope="module")
def kernels():
    found = compiled_code.read(compiled_code.library())
    if not found:
        pytest.skip("a CPU-only build: no CUDA code")
    named = {compiled_code.short_name(name): k for name, k in found.items()}
    assert len(named) == len(found), "two kernel instances share a short name: extend compiled_code.short_name"
    return named


def test_every_kernel_is_compiled_for_every_dtype(kernels):
    for kernel in MEMORY_BOUND:
        for dtype in ("fp32", "fp64") if kernel == "sums_finish" else ("fp32", "fp64", "fp16", "bf16"):
            assert any(name.startswith(f"{kernel}<{dtype}") for name in kernels), (kernel, dtype)


def test_the_convolution_multiplies_on_tensor_cores_in_its_main_loop(kernels):
    # per 64 bytes of K: 16-bit types 2 steps of 2 x 4 16x16x16 fragments (2 HMMA each), float
    # 4 steps of 16x16x8 TF32 ones (2 each); no float64 instance (cuDNN runs those)
    found = {name: k["loop_hmma"] for name, k in kernels.items() if name.startswith("conv3x3_scale_shift_relu_kernel<")}
    assert found == {"conv3x3_scale_shift_relu_kernel<bf16>": 32, "conv3x3_scale_shift_relu_kernel<fp16>": 32,
                     "conv3x3_scale_shift_relu_kernel<fp32>": 64}, found
    # its split-K second pass is memory-bound: 32-bit index math, no division subroutine
    split = {name: k["integer_division_calls"] for name, k in kernels.items()
             if name.startswith("conv3x3_split_k_epilogue<")}
    assert len(split) == 3 and not any(split.values()), split


def test_no_kernel_spills_and_registers_and_shared_memory_stay_within_budget(kernels):
    for name, k in kernels.items():
        assert k["stack"] == 0 and k["local"] == 0, f"{name} uses stack or local memory (spills): {k}"
        assert k["shared"] <= 48 * 1024, f"{name}: {k['shared']} bytes of static shared memory, above 48 KiB"
        budget = BUDGETS.get(name.split("<")[0], DEFAULT_BUDGET)
        assert k["registers"] <= budget, f"{name}: {k['registers']} registers, budget {budget}"
        assert k["instructions"] > 0


def test_memory_bound_kernels_call_no_integer_division_subroutine(kernels):
    checked = {name: k["integer_division_calls"] for name, k in kernels.items()
               if name.split("<")[0] in MEMORY_BOUND and "64-bit" not in name}
    assert {name.split("<")[0] for name in checked} == set(MEMORY_BOUND)
    assert not any(checked.values()), {name: calls for name, calls in checked.items() if calls}
    # the count itself: a 64-bit instance divides by subroutine
    assert kernels["max_pool2x2_nchw_kernel<fp32, 64-bit>"]["integer_division_calls"] > 0


def test_vectorised_kernels_move_wide_vectors(kernels):
    checked = {name: (k["wide_loads"], k["wide_stores"], k["wide_accesses"]) for name, k in kernels.items()
               if name.split("<")[0] in VECTORISED and "32-bit" in name}
    assert len(checked) == 4 * len(VECTORISED), checked  # 4 dtypes each
    assert all(loads and stores and widest for loads, stores, widest in checked.values()), checked


def test_channels_last_tile_kernels_have_vector_instances_that_move_128_bits(kernels):
    # 16 bytes of channels per lane (x2 in fp64 .. x8 in 16-bit types): pooling and unpooling in
    # every dtype, the unpooling backward in 16-bit types (csrc/kernels/pool2x2.cuh says why)
    vectors = {name: k["wide_accesses"] for name, k in kernels.items()
               if "_nhwc_tile_kernel<" in name and ", x1," not in name}
    assert len(vectors) == 4 + 4 + 2, sorted(vectors)
    assert all(name.endswith("32-bit>") for name in vectors), sorted(vectors)
    assert all(vectors.values()), vectors
