"""The benchmark code runs (on a tiny input); its numbers are not asserted."""
from bench.pool import report, run


def test_pool_benchmark_runs_on_a_tiny_input():
    shape = (1, 3, 9, 16)
    result = run(shape, repeat=1)
    assert len(result["rows"]) == 8 and all(r["ours_ms"] > 0 and r["torch_ms"] > 0 for r in result["rows"])
    text = report(result, shape, "cpu", "python -m bench.pool --shape 1 3 9 16")
    assert "| pool forward | NCHW |" in text and "exactly 1/32" in text


def test_conv_bn_relu_benchmark_runs_on_a_tiny_input():
    from bench.conv_bn_relu import bn_relu_rows, inference_rows, report, stack_rows

    result = dict(bn_shape=[2, 4, 5, 7], size=[6, 8], repeat=1, bn=bn_relu_rows((2, 4, 5, 7), 1, "cpu"),
                  stack=stack_rows((6, 8), 1, "cpu"), inference=inference_rows((6, 8), 1, "cpu"))
    text = report(result, "python -m bench.conv_bn_relu --size 6 8", "cpu")
    assert "| NCHW |" in text and "| channels_last |" in text
