"""Ids of any integral or string type (``ALS(indexIds=True)``): a dense int index, distributed.

Training runs on int32 ids. A side whose ids are long or string is indexed first: its distinct
ids, sorted, get ``0, 1, ...`` in their order, so the index is the same whatever the partitioning
and a user can reproduce it by hand (sort the distinct ids, number them). The work is Spark's:
``distinct`` and a range-partitioned sort, then each row's index is its partition's offset plus its
position there (``monotonically_increasing_id`` holds both); only one count per partition comes
to the driver. The index DataFrame ``(key <id type>, index int)`` is cached: the model joins
through it to speak the original ids.
"""

from __future__ import annotations

from typing import Optional

from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from spark_gpu_mf.errors import illegal_argument

_INT_MAX = (1 << 31) - 1
_POSITION_BITS = 33  # monotonically_increasing_id: partition id << 33 | position in partition


def needs_index(dtype: T.DataType) -> bool:
    """Whether ids of ``dtype`` are indexed (long, string) or used as they are (int types)."""
    return isinstance(dtype, (T.LongType, T.StringType))


def build_index(
    ids: DataFrame,
    level: StorageLevel = StorageLevel.MEMORY_AND_DISK,
    offset: int = 0,
    what: str = "ids",
) -> DataFrame:
    """``(key, index int)`` for the distinct values of the one-column DataFrame ``ids``.

    Sorted keys get ``offset, offset + 1, ...``. The result is cached at ``level`` and
    materialized (two small jobs and the sort's sampling job).
    """
    spark = ids.sparkSession
    tagged = (
        ids.select(F.col(ids.columns[0]).alias("key"))
        .distinct()
        .orderBy("key")
        .select("key", F.monotonically_increasing_id().alias("mid"))
        .persist(level)
    )
    partition = F.shiftright(F.col("mid"), _POSITION_BITS)
    counts = sorted(
        (int(r.pid), int(r.n))
        for r in tagged.groupBy(partition.alias("pid")).agg(F.count("*").alias("n")).collect()
    )
    total = sum(n for _, n in counts)
    if offset + total > _INT_MAX + 1:
        tagged.unpersist()
        raise illegal_argument(
            f"ALS can index at most {_INT_MAX + 1} distinct {what}, but there are "
            f"{offset + total}."
        )
    starts, running = [], offset
    for pid, n in counts:
        starts.append((pid, running))
        running += n
    if not starts:
        starts = [(0, offset)]
    offsets = spark.createDataFrame(starts, "pid long, start long")
    position = F.col("mid") - F.shiftleft(partition, _POSITION_BITS)
    index = (
        tagged.join(F.broadcast(offsets), partition == F.col("pid"))
        .select("key", (F.col("start") + position).cast(T.IntegerType()).alias("index"))
        .persist(level)
    )
    index.count()
    tagged.unpersist()
    return index


def to_original(factors: DataFrame, index: Optional[DataFrame]) -> DataFrame:
    """Factor rows ``(id int, features)`` with the original ids back: ``(id <key type>,
    features)``; unchanged for a side that is not indexed."""
    if index is None:
        return factors
    keys = index.select(F.col("index").alias("id"), F.col("key").alias("__original_id"))
    return factors.join(keys, "id").select(F.col("__original_id").alias("id"), "features")


def to_internal(df: DataFrame, column: str, index: Optional[DataFrame]) -> DataFrame:
    """``df`` with ``column``'s original ids replaced by their int index (rows whose id the index
    lacks are left out: the caller says what that means); unchanged when not indexed."""
    if index is None:
        return df
    keys = index.select(F.col("key").alias(column), F.col("index").alias("__internal_id"))
    others = [c for c in df.columns if c != column]
    return df.join(keys, column).select(F.col("__internal_id").alias(column), *others)


def to_original_recommendations(
    recommendations: DataFrame,
    src_col: str,
    dst_col: str,
    src_index: Optional[DataFrame],
    dst_index: Optional[DataFrame],
) -> DataFrame:
    """``recommendFor*`` rows computed on the int index, with the original ids back.

    The destination ids inside each list are mapped by exploding the lists with their
    positions, joining the index and collecting each list again in its order (the ranking is
    the one computed on the ints, Spark's: rating descending, then larger index first).
    """
    if dst_index is not None:
        keys = dst_index.select(F.col("index").alias("__dst"), F.col("key").alias("__dst_key"))
        entries = recommendations.select(
            src_col, F.posexplode("recommendations").alias("__pos", "__entry")
        ).select(
            src_col,
            "__pos",
            F.col("__entry")[dst_col].alias("__dst"),
            F.col("__entry")["rating"].alias("rating"),
        )
        ordered = F.array_sort(
            F.collect_list(F.struct("__pos", F.col("__dst_key").alias(dst_col), "rating"))
        )
        recommendations = (
            entries.join(keys, "__dst")
            .groupBy(src_col)
            .agg(ordered.alias("__list"))
            .select(
                src_col,
                F.transform(
                    "__list",
                    lambda e: F.struct(e[dst_col].alias(dst_col), e["rating"].alias("rating")),
                ).alias("recommendations"),
            )
        )
    if src_index is not None:
        keys = src_index.select(F.col("index").alias(src_col), F.col("key").alias("__src_key"))
        recommendations = recommendations.join(keys, src_col).select(
            F.col("__src_key").alias(src_col), "recommendations"
        )
    return recommendations
