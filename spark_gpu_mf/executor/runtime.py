"""Per-task executor setup: which backend runs the math, and how many BLAS threads it may use."""

from __future__ import annotations

import contextlib
from types import ModuleType


def executor_backend(requested: str) -> ModuleType:
    """The backend module for this task (``numpy_backend`` or ``cupy_backend``).

    Device selection and the CPU fallback live in ``spark_gpu_mf.backends.select_backend``.
    """
    from spark_gpu_mf import backends

    select = getattr(backends, "select_backend", None)
    if select is None:  # the GPU backend has not landed yet: NumPy only
        from spark_gpu_mf.backends import numpy_backend

        return numpy_backend
    return select(requested)


@contextlib.contextmanager
def limit_blas_threads(threads: int):
    """Run the block with at most ``threads`` BLAS threads (0 leaves the limit alone).

    Spark runs several tasks per executor at once; tasks x threads must not exceed the cores.
    """
    if threads <= 0:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads, user_api="blas"):
        yield
