"""Driver side of fold-in (``ALSModel.foldInUsers`` / ``foldInItems``): one exact solve per row.

The rows to fold in are split into parts by ``id mod parts`` (as training splits blocks); each
part's ratings are cogrouped with the fixed factors they reference, each of those once per part,
and solved by ``executor.fold_in.fold_in_part``. Implicit feedback adds ``Y^T Y`` of the whole
fixed side, summed from per-partition Gram matrices (one small collect). Everything goes through
the DataFrame API, so fold-in runs on classic and Spark Connect sessions alike.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from spark_gpu_mf.backends.solve_config import SolveConfig
from spark_gpu_mf.executor.als_tasks import TaskSettings
from spark_gpu_mf.executor.binding import bind, bind_pair
from spark_gpu_mf.executor.fold_in import exact, fold_in_part, partial_gram
from spark_gpu_mf.executor.runtime import BackendChoice
from spark_gpu_mf.spark import session
from spark_gpu_mf.spark.factors import FACTORS_SCHEMA


def gram(fixed: DataFrame, rank: int) -> np.ndarray:
    """``Y^T Y`` in float64 of a factor DataFrame ``(id, features)``."""
    rows = fixed.select("features").mapInArrow(bind(partial_gram, rank=rank), "gram binary")
    total = np.zeros((rank, rank))
    for row in rows.collect():
        total += np.frombuffer(row.gram, np.float64).reshape(rank, rank)
    return total


def fold_in(
    spark: SparkSession,
    ratings: DataFrame,
    fixed: DataFrame,
    config: SolveConfig,
    backend: str,
    num_parts: Optional[int] = None,
) -> DataFrame:
    """New ``(id int, features array<float>)`` rows for the keys of ``ratings``.

    Parameters
    ----------
    ratings : DataFrame
        Validated ``(key int, other int, rating float)``: the rows to solve and their ratings.
    fixed : DataFrame
        The other side's ``(id int, features)`` factors, held fixed.
    config : SolveConfig
        The model's regularization, implicit confidences and nonnegativity; solved exactly.
    num_parts : int, optional
        How many groups the rows are solved in; default: the application's task slots.
    """
    parts = num_parts or session.default_parallelism(spark)
    fixed = fixed.select("id", "features")
    yty = gram(fixed, config.rank) if config.implicit else None
    # Both sides of the cogroup are placed by ``part`` on ``parts`` partitions, so the cogroup
    # itself shuffles nothing (and no stage runs spark.sql.shuffle.partitions mostly empty
    # tasks for a few parts).
    keyed = ratings.select(
        F.pmod(F.col("key"), F.lit(parts)).cast("int").alias("part"), "key", "other", "rating"
    ).repartition(parts, "part")
    # Aliased: both sides of the cogroup come from ``keyed``, and Spark refuses a grouping
    # column it cannot tell apart.
    needed = (
        keyed.select(F.col("part").alias("fixed_part"), F.col("other").alias("id"))
        .distinct()
        .join(fixed, "id")
        .select("fixed_part", "id", "features")
        .repartition(parts, "fixed_part")
    )
    settings = TaskSettings(
        config=exact(config),
        backend=BackendChoice.for_session(spark, backend),
        blas_threads=1,
    )
    return (
        keyed.groupBy("part")
        .cogroup(needed.groupBy("fixed_part"))
        .applyInArrow(bind_pair(fold_in_part, settings=settings, yty=yty), FACTORS_SCHEMA)
    )
