"""The standalone cluster starter's process bookkeeping, without starting a cluster."""

from __future__ import annotations

import os
import subprocess
import sys

from spark_gpu_mf.jobs import standalone


def test_descendants_and_their_memory_are_found_in_proc():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        found = standalone.descendants(os.getpid(), standalone._parents())
        assert child.pid in found
        assert standalone.memory_bytes(child.pid) > 1 << 20  # a Python interpreter: > 1 MiB
    finally:
        child.kill()
        child.wait()
    assert standalone.memory_bytes(child.pid) == 0  # gone: nothing to count


def test_stopping_a_cluster_that_never_started_does_nothing():
    cluster = standalone.StandaloneCluster(workers=1)
    cluster.stop()
    assert cluster.url.startswith("spark://127.0.0.1:")
