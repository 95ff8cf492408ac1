"""Saving and loading ``ALSModel`` in Spark's on-disk layout, atomically.

Layout (Spark's ``ALSModel.ALSModelWriter``)::

    <path>/metadata/part-00000...   one JSON line: class, timestamp, sparkVersion, uid, paramMap,
                                    defaultParamMap, rank
    <path>/userFactors/             Parquet (id int, features array<float>)
    <path>/itemFactors/             Parquet

The class recorded is Spark's (``org.apache.spark.ml.recommendation.ALSModel``), so
``pyspark.ml.recommendation.ALSModel.load`` reads our models, and we read Spark's.

A save writes everything into a hidden sibling directory, metadata last, and renames it into place:
an interrupted save never leaves a directory at ``path`` that loads. Loading reads only JSON and
Parquet (never pickle) and names what is wrong with a damaged directory.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Dict, Tuple

from pyspark.ml.param import Params
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from spark_gpu_mf.errors import DamagedModelError

SPARK_ALS_MODEL_CLASS = "org.apache.spark.ml.recommendation.ALSModel"


def _filesystem(spark: SparkSession, path: str):
    jvm = spark.sparkContext._jvm
    hpath = jvm.org.apache.hadoop.fs.Path(path)
    return hpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()), hpath


def path_exists(spark: SparkSession, path: str) -> bool:
    fs, hpath = _filesystem(spark, path)
    return bool(fs.exists(hpath))


def metadata_json(
    instance: Params, spark: SparkSession, class_name: str, extra: Dict[str, Any]
) -> str:
    """Spark's ``DefaultParamsWriter`` metadata line for ``instance`` under ``class_name``."""
    metadata = {
        "class": class_name,
        "timestamp": int(round(time.time() * 1000)),
        "sparkVersion": spark.version,
        "uid": instance.uid,
        "paramMap": {p.name: v for p, v in instance._paramMap.items()},
        "defaultParamMap": {p.name: v for p, v in instance._defaultParamMap.items()},
    }
    metadata.update(extra)
    return json.dumps(metadata, separators=(",", ":"))


def save_model(
    spark: SparkSession,
    instance: Params,
    rank: int,
    user_factors: DataFrame,
    item_factors: DataFrame,
    path: str,
    overwrite: bool,
) -> None:
    """Write a model in Spark's ALSModel layout; all or nothing at ``path``."""
    if path_exists(spark, path) and not overwrite:
        raise IOError(
            f"Path {path} already exists. To overwrite it, please use write.overwrite().save(path) "
            "for Scala and use write().overwrite().save(path) for Java and Python."
        )
    staging = f"{path.rstrip('/')}.saving-{uuid.uuid4().hex}"
    try:
        user_factors.select("id", "features").write.parquet(f"{staging}/userFactors")
        item_factors.select("id", "features").write.parquet(f"{staging}/itemFactors")
        line = metadata_json(instance, spark, SPARK_ALS_MODEL_CLASS, {"rank": rank})
        spark.createDataFrame([(line,)], schema="value string").coalesce(1).write.text(
            f"{staging}/metadata"
        )
        fs, target = _filesystem(spark, path)
        if overwrite and fs.exists(target):
            fs.delete(target, True)
        _, staged = _filesystem(spark, staging)
        if not fs.rename(staged, target):
            raise IOError(f"could not move the saved model from {staging} to {path}")
    except BaseException:
        fs, staged = _filesystem(spark, staging)
        if fs.exists(staged):
            fs.delete(staged, True)
        raise


def load_metadata(spark: SparkSession, path: str, expected_class: str) -> Dict[str, Any]:
    """The metadata JSON of a saved ML instance, checked like Spark's ``DefaultParamsReader``."""
    metadata_path = f"{path.rstrip('/')}/metadata"
    if not path_exists(spark, path):
        raise DamagedModelError(f"No saved model at {path}: the path does not exist.")
    if not path_exists(spark, metadata_path):
        raise DamagedModelError(f"Cannot load the model at {path}: {metadata_path} is missing.")
    lines = spark.read.text(metadata_path).collect()
    if not lines:
        raise DamagedModelError(f"Cannot load the model at {path}: {metadata_path} is empty.")
    try:
        metadata = json.loads(lines[0].value)
    except ValueError as e:
        raise DamagedModelError(
            f"Cannot load the model at {path}: {metadata_path} is not valid JSON ({e})."
        ) from None
    missing = [k for k in ("class", "uid", "paramMap") if k not in metadata]
    if missing:
        raise DamagedModelError(
            f"Cannot load the model at {path}: metadata lacks {', '.join(missing)}."
        )
    if metadata["class"] != expected_class:
        raise DamagedModelError(
            f"Error loading metadata: Expected class name {expected_class} but found class name "
            f"{metadata['class']}"
        )
    return metadata


def _has_factor_schema(schema: T.StructType) -> bool:
    if "id" not in schema.names or "features" not in schema.names:
        return False
    features = schema["features"].dataType
    return (
        isinstance(schema["id"].dataType, T.IntegerType)
        and isinstance(features, T.ArrayType)
        and isinstance(features.elementType, T.FloatType)
    )


def _read_factors(spark: SparkSession, path: str, name: str) -> DataFrame:
    factor_path = f"{path.rstrip('/')}/{name}"
    if not path_exists(spark, factor_path):
        raise DamagedModelError(f"Cannot load the model at {path}: {name}/ is missing.")
    try:
        df = spark.read.parquet(factor_path)
    except Exception as e:  # noqa: BLE001 - re-raised with the path and part named
        raise DamagedModelError(
            f"Cannot load the model at {path}: {name}/ is not readable Parquet ({e})."
        ) from None
    if not _has_factor_schema(df.schema):
        raise DamagedModelError(
            f"Cannot load the model at {path}: {name}/ must have columns id int and "
            f"features array<float>, found {df.schema.simpleString()}."
        )
    return df


def load_model_parts(
    spark: SparkSession, path: str
) -> Tuple[Dict[str, Any], int, DataFrame, DataFrame]:
    """Metadata, rank and factor DataFrames of a saved ALSModel (ours or Spark's)."""
    metadata = load_metadata(spark, path, SPARK_ALS_MODEL_CLASS)
    rank = metadata.get("rank")
    if not isinstance(rank, int) or rank < 1:
        raise DamagedModelError(f"Cannot load the model at {path}: metadata has no valid rank.")
    user_factors = _read_factors(spark, path, "userFactors")
    item_factors = _read_factors(spark, path, "itemFactors")
    return metadata, rank, user_factors, item_factors
