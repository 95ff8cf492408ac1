"""The classic-session shortcut for a stratified epoch: one RDD job per sub-epoch.

The DataFrame dataflow (``stratified.StratifiedRunner``) runs an epoch as one chain of cogroups
and serves classic and Spark Connect sessions alike. Where a JVM is at hand, this road is
faster on small and medium fits (``docs/benchmarks.md``): a stratum's cells are partitions of a
cached RDD (one cell per partition), a sub-epoch is ``SparkContext.runJob`` on those partitions
with every block it needs in a broadcast, and the driver takes the updated blocks from the
job's result. It runs the same per-cell function on the same cells and blocks in the same order,
so both roads give identical factors (tested).
"""

from __future__ import annotations

from typing import Any

from pyspark import StorageLevel
from pyspark.sql import functions as F

from spark_gpu_mf.executor.binding import bind
from spark_gpu_mf.sgd import cells as cells_module
from spark_gpu_mf.sgd.cells import TRAIN, CellResult, unpack_arrays
from spark_gpu_mf.spark.partitioning import key_of_block

__all__ = ["BroadcastEpochs"]


class BroadcastEpochs:
    """Sub-epochs as RDD jobs for one :class:`~spark_gpu_mf.sgd.stratified.StratifiedRunner`.

    Built on first use (one shuffle of the training cells into one partition each); holds one
    broadcast per block until the block changes.
    """

    def __init__(self, runner, storage_level: StorageLevel = StorageLevel.MEMORY_AND_DISK):
        strata = runner.strata
        self.runner = runner
        self.sc = strata.spark.sparkContext
        b = strata.num_blocks
        index = F.col("user_block") * b + F.col("item_block")
        keyed = strata.of_kind(TRAIN).select(
            key_of_block(index, b * b).alias("ckey"), index.alias("index"), *_CELL_COLUMNS
        )
        # Cell ``ub * b + ib`` lands on partition ``ub * b + ib`` (see spark.partitioning).
        shuffled = keyed.repartition(b * b, "ckey")
        self.cells = shuffled.rdd.map(cells_module.cell_record).persist(storage_level)
        # (side, block) -> (the packed bytes broadcast, their broadcast)
        self._broadcasts: dict[tuple[str, int], tuple[bytes, Any]] = {}

    def _handle(self, side: str, block: int):
        packed = self.runner.packed(side, block)
        sent = self._broadcasts.get((side, block))
        if sent is None or sent[0] is not packed:
            if sent is not None:
                sent[1].destroy(blocking=False)
            sent = (packed, self.sc.broadcast(packed))
            self._broadcasts[(side, block)] = sent
        return sent[1]

    def run_sub_epoch(self, pairs, settings) -> list[CellResult]:
        """Run the cells ``pairs`` of one stratum; returns one result per cell."""
        b = self.runner.strata.num_blocks
        users: list[Any] = [None] * b
        items: list[Any] = [None] * b
        for user_block, item_block in pairs:
            users[user_block] = self._handle("user", user_block)
            items[item_block] = self._handle("item", item_block)
        return self.sc.runJob(
            self.cells,
            bind(
                cells_module.update_cells,
                update=self.runner.update,
                user_blocks=users,
                item_blocks=items,
                settings=settings,
            ),
            [u * b + i for u, i in pairs],
        )

    def close(self) -> None:
        """Destroy the broadcasts and unpersist the cell RDD."""
        for _, handle in self._broadcasts.values():
            handle.destroy(blocking=False)
        self._broadcasts.clear()
        self.cells.unpersist()


_CELL_COLUMNS = ("kind", "user_block", "item_block", "users", "items", "ratings")


def absorb(runner, returned: list[CellResult], pairs) -> tuple[list, list[float]]:
    """Take a sub-epoch's blocks into ``runner``; returns ``(((ub, ib), statistics) per cell,
    task seconds)``, checking that every cell came back once."""
    cells_back = sorted((r[0], r[1]) for r in returned)
    if cells_back != sorted(pairs):
        raise RuntimeError(
            f"{runner.label}: a sub-epoch returned cells {cells_back}, expected {sorted(pairs)}"
        )
    results, seconds = [], []
    for user_block, item_block, user_state, item_state, stats, task_seconds in returned:
        runner.set_block("user", user_block, unpack_arrays(user_state, copy=False), user_state)
        runner.set_block("item", item_block, unpack_arrays(item_state, copy=False), item_state)
        results.append(((user_block, item_block), unpack_arrays(stats, copy=False)))
        seconds.append(task_seconds)
    return results, seconds
