"""Top-k recommendation for every row of one factor DataFrame against another (``recommendFor*``).

Spark's ALSModel blockifies both sides, cross-joins the blocks and runs a GEMV per source row. Here
each executor scores a whole block of ``blockSize`` source rows with one GEMM and keeps the top
``k`` by partial selection. When the destination factors fit under
``spark.gpumf.broadcastThreshold`` they are broadcast and each source partition is done in one
pass with no shuffle; otherwise destination blocks are cross-joined and the per-block top-k lists
are merged.

Results follow Spark's order: rating descending, equal ratings by larger id first.

Spark Connect has no broadcast variables: there the cross-join road is taken whatever the size,
with the same results (Spark itself may still broadcast the small side of the join).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from spark_gpu_mf.executor.binding import bind
from spark_gpu_mf.executor.runtime import BackendChoice, executor_backend
from spark_gpu_mf.spark import session
from spark_gpu_mf.spark.factors import factors_from_table


def recommendation_schema(src_col: str, dst_col: str) -> T.StructType:
    """Spark's output schema.

    ``(src int, recommendations array<struct<dst int, rating float>>)``.
    """
    entry = T.StructType(
        [
            T.StructField(dst_col, T.IntegerType(), True),
            T.StructField("rating", T.FloatType(), True),
        ]
    )
    return T.StructType(
        [
            T.StructField(src_col, T.IntegerType(), False),
            T.StructField("recommendations", T.ArrayType(entry, True), True),
        ]
    )


def _recommendation_batch(
    src_ids: np.ndarray, top_ids: np.ndarray, top_scores: np.ndarray, src_col: str, dst_col: str
) -> pa.RecordBatch:
    n, k = top_ids.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    entries = pa.StructArray.from_arrays(
        [pa.array(top_ids.reshape(-1).astype(np.int32)), pa.array(top_scores.reshape(-1))],
        names=[dst_col, "rating"],
    )
    return pa.RecordBatch.from_arrays(
        [pa.array(src_ids.astype(np.int32)), pa.ListArray.from_arrays(offsets, entries)],
        names=[src_col, "recommendations"],
    )


def _factor_batch(batch: pa.RecordBatch):
    ids = batch.column("id").to_numpy().astype(np.int32)
    flat = batch.column("features").flatten().to_numpy(zero_copy_only=False)
    rank = len(flat) // max(1, len(ids))
    return ids, np.asarray(flat, np.float32).reshape(len(ids), rank)


def top_k_against_broadcast(
    batches: Iterator[pa.RecordBatch],
    candidates,
    num: int,
    block_size: int,
    src_col: str,
    dst_col: str,
    backend: BackendChoice,
) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: top ``num`` broadcast candidates for each source row, ``block_size`` at
    a time."""
    dst_ids, dst_factors = candidates.value
    compute = executor_backend(backend)
    for batch in batches:
        ids, factors = _factor_batch(batch)
        for start in range(0, len(ids), block_size):
            stop = start + block_size
            top_ids, top_scores = compute.top_k(factors[start:stop], dst_factors, dst_ids, num)
            yield _recommendation_batch(ids[start:stop], top_ids, top_scores, src_col, dst_col)


def _blockify(batches: Iterator[pa.RecordBatch], block_size: int) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: factor rows to ``(ids binary, factors binary, rank)`` blocks."""
    for batch in batches:
        ids, factors = _factor_batch(batch)
        for start in range(0, len(ids), block_size):
            part = np.ascontiguousarray(factors[start : start + block_size])
            yield pa.RecordBatch.from_arrays(
                [
                    pa.array([ids[start : start + block_size].tobytes()], pa.binary()),
                    pa.array([part.tobytes()], pa.binary()),
                    pa.array([factors.shape[1]], pa.int32()),
                ],
                names=["ids", "factors", "rank"],
            )


def _block_top_k(batches, num: int, backend: BackendChoice) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: top ``num`` of one destination block for each row of a source block."""
    compute = executor_backend(backend)
    for batch in batches:
        for row in batch.to_pylist():
            src_ids = np.frombuffer(row["src_ids"], np.int32)
            rank = row["rank"]
            src = np.frombuffer(row["src_factors"], np.float32).reshape(len(src_ids), rank)
            dst_ids = np.frombuffer(row["dst_ids"], np.int32)
            dst = np.frombuffer(row["dst_factors"], np.float32).reshape(len(dst_ids), rank)
            top_ids, top_scores = compute.top_k(src, dst, dst_ids, num)
            yield pa.RecordBatch.from_arrays(
                [
                    pa.array([row["src_block"]], pa.int64()),
                    pa.array([row["src_ids"]], pa.binary()),
                    pa.array([top_ids.astype(np.int32).tobytes()], pa.binary()),
                    pa.array([top_scores.astype(np.float32).tobytes()], pa.binary()),
                ],
                names=["src_block", "src_ids", "top_ids", "top_scores"],
            )


def _merge_top_k(table: pa.Table, num: int, src_col: str, dst_col: str) -> pa.Table:
    """applyInArrow body: one source block's per-destination-block top lists, merged."""
    src_ids = np.frombuffer(table.column("src_ids")[0].as_py(), np.int32)
    n = len(src_ids)
    ids = np.hstack(
        [np.frombuffer(v.as_py(), np.int32).reshape(n, -1) for v in table.column("top_ids")]
    )
    scores = np.hstack(
        [np.frombuffer(v.as_py(), np.float32).reshape(n, -1) for v in table.column("top_scores")]
    )
    order = np.lexsort((-ids.astype(np.int64), -scores), axis=1)[:, :num]
    top_ids = np.take_along_axis(ids, order, axis=1)
    top_scores = np.take_along_axis(scores, order, axis=1)
    return pa.Table.from_batches(
        [_recommendation_batch(src_ids, top_ids, top_scores, src_col, dst_col)]
    )


def recommend_for_all(
    spark: SparkSession,
    src: DataFrame,
    dst: DataFrame,
    src_col: str,
    dst_col: str,
    num: int,
    block_size: int,
    broadcast_threshold: int,
    rank: int,
    backend: str = "auto",
    candidates_cache: Optional[dict] = None,
) -> DataFrame:
    """Top ``num`` destination ids for every source id, as Spark's ``ALSModel.recommendForAll``.

    ``rank`` is the model's: knowing it, one job decides and collects the candidates.
    ``candidates_cache`` (the model's) keeps the broadcast candidates for its later calls.
    """
    choice = BackendChoice.for_session(spark, backend)
    schema = recommendation_schema(src_col, dst_col)
    candidates = None
    if not session.is_connect(spark):
        limit = broadcast_threshold // (max(rank, 1) * 4)
        candidates = _broadcast_candidates(spark, dst, limit, candidates_cache)
    src, dst = _factor_columns(src), _factor_columns(dst)
    if candidates is not None:
        body = bind(
            top_k_against_broadcast,
            candidates=candidates,
            num=num,
            block_size=block_size,
            src_col=src_col,
            dst_col=dst_col,
            backend=choice,
        )
        # One task per core: each task costs tens of milliseconds of Spark and Python overhead,
        # more than its GEMM for model-sized inputs. coalesce never adds partitions.
        return src.coalesce(session.default_parallelism(spark)).mapInArrow(body, schema)
    return _recommend_cross_join(src, dst, src_col, dst_col, num, block_size, choice, schema)


def _broadcast_candidates(spark: SparkSession, dst: DataFrame, limit: int, cache: Optional[dict]):
    """``dst``'s factors broadcast to the executors, or ``None`` when it has more than ``limit``.

    A model's factor DataFrames never change, so its calls share one broadcast per side (and
    session and limit) through ``cache``: later calls skip the collecting job, and no broadcast
    is left behind per call.
    """
    key = (id(dst), limit, session.application_id(spark))
    if cache is not None and key in cache:
        return cache[key]
    # At most limit + 1 rows come back, and fewer than that means they are all of them (a
    # count and a collect would cost two jobs).
    ids, factors = _collect_candidates(_factor_columns(dst), limit)
    candidates = session.broadcast(spark, (ids, factors)) if len(ids) <= limit else None
    if cache is not None:
        cache[key] = candidates
    return candidates


def _factor_columns(df: DataFrame) -> DataFrame:
    """``df`` as ``(id, features)``; a model's factor DataFrames already are (``columns`` is
    cached on the DataFrame, a ``select`` costs a round trip to the JVM)."""
    return df if df.columns == ["id", "features"] else df.select("id", "features")


def _collect_candidates(dst: DataFrame, limit: int):
    """At most ``limit + 1`` destination factors on the driver, sorted by id, in one task.

    A limit over many partitions adds a shuffle stage (every partition's first ``limit + 1``
    rows to one task); over one partition the task reads partitions in turn and stops there.
    """
    return factors_from_table(dst.coalesce(1).limit(limit + 1).toArrow())


def _recommend_cross_join(src, dst, src_col, dst_col, num, block_size, backend, schema):
    """Large destination sides: top lists per (source block, destination block), merged per
    source block, so each destination factor is read once per source block."""
    block_schema = "ids binary, factors binary, rank int"
    src_blocks = src.mapInArrow(bind(_blockify, block_size=block_size), block_schema).select(
        F.monotonically_increasing_id().alias("src_block"),
        F.col("ids").alias("src_ids"),
        F.col("factors").alias("src_factors"),
        "rank",
    )
    dst_blocks = dst.mapInArrow(bind(_blockify, block_size=block_size), block_schema).select(
        F.col("ids").alias("dst_ids"), F.col("factors").alias("dst_factors")
    )
    partial_top = src_blocks.crossJoin(dst_blocks).mapInArrow(
        bind(_block_top_k, num=num, backend=backend),
        "src_block long, src_ids binary, top_ids binary, top_scores binary",
    )
    return partial_top.groupBy("src_block").applyInArrow(
        bind(_merge_top_k, num=num, src_col=src_col, dst_col=dst_col), schema
    )
