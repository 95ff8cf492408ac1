"""Driver side of ALS training: blocks, the dataflow, and the model's factor DataFrames.

The math runs on executors (``spark_gpu_mf.executor``) and the alternation is written once
(``executor.alternation.alternate``). This module builds the DataFrames of the distributed
dataflow, chooses between the dataflows and keeps the fit's state. Order and semantics follow
Spark's ``ALS.train``: items are solved first from the users' starting factors, ``maxIter`` full
iterations, the same starting factors for the same seed.

Everything here goes through the DataFrame API, so a fit runs on classic and Spark Connect
sessions alike; on a classic session the JVM's shortcuts (Arrow batches straight from the JVM,
plans cut to one node) give the same factors sooner.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional

import numpy as np
from pyspark import RDD, StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from spark_gpu_mf import conf
from spark_gpu_mf.backends.solve_config import SolveConfig, resolve_solver
from spark_gpu_mf.backends.spark_random import factor_seeds
from spark_gpu_mf.errors import illegal_argument
from spark_gpu_mf.executor import als_tasks, single_task
from spark_gpu_mf.executor.als_tasks import (
    FACTORS,
    GRAM,
    OUTBOX_SCHEMA,
    OWN,
    STATS,
    Route,
    TaskSettings,
)
from spark_gpu_mf.executor.alternation import (
    ITEMS,
    USERS,
    alternate,
    rmse,
    sorted_initial,
    starting_factors,
    with_known_rows,
)
from spark_gpu_mf.executor.binding import bind, bind_pair
from spark_gpu_mf.executor.blocks import (
    BUILT_SCHEMA,
    KNOWN_COLUMNS,
    PACK_BATCH_ROWS,
    PACKED_SCHEMA,
    STARTING_COLUMNS,
    PackedSide,
    build_keyed_blocks,
    build_packed_blocks,
    build_partition,
    keyed_by_part,
    known_of_row,
    pack_known_factors,
    pack_ratings,
)
from spark_gpu_mf.executor.runtime import BackendChoice
from spark_gpu_mf.spark import session
from spark_gpu_mf.spark.arrow_input import map_arrow_batches, map_in_arrow_rows
from spark_gpu_mf.spark.factors import (
    FACTORS_SCHEMA,
    collect_factors_of_sides,
    factors_dataframe,
)
from spark_gpu_mf.spark.partitioning import key_of_block, partition_keys
from spark_gpu_mf.summary import TrainingSummary

logger = logging.getLogger("spark_gpu_mf")


@dataclass(frozen=True)
class AlsJob:
    """Everything one fit needs, resolved from params and confs on the driver."""

    rank: int
    max_iter: int
    reg_param: float
    implicit: bool
    alpha: float
    nonnegative: bool
    num_user_blocks: int
    num_item_blocks: int
    seed: int
    checkpoint_interval: int
    intermediate_level: StorageLevel
    final_level: Optional[StorageLevel]
    solver: str
    cg_iterations: int
    precision: str
    backend: str
    memory_budget: int = conf.parse_bytes(conf.MEMORY_BUDGET.default)
    broadcast_threshold: int = conf.parse_bytes(conf.BROADCAST_THRESHOLD.default)
    blas_threads: int = 0
    training_rmse: bool = False
    # spark.gpumf.als.adaptiveExecution: false runs the distributed dataflow with AQE off.
    adaptive_execution: bool = False
    fail_first_attempt: bool = False
    single_task_max_ratings: int = 0
    # Single-task fits up to this size run in the driver's Python process (local mode only).
    in_driver_max_ratings: int = 0
    # The input DataFrame is cached already: reading it twice (the shape, then the blocks)
    # costs less than copying it into a cache of the validated ratings (docs/benchmarks.md).
    input_cached: bool = False

    def solve_config(self) -> SolveConfig:
        return SolveConfig(
            rank=self.rank,
            reg_param=self.reg_param,
            implicit=self.implicit,
            alpha=self.alpha,
            nonnegative=self.nonnegative,
            solver=resolve_solver(self.solver, self.rank, self.precision),
            cg_iterations=self.cg_iterations,
            precision=self.precision,
            memory_budget_bytes=self.memory_budget,
        )


@dataclass
class Side:
    """One side (users or items) of the factorization: its cached blocks and their layout.

    ``blocks`` reads the cached DataFrame ``cache``, which the two sides may share;
    ``starting`` reads the built blocks' ``STARTING_COLUMNS``, what starting factors are made
    from (a warm start's known rows included).
    """

    name: str
    blocks: DataFrame
    cache: DataFrame
    starting: DataFrame
    num_blocks: int
    num_partitions: int
    block_ids: List[int]
    num_rows: Dict[int, int]
    nnz: int
    positives: int
    seed: int

    @property
    def keys(self) -> tuple:
        return partition_keys(self.num_partitions)

    @property
    def total_rows(self) -> int:
        return sum(self.num_rows.values())


@dataclass
class TrainResult:
    user_factors: DataFrame
    item_factors: DataFrame
    summary: TrainingSummary
    cached: List[DataFrame] = field(default_factory=list)


def _blas_threads(spark: SparkSession, requested: int, num_partitions: int) -> int:
    """Threads per task so that concurrent tasks x threads stay within the cores."""
    if requested > 0:
        return requested
    task_cpus = int(session.conf_value(spark, "spark.task.cpus", "1") or 1)
    spare = max(1, session.default_parallelism(spark) // max(1, num_partitions))
    return max(1, task_cpus * spare)


def _task_threads(spark: SparkSession) -> int:
    """Cores one task may use when it is the only task running: the local machine's (local
    mode) or one executor's."""
    if session.is_local(spark):
        return session.default_parallelism(spark)
    return max(1, int(session.conf_value(spark, "spark.executor.cores", "1") or 1))


# One in-driver fit (or warm-up) at a time per process: BLAS thread limits and the backend's phase
# counters are process-wide. A fit that finds it taken runs as a Spark task instead.
_IN_DRIVER = threading.Lock()
_WARM_UPS: Dict[tuple, threading.Thread] = {}
_WARM_UPS_LOCK = threading.Lock()


def _may_fit_in_driver(spark: SparkSession, job: AlsJob) -> bool:
    """Whether a single-task fit of ``job`` may run in this (the driver's) process: local
    master, classic session, NumPy backend (the driver never imports CuPy)."""
    if min(job.in_driver_max_ratings, job.single_task_max_ratings) <= 0:
        return False
    if session.is_connect(spark) or not session.is_local(spark):
        return False
    return BackendChoice.for_session(spark, job.backend).requested == "numpy"


def _in_driver_settings(spark: SparkSession, job: AlsJob) -> TaskSettings:
    return TaskSettings(
        config=job.solve_config(),
        backend=BackendChoice.for_session(spark, job.backend),
        blas_threads=1,
        fail_first_attempt=job.fail_first_attempt,
    )


def warm_up_driver(spark: SparkSession, job: AlsJob) -> None:
    """Start loading the single task's compiled code on a thread of this process, when the fit
    may run here; ``ALS.fit`` calls it first, so that it overlaps the fit's Spark jobs.

    Once per solver configuration and process; the fit joins the thread before it computes.
    """
    if not _may_fit_in_driver(spark, job):
        return
    settings = _in_driver_settings(spark, job)
    key = (settings.config, job.training_rmse)
    with _WARM_UPS_LOCK:
        if key in _WARM_UPS:
            return
        thread = threading.Thread(
            target=_warm_up, args=(settings, job.training_rmse), name="spark_gpu_mf warm-up",
            daemon=True,
        )  # fmt: skip
        _WARM_UPS[key] = thread
    thread.start()


def _warm_up(settings: TaskSettings, training_rmse: bool) -> None:
    if not _IN_DRIVER.acquire(blocking=False):
        return  # a fit is running in this process: its code is loaded already
    try:
        single_task.warm_up(settings, training_rmse)
    except Exception:  # noqa: BLE001 - a warm-up never fails a fit; the fit reports the error
        logger.debug("ALS warm-up failed", exc_info=True)
    finally:
        _IN_DRIVER.release()


def _wait_for_warm_up(settings: TaskSettings, training_rmse: bool) -> None:
    with _WARM_UPS_LOCK:
        thread = _WARM_UPS.get((settings.config, training_rmse))
    if thread is not None and thread is not threading.current_thread():
        thread.join()


class _Trainer:
    """One fit: the cached state, the dataflow choice, the summary."""

    def __init__(
        self,
        spark: SparkSession,
        ratings: DataFrame,
        job: AlsJob,
        initial: Optional[Dict[str, DataFrame]] = None,
    ):
        self.spark = spark
        self.ratings = ratings
        self.job = job
        self.initial = initial
        self._initial_arrays: Optional[dict] = None
        self.fit_id = uuid.uuid4().hex
        self.cached: List[DataFrame] = []
        self.summary = TrainingSummary(
            algorithm="als", details={"solver": job.solve_config().solver}
        )
        self.checkpoint_paths: Dict[str, str] = {}
        self.truncated_from: Dict[int, DataFrame] = {}

    # ---------------------------------------------------------------- caching
    def describe(self, text: Optional[str]) -> None:
        session.set_job_description(
            self.spark, None if text is None else f"spark_gpu_mf ALS: {text}"
        )

    def persist(self, df: DataFrame, level: Optional[StorageLevel] = None) -> DataFrame:
        df = df.persist(level or self.job.intermediate_level)
        self.cached.append(df)
        return df

    def unpersist(self, df: Optional[DataFrame]) -> None:
        if df is None:
            return
        df = self.truncated_from.pop(id(df), df)
        df.unpersist()
        if df in self.cached:
            self.cached.remove(df)

    def truncated(self, persisted: DataFrame) -> DataFrame:
        """The same rows as ``persisted`` under a one-node logical plan (classic sessions).

        Each half-iteration reads the other side's and its own last outbox, so the plan of
        iteration t would hold the whole history; Spark would re-analyze it in every later
        query. Reading the persisted rows through the physical plan's RDD keeps the RDD lineage
        (recomputable if an executor is lost) while the plan stays a single scan. Every consumer
        of an outbox streams its rows into a shuffle, Arrow or Parquet, so reused row buffers
        are safe. A Connect session has no such handle; there the rows are local-checkpointed
        (read from the cache into the block manager): the plan is cut the same way, but a lost
        executor then fails the fit instead of recomputing its part. Without a cut the plan
        Connect ships doubles every iteration (measured: 3, 5, 10, 26 s for iterations 1-4).
        """
        if session.is_connect(self.spark):
            flat = persisted.localCheckpoint(eager=True, storageLevel=self.job.intermediate_level)
            self.unpersist(persisted)
            return flat
        jdf = persisted._jdf
        # The physical plan's own RDD, not ``toRdd``: its SQLExecutionRDD wrapper made Spark's
        # SQL listener expand every earlier iteration into each iteration's plan graph (2.6x
        # larger per iteration, the driver's heap full after ~12 iterations: docs/benchmarks.md).
        # Every consumer is a query of this session, which sets its SQL conf on the tasks.
        rows = jdf.queryExecution().executedPlan().execute()
        flat = DataFrame(
            self.spark._jsparkSession.internalCreateDataFrame(rows, jdf.schema(), False),
            self.spark,
        )
        self.truncated_from[id(flat)] = persisted
        return flat

    def release(self, keep: List[DataFrame]) -> None:
        """Unpersist everything cached during training except the model's factor DataFrames."""
        for df in list(self.cached):
            if df not in keep:
                self.unpersist(df)
        for path in self.checkpoint_paths.values():
            _delete_checkpoint(self.spark, path)

    def settings(self, num_partitions: int) -> TaskSettings:
        return TaskSettings(
            config=self.job.solve_config(),
            backend=BackendChoice.for_session(self.spark, self.job.backend),
            blas_threads=_blas_threads(self.spark, self.job.blas_threads, num_partitions),
            fail_first_attempt=self.job.fail_first_attempt,
        )

    def record(self, iteration: int, seconds: float, metrics: Optional[dict] = None) -> None:
        entry = {"iteration": iteration, "seconds": seconds}
        entry.update(metrics or {})
        self.summary.iterations.append(entry)
        extra = "".join(f", {k} {v:.6g}" for k, v in (metrics or {}).items() if v is not None)
        logger.info("ALS iteration %d/%d: %.3fs%s", iteration, self.job.max_iter, seconds, extra)

    def finalize(self, df: DataFrame) -> DataFrame:
        """Persist factors at ``finalStorageLevel`` (lazily; ``materialize`` runs them)."""
        return df if self.job.final_level is None else df.persist(self.job.final_level)

    def initial_arrays(self) -> Optional[dict]:
        """The warm start's factors on the driver, ``{side: (ids, factors)}`` sorted by id, for
        the single task, which holds whole factor matrices in one process anyway. The
        distributed dataflows never collect them: the block build gives each block its known
        rows."""
        if self.initial is None:
            return None
        if self._initial_arrays is None:
            self.describe("collect the initial model's factors")
            self._initial_arrays = {
                name: sorted_initial(*side)
                for name, side in collect_factors_of_sides(self.initial).items()
            }
        return self._initial_arrays

    # ---------------------------------------------------------------- the fit
    def run(self) -> TrainResult:
        job = self.job
        started = time.perf_counter()
        user_seed, item_seed = factor_seeds(job.seed)
        if not job.input_cached:
            self.ratings = self.persist(self.ratings)
        trained = None
        # A cached input that counted more ratings than one task takes needs no count job: the
        # distributed dataflow counts them as it builds its blocks.
        known = session.cached_row_count(self.ratings)
        if known is None or known <= job.single_task_max_ratings:
            self.describe("count ratings")
            num_ratings = self.ratings.count()
            if num_ratings == 0:
                raise illegal_argument(
                    f"requirement failed: No ratings available from {self.ratings}"
                )
            if num_ratings <= job.single_task_max_ratings:
                trained = self._run_single_task(user_seed, item_seed, started, num_ratings)
        if trained is None:
            with self._without_adaptive_execution():
                trained = self._run_distributed(user_seed, item_seed, started)
        self.summary.total_seconds = time.perf_counter() - started
        self.describe(None)
        return TrainResult(*trained, self.summary, self.cached)

    def _without_adaptive_execution(self):
        """AQE off for the distributed dataflow's queries, unless the conf keeps it: their
        partitioning is ALS's own, and AQE would run each shuffle of an iteration as a job of
        its own with a re-planning between them (docs/benchmarks.md)."""
        if self.job.adaptive_execution:
            return nullcontext()
        return session.runtime_confs(self.spark, {conf.SQL_ADAPTIVE_ENABLED: "false"})

    def _run_single_task(self, user_seed: int, item_seed: int, started: float, num_ratings: int):
        """``(user factors, item factors)`` from one task, or ``None`` when a side has more
        factors than ``broadcastThreshold`` allows in one process (the task stops after
        building blocks). Small fits run in one task: Spark's ~0.1-0.2 s per stage would
        outweigh the math."""
        job = self.job
        arguments = dict(
            num_user_blocks=job.num_user_blocks,
            num_item_blocks=job.num_item_blocks,
            user_seed=user_seed,
            item_seed=item_seed,
            max_iter=job.max_iter,
            threads=_task_threads(self.spark),
            max_factor_rows=job.broadcast_threshold // (job.rank * 4),
            training_rmse=job.training_rmse,
            initial=self.initial_arrays(),
        )
        rows, where = None, "task"
        if num_ratings <= job.in_driver_max_ratings and _may_fit_in_driver(self.spark, job):
            rows = self._in_driver(arguments, _in_driver_settings(self.spark, job))
            where = "driver"
        if rows is None:
            where = "task"
            self.describe(f"{job.max_iter} iterations in one task")
            # coalesce, not repartition: the ratings (or the input) are cached, and one task
            # reading the cached partitions costs less than shuffling every rating to it.
            rows = map_in_arrow_rows(
                self.ratings.coalesce(1),
                bind(
                    single_task.train_in_one_task,
                    settings=replace(self.settings(1), blas_threads=1),
                    **arguments,
                ),
                single_task.SINGLE_TASK_SCHEMA,
            )
        status, iterations, sides = single_task.decode_result(rows, job.rank)
        if single_task.TOO_WIDE in status:
            logger.info(
                "ALS: %d rows on one side exceed spark.gpumf.broadcastThreshold in one task; "
                "using the distributed dataflow", int(status[single_task.TOO_WIDE]),
            )  # fmt: skip
            return None
        self.unpersist(self.ratings)
        if job.implicit and status.get(single_task.POSITIVES, 0.0) == 0:
            raise _no_positive_rating()
        (user_ids, user_factors), (item_ids, item_factors) = sides[USERS], sides[ITEMS]
        self.summary.details.update(
            {
                "dataflow": "single task",
                "singleTaskIn": where,
                "numUsers": len(user_ids),
                "numItems": len(item_ids),
                "numRatings": num_ratings,
                "warmStart": self.initial is not None,
                "phaseSeconds": {
                    "hermitian": status.get(single_task.HERMITIAN, 0.0),
                    "solve": status.get(single_task.SOLVE, 0.0),
                },
            }
        )
        self.summary.setup_seconds = (
            time.perf_counter() - started - sum(seconds for _, seconds, _ in iterations)
        )
        logger.info(
            "ALS: %d users, %d items, rank %d; single task dataflow",
            len(user_ids), len(item_ids), job.rank,
        )  # fmt: skip
        for iteration, seconds, metrics in iterations:
            self.record(iteration, seconds, metrics)
        # Made from arrays on the driver: nothing to materialize, nothing of the fit to keep.
        users = self.finalize(factors_dataframe(self.spark, user_ids, user_factors))
        return users, self.finalize(factors_dataframe(self.spark, item_ids, item_factors))

    def _in_driver(self, arguments: dict, settings: TaskSettings) -> Optional[List[dict]]:
        """The single task's rows, computed in this process from the collected ratings; None
        when another fit holds the driver (the caller then runs the task).

        In local mode a Spark task's Python worker is a process of this machine that would
        first have to start (a daemon, a fork, the imports) and load the compiled code, most
        of a small first fit (docs/benchmarks.md, "First fits"); the driver has both already (see
        ``warm_up_driver``), and ``toArrow`` hands it the ratings as the JVM's Arrow batches.
        """
        self.describe("collect ratings for a fit in the driver")
        table = self.ratings.toArrow()
        _wait_for_warm_up(settings, self.job.training_rmse)
        if not _IN_DRIVER.acquire(blocking=False):
            return None
        try:
            self.describe(None)
            batches = single_task.train_in_one_task(
                iter(table.to_batches()), settings=settings, **arguments
            )
            return [row for batch in batches for row in batch.to_pylist()]
        finally:
            _IN_DRIVER.release()

    def _build_sides(self, user_seed: int, item_seed: int) -> Dict[str, Side]:
        """Both sides' blocks in one cache; one job.

        The ratings are read once and packed for both sides; one shuffle brings partition
        ``p`` of both sides together, where one Python task builds both sides' blocks. Each
        side reads its own rows of the cache: a block of more than 4 MiB is a cached batch of
        its own, which a scan of the other side skips by its statistics. The blocks are not
        yet placed by a partitioning Spark knows: the driver broadcast reads them where they
        are, and ``_Exchange`` places them.

        A warm start's model factors take the same shuffle, so each block also holds the rows
        of it the model knows (``KNOWN_COLUMNS``): the starting factors read them from there,
        the solves never do. The model's factors are neither joined nor collected.
        """
        job = self.job
        parallelism = session.default_parallelism(self.spark)
        specs = {
            USERS: ("user", "item", job.num_user_blocks, job.num_item_blocks, user_seed),
            ITEMS: ("item", "user", job.num_item_blocks, job.num_user_blocks, item_seed),
        }
        packing = [
            PackedSide(
                key, other, num_blocks, num_other, partition_keys(min(num_blocks, parallelism))
            )
            for key, other, num_blocks, num_other, _ in specs.values()
        ]
        num_build = max(side.num_partitions for side in packing)
        known = None
        if self.initial is not None:
            users, items = (
                self.initial[name].select(F.lit(index).alias("side"), "id", "features")
                for index, name in enumerate(specs)
            )
            # At most a task per core: each Parquet file would be a task of its own.
            known = users.unionByName(items).coalesce(parallelism)
        built = self.persist(self._built_blocks(packing, num_build, known))
        of_side = {name: built.filter(F.col("side") == index) for index, name in enumerate(specs)}
        frames = {name: rows.drop("side", *KNOWN_COLUMNS) for name, rows in of_side.items()}
        self.describe("build user and item blocks")
        meta = (
            frames[USERS]
            .select(F.lit(USERS).alias("side"), "block", "num_rows", "nnz", "positives")
            .unionByName(
                frames[ITEMS].select(
                    F.lit(ITEMS).alias("side"), "block", "num_rows", "nnz", "positives"
                )
            )
            .collect()
        )
        sides = {}
        for index, (name, (_, _, num_blocks, _, seed)) in enumerate(specs.items()):
            rows = [r for r in meta if r.side == name]
            sides[name] = Side(
                name=name,
                blocks=frames[name],
                cache=built,
                starting=of_side[name].select(*STARTING_COLUMNS),
                num_blocks=num_blocks,
                num_partitions=packing[index].num_partitions,
                block_ids=sorted(int(r.block) for r in rows),
                num_rows={int(r.block): int(r.num_rows) for r in rows},
                nnz=sum(int(r.nnz) for r in rows),
                positives=sum(int(r.positives) for r in rows),
                seed=seed,
            )
        return sides

    def _built_blocks(
        self, packing: List[PackedSide], num_build: int, known: Optional[DataFrame]
    ) -> DataFrame:
        """Both sides' blocks (``BUILT_SCHEMA``), from the ratings and the ``known`` factors of
        a warm start, packed and shuffled by partition.

        On a classic session the packed rows take an RDD shuffle: the JVM moves them as
        pickled bytes, where a DataFrame would turn them into rows and back into Arrow
        (docs/benchmarks.md). Spark Connect has no RDDs, so there they take ``mapInArrow``
        and ``repartition``; both roads build the same blocks.
        """
        ratings = self.ratings.select("user", "item", "rating")
        pack_ratings_ = bind(pack_ratings, sides=packing)
        pack_known = bind(pack_known_factors, sides=packing, rank=self.job.rank)
        pairs = [
            map_arrow_batches(
                ratings, bind(keyed_by_part, pack=pack_ratings_), batch_rows=PACK_BATCH_ROWS
            )
        ]
        if pairs[0] is not None and known is not None:
            pairs.append(map_arrow_batches(known, bind(keyed_by_part, pack=pack_known)))
        if None not in pairs:
            # Each input shuffled on its own, so that its keying runs in the Python worker
            # that packs it; shuffles by one partitioner unite partition by partition.
            shuffled = functools.reduce(
                RDD.union, (rdd.partitionBy(num_build, build_partition) for rdd in pairs)
            )
            if shuffled.getNumPartitions() != num_build:  # each task must see all of its part
                raise RuntimeError(
                    f"ALS: the block build's shuffle has {shuffled.getNumPartitions()} "
                    f"partitions, not {num_build}"
                )
            blocks = shuffled.mapPartitions(
                bind(build_keyed_blocks, sides=packing, rank=self.job.rank)
            )
            return self.spark.createDataFrame(blocks, BUILT_SCHEMA)
        packed = ratings.mapInArrow(pack_ratings_, PACKED_SCHEMA)
        if known is not None:
            packed = packed.unionByName(known.mapInArrow(pack_known, PACKED_SCHEMA))
        bkey = key_of_block(F.col("part"), num_build)
        return packed.repartition(num_build, bkey).mapInArrow(
            bind(build_packed_blocks, sides=packing, rank=self.job.rank), BUILT_SCHEMA
        )

    def _run_distributed(self, user_seed: int, item_seed: int, started: float):
        job = self.job
        sides = self._build_sides(user_seed, item_seed)
        users, items = sides[USERS], sides[ITEMS]
        if users.nnz == 0:
            raise illegal_argument(f"requirement failed: No ratings available from {self.ratings}")
        if job.implicit and users.positives == 0:
            raise _no_positive_rating()
        self.unpersist(self.ratings)
        largest_factors = max(users.total_rows, items.total_rows) * job.rank * 4
        whole_blocks = largest_factors <= job.broadcast_threshold
        self.summary.details.update(
            {
                "dataflow": "broadcast" if whole_blocks else "messages",
                "numUsers": users.total_rows,
                "numItems": items.total_rows,
                "numRatings": users.nnz,
                "userPartitions": users.num_partitions,
                "itemPartitions": items.num_partitions,
                "warmStart": self.initial is not None,
                "phaseSeconds": {"hermitian": 0.0, "solve": 0.0},
            }
        )
        self.summary.setup_seconds = time.perf_counter() - started
        logger.info(
            "ALS: %d users, %d items, %d ratings, rank %d; %s dataflow; setup %.2fs",
            users.total_rows, items.total_rows, users.nnz, job.rank,
            self.summary.details["dataflow"], self.summary.setup_seconds,
        )  # fmt: skip
        if whole_blocks and not session.is_connect(self.spark):
            dataflow = _DriverBroadcast(self, sides)
        else:
            dataflow = _Exchange(self, sides, whole_blocks)
        alternate(dataflow, job.max_iter, self.record)
        return dataflow.factor_frames()


class _Exchange:
    """The distributed dataflow: each half-iteration is one Arrow cogroup per partition of the
    solved side, its inbox (the other side's last outbox) shuffled to it by Spark.

    Half-iterations are lazy; ``finish_iteration`` runs the iteration as one query that collects
    the blocks' STATS rows (seconds, squared errors) and leaves both new outboxes cached: two
    shuffles of messages and two solving stages, whatever the sizes, and nothing through the
    driver. ``whole_blocks``: every partition receives whole source blocks (the broadcast
    dataflow on Spark Connect); else each block receives just the rows it needs (Spark's
    OutBlocks, the message dataflow).
    """

    def __init__(self, trainer: _Trainer, sides: Dict[str, Side], whole_blocks: bool):
        self.trainer = trainer
        self.job = trainer.job
        self.replaced: List[DataFrame] = []
        self.sides = {name: self._placed(side) for name, side in sides.items()}
        self.routes = {
            name: Route(other_keys=sides[_other(name)].keys, whole_blocks=whole_blocks)
            for name in sides
        }
        self.settings = {n: trainer.settings(side.num_partitions) for n, side in sides.items()}
        self.checkpoint_dir = session.checkpoint_dir(trainer.spark)
        # The items' starting factors are read only by a warm start (or as the model, after
        # zero iterations); persisting is lazy, so an unread outbox costs nothing.
        self.outbox: Dict[str, DataFrame] = {
            USERS: self._initial_outbox(USERS, send=True),
            ITEMS: self._initial_outbox(ITEMS, send=False),
        }
        self._warn_if_never_checkpointed()

    def _placed(self, side: Side) -> Side:
        """``side`` with its blocks placed by a partitioning Spark knows (hash of ``pkey``), so
        that each half-iteration's cogroup shuffles only the messages, never the blocks.

        Lazy: the first iteration's query places them, and its end frees the unplaced cache.
        """
        placed = self.trainer.persist(side.blocks.repartition(side.num_partitions, "pkey"))
        if side.cache not in self.replaced:
            self.replaced.append(side.cache)
        return replace(side, blocks=placed, cache=placed)

    def _initial_outbox(self, name: str, send: bool) -> DataFrame:
        """Spark's starting factors of a side: sent on (users), or kept for the CG warm start.

        With an initial model, the rows it knows start from its factors, which the block build
        gave each block: no join, and nothing through the driver.
        """
        side = self.sides[name]
        settings = {
            "rank": self.job.rank,
            "side_seed": side.seed,
            "route": self.routes[name],
            "implicit": self.job.implicit,
        }
        # The built blocks' ids, out rows and known rows: their ratings stay in the cache.
        outbox = side.starting.mapInArrow(bind(als_tasks.initial_outbox, **settings), OUTBOX_SCHEMA)
        if not send:
            outbox = outbox.filter(F.col("kind") == OWN)
        return self.trainer.persist(outbox)

    def solve(self, name: str, iteration: int) -> None:
        dst, src = self.sides[name], self.sides[_other(name)]
        config = self.job.solve_config()
        inbox = self.outbox[src.name].filter(F.col("kind").isin(FACTORS, GRAM))
        if config.warm_start:
            inbox = inbox.unionByName(self.outbox[name].filter(F.col("kind") == OWN))
        solved = (
            inbox.repartition(dst.num_partitions, "pkey")
            .groupBy("pkey")
            .cogroup(dst.blocks.groupBy("pkey"))
            .applyInArrow(
                bind_pair(
                    als_tasks.solve_inbox,
                    settings=self.settings[name],
                    route=self.routes[name],
                    fit=self.trainer.fit_id,
                    side=name,
                    num_source_blocks=src.num_blocks,
                    num_gram_parts=len(src.block_ids) if config.implicit else 0,
                    training_error=self.job.training_rmse and name == USERS,
                ),
                OUTBOX_SCHEMA,
            )
        )
        self.replaced.append(self.outbox[name])
        self.outbox[name] = self.trainer.persist(solved)

    def finish_iteration(self, iteration: int) -> Dict[str, float]:
        trainer, job = self.trainer, self.job
        trainer.describe(f"iteration {iteration}/{job.max_iter}")
        stats_rows = (
            self.outbox[ITEMS]
            .filter(F.col("kind") == STATS)
            .select(F.lit(ITEMS).alias("side"), "src", "payload")
            .unionByName(
                self.outbox[USERS]
                .filter(F.col("kind") == STATS)
                .select(F.lit(USERS).alias("side"), "src", "payload")
            )
            .collect()
        )
        stats = {}
        for name in (ITEMS, USERS):
            stats[name] = als_tasks.read_stats(r for r in stats_rows if r.side == name)
            if sorted(stats[name]) != self.sides[name].block_ids:
                raise RuntimeError(f"ALS lost {name} blocks: got {sorted(stats[name])}")
        metrics = _iteration_metrics(trainer, stats, job.training_rmse)
        for df in self.replaced:
            trainer.unpersist(df)
        self.replaced = []
        # Cut the plans now that both outboxes are cached: cutting before would run each
        # half-iteration as a job of its own.
        for name in (ITEMS, USERS):
            self.outbox[name] = trainer.truncated(self.outbox[name])
        self._maybe_checkpoint(iteration)
        return metrics

    def _warn_if_never_checkpointed(self) -> None:
        interval = self.job.checkpoint_interval
        if interval != -1 and self.job.max_iter >= interval:
            if self.checkpoint_dir is None:
                logger.warning(
                    "ALS checkpointing is off: no checkpoint directory is set "
                    "(SparkContext.setCheckpointDir or spark.checkpoint.dir), so "
                    "checkpointInterval=%d is ignored and the lineage grows with every "
                    "iteration.",
                    interval,
                )

    def _maybe_checkpoint(self, iteration: int) -> None:
        """Cut the lineage every ``checkpointInterval`` iterations, as Spark's ALS does.

        Each side's outbox (its factors and messages) is written as Parquet under the checkpoint
        directory and read back; the side's previous checkpoint is deleted once the new one is in
        place. Spark checkpoints only the item factors; with a warm-started solver each side
        also reads its own previous factors, so both sides are checkpointed.
        """
        trainer = self.trainer
        interval = self.job.checkpoint_interval
        directory = self.checkpoint_dir
        if directory is None or interval == -1 or iteration % interval != 0:
            return
        for name in (ITEMS, USERS):
            outbox = self.outbox[name]
            path = f"{directory.rstrip('/')}/spark-gpu-mf-als-{name}-{uuid.uuid4().hex}"
            trainer.describe(f"checkpoint {name} factors, iteration {iteration}")
            outbox.filter(F.col("kind") != STATS).write.parquet(path)
            reread = trainer.persist(trainer.spark.read.parquet(path))
            trainer.unpersist(outbox)
            self.outbox[name] = reread
            previous = trainer.checkpoint_paths.pop(name, None)
            if previous is not None:
                _delete_checkpoint(trainer.spark, previous)
            trainer.checkpoint_paths[name] = path

    def factor_frames(self):
        """The model's ``(id, features)`` DataFrames, persisted at ``finalStorageLevel`` and,
        unless that is NONE, materialized by one job."""
        trainer = self.trainer
        explode = bind(als_tasks.explode_outbox, rank=self.job.rank)
        frames = [
            trainer.finalize(
                self.outbox[name].filter(F.col("kind") == OWN).mapInArrow(explode, FACTORS_SCHEMA)
            )
            for name in (USERS, ITEMS)
        ]
        if self.job.final_level is not None:
            trainer.describe("materialize user and item factors")
            frames[0].unionByName(frames[1]).count()
        return frames[0], frames[1]


class _DriverBroadcast:
    """The broadcast dataflow's classic-session shortcut: the driver keeps both factor matrices
    and each half-iteration broadcasts the source side (a broadcast variable) to one
    ``mapInArrow`` stage over the cached blocks, whose new factors come back to the driver.

    The same solves and factors as ``_Exchange`` with whole-block routes, measured faster on one
    machine: one stage and no shuffle or sort per half-iteration (docs/benchmarks.md). Spark
    Connect has no broadcast variables, so there the exchange runs.
    """

    def __init__(self, trainer: _Trainer, sides: Dict[str, Side]):
        self.trainer = trainer
        self.job = trainer.job
        self.sides = sides
        self.config = self.job.solve_config()
        self.settings = {n: trainer.settings(side.num_partitions) for n, side in sides.items()}
        trainer.describe("collect block ids")
        columns = ("block", "ids") + KNOWN_COLUMNS
        rows = (
            sides[USERS].starting.select(F.lit(USERS).alias("side"), *columns)
            .unionByName(sides[ITEMS].starting.select(F.lit(ITEMS).alias("side"), *columns))
            .toArrow()
            .to_pylist()
        )  # fmt: skip
        of_side = {name: {r["block"]: r for r in rows if r["side"] == name} for name in sides}
        self.ids = {
            name: {b: np.frombuffer(r["ids"], np.int32) for b, r in blocks.items()}
            for name, blocks in of_side.items()
        }
        rank = self.job.rank
        self.factors = {
            name: {
                b: with_known_rows(f, *known_of_row(of_side[name][b], rank))
                for b, f in starting_factors(side.num_rows, rank, side.seed).items()
            }
            for name, side in sides.items()
        }
        self.grams: Dict[str, Optional[np.ndarray]] = {
            name: als_tasks.gram_in_block_order(self.factors[name]) if self.config.implicit
            else None
            for name in sides
        }  # fmt: skip
        self.stats: Dict[str, dict] = {}
        # The side broadcast as the last half-iteration's source: its factors have not changed
        # since, so it is also the next half-iteration's ``previous`` (the CG warm start), and
        # the Python workers that read it already hold it.
        self.last_source: Optional[tuple] = None

    def _layout(self, name: str, gram: bool):
        side = self.sides[name]
        yty = self.grams[name] if gram else None
        return als_tasks.layout(self.ids[name], self.factors[name], side.num_blocks, yty)

    def solve(self, name: str, iteration: int) -> None:
        trainer, sc = self.trainer, self.trainer.spark.sparkContext
        dst, src = self.sides[name], _other(name)
        source = sc.broadcast(self._layout(src, gram=True))
        previous, kept, self.last_source = None, self.last_source, None
        if self.config.warm_start and kept is not None and kept[0] == name:
            previous = kept[1]
        else:
            if kept is not None:
                kept[1].destroy()
            if self.config.warm_start:
                previous = sc.broadcast(self._layout(name, gram=False))
        trainer.describe(f"iteration {iteration}/{self.job.max_iter}: solve {name}s")
        try:
            solved = (
                dst.blocks.mapInArrow(
                    bind(
                        als_tasks.solve_with_broadcast,
                        source=source,
                        previous=previous,
                        settings=self.settings[name],
                        fit=trainer.fit_id,
                        side=name,
                        training_error=self.job.training_rmse and name == USERS,
                    ),
                    als_tasks.SOLVED_SCHEMA,
                )
                .toArrow()
                .to_pylist()
            )
        except BaseException:
            source.destroy()
            raise
        finally:
            if previous is not None:
                previous.destroy()
        self.last_source = (src, source)
        rank = self.job.rank
        factors = {r["block"]: np.frombuffer(r["factors"], np.float32).reshape(-1, rank)
                   for r in solved}  # fmt: skip
        if sorted(factors) != dst.block_ids:
            raise RuntimeError(f"ALS lost {name} blocks: got {sorted(factors)}")
        self.factors[name] = factors
        if self.config.implicit:
            self.grams[name] = als_tasks.sum_in_block_order(
                {r["block"]: np.frombuffer(r["gram"], np.float64).reshape(rank, rank)
                 for r in solved}
            )  # fmt: skip
        self.stats[name] = als_tasks.read_stats(solved, block="block", payload="stats")

    def finish_iteration(self, iteration: int) -> Dict[str, float]:
        return _iteration_metrics(self.trainer, self.stats, self.job.training_rmse)

    def factor_frames(self):
        trainer, spark = self.trainer, self.trainer.spark
        if self.last_source is not None:
            self.last_source[1].destroy()
            self.last_source = None
        frames = []
        for name in (USERS, ITEMS):
            blocks = self.sides[name].block_ids
            ids = np.concatenate([self.ids[name][b] for b in blocks])
            matrix = np.concatenate([self.factors[name][b] for b in blocks])
            # Made from arrays on the driver: nothing to materialize, nothing of the fit to keep.
            frames.append(trainer.finalize(factors_dataframe(spark, ids, matrix)))
        return frames[0], frames[1]


def _iteration_metrics(trainer: _Trainer, stats: Dict[str, dict], training_rmse: bool):
    """Phase seconds into the summary, and the training RMSE from the users' STATS."""
    metrics = {}
    phases = trainer.summary.details["phaseSeconds"]
    for name, by_block in stats.items():
        for phase in phases:
            phases[phase] += sum(s[phase] for s in by_block.values())
    if training_rmse:
        sse, count = als_tasks.block_squared_errors(stats[USERS])
        metrics["trainRmse"] = rmse(sse, count)
    return metrics


def _other(side: str) -> str:
    return ITEMS if side == USERS else USERS


def _no_positive_rating() -> Exception:
    return illegal_argument(
        "implicitPrefs=True needs at least one positive rating: every rating is zero or "
        "negative, so every preference is 0 and every factor would be zero."
    )


def _delete_checkpoint(spark: SparkSession, path: str) -> None:
    try:
        if not session.delete_path(spark, path):
            logger.info("ALS checkpoint %s is left in place (the session cannot delete)", path)
    except Exception:  # a leftover checkpoint is harmless; never fail a fit for it
        logger.warning("could not delete checkpoint %s", path)


def train(
    spark: SparkSession,
    ratings: DataFrame,
    job: AlsJob,
    initial: Optional[Dict[str, DataFrame]] = None,
) -> TrainResult:
    """Fit ALS factors for validated ``(user int, item int, rating float)`` ratings.

    ``initial``: a warm start, ``{"user": factors, "item": factors}`` as ``(id int, features
    array<float>)`` DataFrames of ``job.rank`` features: rows whose id the fit has start from
    them instead of Spark's random factors (the others are ignored).
    """
    trainer = _Trainer(spark, ratings, job, initial)
    try:
        result = trainer.run()
    except BaseException:
        trainer.release(keep=[])
        trainer.describe(None)
        raise
    if job.final_level is not None:
        trainer.release(keep=[result.user_factors, result.item_factors])
    # With finalStorageLevel NONE the factors stay lazy and need the cached state, as in Spark.
    return result
