"""Saving and loading ``ALSModel`` (and params-only stages) in Spark's on-disk layout.

Layout (Spark's ``ALSModel.ALSModelWriter``)::

    <path>/metadata/part-00000...   one JSON line: class, timestamp, sparkVersion, uid, paramMap,
                                    defaultParamMap, rank, pythonClass, trainingParams
    <path>/userFactors/             Parquet (id int, features array<float>)
    <path>/itemFactors/             Parquet

The class recorded is Spark's (``org.apache.spark.ml.recommendation.ALSModel``), so
``pyspark.ml.recommendation.ALSModel.load`` and Spark's JVM loader read our models, and we read
Spark's.

A model with long or string ids (``ALS(indexIds=True)``) extends the layout: its class is
``spark_gpu_mf.model.ALSModel``, which Spark's loaders refuse with their "Expected class name"
error (so they never misread its ids), and a side with such ids is written as
``(id <long or string>, features array<float>, index int)``, ``index`` being the int the
factors were trained under. A side with int ids keeps Spark's two columns.

``pythonClass`` and ``trainingParams`` are ours: Spark's loaders ignore keys they do not
know; ``spark_gpu_mf.model`` reads the first to give saved pipelines back our model class, the
second for fold-in (the fit's regParam, implicitPrefs, alpha, nonnegative, ratingCol, backend).

Every save writes the metadata last, and every load starts from it: a directory whose save was
interrupted has no metadata and does not load. On a classic session the save goes to a hidden
sibling directory that is renamed into place, so an overwrite keeps the old model until the new
one is complete. Spark Connect cannot rename: there an overwrite deletes the old directory first
and writes in place. Loading reads only JSON and Parquet (never pickle) and names what is wrong
with a damaged directory.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable, Dict, Optional, Tuple

from pyspark.ml.param import Params
from pyspark.ml.util import MLWritable, MLWriter
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from spark_gpu_mf.errors import DamagedModelError
from spark_gpu_mf.spark import session

SPARK_ALS_MODEL_CLASS = "org.apache.spark.ml.recommendation.ALSModel"
# The class a model with long or string ids (ALS(indexIds=True)) is saved under: Spark's
# loaders refuse it ("Expected class name ... but found class name ..."), so they never read
# its factors' ids as Spark's; pyspark's stage loader imports it for pipelines.
INDEXED_ALS_MODEL_CLASS = "spark_gpu_mf.model.ALSModel"
PYTHON_CLASS_KEY = "pythonClass"
# Ours too, ignored by Spark: the fit's regParam, implicitPrefs, alpha, nonnegative, ratingCol
# and backend, which fold-in reuses.
TRAINING_KEY = "trainingParams"


def path_exists(spark: SparkSession, path: str) -> bool:
    return session.path_exists(spark, path)


def already_exists(path: str) -> IOError:
    """Spark's ``FileSystemOverwrite`` error for saving over ``path`` without ``overwrite()``."""
    return IOError(
        f"Path {path} already exists. To overwrite it, please use write.overwrite().save(path) "
        "for Scala and use write().overwrite().save(path) for Java and Python."
    )


def metadata_json(
    instance: Params,
    spark: SparkSession,
    class_name: str,
    extra: Dict[str, Any],
    param_values: Optional[Dict[str, Any]] = None,
) -> str:
    """Spark's ``DefaultParamsWriter`` metadata line for ``instance`` under ``class_name``;
    ``param_values`` replace the values of some set params (see ``save_params``)."""
    param_map = {p.name: v for p, v in instance._paramMap.items()}
    param_map.update(param_values or {})
    metadata = {
        "class": class_name,
        "timestamp": int(round(time.time() * 1000)),
        "sparkVersion": spark.version,
        "uid": instance.uid,
        "paramMap": param_map,
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
    python_class: Optional[str] = None,
    training: Optional[Dict[str, Any]] = None,
    user_index: Optional[DataFrame] = None,
    item_index: Optional[DataFrame] = None,
) -> None:
    """Write a model in Spark's ALSModel layout; nothing that loads until it is complete.

    A side with an index (long or string ids) is written as ``(id <original type>, features,
    index int)`` and the model under ``INDEXED_ALS_MODEL_CLASS`` (see the module docstring).
    """

    def write_factors(root: str) -> None:
        _with_original_ids(user_factors, user_index).write.parquet(f"{root}/userFactors")
        _with_original_ids(item_factors, item_index).write.parquet(f"{root}/itemFactors")

    indexed = user_index is not None or item_index is not None
    class_name = INDEXED_ALS_MODEL_CLASS if indexed else SPARK_ALS_MODEL_CLASS
    extra: Dict[str, Any] = {"rank": rank}
    if python_class is not None:
        extra[PYTHON_CLASS_KEY] = python_class
    if training:
        extra[TRAINING_KEY] = training
    _save(
        spark,
        path,
        overwrite,
        write_factors,
        lambda: metadata_json(instance, spark, class_name, extra),
    )


def _with_original_ids(factors: DataFrame, index: Optional[DataFrame]) -> DataFrame:
    if index is None:
        return factors.select("id", "features")
    keys = index.select(F.col("index").alias("id"), F.col("key").alias("__original_id"))
    return factors.join(keys, "id").select(
        F.col("__original_id").alias("id"), "features", F.col("id").alias("index")
    )


def save_params(spark: SparkSession, instance: Params, path: str, overwrite: bool) -> None:
    """``DefaultParamsWriter``'s layout (metadata only, the Python class recorded), with Spark's
    overwrite check, on classic and Connect sessions alike.

    A param whose value is a saveable ML object (``ALS.initialModel`` set to a model) cannot
    be JSON: the object is saved under ``<path>/<param name>/`` and the metadata records that
    path, so the loaded instance reads it from there.
    """
    class_name = f"{type(instance).__module__}.{type(instance).__name__}"
    nested = {p.name: v for p, v in instance._paramMap.items() if isinstance(v, MLWritable)}

    def write_nested(root: str) -> None:
        for name, value in nested.items():
            value.write().save(f"{root}/{name}")

    saved_at = {name: f"{path.rstrip('/')}/{name}" for name in nested}
    _save(
        spark,
        path,
        overwrite,
        write_nested,
        lambda: metadata_json(instance, spark, class_name, {}, saved_at),
    )


class ParamsWriter(MLWriter):
    """``DefaultParamsWriter`` for estimators, with Spark's overwrite check and no py4j, so
    ``save`` and ``write().overwrite().save`` work on Spark Connect too."""

    def __init__(self, instance: Params):
        super().__init__()
        self.instance = instance

    def save(self, path: str) -> None:
        """Save the params to ``path``; overwriting needs ``.overwrite()``, as in Spark."""
        save_params(self.sparkSession, self.instance, path, self.shouldOverwrite)


def _save(
    spark: SparkSession,
    path: str,
    overwrite: bool,
    write_data: Callable[[str], None],
    metadata_line: Callable[[], str],
) -> None:
    if not isinstance(path, str):
        raise TypeError("path should be a string, got type %s" % type(path))
    exists = path_exists(spark, path)
    if exists and not overwrite:
        raise already_exists(path)
    if session.can_rename(spark):
        _save_then_rename(spark, path, write_data, metadata_line)
    else:
        _save_in_place(spark, path, exists, write_data, metadata_line)


def _write(spark: SparkSession, root: str, write_data, metadata_line) -> None:
    write_data(root)
    # Last: a directory without metadata is not a model to any loader.
    spark.createDataFrame([(metadata_line(),)], schema="value string").coalesce(1).write.text(
        f"{root}/metadata"
    )


def _save_then_rename(spark: SparkSession, path: str, write_data, metadata_line) -> None:
    staging = f"{path.rstrip('/')}.saving-{uuid.uuid4().hex}"
    try:
        _write(spark, staging, write_data, metadata_line)
        session.delete_path(spark, path)
        if not session.rename_path(spark, staging, path):
            raise IOError(f"could not move the saved model from {staging} to {path}")
    except BaseException:
        session.delete_path(spark, staging)
        raise


def _save_in_place(spark: SparkSession, path: str, exists: bool, write_data, metadata_line) -> None:
    """Spark Connect: no rename, so the old directory goes first and the metadata comes last."""
    if exists:
        session.delete_path(spark, path)
    try:
        _write(spark, path, write_data, metadata_line)
    except BaseException:
        try:
            session.delete_path(spark, path)
        except Exception:  # noqa: BLE001 - the original error matters; no metadata, no model
            pass
        raise


def load_metadata(
    spark: SparkSession, path: str, expected_class: str, also_accepted: Tuple[str, ...] = ()
) -> Dict[str, Any]:
    """The metadata JSON of a saved ML instance, checked like Spark's ``DefaultParamsReader``
    (``also_accepted``: other classes this loader reads)."""
    metadata_path = f"{path.rstrip('/')}/metadata"
    line = session.first_line(spark, metadata_path)
    if line is None:
        line = _first_line_by_job(spark, path, metadata_path)
    try:
        metadata = json.loads(line)
    except ValueError as e:
        raise DamagedModelError(
            f"Cannot load the model at {path}: {metadata_path} is not valid JSON ({e})."
        ) from None
    missing = [k for k in ("class", "uid", "paramMap") if k not in metadata]
    if missing:
        raise DamagedModelError(
            f"Cannot load the model at {path}: metadata lacks {', '.join(missing)}."
        )
    if metadata["class"] != expected_class and metadata["class"] not in also_accepted:
        raise DamagedModelError(
            f"Error loading metadata: Expected class name {expected_class} but found class name "
            f"{metadata['class']}"
        )
    return metadata


def _first_line_by_job(spark: SparkSession, path: str, metadata_path: str) -> str:
    """The metadata's first line through a job (Spark Connect, or no line found on the
    driver), with a clear error for a missing or empty metadata directory."""
    try:
        lines = spark.read.text(metadata_path).limit(1).collect()
    except Exception:  # noqa: BLE001 - a missing path; asked only now (a round trip on Connect)
        if not path_exists(spark, path):
            raise DamagedModelError(f"No saved model at {path}: the path does not exist.") from None
        if not path_exists(spark, metadata_path):
            raise DamagedModelError(
                f"Cannot load the model at {path}: {metadata_path} is missing."
            ) from None
        raise
    if not lines:
        raise DamagedModelError(f"Cannot load the model at {path}: {metadata_path} is empty.")
    return lines[0].value


_INDEXED_ID_TYPES = (T.ByteType, T.ShortType, T.IntegerType, T.LongType, T.StringType)


def _has_factor_schema(schema: T.StructType, indexed: bool) -> bool:
    if "id" not in schema.names or "features" not in schema.names:
        return False
    features = schema["features"].dataType
    if not (isinstance(features, T.ArrayType) and isinstance(features.elementType, T.FloatType)):
        return False
    if "index" in schema.names:
        return (
            indexed
            and isinstance(schema["index"].dataType, T.IntegerType)
            and isinstance(schema["id"].dataType, _INDEXED_ID_TYPES)
        )
    return isinstance(schema["id"].dataType, T.IntegerType)


def _read_factors(spark: SparkSession, path: str, name: str, indexed: bool = False):
    factor_path = f"{path.rstrip('/')}/{name}"
    try:
        # The schema the writer stored, when the driver can read it: no inference job.
        stored = session.stored_parquet_schema(spark, factor_path)
        df = (spark.read if stored is None else spark.read.schema(stored)).parquet(factor_path)
        schema = df.schema  # Connect reads lazily: its errors come here
    except Exception as e:  # noqa: BLE001 - re-raised with the path and part named
        if not path_exists(spark, factor_path):
            raise DamagedModelError(
                f"Cannot load the model at {path}: {name}/ is missing."
            ) from None
        raise DamagedModelError(
            f"Cannot load the model at {path}: {name}/ is not readable Parquet ({e})."
        ) from None
    if not _has_factor_schema(schema, indexed):
        wanted = "id (int, or long/string with index int)" if indexed else "id int"
        raise DamagedModelError(
            f"Cannot load the model at {path}: {name}/ must have columns {wanted} and "
            f"features array<float>, found {schema.simpleString()}."
        )
    if "index" not in schema.names:
        return df, None
    factors = df.select(F.col("index").alias("id"), "features")
    return factors, df.select(F.col("id").alias("key"), "index")


def load_model_parts(spark: SparkSession, path: str):
    """Metadata, rank, factor DataFrames ``(id int, features)`` and indexes ``(key, index)``
    (None for a side with int ids) of a saved ALSModel (ours or Spark's)."""
    metadata = load_metadata(
        spark, path, SPARK_ALS_MODEL_CLASS, also_accepted=(INDEXED_ALS_MODEL_CLASS,)
    )
    rank = metadata.get("rank")
    if not isinstance(rank, int) or rank < 1:
        raise DamagedModelError(f"Cannot load the model at {path}: metadata has no valid rank.")
    indexed = metadata["class"] == INDEXED_ALS_MODEL_CLASS
    user_factors, user_index = _read_factors(spark, path, "userFactors", indexed)
    item_factors, item_index = _read_factors(spark, path, "itemFactors", indexed)
    return metadata, rank, user_factors, item_factors, user_index, item_index
