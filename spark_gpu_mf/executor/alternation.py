"""The ALS alternation, written once for every dataflow.

Spark's ``ALS.train`` order: the items are solved first from the users' starting factors, then the
users from the new items, ``maxIter`` times. A *dataflow* only decides how a half-iteration's
source factors reach the destination blocks: inside one task (``single_task``), or through Spark's
shuffle from each solved block to the blocks, or partitions, that read it (the driver's
``spark.als_train``). Everything else a fit does per iteration (training RMSE, checkpoints,
progress lines, the summary) happens in ``alternate`` through the same three calls.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Mapping, Optional, Protocol, Tuple

import numpy as np

from spark_gpu_mf.backends.spark_random import initial_factors

USERS, ITEMS = "user", "item"


class Dataflow(Protocol):
    """How a fit's half-iterations run; ``alternate`` calls it in Spark's order."""

    def solve(self, side: str, iteration: int) -> None:
        """Solve every block of ``side`` from the other side's current factors (and, when the
        solver warm-starts, ``side``'s own previous factors)."""

    def finish_iteration(self, iteration: int) -> Dict[str, float]:
        """Complete the iteration (run what is lazy, cut lineage at checkpoints) and return its
        metrics: ``trainRmse`` when asked for, nothing else is required."""


def alternate(
    dataflow: Dataflow,
    max_iter: int,
    on_iteration: Callable[[int, float, Dict[str, float]], None],
) -> None:
    """Run ``max_iter`` ALS iterations of ``dataflow``; ``on_iteration(iteration, seconds,
    metrics)`` after each (progress line, summary entry)."""
    for iteration in range(1, max_iter + 1):
        started = time.perf_counter()
        dataflow.solve(ITEMS, iteration)
        dataflow.solve(USERS, iteration)
        metrics = dataflow.finish_iteration(iteration)
        on_iteration(iteration, time.perf_counter() - started, metrics)


def starting_factors(num_rows: Mapping[int, int], rank: int, seed: int) -> Dict[int, np.ndarray]:
    """Spark's starting factors of each block of one side: ``{block: (rows, rank) float32}``."""
    return {b: initial_factors(n, rank, seed, b) for b, n in num_rows.items()}


# A warm start's factors of one side: ``(ids, factors)``, ids sorted int32, factors (n, rank).
Initial = Tuple[np.ndarray, np.ndarray]


def known_rows(ids: np.ndarray, initial: Optional[Initial]) -> Tuple[np.ndarray, np.ndarray]:
    """``(rows int32, factors float32 (k, rank))``: the rows of a block (sorted ``ids``) that
    ``initial`` has factors for, and those factors (none without ``initial``)."""
    if initial is None or len(initial[0]) == 0 or len(ids) == 0:
        return np.zeros(0, np.int32), np.zeros((0, 0), np.float32)
    known_ids, known_factors = initial
    position = np.minimum(np.searchsorted(known_ids, ids), len(known_ids) - 1)
    rows = np.flatnonzero(known_ids[position] == ids).astype(np.int32)
    return rows, known_factors[position[rows]]


def with_known_rows(factors: np.ndarray, rows: np.ndarray, known: np.ndarray) -> np.ndarray:
    """``factors`` with ``rows`` replaced by ``known`` (a copy; ``factors`` when none are)."""
    if len(rows) == 0:
        return factors
    out = np.array(factors, np.float32, copy=True)
    out[rows] = known
    return out


def warm_started(ids: np.ndarray, factors: np.ndarray, initial: Optional[Initial]) -> np.ndarray:
    """One block's starting factors with the rows ``initial`` knows taken from it.

    ``ids`` are the block's sorted ids and ``factors`` Spark's starting factors for them: rows
    the initial model has no id for keep those, so a warm start differs from a cold one only
    in the known rows.
    """
    return with_known_rows(factors, *known_rows(ids, initial))


def sorted_initial(ids: np.ndarray, factors: np.ndarray) -> Initial:
    """``(ids, factors)`` as ``warm_started`` reads them: int32 ids sorted, float32 rows."""
    order = np.argsort(ids, kind="stable")
    return (
        np.ascontiguousarray(np.asarray(ids)[order], np.int32),
        np.ascontiguousarray(np.asarray(factors)[order], np.float32),
    )


def rmse(sse: float, count: int) -> Optional[float]:
    """Root mean squared error of ``count`` ratings, None when there are none."""
    return float(np.sqrt(sse / count)) if count else None
