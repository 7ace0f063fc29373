"""The CUDA emulator's own tests: barriers, shared memory, shuffles, atomics, partial warps,
and its build."""
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.cuda_emu.build import ROOT, build_directory

SCHEDULES = ["free", "warps_forward", "warps_reverse"]


@pytest.fixture(params=SCHEDULES)
def schedule(request, emu):
    emu.set_schedule(request.param)
    yield request.param
    emu.set_schedule("free")


@pytest.mark.parametrize("threads,blocks,n", [(64, 3, 1000), (96, 2, 5), (32, 1, 33), (128, 4, 4099)])
def test_block_reduction(emu, schedule, threads, blocks, n):
    x = torch.randn(n)
    got = emu.block_sum(x, True, threads, blocks).item()
    assert got == pytest.approx(x.double().sum().item(), rel=1e-5, abs=1e-4)


def test_missing_barrier_fails(emu):
    # Without its __syncthreads(), warp 0 reads the other warps' partial sums before they
    # are written: under the forward schedule it does so on every run.
    emu.set_schedule("warps_forward")
    try:
        # Positive values, so a partial sum read before it is written shows; a new scale
        # each time, so the stale partial sums that the previous launch left in the
        # (static) shared memory cannot pass for this launch's.
        for scale in (1.0, 1e3, 1e6):
            x = (torch.rand(4096) + 1) * scale
            expected = x.double().sum().item()
            assert emu.block_sum(x, True, 128, 2).item() == pytest.approx(expected, rel=1e-5)
            assert emu.block_sum(x, False, 128, 2).item() != pytest.approx(expected, rel=1e-3)
    finally:
        emu.set_schedule("free")


@pytest.mark.parametrize("width", [32, 16, 8, 4])
def test_warp_shuffles_follow_cuda(emu, width):
    threads, blocks = 64, 2
    got = emu.shuffles(threads, blocks, width)
    lane = torch.arange(threads * blocks) % 32
    segment = lane - lane % width
    down = torch.where(lane + 1 < segment + width, lane + 1, lane)
    up = torch.where(lane - 1 >= segment, lane - 1, lane)
    xor = lane ^ 1
    expected = torch.stack([down, up, xor, segment, segment + width - 1], dim=1).int()
    assert torch.equal(got, expected)


@pytest.mark.parametrize("threads,blocks", [(64, 3), (48, 2), (7, 5)])
def test_atomics_and_partial_warps(emu, schedule, threads, blocks):
    counters = emu.atomics(threads, blocks)
    total = threads * blocks
    assert counters[0] == total
    nwarps = (total + 31) // 32
    for w in range(nwarps):
        lanes = min(32, total - 32 * w)
        assert counters[1 + w] == (1 << lanes) - 1
    assert counters[1 + nwarps] == total - 1


def test_shuffle_from_a_lane_a_partial_warp_lacks_is_an_error(emu):
    with pytest.raises(RuntimeError, match="partial warp that has only 20 lanes"):
        emu.shuffle_past_partial_warp(20)
    emu.shuffle_past_partial_warp(32)  # a full warp has the lane


def test_launches_after_a_failed_one_run_as_before(emu):
    # Launches reuse their threads: one that failed midway leaves none of them stuck or
    # holding state, for launches of more threads, fewer or as many.
    for threads in (64, 256, 96, 64):
        with pytest.raises(RuntimeError, match="partial warp that has only 20 lanes"):
            emu.shuffle_past_partial_warp(20)
        x = torch.randn(1000)
        got = emu.block_sum(x, True, threads, 3).item()
        assert got == pytest.approx(x.double().sum().item(), rel=1e-5, abs=1e-4), threads


@pytest.mark.parametrize("threads,returning,mask", [(32, 0, 0xFFFFFFFF), (20, 0, 0xFFFFF), (32, 8, 0xFFFFFF00),
                                                    (64, 0, 0xFFFFFFFF)])
def test_warp_intrinsics_accept_the_mask_of_the_lanes_present(emu, threads, returning, mask):
    out = emu.warp_sync_with_mask(threads, mask, returning)
    expected = torch.arange(threads, dtype=torch.float)
    expected[:returning] = -1
    assert torch.equal(out, expected)


@pytest.mark.parametrize("threads,returning,mask,present", [
    (20, 0, 0xFFFFFFFF, "0x000fffff"),   # names lanes past a partial warp's end
    (32, 8, 0xFFFFFFFF, "0xffffff00"),   # names lanes that returned
    (32, 0, 0x0000FFFF, "0xffffffff"),   # leaves out lanes that take part
])
def test_warp_intrinsics_reject_a_mask_other_than_the_lanes_present(emu, threads, returning, mask, present):
    with pytest.raises(RuntimeError, match=f"mask 0x{mask:08x} in warp 0, whose present lanes are {present}"):
        emu.warp_sync_with_mask(threads, mask, returning)


def test_32_bit_divider_matches_integer_division(emu):
    """kernels/launch.cuh's Divider<uint32_t> (multiply-high and shift) against // and %, for
    every numerator below 2^31 the kernels can pass, at the edges and at random."""
    divisors = [1, 2, 3, 7, 23, 30, 60, 480, 512, 65535, 65537, 2**20 + 7, 2**30, 2**31 - 1]
    divisors += torch.randint(1, 2**31 - 1, (20,)).tolist()
    for d in divisors:
        edges = [0, 1, d - 1, d, d + 1, 2 * d - 1, 2 * d, 2**31 - 1, 2**31 - 2, (2**31 - 1) // d * d]
        n = torch.cat([torch.tensor([e for e in edges if 0 <= e < 2**31]), torch.randint(0, 2**31 - 1, (2000,)),
                       torch.randint(0, 4 * d, (200,)).clamp(max=2**31 - 1)])
        q, r = emu.divide(n, d)
        assert torch.equal(q, n // d) and torch.equal(r, n % d), d


@pytest.mark.parametrize("threads,blocks,message", [
    (257, 1, r"257 threads per block, above the kernel's __launch_bounds__\(256\)"),
    (0, 1, "empty grid"),
    (32, 0, "empty grid"),
])
def test_launches_a_gpu_refuses_are_errors(emu, threads, blocks, message):
    x = torch.randn(64)
    with pytest.raises(RuntimeError, match=message):
        emu.strided_copy(x, 64, 1, False, threads, blocks)


# ---- tensor cores and asynchronous copies (cuda_emu_wmma.h) ----

def tf32(t):
    """Round to TF32 as __float_to_tf32 does (to nearest, ties away from zero)."""
    return ((t.float().view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b_col_major", [False, True])
def test_wmma_fragments_multiply_as_a_matrix_product(emu, dtype, b_col_major):
    a, b = torch.randn(16, 48).to(dtype), torch.randn(48, 16).to(dtype)
    c = emu.wmma_product(a, b, b_col_major, 8, 32)
    want = tf32(a).double() @ tf32(b).double() if dtype == torch.float32 else a.double() @ b.double()
    torch.testing.assert_close(c.double(), want, rtol=1e-6, atol=1e-5)
    if dtype == torch.float32:  # rounded to TF32: far from the float product
        assert (c.double() - a.double() @ b.double()).abs().max() > 1e-4


def test_wmma_needs_the_whole_warp(emu):
    with pytest.raises(RuntimeError, match="fill_fragment in warp 0, whose present lanes are 0x0000ffff"):
        emu.wmma_product(torch.randn(16, 16).half(), torch.randn(16, 16).half(), False, 0, 16)


def test_wmma_loads_count_shared_memory_bank_conflicts(emu):
    a, b = torch.randn(16, 64).half(), torch.randn(64, 16).half()
    emu.bank_traffic()
    emu.wmma_product(a, b, True, 8, 32)  # rows of 144 bytes: 8 rows' 16-byte pieces in 8 bank groups
    wavefronts, ideal = emu.bank_traffic()
    assert wavefronts == ideal == 4 * (4 + 4) + 8  # 4 steps of two fragments of 4 phases, the store's 8
    emu.wmma_product(a, b, True, 0, 32)  # rows of 128 bytes: every row's piece in one bank group
    wavefronts, ideal = emu.bank_traffic()
    assert ideal == 40 and wavefronts == 4 * 8 * 8 + 8


def test_cp_async_copies_and_zero_fills_once_waited_for(emu):
    x = torch.randn(256)
    out = emu.cp_async_exchange(x, True, True).view(64, 4)
    want = x.view(64, 4).roll(-32, 0).clone()  # thread t reads thread t + 32's 16 bytes
    want[1::2, 2:] = 0  # odd threads zero-fill their last 8 bytes
    assert torch.equal(out, want)


def test_a_missing_cp_async_wait_or_barrier_reads_garbage(emu):
    x = torch.randn(256)
    assert emu.cp_async_exchange(x, False, True).isnan().all()  # never waited for
    results = []
    for schedule in ("warps_forward", "warps_reverse"):  # waited for, but no __syncthreads
        emu.set_schedule(schedule)
        try:
            results.append(emu.cp_async_exchange(x, True, False).isnan().any().item())
        finally:
            emu.set_schedule("free")
    assert any(results)


def test_a_forked_process_launches_on_threads_of_its_own(emu):
    x = torch.ones(100)
    assert emu.block_sum(x, True, 64, 1).item() == 100  # the parent's threads exist now
    pid = os.fork()
    if pid == 0:  # the child: its launches must not wait for the parent's threads
        os._exit(0 if emu.block_sum(x, True, 64, 1).item() == 100 else 1)
    for _ in range(600):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's launch did not return within 60 s")


def test_a_build_killed_midway_does_not_stop_the_next(emu):
    # torch's load() before 2.14 waits for as long as its "lock" file exists, and a build
    # killed midway (a session's end, ^C) leaves one: the next build must not hang on it.
    # (torch 2.14 locks with flock, which dies with its process; test-cpu-only runs 2.13.)
    lock = os.path.join(build_directory("segnet_cuda_emu"), "lock")
    open(lock, "w").close()
    code = "from tests.cuda_emu.build import build_emulator; build_emulator()"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
