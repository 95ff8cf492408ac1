"""PrunedMF's executor side: the per-cell function the stratified runner calls, and the row state.

Row state of a block (``cells.RowState``): ``factors`` float32 ``(rows, rank)`` and
``accumulator`` float32 ``(rows,)``, LIBMF's row-wise AdaGrad sum (starts at 1; plain SGD leaves
it at 1). The update runs on the task's GPU through ``kernels/sgd_pruned.cu`` when the backend
selection gives it one, else through the Numba kernel; both return the same statistics.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from spark_gpu_mf.sgd.cells import Cell, RowState
from spark_gpu_mf.sgd.common import task_uses_gpu
from spark_gpu_mf.sgd.pruned_numba import sgd_cell

__all__ = ["ACCUMULATOR", "FACTORS", "initial_state", "update_cell"]

FACTORS = "factors"
ACCUMULATOR = "accumulator"


def initial_state(
    block_ids: list[np.ndarray], rank: int, init_std: float, seed: int, side: int
) -> list[RowState]:
    """Row state of every block: ``N(0, init_std^2)`` factors and accumulators of 1.

    The factors are drawn for all ids of the side in ascending id order from a generator seeded
    by ``(seed, side)`` and then dealt to the blocks, so a row starts from the same vector
    whatever ``numBlocks`` is.
    """
    ids = np.concatenate(block_ids) if block_ids else np.zeros(0, np.int32)
    order = np.argsort(ids, kind="stable")
    draws = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x9D3F, int(side)]).normal(
        0.0, init_std, (len(ids), rank)
    )
    factors = np.empty((len(ids), rank), np.float32)
    factors[order] = draws
    states, start = [], 0
    for block in block_ids:
        stop = start + len(block)
        states.append(
            {
                FACTORS: np.ascontiguousarray(factors[start:stop]),
                ACCUMULATOR: np.ones(len(block), np.float32),
            }
        )
        start = stop
    return states


def _cell_kernel(settings: Mapping[str, Any], rank: int):
    """``pruned_numba.sgd_cell`` or its CUDA twin, by the task's backend (a ``BackendChoice``)."""
    if task_uses_gpu(settings["backend"]):
        from spark_gpu_mf.sgd import pruned_cuda

        if rank <= pruned_cuda.MAX_RANK:
            return pruned_cuda.sgd_cell_cupy
    return sgd_cell


def update_cell(
    cell: Cell, users: RowState, items: RowState, settings: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """One cell of one sub-epoch (the runner's ``CellFunction``).

    ``settings``: ``step``, ``reg`` (training scale), ``threshold_user``, ``threshold_item``
    (0 before pruning starts), ``optimizer`` (``pruned_numba.OPTIMIZERS`` code), ``regrowth``,
    ``backend`` (the driver's ``BackendChoice``).

    Returns ``sse`` (squared errors of the pruned predictions, before each update, in training
    scale), ``macs`` (executed multiply-adds) and ``cpu_seconds`` (CPU time of this thread in the
    kernel call: unlike wall time it does not grow when other processes share the cores; on a GPU
    it is only the host's part), summed over the epoch by the runner.
    """
    P, Q = users[FACTORS], items[FACTORS]
    kernel = _cell_kernel(settings, P.shape[1])
    started = time.thread_time()
    sse, macs = kernel(
        cell.users,
        cell.items,
        cell.ratings,
        P,
        Q,
        users[ACCUMULATOR],
        items[ACCUMULATOR],
        float(settings["step"]),
        float(settings["reg"]),
        float(settings["threshold_user"]),
        float(settings["threshold_item"]),
        int(settings["optimizer"]),
        bool(settings.get("regrowth", False)),
    )
    cpu_seconds = time.thread_time() - started
    return {
        "sse": np.float64(sse),
        "macs": np.float64(macs),
        "cpu_seconds": np.float64(cpu_seconds),
    }
