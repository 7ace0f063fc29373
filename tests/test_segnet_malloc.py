"""segnet.malloc: the process re-executes itself once with the large-block thresholds,
unless told not to or the user chose otherwise."""
import os
import subprocess
import sys

import pytest

from segnet import malloc

PROBE = ("import os, sys; from segnet import malloc; print('start', flush=True); malloc.use_tuned_malloc(); "
         "print(os.environ.get('MALLOC_MMAP_THRESHOLD_'), os.environ.get('MALLOC_TRIM_THRESHOLD_'), sys.argv[1:])")


def probe(**env):
    base = {k: v for k, v in os.environ.items() if k not in malloc.THRESHOLDS and k != malloc.SWITCH}
    done = subprocess.run([sys.executable, "-c", PROBE, "--flag", "x y"], capture_output=True, text=True,
                          env={**base, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.mark.skipif(not malloc._glibc(), reason="glibc only")
def test_reexecutes_once_with_the_thresholds_and_the_same_arguments():
    big = malloc.THRESHOLDS["MALLOC_MMAP_THRESHOLD_"]
    assert probe() == ["start", "start", f"{big} {big} ['--flag', 'x y']"]


def test_switch_and_the_users_own_settings_are_left_alone():
    assert probe(SEGNET_MALLOC="default") == ["start", "None None ['--flag', 'x y']"]
    assert probe(MALLOC_MMAP_THRESHOLD_="65536") == ["start", "65536 None ['--flag', 'x y']"]
    assert probe(LD_PRELOAD="/nonexistent/libjemalloc.so.2") == ["start", "None None ['--flag', 'x y']"]
