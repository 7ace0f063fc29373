"""pytest-benchmark view of the same cases as `python -m bench.pool` (which reports the
ratios and the bandwidth floor): one benchmark group per op and layout, ours beside torch's.

    MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 \\
        python -m pytest bench/test_pool_bench.py --benchmark-group-by=group
"""
import pytest

from bench.pool import cases

SHAPE = (4, 64, 360, 480)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("op", ["pool forward", "pool backward", "unpool forward", "unpool backward"])
@pytest.mark.parametrize("impl", ["segnet_ext", "torch"])
def test_pool_ops(benchmark, op, channels_last, impl):
    name, ours, theirs, *_ = next(c for c in cases(SHAPE, channels_last) if c[0] == op)
    benchmark.group = f"{op} {'channels_last' if channels_last else 'NCHW'}"
    benchmark(ours if impl == "segnet_ext" else theirs)
