"""Driver side of ALS training: blocks, the iteration loop, and the model's factor DataFrames.

The math runs on executors (``spark_gpu_mf.executor``); this module only builds DataFrames,
chooses the dataflow and keeps the loop's state. Order and semantics follow Spark's ``ALS.train``:
items are solved first from the users' starting factors, ``maxIter`` full iterations, the same
starting factors for the same seed.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional

import numpy as np
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from spark_gpu_mf import conf
from spark_gpu_mf.backends.numpy_backend import SolveConfig
from spark_gpu_mf.backends.spark_random import factor_seeds, initial_factors
from spark_gpu_mf.errors import illegal_argument
from spark_gpu_mf.executor import als_tasks, single_task
from spark_gpu_mf.executor.als_tasks import (
    OUTBOX_SCHEMA,
    OWN,
    SOLVED_SCHEMA,
    SourceFactors,
    TaskSettings,
)
from spark_gpu_mf.executor.binding import bind, bind_pair
from spark_gpu_mf.executor.blocks import (
    BLOCK_SCHEMA,
    PACKED_SCHEMA,
    build_packed_blocks,
    from_bytes,
    pack_ratings,
)
from spark_gpu_mf.executor.runtime import BackendChoice
from spark_gpu_mf.spark.arrow_input import map_in_arrow_rows
from spark_gpu_mf.spark.factors import FACTORS_SCHEMA, factors_dataframe
from spark_gpu_mf.spark.partitioning import partition_keys
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
    fail_first_attempt: bool = False
    single_task_max_ratings: int = 0
    # The input DataFrame is cached already: reading it twice (the shape, then the blocks)
    # costs less than copying it into a cache of the validated ratings (3.1 s of 6.3 s of
    # setup at 8M ratings).
    input_cached: bool = False

    def solve_config(self) -> SolveConfig:
        return SolveConfig(
            rank=self.rank,
            reg_param=self.reg_param,
            implicit=self.implicit,
            alpha=self.alpha,
            nonnegative=self.nonnegative,
            solver=self.solver,
            cg_iterations=self.cg_iterations,
            precision=self.precision,
            memory_budget_bytes=self.memory_budget,
        )

    @property
    def warm_start(self) -> bool:
        return self.solver == "cg" and not self.nonnegative


@dataclass
class Side:
    """One side (users or items) of the factorization: its cached blocks and their layout."""

    name: str
    blocks: DataFrame
    num_blocks: int
    num_partitions: int
    block_ids: List[int]
    num_rows: Dict[int, int]
    nnz: int
    positives: int
    seed: int
    ids: Optional[Dict[int, np.ndarray]] = None

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
    sc = spark.sparkContext
    task_cpus = int(sc.getConf().get("spark.task.cpus", "1"))
    spare = max(1, sc.defaultParallelism // max(1, num_partitions))
    return max(1, task_cpus * spare)


class _Trainer:
    def __init__(self, spark: SparkSession, ratings: DataFrame, job: AlsJob):
        self.spark = spark
        self.sc = spark.sparkContext
        self.ratings = ratings
        self.job = job
        self.cached: List[DataFrame] = []
        self.summary = TrainingSummary(algorithm="als")
        self.checkpoint_paths: Dict[str, str] = {}
        self.truncated_from: Dict[int, DataFrame] = {}

    # ---------------------------------------------------------------- setup
    def _describe(self, text: str) -> None:
        self.sc.setJobDescription(f"spark_gpu_mf ALS: {text}")

    def _persist(self, df: DataFrame, level: StorageLevel) -> DataFrame:
        df = df.persist(level)
        self.cached.append(df)
        return df

    def _unpersist(self, df: Optional[DataFrame]) -> None:
        if df is None:
            return
        df = self.truncated_from.pop(id(df), df)
        df.unpersist()
        if df in self.cached:
            self.cached.remove(df)

    def _build_side(
        self, name: str, key: str, other: str, num_blocks: int, num_other: int, seed: int
    ) -> Side:
        parallelism = max(1, self.sc.defaultParallelism)
        num_partitions = min(num_blocks, parallelism)
        # Ratings travel packed, one row per (input batch, partition key), not one per rating.
        packed = (
            self.ratings.select(key, other, "rating")
            .mapInArrow(
                bind(
                    pack_ratings,
                    key_col=key,
                    other_col=other,
                    num_blocks=num_blocks,
                    partition_keys=partition_keys(num_partitions),
                ),
                PACKED_SCHEMA,
            )
            .repartition(num_partitions, "pkey")
        )
        blocks = packed.groupBy("pkey").applyInPandas(
            bind(build_packed_blocks, num_blocks=num_blocks, num_other_blocks=num_other),
            BLOCK_SCHEMA,
        )
        blocks = self._persist(blocks, self.job.intermediate_level)
        self._describe(f"build {name} blocks")
        meta = blocks.select("block", "num_rows", "nnz", "positives").collect()
        return Side(
            name=name,
            blocks=blocks,
            num_blocks=num_blocks,
            num_partitions=num_partitions,
            block_ids=sorted(int(r.block) for r in meta),
            num_rows={int(r.block): int(r.num_rows) for r in meta},
            nnz=sum(int(r.nnz) for r in meta),
            positives=sum(int(r.positives) for r in meta),
            seed=seed,
        )

    def _settings(self, side: Side) -> TaskSettings:
        return self._settings_for(side.num_partitions)

    def _settings_for(self, num_partitions: int) -> TaskSettings:
        return TaskSettings(
            config=self.job.solve_config(),
            backend=BackendChoice.for_session(self.spark, self.job.backend),
            blas_threads=_blas_threads(self.spark, self.job.blas_threads, num_partitions),
            fail_first_attempt=self.job.fail_first_attempt,
        )

    # ---------------------------------------------------------------- main loop
    def run(self) -> TrainResult:
        job = self.job
        started = time.perf_counter()
        user_seed, item_seed = factor_seeds(job.seed)
        if not job.input_cached:
            self.ratings = self._persist(self.ratings, job.intermediate_level)
        self._describe("count ratings")
        num_ratings = self.ratings.count()
        if num_ratings == 0:
            raise illegal_argument(f"requirement failed: No ratings available from {self.ratings}")
        if self._fits_one_task(num_ratings):
            trained = self._run_single_task(user_seed, item_seed, started, num_ratings)
            if trained is not None:
                self.summary.total_seconds = time.perf_counter() - started
                self.sc.setJobDescription(None)
                return TrainResult(*trained, self.summary, self.cached)
        users = self._build_side(
            "user", "user", "item", job.num_user_blocks, job.num_item_blocks, user_seed
        )
        if users.nnz == 0:
            raise illegal_argument(f"requirement failed: No ratings available from {self.ratings}")
        if job.implicit and users.positives == 0:
            raise _no_positive_rating()
        items = self._build_side(
            "item", "item", "user", job.num_item_blocks, job.num_user_blocks, item_seed
        )
        self._unpersist(self.ratings)
        largest_factors = max(users.total_rows, items.total_rows) * job.rank * 4
        broadcast = largest_factors <= job.broadcast_threshold
        self.summary.details.update(
            {
                "dataflow": "broadcast" if broadcast else "messages",
                "numUsers": users.total_rows,
                "numItems": items.total_rows,
                "numRatings": users.nnz,
                "userPartitions": users.num_partitions,
                "itemPartitions": items.num_partitions,
            }
        )
        self.summary.setup_seconds = time.perf_counter() - started
        logger.info(
            "ALS: %d users, %d items, %d ratings, rank %d; %s dataflow; setup %.2fs",
            users.total_rows,
            items.total_rows,
            users.nnz,
            job.rank,
            self.summary.details["dataflow"],
            self.summary.setup_seconds,
        )
        if broadcast:
            user_df, item_df = self._run_broadcast(users, items)
        else:
            user_df, item_df = self._run_messages(users, items)
        self.summary.total_seconds = time.perf_counter() - started
        self.sc.setJobDescription(None)
        return TrainResult(user_df, item_df, self.summary, self.cached)

    # ---------------------------------------------------------------- single-task dataflow
    def _fits_one_task(self, num_ratings: int) -> bool:
        """Small fits run in one task: Spark's ~0.1-0.2 s per job would outweigh the math. (The
        task itself checks that both sides' factors fit ``broadcastThreshold``.)"""
        job = self.job
        return not job.training_rmse and num_ratings <= job.single_task_max_ratings

    def _run_single_task(self, user_seed: int, item_seed: int, started: float, num_ratings: int):
        """``(user factors, item factors)``, or ``None`` when a side has more factors than
        ``broadcastThreshold`` allows in one process (the task stops after building blocks)."""
        job = self.job
        settings = replace(self._settings_for(1), blas_threads=1)
        self.summary.details["dataflow"] = "single task"
        self._describe(f"{job.max_iter} iterations in one task")
        # coalesce, not repartition: the ratings (or the input) are cached, and one task
        # reading the cached partitions costs less than shuffling every rating to it.
        rows = map_in_arrow_rows(
            self.ratings.coalesce(1),
            bind(
                single_task.train_in_one_task,
                settings=settings,
                num_user_blocks=job.num_user_blocks,
                num_item_blocks=job.num_item_blocks,
                user_seed=user_seed,
                item_seed=item_seed,
                max_iter=job.max_iter,
                threads=_task_threads(self.spark),
                max_factor_rows=job.broadcast_threshold // (job.rank * 4),
            ),
            single_task.SINGLE_TASK_SCHEMA,
        )
        status, seconds, sides = single_task.decode_result(rows, job.rank)
        if single_task.TOO_WIDE in status:
            logger.info(
                "ALS: %d rows on one side exceed spark.gpumf.broadcastThreshold in one task; "
                "using the distributed dataflow", int(status[single_task.TOO_WIDE]),
            )  # fmt: skip
            del self.summary.details["dataflow"]
            return None
        self._unpersist(self.ratings)
        if job.implicit and status.get(single_task.POSITIVES, 0.0) == 0:
            raise _no_positive_rating()
        self.summary.details["phaseSeconds"] = {
            "hermitian": status.get(single_task.HERMITIAN, 0.0),
            "solve": status.get(single_task.SOLVE, 0.0),
        }
        (user_ids, user_factors), (item_ids, item_factors) = sides[0], sides[1]
        self.summary.details.update(
            {"numUsers": len(user_ids), "numItems": len(item_ids), "numRatings": num_ratings}
        )
        self.summary.setup_seconds = time.perf_counter() - started - sum(seconds)
        logger.info(
            "ALS: %d users, %d items, rank %d; single task dataflow",
            len(user_ids), len(item_ids), job.rank,
        )  # fmt: skip
        for iteration, elapsed in enumerate(seconds, start=1):
            self._record(iteration, elapsed)
        users = factors_dataframe(self.spark, user_ids, user_factors)
        items = factors_dataframe(self.spark, item_ids, item_factors)
        users = self._finalize(users, "user", from_driver=True)
        return users, self._finalize(items, "item", from_driver=True)

    def _record(self, iteration: int, seconds: float, metrics: Optional[dict] = None) -> None:
        entry = {"iteration": iteration, "seconds": seconds}
        entry.update(metrics or {})
        self.summary.iterations.append(entry)
        extra = "".join(f", {k} {v:.6g}" for k, v in (metrics or {}).items())
        logger.info("ALS iteration %d/%d: %.3fs%s", iteration, self.job.max_iter, seconds, extra)

    # ---------------------------------------------------------------- broadcast dataflow
    def _collect_ids(self, side: Side) -> None:
        rows = side.blocks.select("block", "ids").collect()
        side.ids = {int(r.block): from_bytes(r.ids, np.int32) for r in rows}

    def _source(self, side: Side, factors: Dict[int, np.ndarray], yty) -> SourceFactors:
        """Factors of one side laid out block after block, with empty slots for absent blocks."""
        offsets = np.zeros(side.num_blocks + 1, np.int64)
        for b in range(side.num_blocks):
            offsets[b + 1] = offsets[b] + side.num_rows.get(b, 0)
        ids = np.concatenate([side.ids[b] for b in side.block_ids])
        matrix = np.concatenate([factors[b] for b in side.block_ids]).reshape(-1, self.job.rank)
        return SourceFactors(ids=ids, offsets=offsets, factors=matrix, yty=yty)

    def _initial(self, side: Side) -> Dict[int, np.ndarray]:
        return {
            b: initial_factors(side.num_rows[b], self.job.rank, side.seed, b)
            for b in side.block_ids
        }

    def _half_broadcast(self, dst: Side, src: Side, src_factors, src_yty, previous, label):
        job = self.job
        source = self.sc.broadcast(self._source(src, src_factors, src_yty))
        warm = self.sc.broadcast(self._source(dst, previous, None)) if job.warm_start else None
        self._describe(label)
        try:
            solved = (
                dst.blocks.mapInPandas(
                    bind(
                        als_tasks.solve_with_broadcast,
                        source=source,
                        previous=warm,
                        settings=self._settings(dst),
                    ),
                    SOLVED_SCHEMA,
                )
                .toArrow()
                .to_pylist()
            )
        finally:
            source.destroy()
            if warm is not None:
                warm.destroy()
        factors = {
            r["block"]: from_bytes(r["factors"], np.float32).reshape(-1, job.rank) for r in solved
        }
        if sorted(factors) != dst.block_ids:
            raise RuntimeError(f"ALS lost {dst.name} blocks: got {sorted(factors)}")
        phases = self.summary.details.setdefault("phaseSeconds", {"hermitian": 0.0, "solve": 0.0})
        for name in phases:
            phases[name] += sum(r[name] for r in solved)
        yty = None
        if job.implicit:
            yty = als_tasks.sum_in_block_order(
                {
                    r["block"]: from_bytes(r["gram"], np.float64).reshape(job.rank, job.rank)
                    for r in solved
                }
            )
        return factors, yty

    def _gram(self, factors: Dict[int, np.ndarray]):
        return als_tasks.gram_in_block_order(factors) if self.job.implicit else None

    def _run_broadcast(self, users: Side, items: Side):
        job = self.job
        self._collect_ids(users)
        self._collect_ids(items)
        user_factors, item_factors = self._initial(users), self._initial(items)
        user_yty = self._gram(user_factors)
        for iteration in range(1, job.max_iter + 1):
            started = time.perf_counter()
            item_factors, item_yty = self._half_broadcast(
                items,
                users,
                user_factors,
                user_yty,
                item_factors,
                f"iteration {iteration}/{job.max_iter}: solve items",
            )
            user_factors, user_yty = self._half_broadcast(
                users,
                items,
                item_factors,
                item_yty,
                user_factors,
                f"iteration {iteration}/{job.max_iter}: solve users",
            )
            metrics = None
            if job.training_rmse:
                metrics = {
                    "trainRmse": self._train_rmse_broadcast(
                        users, items, user_factors, item_factors
                    )
                }
            self._record(iteration, time.perf_counter() - started, metrics)
        return (
            self._final_broadcast(users, user_factors),
            self._final_broadcast(items, item_factors),
        )

    def _train_rmse_broadcast(self, users: Side, items: Side, user_factors, item_factors) -> float:
        source = self.sc.broadcast(self._source(items, item_factors, None))
        own = self.sc.broadcast(self._source(users, user_factors, None))
        self._describe("training RMSE")
        try:
            rows = users.blocks.mapInPandas(
                bind(als_tasks.squared_error, source=source, own=own, rank=self.job.rank),
                "sse double, count long",
            ).collect()
        finally:
            source.destroy()
            own.destroy()
        return float(np.sqrt(sum(r.sse for r in rows) / max(1, sum(r["count"] for r in rows))))

    def _final_broadcast(self, side: Side, factors) -> DataFrame:
        ids = np.concatenate([side.ids[b] for b in side.block_ids])
        matrix = np.concatenate([factors[b] for b in side.block_ids])
        return self._finalize(
            factors_dataframe(self.spark, ids, matrix), side.name, from_driver=True
        )

    def _finalize(self, df: DataFrame, side_name: str, from_driver: bool = False) -> DataFrame:
        """Persist the factors at ``finalStorageLevel``, materialized now unless they were made
        from arrays on the driver (``from_driver``): those cost nothing to recompute and need
        none of the training state ``release`` drops, so a job (two per fit, ~0.2 s each at 1M
        ratings) would only move the caching to before the user's first action."""
        if self.job.final_level is not None:
            df = df.persist(self.job.final_level)
            if not from_driver:
                self._describe(f"materialize {side_name} factors")
                df.count()
        return df

    # ---------------------------------------------------------------- message dataflow
    def _checkpoint_dir(self) -> Optional[str]:
        jdir = self.sc._jsc.sc().getCheckpointDir()
        return jdir.get() if jdir.isDefined() else None

    def _maybe_checkpoint(self, outbox: DataFrame, side: Side, iteration: int) -> DataFrame:
        """Cut the lineage every ``checkpointInterval`` iterations, as Spark's ALS does.

        The outbox is written as Parquet under the checkpoint directory and read back; the side's
        previous checkpoint is deleted once the new one is in place. Spark checkpoints only the
        item factors; with a warm-started solver each side also reads its own previous factors,
        so both sides are checkpointed (else one side's chain keeps growing until the stack
        overflows).
        """
        interval = self.job.checkpoint_interval
        directory = self._checkpoint_dir()
        if directory is None or interval == -1 or iteration % interval != 0:
            return outbox
        path = f"{directory.rstrip('/')}/spark-gpu-mf-als-{side.name}-{uuid.uuid4().hex}"
        self._describe(f"checkpoint {side.name} factors, iteration {iteration}")
        outbox.write.parquet(path)
        reread = self._persist(self.spark.read.parquet(path), self.job.intermediate_level)
        reread.count()
        self._unpersist(outbox)
        previous = self.checkpoint_paths.pop(side.name, None)
        if previous is not None:
            _delete_path(self.spark, previous)
        self.checkpoint_paths[side.name] = path
        return reread

    def _partition_by_key(self, side: Side) -> None:
        """Cache the side's blocks under a partitioning Spark knows (hash of ``pkey``), so that
        each half-iteration's cogroup shuffles only the messages, never the blocks."""
        keyed = self._persist(
            side.blocks.repartition(side.num_partitions, "pkey"), self.job.intermediate_level
        )
        self._describe(f"place {side.name} blocks")
        keyed.count()
        self._unpersist(side.blocks)
        side.blocks = keyed

    def _initial_outbox(self, side: Side, other: Side) -> DataFrame:
        job = self.job
        outbox = side.blocks.mapInPandas(
            bind(
                als_tasks.initial_outbox,
                rank=job.rank,
                side_seed=side.seed,
                other_keys=other.keys,
                other_blocks=other.block_ids,
                implicit=job.implicit,
            ),
            OUTBOX_SCHEMA,
        )
        outbox = self._persist(outbox, job.intermediate_level)
        self._describe(f"initialize {side.name} factors")
        outbox.count()
        return self._truncated(outbox)

    def _half_messages(self, dst: Side, src: Side, src_outbox, dst_outbox, label) -> DataFrame:
        job = self.job
        messages = src_outbox.filter(F.col("kind") != OWN)
        if job.warm_start:
            messages = messages.unionByName(dst_outbox.filter(F.col("kind") == OWN))
        messages = messages.repartition(dst.num_partitions, "pkey")
        solved = (
            messages.groupBy("pkey")
            .cogroup(dst.blocks.groupBy("pkey"))
            .applyInPandas(
                bind_pair(
                    als_tasks.solve_from_messages,
                    settings=self._settings(dst),
                    other_keys=src.keys,
                    other_blocks=src.block_ids,
                    num_gram_parts=len(src.block_ids) if job.implicit else 0,
                ),
                OUTBOX_SCHEMA,
            )
        )
        solved = self._persist(solved, job.intermediate_level)
        self._describe(label)
        solved.count()
        return self._truncated(solved)

    def _truncated(self, persisted: DataFrame) -> DataFrame:
        """The same rows as ``persisted`` under a one-node logical plan.

        Each half-iteration reads both the other side's and its own previous outbox, so the
        logical plan of iteration t would hold the whole history as a tree twice as large as the
        one before; Spark would spend memory and time on it in every later query. Reading the
        persisted rows through ``queryExecution.toRdd`` keeps the RDD lineage (recomputable if an
        executor is lost) while the plan stays a single scan. Every consumer of the outbox streams
        its rows into a shuffle, Arrow or Parquet, so reused row buffers are safe.
        """
        jdf = persisted._jdf
        rows = jdf.queryExecution().toRdd()
        flat = DataFrame(
            self.spark._jsparkSession.internalCreateDataFrame(rows, jdf.schema(), False), self.spark
        )
        self.truncated_from[id(flat)] = persisted
        return flat

    def _run_messages(self, users: Side, items: Side):
        job = self.job
        if (
            job.checkpoint_interval != -1
            and self._checkpoint_dir() is None
            and (job.max_iter >= job.checkpoint_interval)
        ):
            logger.warning(
                "ALS checkpointing is off: no checkpoint directory is set "
                "(SparkContext.setCheckpointDir), so checkpointInterval=%d is ignored and the "
                "lineage grows with every iteration.",
                job.checkpoint_interval,
            )
        for side in (users, items):
            self._partition_by_key(side)
        user_outbox = self._initial_outbox(users, items)
        item_outbox = self._initial_outbox(items, users)
        for iteration in range(1, job.max_iter + 1):
            started = time.perf_counter()
            new_items = self._half_messages(
                items,
                users,
                user_outbox,
                item_outbox,
                f"iteration {iteration}/{job.max_iter}: solve items",
            )
            self._unpersist(item_outbox)
            item_outbox = self._maybe_checkpoint(new_items, items, iteration)
            new_users = self._half_messages(
                users,
                items,
                item_outbox,
                user_outbox,
                f"iteration {iteration}/{job.max_iter}: solve users",
            )
            self._unpersist(user_outbox)
            user_outbox = (
                self._maybe_checkpoint(new_users, users, iteration) if job.warm_start else new_users
            )
            self._record(iteration, time.perf_counter() - started)
        explode = bind(als_tasks.explode_outbox, rank=job.rank)
        user_df = self._finalize(
            user_outbox.filter(F.col("kind") == OWN).mapInPandas(explode, FACTORS_SCHEMA), users
        )
        item_df = self._finalize(
            item_outbox.filter(F.col("kind") == OWN).mapInPandas(explode, FACTORS_SCHEMA), items
        )
        return user_df, item_df

    def release(self, keep: List[DataFrame]) -> None:
        """Unpersist everything cached during training except the model's factor DataFrames."""
        for df in list(self.cached):
            if df not in keep:
                self._unpersist(df)
        for path in self.checkpoint_paths.values():
            _delete_path(self.spark, path)


def _no_positive_rating() -> Exception:
    return illegal_argument(
        "implicitPrefs=True needs at least one positive rating: every rating is zero or "
        "negative, so every preference is 0 and every factor would be zero."
    )


def _task_threads(spark: SparkSession) -> int:
    """Cores one task may use when it is the only task running: the local machine's (local
    mode) or one executor's."""
    sc = spark.sparkContext
    if (sc.master or "").startswith("local"):
        return max(1, sc.defaultParallelism)
    return max(1, int(sc.getConf().get("spark.executor.cores", "1")))


def _delete_path(spark: SparkSession, path: str) -> None:
    jvm = spark.sparkContext._jvm
    hpath = jvm.org.apache.hadoop.fs.Path(path)
    fs = hpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    try:
        fs.delete(hpath, True)
    except Exception:  # a leftover checkpoint is harmless; never fail a fit for it
        logger.warning("could not delete checkpoint %s", path)


def train(spark: SparkSession, ratings: DataFrame, job: AlsJob) -> TrainResult:
    """Fit ALS factors for validated ``(user int, item int, rating float)`` ratings."""
    trainer = _Trainer(spark, ratings, job)
    try:
        result = trainer.run()
    except BaseException:
        trainer.release(keep=[])
        trainer.sc.setJobDescription(None)
        raise
    if job.final_level is not None:
        trainer.release(keep=[result.user_factors, result.item_factors])
    # With finalStorageLevel NONE the factors stay lazy and need the cached state, as in Spark.
    return result
