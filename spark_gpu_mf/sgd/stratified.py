"""Stratified SGD (DSGD) on Spark: the machinery ``MascotMF`` and ``PrunedMF`` share.

Gemulla et al., "Large-scale matrix factorization with distributed stochastic gradient descent"
(KDD 2011): users and items are cut into ``b`` blocks each, so the ratings form ``b x b`` cells.
The ``b`` cells ``(p, (p + s) mod b)`` of a *stratum* ``s`` share no user block and no item block,
so ``b`` tasks can run SGD on them at the same time without two tasks ever writing the same row.
An epoch runs all ``b`` strata one after the other (``b`` sub-epochs); every rating is visited once
per epoch.

Dataflow (measured and justified in ``docs/mascot.md``)
-------------------------------------------------------
* **Cells, built once.** :func:`build_strata` counts ratings per user and item, deals the rows to
  blocks on the driver (balanced by rating count), maps ids to (block, row) with a broadcast join,
  and builds every non-empty cell once (block-local row numbers and ratings in a fixed seeded
  order), cached as an RDD with one cell per partition. A sub-epoch is then one job of ``b``
  tasks, ``SparkContext.runJob`` on the partitions of its stratum's cells: no filter, no shuffle,
  no SQL planning (a ``mapInArrow`` stage over a cached cell DataFrame took about twice as long).
* **Row state lives on the driver** between sub-epochs, as NumPy arrays per block: factors and any
  optimizer state an estimator keeps per row. Before a sub-epoch every block that will change is
  broadcast (one broadcast per block, reused until the block changes); each task unpacks the two
  blocks of its cell, runs the estimator's update on private copies and returns both blocks with
  its statistics; the driver collects them (Arrow) and the next sub-epoch starts. This keeps every
  sub-epoch to one Spark job with no shuffle, and lets the estimator change any state between
  epochs in plain NumPy. It suits factor matrices up to a few hundred MB (they cross the network
  twice per sub-epoch).
* **Determinism.** Rows are assigned to blocks by (count, id), cells are sorted canonically and
  shuffled with a seed derived from ``(seed, kind, user block, item block)``, the order of strata
  in epoch ``e`` is a permutation seeded by ``(seed, e)``, and statistics are summed in cell order.
  Same seed, data and ``b`` => identical factors, whatever Spark's scheduling.

API for estimators
------------------
Executor side (``spark_gpu_mf.sgd.cells``), module-level functions::

    def update(cell: Cell, users: RowState, items: RowState, settings) -> dict[str, ndarray]

``cell`` has ``users``/``items`` (int32 block-local rows), ``ratings`` (float32) in visiting order;
``users``/``items`` are ``{name: array}`` with the blocks' rows on axis 0 (private copies, update
them in place; new arrays may be added); ``settings`` is the estimator's mapping of plain values
plus ``epoch``, ``sub_epoch`` and ``stratum``. The returned arrays (e.g. MASCOT's per-group sums,
PrunedMF's multiply-add counts) are summed over all cells of the epoch on the driver.

Driver side::

    strata = build_strata(spark, ratings, num_blocks=b, seed=seed)   # ratings: user, item, rating
    runner = StratifiedRunner(strata, update, user_state=[...], item_state=[...], label="PrunedMF")
    for epoch in range(max_iter):
        run = runner.run_epoch(epoch, {"lr": ..., ...})     # b sub-epochs; run.statistics summed
        runner.state("user")[b]  -> RowState of user block b (read)
        runner.set_state("item", [...])                     # between epochs: any NumPy change
        stats, seconds = runner.evaluate(evaluate_fn, settings)  # read-only pass, VALIDATION cells
    runner.close(); strata.release()

``strata.users`` / ``strata.items`` (:class:`BlockLayout`) give each block's ids and per-row
rating counts, for initialization, grouping and the final factor DataFrames.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from pyspark import RDD, StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from spark_gpu_mf.errors import illegal_argument
from spark_gpu_mf.executor.binding import bind
from spark_gpu_mf.sgd import cells as cells_module
from spark_gpu_mf.sgd.cells import (
    CELL_SCHEMA,
    TRAIN,
    VALIDATION,
    CellFunction,
    CellResult,
    RowState,
    pack_arrays,
    sum_statistics,
    unpack_arrays,
)
from spark_gpu_mf.spark.partitioning import key_of_block

__all__ = [
    "BlockLayout",
    "EpochRun",
    "Strata",
    "StratifiedRunner",
    "SubEpochRun",
    "assign_blocks",
    "build_strata",
    "default_num_blocks",
    "strata_order",
]

logger = logging.getLogger("spark_gpu_mf")

# Above this many rows, an id -> (block, row) map is joined by a shuffle instead of a broadcast.
_BROADCAST_MAP_ROWS = 20_000_000
# The setup's scans of the ratings use at most this many tasks per task slot (coalesced).
_SCAN_TASKS_PER_SLOT = 4
# Up to this many ratings, StratifiedRunner.evaluate keeps the cells on the driver (12 bytes each).
LOCAL_EVALUATION_RATINGS = 5_000_000


# --------------------------------------------------------------------------- layout


@dataclass
class BlockLayout:
    """The rows of one side (users or items) cut into blocks.

    Attributes
    ----------
    name : str
        ``"user"`` or ``"item"``.
    ids : list of numpy.ndarray
        ``ids[b]``: int32 ids of block ``b``'s rows, ascending; row ``r`` of the block is
        ``ids[b][r]``.
    counts : list of numpy.ndarray
        ``counts[b]``: int64 training ratings of each row of block ``b``.
    """

    name: str
    ids: list[np.ndarray]
    counts: list[np.ndarray]

    @property
    def num_blocks(self) -> int:
        return len(self.ids)

    @property
    def num_rows(self) -> list[int]:
        return [len(ids) for ids in self.ids]

    @property
    def total_rows(self) -> int:
        return sum(self.num_rows)

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(block, row)`` of each id (int32 arrays), ``(-1, -1)`` for ids not in the layout."""
        ids = np.asarray(ids, dtype=np.int32)
        block = np.full(len(ids), -1, np.int32)
        row = np.full(len(ids), -1, np.int32)
        for b, block_ids in enumerate(self.ids):
            if len(block_ids) == 0:
                continue
            position = np.minimum(np.searchsorted(block_ids, ids), len(block_ids) - 1)
            found = block_ids[position] == ids
            block[found] = b
            row[found] = position[found]
        return block, row


def assign_blocks(name: str, ids: np.ndarray, counts: np.ndarray, num_blocks: int) -> BlockLayout:
    """Deal rows to ``num_blocks`` blocks so that every block gets a similar rating count.

    Rows are sorted by count (descending; ties by id) and dealt in snake order (0, 1, .., b-1,
    b-1, .., 0, ...), so each block gets one of the heaviest rows of every round: the blocks' total
    counts differ by at most the largest count, and the result depends only on (ids, counts, b).
    """
    ids = np.asarray(ids, dtype=np.int32)
    counts = np.asarray(counts, dtype=np.int64)
    order = np.lexsort((ids, -counts))
    rounds = np.arange(len(order)) // num_blocks
    position = np.arange(len(order)) % num_blocks
    block_of_rank = np.where(rounds % 2 == 0, position, num_blocks - 1 - position)
    block_ids, block_counts = [], []
    for b in range(num_blocks):
        members = order[block_of_rank == b]
        members = members[np.argsort(ids[members], kind="stable")]
        block_ids.append(ids[members])
        block_counts.append(counts[members])
    return BlockLayout(name, block_ids, block_counts)


def default_num_blocks(spark: SparkSession) -> int:
    """One block per task slot: each sub-epoch is one wave of tasks."""
    return max(1, spark.sparkContext.defaultParallelism)


def strata_order(num_blocks: int, seed: int, epoch: int) -> list[int]:
    """The order in which epoch ``epoch`` visits the strata: a permutation seeded by both."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x5D5, int(epoch)])
    return [int(s) for s in rng.permutation(num_blocks)]


# --------------------------------------------------------------------------- strata


@dataclass
class Strata:
    """Ratings of one fit, cut into cached cells.

    Attributes
    ----------
    num_blocks : int
    seed : int
    users, items : BlockLayout
    cells : pyspark.RDD
        Cached, one cell per partition: training cell ``(bu, bi)`` in partition ``bu * b + bi``,
        validation cells ``b * b`` further on; records ``(index, (kind, bu, bi, users, items,
        ratings))`` with the arrays as bytes (``cells.cell_record``).
    train_sizes, validation_sizes : numpy.ndarray
        int64 ``(b, b)``: ratings per cell.
    num_validation_unknown : int
        Validation ratings left out because their user or item has no training rating.
    """

    spark: SparkSession
    num_blocks: int
    seed: int
    users: BlockLayout
    items: BlockLayout
    cells: RDD
    train_sizes: np.ndarray
    validation_sizes: np.ndarray
    num_validation_unknown: int = 0
    setup_seconds: float = 0.0

    @property
    def num_ratings(self) -> int:
        return int(self.train_sizes.sum())

    @property
    def num_validation(self) -> int:
        return int(self.validation_sizes.sum())

    def partition(self, kind: int, user_block: int, item_block: int) -> int:
        """The partition of the cached cell RDD that holds one cell."""
        b = self.num_blocks
        return kind * b * b + user_block * b + item_block

    def release(self) -> None:
        """Unpersist the cached cells."""
        self.cells.unpersist()


def _counts(ratings: DataFrame, has_validation: bool) -> dict[str, tuple[np.ndarray, ...]]:
    """Per side, ``(ids, training counts, validation counts)`` of every distinct id.

    One job for both sides (a union of the user and the item column), collected through Arrow.
    """
    is_validation = F.col("is_validation") if has_validation else F.lit(False)
    sides = [
        ratings.select(F.lit(side).alias("side"), F.col(key).alias("id"), is_validation.alias("v"))
        for side, key in enumerate(("user", "item"))
    ]
    table = (
        sides[0]
        .unionByName(sides[1])
        .groupBy("side", "id")
        .agg(
            F.sum(F.when(F.col("v"), 0).otherwise(1)).cast("long").alias("train"),
            F.sum(F.when(F.col("v"), 1).otherwise(0)).cast("long").alias("validation"),
        )
        .toArrow()
    )
    side = table.column("side").to_numpy()
    columns = {
        "id": table.column("id").to_numpy().astype(np.int32),
        "train": table.column("train").to_numpy().astype(np.int64),
        "validation": table.column("validation").to_numpy().astype(np.int64),
    }
    return {
        name: tuple(columns[c][side == index] for c in ("id", "train", "validation"))
        for index, name in enumerate(("user", "item"))
    }


def _row_map(spark: SparkSession, layout: BlockLayout, prefix: str) -> DataFrame:
    block = np.concatenate(
        [np.full(n, b, np.int32) for b, n in enumerate(layout.num_rows)] or [np.zeros(0, np.int32)]
    )
    row = np.concatenate([np.arange(n, dtype=np.int32) for n in layout.num_rows] or [block])
    ids = np.concatenate(layout.ids) if layout.ids else np.zeros(0, np.int32)
    table = pa.table({prefix: ids, f"{prefix[0]}b": block, f"{prefix[0]}l": row})
    frame = spark.createDataFrame(table)
    return F.broadcast(frame) if len(ids) <= _BROADCAST_MAP_ROWS else frame


def _cell_meta(partition: int, records) -> list[tuple[int, int, int, int]]:
    """``(kind, user block, item block, size)`` of the partition's cell, checking its place."""
    meta = []
    for index, (kind, user_block, item_block, _, _, ratings) in records:
        if index != partition:
            raise RuntimeError(f"cell {index} landed on partition {partition}")
        meta.append((kind, user_block, item_block, len(ratings) // 4))
    return meta


def build_strata(
    spark: SparkSession,
    ratings: DataFrame,
    *,
    num_blocks: int,
    seed: int,
    has_validation: bool = False,
    storage_level: StorageLevel = StorageLevel.MEMORY_AND_DISK,
    label: str = "SGD",
) -> Strata:
    """Cut validated ratings into the cached cells of ``num_blocks x num_blocks`` strata.

    Parameters
    ----------
    ratings : DataFrame
        ``user int, item int, rating float`` (see ``validation.validated_ratings``), plus a
        non-null boolean ``is_validation`` column when ``has_validation``: those rows are held
        out of training and cut into validation cells with the same blocks.
    num_blocks : int
        ``b``; partitions of the cached cells and tasks per sub-epoch.
    seed : int
        Seeds the visiting order inside every cell.

    Raises
    ------
    IllegalArgumentException
        When there is no training rating (Spark ALS's message).
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    started = time.perf_counter()
    sc = spark.sparkContext
    sc.setJobDescription(f"spark_gpu_mf {label}: count ratings per user and item")
    most = _SCAN_TASKS_PER_SLOT * max(1, sc.defaultParallelism)
    if ratings.rdd.getNumPartitions() > most:
        # Input from createDataFrame or many small files can have thousands of partitions; the
        # setup scans it three times, and each task costs scheduling time whatever its size.
        ratings = ratings.coalesce(most)
    ratings = ratings.persist(storage_level)
    try:
        counts = _counts(ratings, has_validation)
        user_ids, user_train, user_val = counts["user"]
        item_ids, item_train, _ = counts["item"]
        if user_train.sum() == 0:
            raise illegal_argument(f"requirement failed: No ratings available from {ratings}")
        known_users, known_items = user_train > 0, item_train > 0
        users = assign_blocks("user", user_ids[known_users], user_train[known_users], num_blocks)
        items = assign_blocks("item", item_ids[known_items], item_train[known_items], num_blocks)
        total_validation = int(user_val.sum())

        joined = ratings.join(_row_map(spark, users, "user"), "user").join(
            _row_map(spark, items, "item"), "item"
        )
        kind = (
            F.when(F.col("is_validation"), VALIDATION).otherwise(TRAIN)
            if has_validation
            else F.lit(TRAIN)
        )
        b = num_blocks
        partitions = (2 if has_validation else 1) * b * b
        index = kind * (b * b) + F.col("ub") * b + F.col("ib")
        keyed = joined.select(
            key_of_block(index, partitions).alias("pkey"),
            index.alias("index"),
            kind.alias("kind"),
            "ub",
            "ul",
            "ib",
            "il",
            "rating",
        ).repartition(partitions, "pkey")
        # Cell ``index`` lands on partition ``index`` (see spark.partitioning), the grouping
        # keeps that placement, so the RDD has one cell per partition without another shuffle.
        frames = keyed.groupBy("pkey", "index").applyInPandas(
            bind(cells_module.build_cells, seed=seed), CELL_SCHEMA
        )
        cells = frames.rdd.map(cells_module.cell_record).persist(storage_level)
        sc.setJobDescription(f"spark_gpu_mf {label}: build rating cells")
        meta = cells.mapPartitionsWithIndex(_cell_meta).collect()
    except BaseException:
        ratings.unpersist()
        sc.setJobDescription(None)
        raise
    ratings.unpersist()
    sizes = np.zeros((2, num_blocks, num_blocks), np.int64)
    for kind_of_cell, user_block, item_block, size in meta:
        sizes[kind_of_cell, user_block, item_block] += size
    sc.setJobDescription(None)
    return Strata(
        spark=spark,
        num_blocks=num_blocks,
        seed=seed,
        users=users,
        items=items,
        cells=cells,
        train_sizes=sizes[TRAIN],
        validation_sizes=sizes[VALIDATION],
        num_validation_unknown=total_validation - int(sizes[VALIDATION].sum()),
        setup_seconds=time.perf_counter() - started,
    )


# --------------------------------------------------------------------------- running epochs


@dataclass
class SubEpochRun:
    """One sub-epoch: its stratum, wall time, and the time tasks spent in the update function
    (the rest of ``seconds`` is Spark and data movement)."""

    stratum: int
    seconds: float
    cells: int
    max_task_seconds: float
    sum_task_seconds: float

    @property
    def overhead_seconds(self) -> float:
        return max(0.0, self.seconds - self.max_task_seconds)


@dataclass
class EpochRun:
    """One epoch: summed statistics of all its cells, and its sub-epochs."""

    epoch: int
    statistics: dict[str, np.ndarray]
    seconds: float
    sub_epochs: list[SubEpochRun] = field(default_factory=list)

    @property
    def overhead_seconds(self) -> float:
        return sum(s.overhead_seconds for s in self.sub_epochs)


_SIDES = ("user", "item")


class StratifiedRunner:
    """Runs sub-epochs of an estimator's per-cell update over :class:`Strata`.

    Parameters
    ----------
    strata : Strata
    update : CellFunction
        Module-level executor function (see the module docstring).
    user_state, item_state : list of RowState
        Initial per-row state of every block (``len == num_blocks``; arrays with the block's rows
        on axis 0). The runner owns the lists; read them with :meth:`state` and replace blocks
        with :meth:`set_state` / :meth:`set_block` so that stale broadcasts are dropped.
    label : str
        Estimator name for Spark job descriptions and log lines.
    """

    def __init__(
        self,
        strata: Strata,
        update: CellFunction,
        *,
        user_state: Sequence[RowState],
        item_state: Sequence[RowState],
        label: str = "SGD",
    ):
        self.strata = strata
        self.spark = strata.spark
        self.sc = strata.spark.sparkContext
        self.update = update
        self.label = label
        b = strata.num_blocks
        self._state: dict[str, list[RowState]] = {"user": [], "item": []}
        self._broadcasts: dict[tuple[str, int], Any] = {}
        self._local_cells: dict[int, list[cells_module.Cell]] = {}
        self.set_state("user", user_state)
        self.set_state("item", item_state)
        self._strata_cells = [
            [(p, (p + s) % b) for p in range(b) if strata.train_sizes[p, (p + s) % b] > 0]
            for s in range(b)
        ]

    # ------------------------------------------------------------------ state
    def state(self, side: str) -> list[RowState]:
        """The current row state of every block of ``side`` (``"user"`` or ``"item"``)."""
        return self._state[side]

    def set_state(self, side: str, blocks: Sequence[RowState]) -> None:
        """Replace the state of every block of ``side``."""
        if side not in _SIDES:
            raise ValueError(f"side must be 'user' or 'item', got {side!r}")
        if len(blocks) != self.strata.num_blocks:
            raise ValueError(f"expected {self.strata.num_blocks} {side} blocks, got {len(blocks)}")
        self._state[side] = [dict(block) for block in blocks]
        for b in range(self.strata.num_blocks):
            self._drop_broadcast(side, b)

    def set_block(self, side: str, block: int, arrays: RowState) -> None:
        """Replace the state of one block."""
        self._state[side][block] = dict(arrays)
        self._drop_broadcast(side, block)

    def _drop_broadcast(self, side: str, block: int) -> None:
        handle = self._broadcasts.pop((side, block), None)
        if handle is not None:
            handle.destroy(blocking=False)

    def _handle(self, side: str, block: int):
        handle = self._broadcasts.get((side, block))
        if handle is None:
            handle = self.sc.broadcast(pack_arrays(self._state[side][block]))
            self._broadcasts[(side, block)] = handle
        return handle

    def _handles(self, pairs: Sequence[tuple[int, int]]):
        b = self.strata.num_blocks
        users: list[Any] = [None] * b
        items: list[Any] = [None] * b
        for user_block, item_block in pairs:
            users[user_block] = self._handle("user", user_block)
            items[item_block] = self._handle("item", item_block)
        return users, items

    # ------------------------------------------------------------------ epochs
    def _describe(self, text: str) -> None:
        self.sc.setJobDescription(f"spark_gpu_mf {self.label}: {text}")

    def run_epoch(
        self, epoch: int, settings: Mapping[str, Any] | None = None, *, max_iter: int = 0
    ) -> EpochRun:
        """Run the ``b`` sub-epochs of ``epoch`` (0-based) and return their summed statistics.

        ``settings`` (plain, picklable values) reach every task together with ``epoch``,
        ``sub_epoch`` and ``stratum``.
        """
        started = time.perf_counter()
        b = self.strata.num_blocks
        results: list[tuple[tuple[int, int], dict[str, np.ndarray]]] = []
        sub_epochs = []
        total = f"/{max_iter}" if max_iter else ""
        for sub_epoch, stratum in enumerate(strata_order(b, self.strata.seed, epoch)):
            pairs = self._strata_cells[stratum]
            if not pairs:
                continue
            sub_started = time.perf_counter()
            users, items = self._handles(pairs)
            task_settings = cells_module.settings_for(
                settings, epoch=epoch, sub_epoch=sub_epoch, stratum=stratum
            )
            self._describe(f"epoch {epoch + 1}{total}, sub-epoch {sub_epoch + 1}/{b}")
            partitions = [self.strata.partition(TRAIN, u, i) for u, i in pairs]
            returned = self.sc.runJob(
                self.strata.cells,
                bind(
                    cells_module.update_cells,
                    update=self.update,
                    user_blocks=users,
                    item_blocks=items,
                    settings=task_settings,
                ),
                partitions,
            )
            task_seconds = self._absorb(returned, pairs, results)
            sub_epochs.append(
                SubEpochRun(
                    stratum=stratum,
                    seconds=time.perf_counter() - sub_started,
                    cells=len(pairs),
                    max_task_seconds=max(task_seconds, default=0.0),
                    sum_task_seconds=float(sum(task_seconds)),
                )
            )
        self.sc.setJobDescription(None)
        results.sort(key=lambda item: item[0])
        statistics = sum_statistics([stats for _, stats in results])
        return EpochRun(epoch, statistics, time.perf_counter() - started, sub_epochs)

    def _absorb(self, returned: list[CellResult], pairs, results) -> list[float]:
        """Take the updated blocks of a sub-epoch's results; check every cell came back once."""
        cells_back = sorted((r[0], r[1]) for r in returned)
        if cells_back != sorted(pairs):
            raise RuntimeError(
                f"{self.label}: a sub-epoch returned cells {cells_back}, expected {sorted(pairs)}"
            )
        seconds = []
        for user_block, item_block, user_state, item_state, stats, task_seconds in returned:
            self.set_block("user", user_block, unpack_arrays(user_state, copy=False))
            self.set_block("item", item_block, unpack_arrays(item_state, copy=False))
            results.append(((user_block, item_block), unpack_arrays(stats, copy=False)))
            seconds.append(task_seconds)
        return seconds

    def evaluate(
        self,
        evaluate: CellFunction,
        settings: Mapping[str, Any] | None = None,
        *,
        kind: int = VALIDATION,
        label: str = "evaluate",
        on_driver: bool | None = None,
    ) -> tuple[dict[str, np.ndarray], float]:
        """Run a read-only ``evaluate`` function over all cells of ``kind``.

        Returns the statistics summed in cell order and the wall time. ``on_driver``: where it
        runs. ``None`` (default) runs on the driver when the cells hold at most
        ``LOCAL_EVALUATION_RATINGS`` ratings: they are collected once (12 bytes per rating) and
        every later call costs no Spark job, which would otherwise take as long as a whole
        epoch on small data. Otherwise (or with ``False``) it is one job in which blocks are
        broadcast as for a sub-epoch (and those broadcasts are reused by the next sub-epoch).
        On the driver ``evaluate`` receives the runner's own state: it must not change it.
        """
        started = time.perf_counter()
        sizes = self.strata.validation_sizes if kind == VALIDATION else self.strata.train_sizes
        pairs = [tuple(int(x) for x in p) for p in np.argwhere(sizes > 0)]
        if not pairs:
            return {}, 0.0
        partitions = [self.strata.partition(kind, u, i) for u, i in pairs]
        if on_driver is None:
            on_driver = int(sizes.sum()) <= LOCAL_EVALUATION_RATINGS
        settings = dict(settings or {})
        if on_driver:
            cells = self._local_cells.get(kind)
            if cells is None:
                self._describe(
                    f"collect {'validation' if kind == VALIDATION else 'training'} cells"
                )
                records = self.sc.runJob(self.strata.cells, _records, partitions)
                cells = sorted(
                    cells_module.cells_of(records), key=lambda c: (c.user_block, c.item_block)
                )
                self._local_cells[kind] = cells
            results = [
                evaluate(c, self._state["user"][c.user_block], self._state["item"][c.item_block],
                         settings)
                for c in cells
            ]  # fmt: skip
            self.sc.setJobDescription(None)
            return sum_statistics(results), time.perf_counter() - started
        users, items = self._handles(pairs)
        self._describe(label)
        returned = self.sc.runJob(
            self.strata.cells,
            bind(
                cells_module.evaluate_cells,
                evaluate=evaluate,
                user_blocks=users,
                item_blocks=items,
                settings=settings,
            ),
            partitions,
        )
        self.sc.setJobDescription(None)
        returned.sort(key=lambda r: (r[0], r[1]))
        statistics = sum_statistics([unpack_arrays(r[4], copy=False) for r in returned])
        return statistics, time.perf_counter() - started

    def close(self) -> None:
        """Destroy every broadcast the runner made."""
        for key in list(self._broadcasts):
            self._drop_broadcast(*key)


def _records(records):
    return list(records)


def merged_ids(layout: BlockLayout) -> np.ndarray:
    """All ids of a layout, block after block: the row order of the blocks' arrays stacked."""
    return np.concatenate(layout.ids) if layout.ids else np.zeros(0, np.int32)
