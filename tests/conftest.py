import os
import random

import pytest
import torch

# Fresh random inputs every run; the seed is printed in the header, and
# SEGNET_TEST_SEED=<seed> replays a run.
SEED = int(os.environ.get("SEGNET_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"segnet-ext test seed: {SEED} (replay with SEGNET_TEST_SEED={SEED})"


@pytest.fixture(autouse=True)
def _seed(request):
    # Per-test seed derived from the run's seed and the test id: fresh every run,
    # yet independent of which tests run before.
    torch.manual_seed(SEED ^ (hash(request.node.nodeid) & 0x7FFFFFFF))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session")
def emu():
    """The CUDA kernels of csrc/kernels/, built for the CPU against tests/cuda_emu/cuda_emu.h."""
    from tests.cuda_emu.build import build_emulator

    return build_emulator()
