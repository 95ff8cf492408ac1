"""Driver side of MascotMF: groups, the epoch loop, g-switching, validation and the summary.

The stratified runner (``sgd.stratified``) moves blocks and runs the per-cell update
(``mascot_tasks.update_cell``) ``numBlocks`` tasks at a time (for a small fit, up to
``spark.gpumf.sgd.inDriverMaxRatings``, the same cells run in threads of the driver: a Spark job
per sub-epoch would cost more than the SGD); this module decides what each epoch runs with:

* ``lr = stepSize / (1 + decay * e^1.5)`` for 0-based epoch ``e``;
* rows grouped by training rating count (``mascot_groups.count_groups``) per side; all groups
  start in FP16 (``storage`` "fp16" and "mascot") or FP32 ("fp32"), and with "mascot" every
  check epoch collects the per-group sums, reduces them over all cells (the runner sums the
  cells' statistics) and switches groups for good (``GroupPrecision.check``); the blocks of a
  side are then re-stored on the driver before the next epoch;
* with a validation set, one read-only pass per epoch gives the held-out RMSE.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
from pyspark.sql import DataFrame, SparkSession

from spark_gpu_mf.sgd import mascot_tasks
from spark_gpu_mf.sgd.common import SGDJob, SGDResult
from spark_gpu_mf.sgd.mascot_groups import GroupPrecision, count_groups, is_check_epoch
from spark_gpu_mf.sgd.stratified import (
    BlockLayout,
    StratifiedRunner,
    build_strata,
    build_strata_on_driver,
    merged_ids,
)
from spark_gpu_mf.spark import session as sessions
from spark_gpu_mf.spark.factors import factors_dataframe
from spark_gpu_mf.summary import TrainingSummary

__all__ = ["MascotJob", "MascotResult", "fp32_line", "learning_rate", "train"]

logger = logging.getLogger("spark_gpu_mf")

_SIDES = ("user", "item")


@dataclass(frozen=True, kw_only=True)
class MascotJob(SGDJob):
    """MascotMF's fit: the shared SGD fields plus MASCOT's."""

    decay: float
    storage: str
    num_user_groups: int
    num_item_groups: int
    sample_ratio: float
    check_interval: int
    error_threshold: float
    first_check_epoch: int
    has_validation: bool = False
    rounding_threshold: float = 0.0
    in_driver_max_ratings: int = 0  # 0: always on Spark


MascotResult = SGDResult


def learning_rate(step_size: float, decay: float, epoch: int) -> float:
    """MASCOT's schedule: ``step_size / (1 + decay * epoch^1.5)`` (0-based epoch)."""
    return step_size / (1.0 + decay * epoch**1.5)


@dataclass
class _Side:
    name: str
    layout: BlockLayout
    groups: list[np.ndarray]  # per block: group of each row
    precision: GroupPrecision
    group_rows: np.ndarray  # rows per group
    group_counts: tuple[np.ndarray, np.ndarray]  # (min, max) rating count per group
    group_ratings: np.ndarray  # training ratings per group (the updates it gets per epoch)

    def fp32_share(self) -> float:
        """Share of an epoch's updates of this side that touch FP32 rows now."""
        total = self.group_ratings.sum()
        return float(self.group_ratings[self.precision.fp32].sum() / total) if total else 0.0


def _side(name: str, layout: BlockLayout, num_groups: int, start_fp32: bool) -> _Side:
    counts = np.concatenate(layout.counts) if layout.counts else np.zeros(0, np.int64)
    groups = count_groups(counts, num_groups)
    actual = int(groups.max()) + 1 if len(groups) else 1
    per_block, start = [], 0
    for n in layout.num_rows:
        per_block.append(groups[start : start + n])
        start += n
    rows = np.bincount(groups, minlength=actual)
    low = np.full(actual, np.iinfo(np.int64).max)
    high = np.zeros(actual, np.int64)
    np.minimum.at(low, groups, counts)
    np.maximum.at(high, groups, counts)
    ratings = np.bincount(groups, weights=counts, minlength=actual)
    return _Side(name, layout, per_block, GroupPrecision.create(actual, start_fp32), rows,
                 (low, high), ratings)  # fmt: skip


def train(spark: SparkSession, ratings: DataFrame, job: MascotJob) -> MascotResult:
    """Fit MascotMF factors for validated ``(user int, item int, rating float[, is_validation])``
    ratings."""
    started = time.perf_counter()
    summary = TrainingSummary(algorithm="mascot")
    strata = runner = None
    try:
        collected = _collect_if_small(spark, ratings, job.in_driver_max_ratings)
        if collected is not None:
            strata = build_strata_on_driver(
                spark, collected, num_blocks=job.num_blocks, seed=job.seed,
                has_validation=job.has_validation,
            )  # fmt: skip
        else:
            strata = build_strata(
                spark, ratings, num_blocks=job.num_blocks, seed=job.seed,
                has_validation=job.has_validation, label="MascotMF",
            )  # fmt: skip
        start_fp32 = job.storage == "fp32"
        sides = {
            "user": _side("user", strata.users, job.num_user_groups, start_fp32),
            "item": _side("item", strata.items, job.num_item_groups, start_fp32),
        }
        states = {}
        for index, name in enumerate(_SIDES):
            side = sides[name]
            values = mascot_tasks.initial_values(
                side.layout.ids, job.rank, job.init_std, job.seed, index
            )
            states[name] = [
                mascot_tasks.layout(v, g, side.precision.fp32) for v, g in zip(values, side.groups)
            ]
        runner = StratifiedRunner(
            strata, mascot_tasks.update_cell, user_state=states["user"],
            item_state=states["item"], label="MascotMF",
        )  # fmt: skip
        summary.details.update(
            {
                "storage": job.storage,
                "arithmetic": "fp32 (MASCOT-N1: float16 storage, float32 compute)",
                "numUsers": strata.users.total_rows,
                "numItems": strata.items.total_rows,
                "numRatings": strata.num_ratings,
                "numValidation": strata.num_validation,
                "numValidationUnknown": strata.num_validation_unknown,
                "numBlocks": strata.num_blocks,
                "numUserGroups": sides["user"].precision.num_groups,
                "numItemGroups": sides["item"].precision.num_groups,
                "backend": job.backend.requested,
                "epochsIn": "spark" if collected is None else "driver",
                "setupStrataSeconds": strata.setup_seconds,
            }
        )
        summary.setup_seconds = time.perf_counter() - started
        logger.info(
            "MascotMF: %d users, %d items, %d ratings (%d validation), rank %d, %d blocks, "
            "storage %s; setup %.2fs",
            strata.users.total_rows, strata.items.total_rows, strata.num_ratings,
            strata.num_validation, job.rank, strata.num_blocks, job.storage,
            summary.setup_seconds,
        )  # fmt: skip
        _epochs(runner, job, sides, strata.num_validation > 0, summary)
        _describe_groups(sides, summary)
        summary.details["fp32PerEpoch"] = fp32_line(summary.iterations)
        logger.info("MascotMF: %s", summary.details["fp32PerEpoch"])
        user_df, item_df = (
            factors_dataframe(
                spark,
                merged_ids(sides[name].layout),
                _dense_side(runner, name, sides[name].precision.fp32, job.rank),
            )
            for name in _SIDES
        )
    finally:
        if runner is not None:
            runner.close()
        if strata is not None:
            strata.release()
        sessions.set_job_description(spark, None)
    summary.total_seconds = time.perf_counter() - started
    return MascotResult(user_df, item_df, summary)


def _collect_if_small(spark: SparkSession, ratings: DataFrame, max_ratings: int):
    """The validated ratings as an Arrow table when there are at most ``max_ratings`` (then the
    fit runs in the driver), else None; one Spark job that reads at most ``max_ratings + 1``."""
    if max_ratings <= 0:
        return None
    sessions.set_job_description(spark, "spark_gpu_mf MascotMF: collect a small rating set")
    try:
        table = ratings.limit(max_ratings + 1).toArrow()
    finally:
        sessions.set_job_description(spark, None)
    return table if table.num_rows <= max_ratings else None


def _dense_side(runner: StratifiedRunner, side: str, fp32: np.ndarray, rank: int) -> np.ndarray:
    blocks = [mascot_tasks.dense(state, fp32) for state in runner.state(side)]
    return np.concatenate(blocks) if blocks else np.zeros((0, rank), np.float32)


def _flags(side: _Side) -> np.ndarray:
    return side.precision.fp32.astype(np.uint8)


def _epochs(runner, job: MascotJob, sides, validate: bool, summary: TrainingSummary) -> None:
    base = {
        "reg": job.reg_param,
        "sample_ratio": job.sample_ratio,
        "backend": job.backend,
    }
    for epoch in range(job.max_iter):
        epoch_started = time.perf_counter()
        lr = learning_rate(job.step_size, job.decay, epoch)
        check = job.storage == "mascot" and is_check_epoch(
            epoch, job.first_check_epoch, job.check_interval, job.max_iter
        )
        settings = {
            **base,
            "lr": lr,
            "collect": check,
            "user_group_fp32": _flags(sides["user"]),
            "item_group_fp32": _flags(sides["item"]),
        }
        shares = {name: sides[name].fp32_share() for name in _SIDES}
        run = runner.run_epoch(epoch, settings, max_iter=job.max_iter)
        stats = run.statistics
        entry = {
            "iteration": epoch + 1,
            "seconds": 0.0,
            "learningRate": lr,
            "trainRmse": math.sqrt(float(stats["sse"]) / max(1.0, float(stats["count"]))),
            "computeSeconds": sum(s.sum_task_seconds for s in run.sub_epochs),
            "criticalComputeSeconds": sum(s.max_task_seconds for s in run.sub_epochs),
            "overheadSeconds": run.overhead_seconds,
            "checkEpoch": check,
            "fp32UserShare": shares["user"],
            "fp32ItemShare": shares["item"],
        }
        if check:
            entry.update(
                _switch(runner, sides, stats, epoch, job.error_threshold, job.rounding_threshold)
            )
        entry["fp32UserGroups"] = int(sides["user"].precision.fp32.sum())
        entry["fp32ItemGroups"] = int(sides["item"].precision.fp32.sum())
        entry["seconds"] = time.perf_counter() - epoch_started
        if validate:
            evaluation, seconds = runner.evaluate(
                mascot_tasks.evaluate_cell,
                {
                    "user_group_fp32": _flags(sides["user"]),
                    "item_group_fp32": _flags(sides["item"]),
                },
                label=f"validation RMSE after epoch {epoch + 1}/{job.max_iter}",
            )
            entry["validationRmse"] = math.sqrt(
                float(evaluation["sse"]) / max(1.0, float(evaluation["count"]))
            )
            entry["validationSeconds"] = seconds
        summary.iterations.append(entry)
        logger.info(
            "MascotMF epoch %d/%d: %.3fs (compute %.3fs), lr %.3g, train RMSE %.5g%s, "
            "FP32 groups %d user / %d item",
            epoch + 1, job.max_iter, entry["seconds"], entry["criticalComputeSeconds"], lr,
            entry["trainRmse"],
            f", validation RMSE {entry['validationRmse']:.5g}" if validate else "",
            entry["fp32UserGroups"], entry["fp32ItemGroups"],
        )  # fmt: skip


def _switch(
    runner: StratifiedRunner, sides, stats, epoch: int, threshold: float, rounding_threshold: float
) -> dict:
    """Apply one check epoch's statistics to both sides; re-store the blocks that changed."""
    entry = {}
    for name in _SIDES:
        side = sides[name]
        before = side.precision.fp32.copy()
        switched = side.precision.check(
            epoch, stats[f"{name}_sums"], stats[f"{name}_squares"], threshold,
            stats.get(f"{name}_rounding"), rounding_threshold,
        )  # fmt: skip
        errors = side.precision.errors[epoch]
        entry[f"{name}ErrorMax"] = float(np.nanmax(errors)) if np.isfinite(errors).any() else None
        rounding = side.precision.rounding.get(epoch)
        entry[f"{name}RoundingMax"] = (
            float(np.nanmax(rounding))
            if rounding is not None and np.isfinite(rounding).any()
            else None
        )
        entry[f"switched{name.capitalize()}Groups"] = switched.tolist()
        if len(switched):
            runner.set_state(
                name,
                [
                    mascot_tasks.relayout(state, before, side.precision.fp32)
                    for state in runner.state(name)
                ],
            )
            logger.info(
                "MascotMF after epoch %d: %s groups %s switch to FP32",
                epoch + 1, name, switched.tolist(),
            )  # fmt: skip
    return entry


def _describe_groups(sides, summary: TrainingSummary) -> None:
    for name in _SIDES:
        side = sides[name]
        low, high = side.group_counts
        precision = side.precision
        summary.details[f"{name}Groups"] = [
            {
                "group": g,
                "rows": int(side.group_rows[g]),
                "minRatings": int(low[g]),
                "maxRatings": int(high[g]),
                "fp32": bool(precision.fp32[g]),
                "switchedAfterEpoch": (
                    int(precision.switched_at[g]) + 1 if precision.switched_at[g] >= 0 else None
                ),
            }
            for g in range(precision.num_groups)
        ]
        summary.details[f"fp32{name.capitalize()}Groups"] = np.flatnonzero(precision.fp32).tolist()
        summary.details[f"{name}ErrorHistory"] = {
            int(epoch) + 1: [None if np.isnan(x) else float(x) for x in errors]
            for epoch, errors in precision.errors.items()
        }
        summary.details[f"{name}RoundingHistory"] = {
            int(epoch) + 1: [None if np.isnan(x) else float(x) for x in shares]
            for epoch, shares in precision.rounding.items()
        }


def fp32_line(iterations: list[dict]) -> str:
    """One line: the share of each side's updates that ran on FP32 rows, per epoch.

    Epochs with the same shares are merged: ``"updates on fp32 rows (user/item %) by epoch:
    1-17 0/0, 18-21 12/0, 22-50 40/3"``. A share is the training ratings of FP32 groups over all
    training ratings, with the precision in effect during the epoch.
    """
    runs: list[list] = []
    for entry in iterations:
        shares = (round(100 * entry["fp32UserShare"]), round(100 * entry["fp32ItemShare"]))
        if runs and runs[-1][2] == shares:
            runs[-1][1] = entry["iteration"]
        else:
            runs.append([entry["iteration"], entry["iteration"], shares])
    parts = [
        f"{first}{'' if first == last else f'-{last}'} {user}/{item}"
        for first, last, (user, item) in runs
    ]
    return "updates on fp32 rows (user/item %) by epoch: " + (", ".join(parts) or "none")
