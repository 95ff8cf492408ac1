"""Stratified SGD (DSGD) on Spark: the machinery ``MascotMF`` and ``PrunedMF`` share.

Gemulla et al., "Large-scale matrix factorization with distributed stochastic gradient descent"
(KDD 2011): users and items are cut into ``b`` blocks each, so the ratings form ``b x b`` cells.
The ``b`` cells ``(p, (p + s) mod b)`` of a *stratum* ``s`` share no user block and no item block,
so ``b`` tasks can run SGD on them at the same time without two tasks ever writing the same row.
An epoch runs all ``b`` strata one after the other (``b`` sub-epochs); every rating is visited once
per epoch.

Dataflow (DataFrame API only, so classic and Spark Connect sessions run the same code; measured
in ``docs/mascot.md`` and ``docs/benchmarks.md``)
--------------------------------------------------------------------------------------------
* **Cells, built once.** :func:`build_strata` counts ratings per user and item, deals the rows to
  blocks on the driver (balanced by rating count), maps ids to (block, row) with a broadcast join,
  and builds every non-empty cell once (block-local row numbers and ratings in a fixed seeded
  order), cached as a DataFrame with one row per cell, the cells of user block ``p`` in
  partition ``p`` (``repartition`` by a partition key, ``spark.partitioning``).
* **An epoch is one Spark job.** The driver sends every block's row state (factors and any
  optimizer state, packed as Arrow binary) in a small local DataFrame of *messages*. Sub-epoch
  ``k`` is a cogroup, on the user block's partition key, of the stratum's cached cells with the
  messages; its task (``cells.run_sub_epoch``) updates its two blocks and re-keys the item block
  for the task that meets it in the next stratum. Sub-epochs are chained by a ``repartition`` of
  the messages alone (the cells side keeps its cached partitioning, so no rating moves), and the
  last one's messages (all blocks and every cell's statistics) come back to the driver as
  Arrow. Between epochs the estimator may change any state in plain NumPy.
* **Classic sessions** take a measured-faster road to the same factors unless
  ``spark.gpumf.sgd.jvmShortcut`` is false: one RDD job per sub-epoch over the same cells, the
  blocks in broadcasts (``jvm_epochs``).
* **Small fits** may skip Spark after collecting the ratings: :func:`build_strata_on_driver`
  makes the same blocks and cells in the driver, and the runner then runs every sub-epoch's cells
  in threads of the driver (the estimator decides when; MascotMF up to
  ``spark.gpumf.sgd.inDriverMaxRatings``). Same factors, no job per sub-epoch.
* **Determinism.** Rows are assigned to blocks by (count, id), cells are sorted canonically and
  shuffled with a seed derived from ``(seed, kind, user block, item block)``, the order of strata
  in epoch ``e`` is a permutation seeded by ``(seed, e)``, and statistics are summed in cell order.
  Same seed, data and ``b`` => identical factors, whatever Spark's scheduling or the kind of
  session. A retried task reads the same shuffled messages and so computes the same blocks.

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from spark_gpu_mf import conf
from spark_gpu_mf.errors import illegal_argument
from spark_gpu_mf.executor.binding import bind, bind_pair
from spark_gpu_mf.sgd import cells as cells_module
from spark_gpu_mf.sgd.cells import (
    BUILT_CELL_SCHEMA,
    ITEM,
    MESSAGE_SCHEMA,
    STATS,
    TRAIN,
    USER,
    VALIDATION,
    CellFunction,
    RowState,
    item_destination,
    message_table,
    pack_arrays,
    state_message,
    sum_statistics,
    unpack_arrays,
)
from spark_gpu_mf.sgd.jvm_epochs import BroadcastEpochs, absorb
from spark_gpu_mf.spark import session as sessions
from spark_gpu_mf.spark.partitioning import key_of_block, partition_keys

__all__ = [
    "BlockLayout",
    "EpochRun",
    "Strata",
    "StratifiedRunner",
    "SubEpochRun",
    "assign_blocks",
    "build_strata",
    "build_strata_on_driver",
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
    return sessions.default_parallelism(spark)


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
    cells : pyspark.sql.DataFrame
        Cached, one row per non-empty cell: ``pkey, stratum`` (``(item block - user block) mod
        b``) and the ``cells.BUILT_CELL_SCHEMA`` columns, hash-partitioned on ``pkey`` so that
        the cells of user block ``p`` are in partition ``p``.
    train_sizes, validation_sizes : numpy.ndarray
        int64 ``(b, b)``: ratings per cell.
    num_validation_unknown : int
        Validation ratings left out because their user or item has no training rating.
    local_cells : dict or None
        Strata built on the driver (:func:`build_strata_on_driver`): ``cells`` is None and
        this maps ``TRAIN``/``VALIDATION`` to the cells, sorted by (user block, item block).
    """

    spark: SparkSession
    num_blocks: int
    seed: int
    users: BlockLayout
    items: BlockLayout
    cells: DataFrame | None
    train_sizes: np.ndarray
    validation_sizes: np.ndarray
    num_validation_unknown: int = 0
    setup_seconds: float = 0.0
    local_cells: dict[int, list[cells_module.Cell]] | None = None

    @property
    def in_driver(self) -> bool:
        """Whether the cells live in this process (:func:`build_strata_on_driver`)."""
        return self.local_cells is not None

    @property
    def num_ratings(self) -> int:
        return int(self.train_sizes.sum())

    @property
    def num_validation(self) -> int:
        return int(self.validation_sizes.sum())

    def of_kind(self, kind: int, stratum: int | None = None) -> DataFrame:
        """The cached cells of ``kind`` (and of one stratum), keeping their partitioning."""
        condition = F.col("kind") == kind
        if stratum is not None:
            condition = condition & (F.col("stratum") == stratum)
        return self.cells.filter(condition)

    def release(self) -> None:
        """Unpersist the cached cells."""
        if self.cells is not None:
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
    sessions.set_job_description(spark, f"spark_gpu_mf {label}: count ratings per user and item")
    # Input from createDataFrame or many small files can have thousands of partitions; the setup
    # scans it twice, and each task costs scheduling time whatever its size (a no-op when the
    # input has fewer partitions).
    ratings = ratings.coalesce(_SCAN_TASKS_PER_SLOT * sessions.default_parallelism(spark))
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
        built = (
            joined.select(kind.alias("kind"), "ub", "ul", "ib", "il", "rating")
            .groupBy("kind", "ub", "ib")
            .applyInPandas(bind(cells_module.build_cells, seed=seed), BUILT_CELL_SCHEMA)
        )
        cells = (
            built.select(
                key_of_block(F.col("user_block"), b).alias("pkey"),
                F.pmod(F.col("item_block") - F.col("user_block"), F.lit(b)).alias("stratum"),
                *built.columns,
            )
            .repartition(b, "pkey")
            .persist(storage_level)
        )
        sessions.set_job_description(spark, f"spark_gpu_mf {label}: build rating cells")
        meta = cells.select(
            "kind", "user_block", "item_block", "size", F.spark_partition_id().alias("partition")
        ).toArrow()
    except BaseException:
        ratings.unpersist()
        sessions.set_job_description(spark, None)
        raise
    ratings.unpersist()
    sizes = np.zeros((2, num_blocks, num_blocks), np.int64)
    columns = [meta.column(c).to_numpy() for c in ("kind", "user_block", "item_block", "size")]
    misplaced = meta.column("partition").to_numpy() != columns[1]
    if misplaced.any():
        cells.unpersist()
        raise RuntimeError(f"{int(misplaced.sum())} cells are not in their user block's partition")
    np.add.at(sizes, tuple(columns[:3]), columns[3])
    sessions.set_job_description(spark, None)
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


def build_strata_on_driver(
    spark: SparkSession,
    table: pa.Table,
    *,
    num_blocks: int,
    seed: int,
    has_validation: bool = False,
) -> Strata:
    """The strata :func:`build_strata` makes, from ratings already collected on the driver.

    For small fits: no Spark job at all, and the same blocks and cells (same layout, same
    visiting order), so a :class:`StratifiedRunner` over them computes the same factors as over
    the cached cells. ``table``: ``user int, item int, rating float[, is_validation bool]``.
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    started = time.perf_counter()
    user = table.column("user").to_numpy().astype(np.int32)
    item = table.column("item").to_numpy().astype(np.int32)
    rating = table.column("rating").to_numpy().astype(np.float32)
    if has_validation:
        is_validation = table.column("is_validation").to_numpy(zero_copy_only=False).astype(bool)
    else:
        is_validation = np.zeros(len(user), bool)
    train = ~is_validation
    if not train.any():
        raise illegal_argument("requirement failed: No ratings available from the training set")
    layouts = []
    for name, ids in (("user", user), ("item", item)):
        known, counts = np.unique(ids[train], return_counts=True)
        layouts.append(assign_blocks(name, known, counts, num_blocks))
    users, items = layouts
    ub, ul = users.locate(user)
    ib, il = items.locate(item)
    kind = np.where(is_validation, VALIDATION, TRAIN)
    placed = (ub >= 0) & (ib >= 0)
    b = num_blocks
    key = (kind * b + ub) * b + ib
    order = np.argsort(np.where(placed, key, -1), kind="stable")[int((~placed).sum()) :]
    key_sorted = key[order]
    starts = np.flatnonzero(np.r_[True, key_sorted[1:] != key_sorted[:-1]])
    ends = np.r_[starts[1:], len(order)]
    local: dict[int, list[cells_module.Cell]] = {TRAIN: [], VALIDATION: []}
    sizes = np.zeros((2, b, b), np.int64)
    for start, end in zip(starts.tolist(), ends.tolist()):
        rows = order[start:end]
        cell_kind, user_block, item_block = int(kind[rows[0]]), int(ub[rows[0]]), int(ib[rows[0]])
        users_of, items_of, ratings_of = ul[rows], il[rows], rating[rows]
        visit = cells_module.visiting_order(
            cell_kind, user_block, item_block, users_of, items_of, ratings_of, seed
        )
        local[cell_kind].append(
            cells_module.Cell(
                user_block, item_block, users_of[visit], items_of[visit], ratings_of[visit]
            )
        )
        sizes[cell_kind, user_block, item_block] = len(rows)
    return Strata(
        spark=spark,
        num_blocks=num_blocks,
        seed=seed,
        users=users,
        items=items,
        cells=None,
        train_sizes=sizes[TRAIN],
        validation_sizes=sizes[VALIDATION],
        num_validation_unknown=int((is_validation & ~placed).sum()),
        setup_seconds=time.perf_counter() - started,
        local_cells=local,
    )


# --------------------------------------------------------------------------- running epochs


@dataclass
class SubEpochRun:
    """One sub-epoch: its stratum and the time its tasks spent in the update function (the
    sub-epochs of an epoch run in one Spark job, so only the epoch has a wall time)."""

    stratum: int
    cells: int
    max_task_seconds: float
    sum_task_seconds: float


@dataclass
class EpochRun:
    """One epoch: summed statistics of all its cells, and its sub-epochs."""

    epoch: int
    statistics: dict[str, np.ndarray]
    seconds: float
    sub_epochs: list[SubEpochRun] = field(default_factory=list)

    @property
    def overhead_seconds(self) -> float:
        """Wall time not spent in the slowest task of each sub-epoch: Spark and data movement."""
        return max(0.0, self.seconds - sum(s.max_task_seconds for s in self.sub_epochs))


_SIDES = ("user", "item")


class StratifiedRunner:
    """Runs epochs of an estimator's per-cell update over :class:`Strata`.

    Parameters
    ----------
    strata : Strata
    update : CellFunction
        Module-level executor function (see the module docstring).
    user_state, item_state : list of RowState
        Initial per-row state of every block (``len == num_blocks``; arrays with the block's rows
        on axis 0). The runner owns the lists; read them with :meth:`state` and replace blocks
        with :meth:`set_state` / :meth:`set_block`.
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
        self.update = update
        self.label = label
        b = strata.num_blocks
        self._keys = partition_keys(b)
        self._state: dict[str, list[RowState]] = {"user": [], "item": []}
        self._packed: dict[tuple[str, int], bytes] = {}
        self._local_cells: dict[int, list[cells_module.Cell]] = {}
        self._jvm: BroadcastEpochs | None = None
        # Strata built on the driver run here too: cells in threads, one per task slot (the
        # kernels release the GIL), no Spark job.
        self._on_driver = strata.local_cells is not None
        self._pool = ThreadPoolExecutor(max_workers=b) if self._on_driver else None
        if self._on_driver:
            self._local_cells = dict(strata.local_cells)
            self._train_cells = {(c.user_block, c.item_block): c for c in strata.local_cells[TRAIN]}
        self._use_jvm = (
            not self._on_driver
            and not sessions.is_connect(self.spark)
            and conf.SGD_JVM_SHORTCUT.get(self.spark)
        )
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
            self._packed.pop((side, b), None)

    def set_block(self, side: str, block: int, arrays: RowState, packed: bytes | None = None):
        """Replace the state of one block (``packed``: its ``pack_arrays`` bytes, if known)."""
        self._state[side][block] = dict(arrays)
        if packed is None:
            self._packed.pop((side, block), None)
        else:
            self._packed[(side, block)] = packed

    def packed(self, side: str, block: int) -> bytes:
        """The ``pack_arrays`` bytes of one block's state (kept until the block changes)."""
        packed = self._packed.get((side, block))
        if packed is None:
            packed = pack_arrays(self._state[side][block])
            self._packed[(side, block)] = packed
        return packed

    def _state_frame(self, first_stratum: int) -> DataFrame:
        """Every block's packed state, keyed for the tasks of ``first_stratum``."""
        b = self.strata.num_blocks
        messages = [state_message(USER, p, self.packed("user", p), self._keys[p]) for p in range(b)]
        messages += [
            state_message(
                ITEM, q, self.packed("item", q), self._keys[item_destination(q, first_stratum, b)]
            )
            for q in range(b)
        ]
        return self.spark.createDataFrame(message_table(messages))

    def _block_frame(self, side: str) -> DataFrame:
        """``<side>_block int, <side>_state binary``: every block's packed state."""
        b = self.strata.num_blocks
        table = pa.table(
            {
                f"{side}_block": pa.array(range(b), pa.int32()),
                f"{side}_state": pa.array([self.packed(side, k) for k in range(b)], pa.binary()),
            }
        )
        return self.spark.createDataFrame(table)

    # ------------------------------------------------------------------ epochs
    def _describe(self, text: str | None) -> None:
        sessions.set_job_description(
            self.spark, None if text is None else f"spark_gpu_mf {self.label}: {text}"
        )

    def run_epoch(
        self, epoch: int, settings: Mapping[str, Any] | None = None, *, max_iter: int = 0
    ) -> EpochRun:
        """Run the ``b`` sub-epochs of ``epoch`` (0-based), one Spark job; returns their summed
        statistics.

        ``settings`` (plain, picklable values) reach every task together with ``epoch``,
        ``sub_epoch`` and ``stratum``.
        """
        started = time.perf_counter()
        b = self.strata.num_blocks
        steps = [
            (sub_epoch, stratum)
            for sub_epoch, stratum in enumerate(strata_order(b, self.strata.seed, epoch))
            if self._strata_cells[stratum]
        ]
        if not steps:
            return EpochRun(epoch, {}, time.perf_counter() - started, [])
        if self._on_driver:
            statistics, sub_epochs = self._run_driver_epoch(epoch, steps, settings)
            return EpochRun(epoch, statistics, time.perf_counter() - started, sub_epochs)
        if self._use_jvm:
            statistics, sub_epochs = self._run_jvm_epoch(epoch, steps, settings, max_iter)
            return EpochRun(epoch, statistics, time.perf_counter() - started, sub_epochs)
        messages = self._state_frame(steps[0][1]).repartition(b, "pkey")
        for position, (sub_epoch, stratum) in enumerate(steps):
            task = bind_pair(
                cells_module.run_sub_epoch,
                update=self.update,
                settings=cells_module.settings_for(
                    settings, epoch=epoch, sub_epoch=sub_epoch, stratum=stratum
                ),
                keys=self._keys,
                next_stratum=steps[position + 1][1] if position + 1 < len(steps) else 0,
            )
            messages = (
                self.strata.of_kind(TRAIN, stratum)
                .groupBy("pkey")
                .cogroup(messages.groupBy("pkey"))
                .applyInArrow(task, MESSAGE_SCHEMA)
            )
            if position + 1 < len(steps):
                messages = messages.repartition(b, "pkey")
        total = f"/{max_iter}" if max_iter else ""
        self._describe(f"epoch {epoch + 1}{total} ({len(steps)} sub-epochs)")
        try:
            table = messages.toArrow()
        finally:
            self._describe(None)
        statistics, sub_epochs = self._absorb(table, steps)
        return EpochRun(epoch, statistics, time.perf_counter() - started, sub_epochs)

    def _run_driver_epoch(self, epoch: int, steps, settings):
        """Strata built on the driver: each sub-epoch's cells in threads on the runner's own
        blocks (in place), statistics summed in cell order as on Spark."""
        results, sub_epochs = [], []
        for sub_epoch, stratum in steps:
            task_settings = cells_module.settings_for(
                settings, epoch=epoch, sub_epoch=sub_epoch, stratum=stratum
            )

            def run_cell(pair, task_settings=task_settings):
                started = time.perf_counter()
                user_block, item_block = pair
                statistics = self.update(
                    self._train_cells[pair],
                    self._state["user"][user_block],
                    self._state["item"][item_block],
                    task_settings,
                )
                return pair, statistics, time.perf_counter() - started

            pairs = self._strata_cells[stratum]
            done = list(self._pool.map(run_cell, pairs))
            results += [(pair, statistics) for pair, statistics, _ in done]
            seconds = [elapsed for _, _, elapsed in done]
            sub_epochs.append(SubEpochRun(stratum, len(pairs), max(seconds), sum(seconds)))
        self._packed.clear()
        results.sort(key=lambda item: item[0])
        return sum_statistics([statistics for _, statistics in results]), sub_epochs

    def _run_jvm_epoch(self, epoch: int, steps, settings, max_iter: int):
        """The classic-session shortcut (``jvm_epochs``): one RDD job per sub-epoch."""
        if self._jvm is None:
            self._jvm = BroadcastEpochs(self)
        b = self.strata.num_blocks
        total = f"/{max_iter}" if max_iter else ""
        results, sub_epochs = [], []
        try:
            for sub_epoch, stratum in steps:
                pairs = self._strata_cells[stratum]
                self._describe(f"epoch {epoch + 1}{total}, sub-epoch {sub_epoch + 1}/{b}")
                returned = self._jvm.run_sub_epoch(
                    pairs,
                    cells_module.settings_for(
                        settings, epoch=epoch, sub_epoch=sub_epoch, stratum=stratum
                    ),
                )
                cell_results, seconds = absorb(self, returned, pairs)
                results += cell_results
                sub_epochs.append(
                    SubEpochRun(stratum, len(pairs), max(seconds, default=0.0), sum(seconds))
                )
        finally:
            self._describe(None)
        results.sort(key=lambda item: item[0])
        return sum_statistics([stats for _, stats in results]), sub_epochs

    def _absorb(self, table: pa.Table, steps) -> tuple[dict[str, np.ndarray], list[SubEpochRun]]:
        """Take an epoch's blocks and statistics; check every block and cell came back once."""
        b = self.strata.num_blocks
        rows = table.select(["side", "sub_epoch", "user_block", "item_block", "seconds"])
        side, sub_epoch, user_block, item_block, seconds = (c.to_numpy() for c in rows.columns)
        payload = table.column("payload")
        for name, code, blocks in (("user", USER, user_block), ("item", ITEM, item_block)):
            mine = np.flatnonzero(side == code)
            if sorted(blocks[mine].tolist()) != list(range(b)):
                raise RuntimeError(f"{self.label}: an epoch returned {name} blocks {blocks[mine]}")
            for row in mine:
                packed = payload[int(row)].as_py()
                self.set_block(name, int(blocks[row]), unpack_arrays(packed, copy=False), packed)
        stats = np.flatnonzero(side == STATS)
        expected = sorted(pair for _, stratum in steps for pair in self._strata_cells[stratum])
        returned = sorted(zip(user_block[stats].tolist(), item_block[stats].tolist()))
        if returned != expected:
            raise RuntimeError(f"{self.label}: an epoch returned cells {returned}, not {expected}")
        in_cell_order = sorted(stats.tolist(), key=lambda r: (user_block[r], item_block[r]))
        statistics = sum_statistics(
            [unpack_arrays(payload[r].as_py(), copy=False) for r in in_cell_order]
        )
        sub_epochs = []
        for number, stratum in steps:
            times = seconds[stats[sub_epoch[stats] == number]]
            sub_epochs.append(
                SubEpochRun(
                    stratum=stratum,
                    cells=len(times),
                    max_task_seconds=float(times.max(initial=0.0)),
                    sum_task_seconds=float(times.sum()),
                )
            )
        return statistics, sub_epochs

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
        epoch on small data. Otherwise (or with ``False``) it is one job in which every cell
        meets its two blocks through broadcast joins. On the driver ``evaluate`` receives the
        runner's own state: it must not change it.
        """
        started = time.perf_counter()
        sizes = self.strata.validation_sizes if kind == VALIDATION else self.strata.train_sizes
        if not (sizes > 0).any():
            return {}, 0.0
        if on_driver is None:
            on_driver = self._on_driver or int(sizes.sum()) <= LOCAL_EVALUATION_RATINGS
        settings = dict(settings or {})
        if on_driver:
            cells = self._local_cells.get(kind)
            if cells is None:
                self._describe(
                    f"collect {'validation' if kind == VALIDATION else 'training'} cells"
                )
                try:
                    table = self.strata.of_kind(kind).drop("pkey", "stratum").toArrow()
                finally:
                    self._describe(None)
                cells = sorted(
                    cells_module.cells_of_table(table), key=lambda c: (c.user_block, c.item_block)
                )
                self._local_cells[kind] = cells
            results = [
                evaluate(c, self._state["user"][c.user_block], self._state["item"][c.item_block],
                         settings)
                for c in cells
            ]  # fmt: skip
            return sum_statistics(results), time.perf_counter() - started
        frame = (
            self.strata.of_kind(kind)
            .join(F.broadcast(self._block_frame("user")), "user_block")
            .join(F.broadcast(self._block_frame("item")), "item_block")
            .mapInArrow(
                bind(cells_module.evaluate_batches, evaluate=evaluate, settings=settings),
                MESSAGE_SCHEMA,
            )
        )
        self._describe(label)
        try:
            table = frame.select("user_block", "item_block", "payload").toArrow()
        finally:
            self._describe(None)
        user_block, item_block = (table.column(c).to_numpy() for c in ("user_block", "item_block"))
        payload = table.column("payload")
        statistics = sum_statistics(
            [
                unpack_arrays(payload[int(r)].as_py(), copy=False)
                for r in np.lexsort((item_block, user_block))
            ]
        )
        return statistics, time.perf_counter() - started

    def close(self) -> None:
        """Drop the packed blocks, the cells collected for evaluation and the shortcut's RDD."""
        if self._jvm is not None:
            self._jvm.close()
            self._jvm = None
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._packed.clear()
        self._local_cells.clear()


def merged_ids(layout: BlockLayout) -> np.ndarray:
    """All ids of a layout, block after block: the row order of the blocks' arrays stacked."""
    return np.concatenate(layout.ids) if layout.ids else np.zeros(0, np.int32)
