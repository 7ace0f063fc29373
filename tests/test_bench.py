"""The benchmark code runs (on a tiny input); its numbers are not asserted."""
from bench.pool import report, run


def test_pool_benchmark_runs_on_a_tiny_input():
    shape = (1, 3, 9, 16)
    result = run(shape, repeat=1)
    assert len(result["rows"]) == 8 and all(r["ours_ms"] > 0 and r["torch_ms"] > 0 for r in result["rows"])
    text = report(result, shape, "cpu", "python -m bench.pool --shape 1 3 9 16")
    assert "| pool forward | NCHW |" in text and "exactly 1/32" in text
