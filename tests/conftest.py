import getpass
import os
import random
import tempfile
import zlib

import pytest
import torch

# Inductor's on-disk cache does not key on ATEN_CPU_CAPABILITY (torch 2.14.1): C++ kernels
# generated for the machine's AVX-512 and reloaded under avx2 compute NaN, even for plain nn
# layers. A run that overrides the capability (make test-isa) gets a cache of its own, and
# leaves the machine's cache alone.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY']}")

# Fresh random inputs every run; the seed is printed in the header, and
# SEGNET_TEST_SEED=<seed> replays a run.
SEED = int(os.environ.get("SEGNET_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    import segnet_ext

    return [f"segnet-ext test seed: {SEED} (replay with SEGNET_TEST_SEED={SEED})",
            f"CPU kernels: segnet_ext {segnet_ext.cpu_capability()}, ATen {torch.backends.cpu.get_cpu_capability()}; "
            f"torch {torch.__version__}, segnet_ext CUDA kernels: {segnet_ext.cuda_kernels_available()}"]


def pytest_terminal_summary(terminalreporter):
    import sys

    fuzz = sys.modules.get("tests.test_fuzz")
    if fuzz is not None and fuzz.CASES:
        terminalreporter.write_sep("-", f"fuzz cases run: {sum(fuzz.CASES.values())}")
        for what, count in sorted(fuzz.CASES.items()):
            terminalreporter.write_line(f"{count:6d}  {what}")


@pytest.fixture(autouse=True)
def _seed(request):
    # Per-test seed derived from the run's seed and the test id: fresh every run, yet
    # independent of which tests run before. crc32, not hash(): str hashes change from one
    # process to the next (PYTHONHASHSEED), which made SEGNET_TEST_SEED replay nothing.
    torch.manual_seed(SEED ^ zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    # Class-weight caches go to a temporary folder, not the user's ~/.cache.
    monkeypatch.setenv("SEGNET_CACHE", str(tmp_path_factory.getbasetemp() / "segnet-cache"))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session")
def emu():
    """The CUDA kernels of csrc/kernels/, built for the CPU against tests/cuda_emu/cuda_emu.h."""
    from tests.cuda_emu.build import build_emulator

    return build_emulator()


@pytest.fixture(params=[32, 64], ids=["index32", "index64"])
def index_bits(request, emu):
    """Runs an emulated kernel test with 32-bit indices (what every tensor under 2^31 elements
    gets) and again with the 64-bit path forced."""
    emu.set_index64(request.param == 64)
    yield request.param
    emu.set_index64(False)


def write_camvid(root, splits=(("train", 4), ("val", 2)), size=(24, 32), seed=0):
    """A small CamVid-layout folder of random images and labels (every class present,
    some void), for tests that need data without the bundled sample's 360x480 cost."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    H, W = size
    for split, count in splits:
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            label = rng.integers(0, 12, size=(H, W), dtype=np.uint8)
            image = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / split / f"img{i}.png")
            Image.fromarray(label).save(root / f"{split}annot" / f"img{i}.png")
    return root


@pytest.fixture
def camvid_root(tmp_path):
    return write_camvid(tmp_path / "camvid")
