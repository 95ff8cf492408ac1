"""PrunedMF's per-cell update on a GPU: loading and launching ``kernels/sgd_pruned.cu``.

The kernel is the CUDA twin of ``pruned_numba.sgd_cell`` (same update, same counters; see the
comment at the top of the ``.cu`` file for the warp layout). Everything here except
``get_module`` and ``sgd_cell_cupy`` is plain Python over an array namespace ``xp`` and a
``RawModule``-like ``module``, so the tests run this launch code unchanged against the kernel
compiled for the CPU by the host shim (``tests/cuda_shim``). CuPy is imported only inside those
two functions, which run on GPU executors; the driver never calls them.
"""

from __future__ import annotations

import numpy as np

from spark_gpu_mf.backends import cuda_kernels
from spark_gpu_mf.sgd import warp_launch
from spark_gpu_mf.sgd.pruned_numba import ADAGRAD
from spark_gpu_mf.sgd.warp_launch import DIMS_PER_LANE, MAX_RANK, production_warps

__all__ = [
    "DIMS_PER_LANE",
    "KERNEL_FILE",
    "MAX_RANK",
    "get_module",
    "kernel_name",
    "launch_cell",
    "production_warps",
    "sgd_cell_cupy",
]

KERNEL_FILE = "sgd_pruned.cu"  # entry points sgd_pruned_d{1,2,4,8}; geometry: warp_launch


def kernel_name(rank: int) -> str:
    """The entry point for ``rank``: the fewest dimensions per lane that cover it."""
    return warp_launch.kernel_name("sgd_pruned_d", rank, "PrunedMF")


def launch_cell(
    module,
    xp,
    users,
    items,
    ratings,
    P,
    Q,
    GP,
    GQ,
    *,
    step: float,
    reg: float,
    threshold_p: float,
    threshold_q: float,
    optimizer: int,
    warps: int,
    regrowth: bool = False,
) -> tuple[float, int]:
    """Run one cell's ratings through the kernel; ``P``, ``Q``, ``GP``, ``GQ`` change in place.

    Arrays live where ``module`` runs (CuPy arrays on a GPU, NumPy arrays for the shim): int32
    ``users``/``items``, float32 ``ratings``, C-contiguous float32 ``P``/``Q`` (rows, rank) and
    float32 ``GP``/``GQ``. Returns ``(sum of squared errors, executed multiply-adds)`` like
    ``pruned_numba.sgd_cell``.
    """
    n = int(ratings.shape[0])
    rank = int(P.shape[1])
    if n == 0:
        return 0.0, 0
    blocks, per_block = warp_launch.launch_shape(n, warps)
    total_warps = blocks * per_block
    sse = xp.zeros(total_warps, dtype=xp.float64)
    macs = xp.zeros(total_warps, dtype=xp.int64)
    kernel = module.get_function(kernel_name(rank))
    kernel(
        (blocks,),
        (32 * per_block,),
        (
            users,
            items,
            ratings,
            np.int64(n),
            P,
            Q,
            GP,
            GQ,
            np.int32(rank),
            np.float32(step),
            np.float32(reg),
            np.float32(threshold_p),
            np.float32(threshold_q),
            np.int32(1 if optimizer == ADAGRAD else 0),
            np.int32(1 if regrowth else 0),
            sse,
            macs,
        ),
    )
    return float(sse.sum()), int(macs.sum())


def get_module():
    """The compiled ``sgd_pruned.cu`` for the current CUDA device (GPU executors only)."""
    return cuda_kernels.get_module((KERNEL_FILE,))


def sgd_cell_cupy(
    users: np.ndarray,
    items: np.ndarray,
    ratings: np.ndarray,
    P: np.ndarray,
    Q: np.ndarray,
    GP: np.ndarray,
    GQ: np.ndarray,
    step: float,
    reg: float,
    threshold_p: float,
    threshold_q: float,
    optimizer: int,
    regrowth: bool = False,
) -> tuple[float, int]:
    """``pruned_numba.sgd_cell`` on the task's GPU: host arrays in, updated in place."""
    import cupy

    device = [cupy.asarray(a) for a in (users, items, ratings, P, Q, GP, GQ)]
    result = launch_cell(
        get_module(),
        cupy,
        *device,
        step=step,
        reg=reg,
        threshold_p=threshold_p,
        threshold_q=threshold_q,
        optimizer=optimizer,
        warps=production_warps(len(ratings)),
        regrowth=regrowth,
    )
    for host, updated in zip((P, Q, GP, GQ), device[3:]):
        host[...] = cupy.asnumpy(updated)
    return result
