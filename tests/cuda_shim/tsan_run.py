"""Run every kernel once on a small input through a ThreadSanitizer build of the shim.

Usage: ``LD_PRELOAD=<libtsan.so> python tsan_run.py <libcudashim.so>`` (``shim.tsan_environment``).
Each CUDA thread is an std::thread, so a missing ``__syncthreads`` shows up as a TSan data race
(exit code 66 from TSAN_OPTIONS) and usually as a wrong result (exit code 3). Prints one line per
kernel with its largest error against numpy_backend.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import shim

from spark_gpu_mf.backends import cupy_backend, numpy_backend


def main(library: str) -> int:
    device = cupy_backend.Device(shim.ShimModule(Path(library)))
    rng = np.random.default_rng(7)
    rank, n_src = 13, 60
    counts = np.array([0, 1, 9, 40])  # 40 ratings: two staging windows of the rank-13 plan
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    indices = rng.integers(0, n_src, indptr[-1]).astype(np.int32)
    ratings = rng.normal(2.0, 2.0, indptr[-1]).astype(np.float32)
    src = rng.normal(0.0, 0.5, (n_src, rank)).astype(np.float32)
    yty = numpy_backend.gram(src)
    failed = False
    for implicit in (False, True):
        args = {"reg_param": 0.1, "implicit": implicit, "alpha": 1.5, "yty": yty}
        A, b = cupy_backend._normal_equations(device, indptr, indices, ratings, src, **args)
        A_ref, b_ref = numpy_backend.normal_equations(indptr, indices, ratings, src, **args)
        error = max(np.abs(A - A_ref).max(), np.abs(b - b_ref).max())
        print(f"hermitian implicit={implicit}: max error {error:.2e}")
        failed |= not error < 1e-4
    A, b = A_ref[1:], b_ref[1:]  # implicit systems of the rows with ratings
    x0 = rng.normal(0.0, 0.1, b.shape).astype(np.float32)
    for precision in ("fp32", "fp16"):
        x = cupy_backend._solve_cg(device, A, b, x0, iterations=5, precision=precision)
        x_ref = numpy_backend.solve_cg(A, b, x0, iterations=5, precision=precision)
        error = np.abs(x - x_ref).max() / np.abs(x_ref).max()
        print(f"cg {precision}: max relative error {error:.2e}")
        failed |= not error < 1e-2
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
