"""Per-task executor setup: which backend runs the math, and how many BLAS threads it may use."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Optional, Union


@dataclass(frozen=True)
class BackendChoice:
    """What the driver knows about the backend a task should use, as plain values.

    Executors cannot tell local mode from a cluster reliably, so the driver records it.
    """

    requested: str = "auto"
    local_mode: Optional[bool] = None
    cpu_fallback: bool = True

    @classmethod
    def for_session(cls, spark, requested: str) -> "BackendChoice":
        """The choice for tasks of ``spark``; in local mode, warns here (once, on the driver)
        when ``"auto"`` will fall back to NumPy on a machine with CuPy but no GPU.

        Local tasks run on the driver's machine, so ``"auto"`` there is settled here: where no
        GPU can be used, the tasks get ``"numpy"`` and no fresh Python worker imports CuPy only
        to find no device (0.5 s each).
        """
        from spark_gpu_mf import conf
        from spark_gpu_mf.backends import local_gpu_possible, warn_local_fallback

        master = spark.conf.get("spark.master", "") or ""
        choice = cls(requested, master.startswith("local"), conf.CPU_FALLBACK.get(spark))
        if choice.local_mode and requested == "auto" and choice.cpu_fallback:
            warn_local_fallback()
            if not local_gpu_possible():
                choice = replace(choice, requested="numpy")
        return choice


def executor_backend(choice: Union[BackendChoice, str]) -> ModuleType:
    """The backend module for this task (``numpy_backend`` or ``cupy_backend``).

    Device selection and the CPU fallback live in ``spark_gpu_mf.backends.select_backend``.
    A plain backend name leaves local mode undecided (see ``select_backend``).
    """
    from spark_gpu_mf.backends import select_backend

    if isinstance(choice, str):
        choice = BackendChoice(choice)
    return select_backend(
        choice.requested, local_mode=choice.local_mode, cpu_fallback=choice.cpu_fallback
    )


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
