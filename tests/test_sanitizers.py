"""The op tests again, against a build of the native library under AddressSanitizer and
UndefinedBehaviorSanitizer (SEGNET_EXT_SANITIZE=1, see setup.py), with the CUDA kernels in
the emulator built the same way: any out-of-bounds read or write, in a CPU kernel or an
emulated CUDA kernel (a partial border window, a partial warp, the last packed byte), or
any undefined behaviour, ends that run with a report and fails here. This is the project's
stand-in for compute-sanitizer on a GPU. (tests/cuda_emu/test_sanitizers.py adds
ThreadSanitizer for races between emulated threads.)

Run it alone with `pytest tests/test_sanitizers.py -s` (a few minutes: one build of the
library's CPU sources and of the emulator, then the op tests at sanitizer speed)."""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build", "sanitize")
OP_TESTS = [
    "tests/test_pool.py",
    "tests/test_conv_bn_relu.py",
    "tests/test_fuzz.py",
    "tests/cuda_emu/test_pool_kernels.py",
    "tests/cuda_emu/test_conv_bn_relu_kernels.py",
]
CXX = shutil.which("g++")

pytestmark = [
    pytest.mark.sanitizers,
    pytest.mark.skipif(CXX is None, reason="needs g++ and its sanitizer runtimes"),
    pytest.mark.skipif(os.environ.get("SEGNET_EXT_SANITIZE") == "1", reason="this is the sanitized run itself"),
]


def runtime(name: str) -> str:
    return subprocess.run([CXX, f"-print-file-name={name}"], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def sanitized_env():
    """Builds the sanitized library into build/sanitize (incrementally) and returns the
    environment that runs Python with it in place of segnet_ext._C."""
    env = {**os.environ, "SEGNET_EXT_SANITIZE": "1"}
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", os.path.join(BUILD, "lib"),
                            "--build-temp", os.path.join(BUILD, "tmp")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (library,) = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(BUILD, "lib")) for f in files if f.startswith("_C.")]
    # The ASan runtime must come first; libstdc++ with it, so that ASan finds __cxa_throw.
    env.update(LD_PRELOAD=f"{runtime('libasan.so')} {runtime('libstdc++.so')}", SEGNET_EXT_LIBRARY=library,
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1",
               SEGNET_FUZZ_EXAMPLES=os.environ.get("SEGNET_FUZZ_EXAMPLES", "30"))
    return env


def test_out_of_bounds_kernel_is_caught(sanitized_env):
    # A kernel with an off-by-one bound (tests/cuda_emu/selftest_kernels.cuh) must be reported.
    code = ("import torch; from tests.cuda_emu.build import build_emulator; "
            "build_emulator().copy_off_by_one(torch.randn(100), 32, 2); print('not caught')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=sanitized_env, capture_output=True, text=True, timeout=900)
    assert result.returncode != 0 and "not caught" not in result.stdout, result.stdout + result.stderr[-3000:]
    assert "AddressSanitizer: heap-buffer-overflow" in result.stderr and "copy_off_by_one" in result.stderr, result.stderr[-3000:]


def test_op_tests_pass_under_sanitizers(sanitized_env):
    # -s: a sanitizer report goes to stderr as the process dies; pytest must not swallow it
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *OP_TESTS],
                            cwd=ROOT, env=sanitized_env, capture_output=True, text=True, timeout=3600)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    fuzz = re.search(r"fuzz cases run: \d+", result.stdout)
    print(f"under ASan+UBSan: {summary}" + (f"; {fuzz.group(0)}" if fuzz else ""))
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    assert re.search(r"\d+ passed", summary) and "failed" not in summary, summary
