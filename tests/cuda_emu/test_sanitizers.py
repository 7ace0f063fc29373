"""The emulated CUDA kernels under AddressSanitizer + UndefinedBehaviorSanitizer and under
ThreadSanitizer (the stand-in for compute-sanitizer's memcheck and racecheck), built as a
program without torch's libraries (c10's header-only half types only), so that no Python
process needs the sanitizer runtimes preloaded."""
import os
import shutil
import subprocess

import pytest
from torch.utils.cpp_extension import include_paths

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CXX = shutil.which("g++") or shutil.which("c++")

pytestmark = [pytest.mark.sanitizers, pytest.mark.skipif(CXX is None, reason="no C++ compiler")]


def build(tmp_path, sanitizer):
    exe = tmp_path / f"sanitize_{sanitizer.split(',')[0]}"
    subprocess.run([CXX, "-std=c++20", "-O1", "-g", f"-fsanitize={sanitizer}", "-fno-sanitize-recover=all",
                    "-fno-omit-frame-pointer", f"-I{ROOT}/csrc", f"-I{HERE}", f"-I{include_paths()[0]}",
                    os.path.join(HERE, "sanitize_main.cpp"), "-o", str(exe), "-pthread"],
                   check=True, capture_output=True, text=True)
    return str(exe)


def test_kernels_clean_under_address_and_undefined_sanitizers(tmp_path):
    result = subprocess.run([build(tmp_path, "address,undefined")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


def test_kernels_race_free_under_thread_sanitizer_and_a_race_is_caught(tmp_path):
    exe = build(tmp_path, "thread")
    env = {**os.environ, "TSAN_OPTIONS": "halt_on_error=1"}
    clean = subprocess.run([exe], capture_output=True, text=True, timeout=300, env=env)
    assert clean.returncode == 0 and clean.stdout.strip() == "ok", clean.stdout + clean.stderr
    racy = subprocess.run([exe, "racy"], capture_output=True, text=True, timeout=300, env=env)
    assert racy.returncode != 0 and "data race" in racy.stderr, racy.stdout + racy.stderr
