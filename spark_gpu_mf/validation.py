"""Input checks with Spark ALS's exact messages, expressed as Spark SQL columns.

The id and rating checks are the same expressions Spark's ``ALS.fit`` and ``ALSModel.transform``
build (``checkIntegers``, ``checkNonNanValues``): they run inside the first job that reads the
data, so bad rows fail that job with Spark's ``[USER_RAISED_EXCEPTION]`` text, and nothing is
silently dropped or truncated.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from spark_gpu_mf.errors import illegal_argument

__all__ = [
    "require_column",
    "check_numeric_column",
    "checked_id",
    "checked_rating",
    "validated_ratings",
    "check_indexable",
    "non_null_id",
    "FLOAT32_MAX",
]

# Id types ``indexIds=True`` takes: the int types are used as they are, long and string indexed.
INDEXABLE_TYPES = (T.ByteType, T.ShortType, T.IntegerType, T.LongType, T.StringType)

FLOAT32_MAX = 3.4028234663852886e38


def require_column(schema: T.StructType, name: str) -> T.DataType:
    """The column's type, or Spark's ``FIELD_NOT_FOUND`` error when it is missing."""
    if name not in schema.names:
        fields = ", ".join(f"`{n}`" for n in schema.names)
        raise illegal_argument(
            f"[FIELD_NOT_FOUND] No such struct field `{name}` in {fields}. SQLSTATE: 42704"
        )
    return schema[name].dataType


def check_numeric_column(schema: T.StructType, name: str) -> None:
    """Spark's ``SchemaUtils.checkNumericType``: the column exists and is numeric."""
    dtype = require_column(schema, name)
    if not isinstance(dtype, T.NumericType):
        raise illegal_argument(
            f"requirement failed: Column {name} must be of type numeric but was actually of "
            f"type {dtype.simpleString()}."
        )


def checked_id(dataset: DataFrame, name: str) -> Column:
    """Spark's ``checkIntegers``: the id column cast to int, failing on null, fractional or
    out-of-range values instead of truncating them."""
    dtype = require_column(dataset.schema, name)
    column = dataset[name]
    if isinstance(dtype, T.IntegerType):
        return F.when(
            column.isNull(), F.raise_error(F.lit(f"{name} Ids MUST NOT be Null"))
        ).otherwise(column)
    if isinstance(dtype, T.NumericType):
        casted = column.cast(T.IntegerType())
        return F.when(
            column.isNull() | (column != casted),
            F.raise_error(
                F.concat(
                    F.lit(
                        "ALS only supports non-Null values in Integer range and without "
                        f"fractional part for column {name}, but got "
                    ),
                    column.cast(T.StringType()),
                )
            ),
        ).otherwise(casted)
    raise illegal_argument(
        f"ALS only supports values in Integer range for column {name}, but got type "
        f"{dtype.simpleString()}."
    )


def checked_rating(dataset: DataFrame, name: str) -> Column:
    """Spark's ``checkNonNanValues(ratingCol, "Ratings")`` cast to float.

    One check more than Spark: a finite double too large for float32 would become infinity in
    Spark's cast; it fails here with the same message instead.
    """
    casted = dataset[name].cast(T.DoubleType())
    infinite = F.concat(F.lit("Ratings MUST NOT be Infinity, but got "), casted.cast("string"))
    return (
        F.when(
            casted.isNull() | F.isnan(casted),
            F.raise_error(F.lit("Ratings MUST NOT be Null or NaN")),
        )
        .when(F.abs(casted) > F.lit(FLOAT32_MAX), F.raise_error(infinite))
        .otherwise(casted)
        .cast(T.FloatType())
    )


def validated_ratings(
    dataset: DataFrame, user_col: str, item_col: str, rating_col: str
) -> DataFrame:
    """``(user int, item int, rating float)`` with every row checked as Spark's ``ALS.fit`` does.

    Schema errors (missing or non-numeric columns) are raised here, before any job runs; value
    errors are raised by the first job that reads the result.
    """
    schema = dataset.schema
    for column in (user_col, item_col, rating_col):
        check_numeric_column(schema, column)
    return dataset.select(
        checked_id(dataset, user_col).alias("user"),
        checked_id(dataset, item_col).alias("item"),
        checked_rating(dataset, rating_col).alias("rating"),
    )


def check_indexable(schema: T.StructType, name: str) -> T.DataType:
    """The id column's type under ``indexIds=True``: integral or string, else a clear error."""
    dtype = require_column(schema, name)
    if not isinstance(dtype, INDEXABLE_TYPES):
        raise illegal_argument(
            f"With indexIds=True, column {name} must hold integral or string ids, but was of "
            f"type {dtype.simpleString()}."
        )
    return dtype


def non_null_id(dataset: DataFrame, name: str) -> Column:
    """An id column that ALS indexes (long or string), failing on a null with Spark's message."""
    column = dataset[name]
    return F.when(column.isNull(), F.raise_error(F.lit(f"{name} Ids MUST NOT be Null"))).otherwise(
        column
    )
