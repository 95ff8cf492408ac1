"""Saving and loading ``ALSModel`` (and params-only stages) in Spark's on-disk layout.

Layout (Spark's ``ALSModel.ALSModelWriter``)::

    <path>/metadata/part-00000...   one JSON line: class, timestamp, sparkVersion, uid, paramMap,
                                    defaultParamMap, rank, pythonClass, trainingParams
    <path>/userFactors/             Parquet (id int, features array<float>)
    <path>/itemFactors/             Parquet

The class recorded is Spark's (``org.apache.spark.ml.recommendation.ALSModel``), so
``pyspark.ml.recommendation.ALSModel.load`` and Spark's JVM loader read our models, and we read
Spark's. ``pythonClass`` and ``trainingParams`` are ours: Spark's loaders ignore keys they do not
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
from pyspark.sql import types as T

from spark_gpu_mf.errors import DamagedModelError
from spark_gpu_mf.spark import session

SPARK_ALS_MODEL_CLASS = "org.apache.spark.ml.recommendation.ALSModel"
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
) -> None:
    """Write a model in Spark's ALSModel layout; nothing that loads until it is complete."""

    def write_factors(root: str) -> None:
        user_factors.select("id", "features").write.parquet(f"{root}/userFactors")
        item_factors.select("id", "features").write.parquet(f"{root}/itemFactors")

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
        lambda: metadata_json(instance, spark, SPARK_ALS_MODEL_CLASS, extra),
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


def load_metadata(spark: SparkSession, path: str, expected_class: str) -> Dict[str, Any]:
    """The metadata JSON of a saved ML instance, checked like Spark's ``DefaultParamsReader``."""
    metadata_path = f"{path.rstrip('/')}/metadata"
    try:
        lines = spark.read.text(metadata_path).collect()
    except Exception:  # noqa: BLE001 - a missing path; asked only now (a round trip on Connect)
        if not path_exists(spark, path):
            raise DamagedModelError(
                f"No saved model at {path}: the path does not exist."
            ) from None
        if not path_exists(spark, metadata_path):
            raise DamagedModelError(
                f"Cannot load the model at {path}: {metadata_path} is missing."
            ) from None
        raise
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
    try:
        df = spark.read.parquet(factor_path)
        schema = df.schema  # Connect reads lazily: its errors come here
    except Exception as e:  # noqa: BLE001 - re-raised with the path and part named
        if not path_exists(spark, factor_path):
            raise DamagedModelError(
                f"Cannot load the model at {path}: {name}/ is missing."
            ) from None
        raise DamagedModelError(
            f"Cannot load the model at {path}: {name}/ is not readable Parquet ({e})."
        ) from None
    if not _has_factor_schema(schema):
        raise DamagedModelError(
            f"Cannot load the model at {path}: {name}/ must have columns id int and "
            f"features array<float>, found {schema.simpleString()}."
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
