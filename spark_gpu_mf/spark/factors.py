"""Factor DataFrames ``(id int, features array<float>)``: the model's storage, as in Spark.

Conversions go through Arrow with one flat float32 buffer, never a Python object per row.
"""

from __future__ import annotations

import functools
from typing import Dict, Tuple

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from spark_gpu_mf.executor.blocks import factor_table

FACTORS_SCHEMA = T.StructType(
    [
        T.StructField("id", T.IntegerType(), False),
        T.StructField("features", T.ArrayType(T.FloatType(), False), True),
    ]
)


def factors_dataframe(spark: SparkSession, ids: np.ndarray, factors: np.ndarray) -> DataFrame:
    """A Spark factor DataFrame holding ``factors`` for ``ids``, with Spark ALS's schema."""
    return spark.createDataFrame(factor_table(ids, factors), schema=FACTORS_SCHEMA)


def collect_factors(df: DataFrame) -> Tuple[np.ndarray, np.ndarray]:
    """``(ids int32 (n,), factors float32 (n, rank))`` of a factor DataFrame, sorted by id."""
    return factors_from_table(df.select("id", "features").toArrow())


def collect_factors_of_sides(
    frames: Dict[str, DataFrame],
) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """:func:`collect_factors` of several factor DataFrames in one Spark job (a union tagged
    by name): one query instead of one per side, which is most of what a small warm start
    costs."""
    names = sorted(frames)
    tagged = [
        frames[name].select(F.lit(i).alias("side"), "id", "features")
        for i, name in enumerate(names)
    ]
    table = functools.reduce(DataFrame.unionByName, tagged).toArrow()
    sides = table.column("side").to_numpy()
    return {
        name: factors_from_table(table.filter(pa.array(sides == i)).select(["id", "features"]))
        for i, name in enumerate(names)
    }


def factors_from_table(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32 (n,), factors float32 (n, rank))`` of an Arrow factor table, sorted by id."""
    ids = table.column("id").to_numpy().astype(np.int32)
    features = table.column("features").combine_chunks()
    if len(ids) == 0:
        return ids, np.zeros((0, 0), np.float32)
    flat = features.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    factors = flat.reshape(len(ids), -1)
    order = np.argsort(ids, kind="stable")
    return ids[order], factors[order]
