"""Driver side of PrunedMF: rating scale, the epoch loop and the pruning decision.

The stratified runner (``sgd.stratified``) moves blocks and runs the per-cell update
(``pruned_tasks.update_cell``); this module decides what each epoch runs with. Following the
authors' LIBMF fork:

* ratings are divided by their standard deviation ``s`` for training and ``regParam`` by ``s``;
  the final factors are multiplied by ``sqrt(s)``, so predictions are in rating units;
* epochs ``0 .. pruneStartEpoch-1`` run unpruned; then, once, the thresholds are fitted and the
  columns of every factor block are permuted by joint sparsity (``pruned_math.plan_pruning``),
  on the driver where the runner keeps the blocks between sub-epochs; every later epoch prunes;
* with ``truncateFactors``, every row is zeroed from its first insignificant entry on at the end
  (``pruned_math.truncate_rows``), so the model predicts exactly what training fitted.

Small fits run in the driver (``stratified.build_strata_on_driver``, one block) when
``spark.gpumf.sgd.inDriverMaxRatings`` allows it and ``numBlocks`` is 0 or 1: on 100K ratings a
Spark job per sub-epoch costs more than the whole epoch's SGD.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from spark_gpu_mf.sgd import pruned_math
from spark_gpu_mf.sgd.common import SGDJob, SGDResult
from spark_gpu_mf.sgd.pruned_numba import OPTIMIZERS
from spark_gpu_mf.sgd.pruned_tasks import ACCUMULATOR, FACTORS, initial_state, update_cell
from spark_gpu_mf.sgd.stratified import (
    StratifiedRunner,
    build_strata,
    build_strata_on_driver,
    default_num_blocks,
    merged_ids,
)
from spark_gpu_mf.spark import session as sessions
from spark_gpu_mf.spark.factors import factors_dataframe
from spark_gpu_mf.summary import TrainingSummary

__all__ = ["PrunedJob", "PrunedResult", "rating_scale", "train"]

logger = logging.getLogger("spark_gpu_mf")

_USER_SIDE, _ITEM_SIDE = 0, 1


@dataclass(frozen=True, kw_only=True)
class PrunedJob(SGDJob):
    """PrunedMF's fit: the shared SGD fields plus DP-MF's, and where small fits may run.

    ``in_driver_max_ratings``: the largest fit that runs in the driver (0: never); the caller
    sets it only where that is possible (local master, classic session, NumPy backend).
    """

    optimizer: str
    pruning_rate: float
    prune_start_epoch: int
    truncate_factors: bool = True
    regrowth: bool = False
    in_driver_max_ratings: int = 0


PrunedResult = SGDResult


def rating_scale(ratings: DataFrame) -> tuple[float, int]:
    """LIBMF's scale, the standard deviation of the ratings (1 if they are all equal or none),
    and the number of ratings: one Spark job."""
    count, std = ratings.agg(F.count(F.lit(1)), F.stddev_pop("rating")).collect()[0]
    return (float(std) if std and std > 0 else 1.0), int(count)


def train(spark: SparkSession, ratings: DataFrame, job: PrunedJob) -> PrunedResult:
    """Fit PrunedMF factors for validated ``(user int, item int, rating float)`` ratings."""
    started = time.perf_counter()
    summary = TrainingSummary(algorithm="pruned")
    ratings = ratings.persist(StorageLevel.MEMORY_AND_DISK)
    strata = runner = None
    try:
        sessions.set_job_description(spark, "spark_gpu_mf PrunedMF: rating scale")
        scale, count = rating_scale(ratings)
        scaled = ratings.withColumn("rating", (F.col("rating") / F.lit(scale)).cast(T.FloatType()))
        if job.num_blocks <= 1 and 0 < count <= job.in_driver_max_ratings:
            sessions.set_job_description(spark, "spark_gpu_mf PrunedMF: collect ratings")
            table = scaled.select("user", "item", "rating").toArrow()
            strata = build_strata_on_driver(spark, table, num_blocks=1, seed=job.seed)
        else:
            num_blocks = job.num_blocks or default_num_blocks(spark)
            strata = build_strata(
                spark, scaled, num_blocks=num_blocks, seed=job.seed, label="PrunedMF"
            )
        ratings.unpersist()
        runner = StratifiedRunner(
            strata,
            update_cell,
            user_state=initial_state(strata.users.ids, job.rank, job.init_std, job.seed, 0),
            item_state=initial_state(strata.items.ids, job.rank, job.init_std, job.seed, 1),
            label="PrunedMF",
        )
        nnz = strata.num_ratings
        summary.details.update(
            {
                "numUsers": strata.users.total_rows,
                "numItems": strata.items.total_rows,
                "numRatings": nnz,
                "numBlocks": strata.num_blocks,
                "ratingScale": scale,
                "pruningRate": job.pruning_rate,
                "pruneStartEpoch": job.prune_start_epoch,
                "regrowth": job.regrowth,
                "backend": job.backend.requested,
                "inDriver": strata.in_driver,
            }
        )
        summary.setup_seconds = time.perf_counter() - started
        logger.info(
            "PrunedMF: %d users, %d items, %d ratings, rank %d, %d blocks; setup %.2fs",
            strata.users.total_rows, strata.items.total_rows, nnz, job.rank, strata.num_blocks,
            summary.setup_seconds,
        )  # fmt: skip
        thresholds = _epochs(runner, job, scale, nnz, summary)
        if job.truncate_factors:
            _truncate(runner, thresholds, summary)
        user_df, item_df = (
            _factors(spark, runner, strata, side, scale) for side in ("user", "item")
        )
    finally:
        ratings.unpersist()
        if runner is not None:
            runner.close()
        if strata is not None:
            strata.release()
        sessions.set_job_description(spark, None)
    summary.total_seconds = time.perf_counter() - started
    return SGDResult(user_df, item_df, summary)


def _epochs(runner: StratifiedRunner, job: PrunedJob, scale: float, nnz: int, summary):
    """Run every epoch; returns the final ``{side: threshold}`` (0 when pruning never started)."""
    settings = {
        "step": job.step_size,
        "reg": job.reg_param / scale,
        "threshold_user": 0.0,
        "threshold_item": 0.0,
        "optimizer": OPTIMIZERS[job.optimizer],
        "regrowth": job.regrowth,
        "backend": job.backend,
    }
    total_macs = 0.0
    for epoch in range(job.max_iter):
        epoch_started = time.perf_counter()
        if epoch == job.prune_start_epoch:
            plan = _start_pruning(runner, job.pruning_rate)
            settings["threshold_user"] = plan.threshold_p
            settings["threshold_item"] = plan.threshold_q
            summary.details["pruning"] = plan.details()
            summary.details["pruningSeconds"] = time.perf_counter() - epoch_started
        run = runner.run_epoch(epoch, settings, max_iter=job.max_iter)
        macs = _scalar(run.statistics, "macs")
        total_macs += macs
        metrics = {
            "trainRmse": math.sqrt(_scalar(run.statistics, "sse") / nnz) * scale,
            "macFraction": macs / (job.rank * nnz),
            "computeSeconds": sum(s.sum_task_seconds for s in run.sub_epochs),
            "computeCpuSeconds": _scalar(run.statistics, "cpu_seconds"),
            "criticalComputeSeconds": sum(s.max_task_seconds for s in run.sub_epochs),
            "overheadSeconds": run.overhead_seconds,
        }
        seconds = time.perf_counter() - epoch_started
        summary.iterations.append(
            {"iteration": epoch + 1, "seconds": seconds, "pruned": epoch >= job.prune_start_epoch,
             **metrics}
        )  # fmt: skip
        logger.info(
            "PrunedMF epoch %d/%d: %.3fs, train RMSE %.5g, multiply-adds %.1f%%, compute %.3fs",
            epoch + 1, job.max_iter, seconds, metrics["trainRmse"],
            100 * metrics["macFraction"], metrics["computeSeconds"],
        )  # fmt: skip
    if job.max_iter:
        summary.details["macFraction"] = total_macs / (job.rank * nnz * job.max_iter)
    return {"user": settings["threshold_user"], "item": settings["threshold_item"]}


def _truncate(runner: StratifiedRunner, thresholds: dict, summary) -> None:
    """Zero every row from its first insignificant entry on (see ``pruned_math.truncate_rows``)."""
    for side, threshold in thresholds.items():
        blocks, zeroed, total = [], 0, 0
        for state in runner.state(side):
            factors, count = pruned_math.truncate_rows(state[FACTORS], threshold)
            blocks.append({**state, FACTORS: factors})
            zeroed += count
            total += factors.size
        runner.set_state(side, blocks)
        summary.details[f"truncatedShare{side.capitalize()}"] = zeroed / max(total, 1)


def _scalar(statistics, name: str) -> float:
    """A summed statistic as a float, whatever its shape (a 0-d or one-element array)."""
    return float(np.sum(statistics.get(name, 0.0)))


def _start_pruning(runner: StratifiedRunner, rate: float) -> pruned_math.PruningPlan:
    """Fit the thresholds and permute the columns of every block (P, Q and any per-dimension
    optimizer state; row-wise AdaGrad has none)."""
    users, items = runner.state("user"), runner.state("item")
    plan = pruned_math.plan_pruning([s[FACTORS] for s in users], [s[FACTORS] for s in items], rate)
    for side, blocks in (("user", users), ("item", items)):
        runner.set_state(
            side,
            [
                {FACTORS: pruned_math.permute_columns(s[FACTORS], plan.order),
                 ACCUMULATOR: s[ACCUMULATOR]}
                for s in blocks
            ],
        )  # fmt: skip
    logger.info(
        "PrunedMF pruning from now on: thresholds user %.4g item %.4g (training scale), "
        "column order %s",
        plan.threshold_p, plan.threshold_q, plan.order.tolist(),
    )  # fmt: skip
    return plan


def _factors(spark, runner, strata, side: str, scale: float) -> DataFrame:
    layout = strata.users if side == "user" else strata.items
    matrix = np.concatenate([s[FACTORS] for s in runner.state(side)])
    matrix = matrix * np.float32(math.sqrt(scale))
    return factors_dataframe(spark, merged_ids(layout), matrix)
