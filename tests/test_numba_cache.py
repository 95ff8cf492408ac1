"""Numba's on-disk cache of the compiled loops: always somewhere writable.

A read-only installation without a writable home (a container image) made every
``@njit(cache=True)`` fail at import ("no locator available"); the package now falls back to a
per-user directory under the temporary directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from spark_gpu_mf.backends import numba_cache

PACKAGE = Path(__file__).resolve().parents[1] / "spark_gpu_mf"


def test_numbas_own_locations_are_kept_while_one_is_writable(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert numba_cache.choose_cache_dir(str(tmp_path / "pycache"), str(blocked / "x")) is None
    assert numba_cache.choose_cache_dir(str(blocked / "x"), str(tmp_path / "user")) is None
    chosen = numba_cache.choose_cache_dir(str(blocked / "x"), str(blocked / "y"))
    assert chosen == numba_cache.fallback_cache_dir()


def test_a_read_only_install_without_a_writable_home_still_imports_and_caches(tmp_path):
    """Every ``__pycache__`` of a copy of the package is a file (not writable, even for root),
    and the user cache directory lies under a file: the kernels import, compile and cache in
    the fallback directory under TMPDIR."""
    copy = tmp_path / "site"
    shutil.copytree(PACKAGE, copy / "spark_gpu_mf", ignore=shutil.ignore_patterns("__pycache__"))
    for directory, _, _ in os.walk(copy / "spark_gpu_mf"):
        (Path(directory) / "__pycache__").write_text("")
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(copy), "XDG_CACHE_HOME": str(blocked),
           "HOME": str(blocked), "TMPDIR": str(temp), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("NUMBA_CACHE_DIR", None)
    code = (
        "import numpy as np, spark_gpu_mf.executor.sorting as s\n"
        "assert s.__file__.startswith(%r), s.__file__\n"
        "print(s.stable_argsort(np.array([3, 1, 2], np.int32), 4)[0].tolist())\n" % str(copy)
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, cwd=temp,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[1, 2, 0]"
    cached = [f for _, _, files in os.walk(temp) for f in files if f.endswith(".nbi")]
    assert any(f.startswith("sorting.") for f in cached), cached


def test_compile_kernels_runs_every_als_configuration_once(monkeypatch):
    """``scripts/setup.sh``'s step: one tiny fit per solver path, training RMSE included."""
    from spark_gpu_mf.executor import single_task

    seen = []
    monkeypatch.setattr(single_task, "warm_up", lambda s, training_rmse: seen.append(
        (s.config.solver, s.config.precision, s.config.implicit, s.config.nonnegative,
         training_rmse, s.blas_threads)))  # fmt: skip
    single_task.compile_kernels()
    assert len(set(seen)) == len(seen) == 6
    assert {s[:4] for s in seen} >= {
        ("cg", "fp32", False, False), ("cholesky", "fp32", True, False),
        ("cg", "fp16", False, False), ("cg", "fp32", False, True),
    }  # fmt: skip
    assert all(s[4] is True and s[5] == 0 for s in seen)
