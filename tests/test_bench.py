"""The benchmark code runs (on a tiny input); its numbers are not asserted."""
import torch

from bench.pool import report, run


def test_pool_benchmark_runs_on_a_tiny_input():
    shape = (1, 3, 9, 16)
    result = run(shape, repeat=1)
    assert len(result["rows"]) == 8 and all(r["ours_ms"] > 0 and r["torch_ms"] > 0 for r in result["rows"])
    text = report(result, shape, "cpu", "python -m bench.pool --shape 1 3 9 16")
    assert "| pool forward | NCHW |" in text and "exactly 1/32" in text and "default malloc" not in text
    result["default"] = result
    text = report(result, shape, "cpu", "python -m bench.pool --shape 1 3 9 16")
    rows = [line for line in text.splitlines() if line.startswith(("| pool", "| unpool"))]
    assert text.count("default malloc") == 1 and len(rows) == 8 and all(line.count("|") == 12 for line in rows)


def test_pool_benchmark_times_the_dtype_asked_for():
    shape = (1, 3, 9, 16)
    result = run(shape, repeat=1, dtype=torch.bfloat16)
    text = report(result, shape, "cpu", "python -m bench.pool --shape 1 3 9 16 --dtype bfloat16")
    assert text.startswith("## 2x2 arg-max pooling and unpooling, bfloat16") and "input [1, 3, 9, 16] bfloat16" in text
    assert "float32" not in report(run(shape, repeat=1), shape, "cpu", "python -m bench.pool").split("\n")[0]


def test_benchmark_runs_under_glibc_defaults_in_a_child_process():
    from bench.common import under_default_allocator

    rows = under_default_allocator("bench.conv_bn_relu", ["--bn-shape", 2, 4, 5, 7, "--repeat", 1])["rows"]
    assert [r["layout"] for r in rows] == ["NCHW", "channels_last"] and all(r["ours_ms"] > 0 for r in rows)


def test_machine_description_names_the_isa():
    from bench.common import cpu_isa, machine_description

    assert cpu_isa("flags\t: fpu avx2 avx512f avx512_bf16 amx_tile\n") == "AVX-512 + BF16 + AMX"
    assert cpu_isa("flags\t: fpu avx avx2 fma\n") == "AVX2 (no AVX-512)"
    assert "segnet_ext " in machine_description() and "ATen " in machine_description()


def test_conv_bn_relu_benchmark_runs_on_a_tiny_input():
    from bench.conv_bn_relu import bn_relu_rows, inference_rows, report, stack_rows, winograd_rows

    result = dict(bn_shape=[2, 4, 5, 7], size=[6, 8], repeat=1, bn=bn_relu_rows((2, 4, 5, 7), 1, "cpu"),
                  stack=stack_rows((6, 8), 1, "cpu"), inference=inference_rows((6, 8), 1, "cpu"),
                  winograd=winograd_rows(1, [(16, 16, 5, 64), (8, 16, 5, 7)]))
    text = report(result, "python -m bench.conv_bn_relu --size 6 8", "cpu")
    assert "| NCHW |" in text and "| channels_last |" in text
    assert "| 16 -> 16, 5x64 | NCHW |" in text and text.count("| Winograd |") == 2 and text.count("| oneDNN |") == 2


def test_segnet_report_runs_on_a_tiny_input(tmp_path):
    from bench.report import peak_memory, plot, ratios, report, run

    result = run("segnet_basic", (16, 24), [2], [(8, 12), (16, 24)], repeat=1, variants=["ours", "torch", "torch+sac"],
                 peak=False)
    rows = result["training"]["batch 2"]
    assert all(rows[v]["saved_bytes"] > 0 and rows[v]["step_ms"] > 0 for v in ("ours", "torch", "torch+sac"))
    assert result["index_bytes"]["batch 2"]["int64"] == 32 * result["index_bytes"]["batch 2"]["packed"]
    assert set(ratios(rows)) == {"torch", "torch+sac"}
    text = report(result, "python -m bench.report --model segnet_basic --size 16 24")
    assert "### Training" in text and "1/32.0" in text
    plot(result, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"memory.png", "time.png", "scaling.png"}
    assert peak_memory("train", "ours", "segnet_basic", (16, 24), 1) > 0


def test_segnet_report_profile_runs():
    from bench.report import profile

    shares = profile("segnet_basic", (16, 24), 1)
    assert set(shares) == {"ours", "torch"} and all(0 < s <= 1 for s in shares.values())


def test_recipe_benchmark_runs_on_a_tiny_input():
    from bench.recipe import measure, report

    ms = measure(1, 1, crop=(16, 24), full=(24, 32))
    text = report(ms, 1, 1, "python -m bench.recipe", crop=(16, 24), full=(24, 32), default_ms=[2 * t for t in ms])
    assert text.count("| bf16 autocast") == 5 and "| 1.00x |" in text and text.count("| 50% |") == 7
    text = report(ms[:2], 1, 1, "python -m bench.recipe", crop=(16, 24), full=(24, 32), bf16=False)
    assert "| bf16 autocast" not in text and "left out" in text


def test_models_benchmark_runs_on_a_tiny_input():
    from bench.models import measure, table

    row = measure("segnet_basic", False, 1, size=((96, 128), 1))
    assert row["fused"] == row["pairs"] == 8 and not row["left"] and row["exact"] < 1e-9
    f, p = row["eager saved MiB"]
    assert 0 < f < p
    f, p = row["eager step peak MiB"]
    assert 0 < f < 0.9 * p  # the fused step saves less, and frees what it saved as its backward goes
    text = table([row], ["eager"], default_malloc=False)
    assert text.count("\n") == 2 and "| segnet_basic | 1x3x96x128 | 8 | 8 |" in text
    assert f" {f:.0f} / {p:.0f} ({f / p:.2f}x) |" in text
    row["default malloc step ratio"], row["default malloc step ms"] = 1.5, [3.0, 2.0]
    text = table([row], ["eager"], default_malloc=True)
    assert "glibc's default malloc |" in text.splitlines()[0] and text.endswith(" 1.500x (2 ms plain) |")


def test_saved_activations_count_copies_of_a_parameter_apart():
    """A compiled model keeps channels_last copies of its weights: counted apart, not as
    activations; the parameter itself counted nowhere."""
    from bench.models import saved_activation_bytes

    class CopiesItsWeight(torch.nn.Conv2d):
        def forward(self, x):
            return torch.nn.functional.conv2d(x, self.weight.contiguous(memory_format=torch.channels_last))

    x = torch.randn(2, 4, 9, 11)
    layer = CopiesItsWeight(4, 6, 3, bias=False)
    assert saved_activation_bytes(layer, x) == (x.numel() * 4, layer.weight.numel() * 4)
    plain = torch.nn.Conv2d(4, 6, 3, bias=False)
    assert saved_activation_bytes(plain, x) == (x.numel() * 4, 0)


def test_gpu_check_runs_dry_here(tmp_path):
    """`make gpu-check` without a GPU: every measurement on the CPU at tiny sizes, the report
    written; and its sanitizer driver runs every op."""
    from bench import gpu_check

    out = tmp_path / "gpu.md"
    gpu_check.main(["--dry", "--output", str(out)])
    text = out.read_text()
    for op in ("max_pool2x2", "max_unpool2x2_backward", "bn_relu_backward_apply"):
        assert text.count(f"| {op} |") == 2 * 2 * len(gpu_check.DRY_MAPS), op
    assert text.count("| 8->8 12x16 |") == 2 and "| none |" in text and "| bf16 |" in text
    gpu_check.main(["--ops-once"])
