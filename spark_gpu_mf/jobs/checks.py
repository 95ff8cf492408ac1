"""The jobs' check of the ratings' values before any fit: each kind of bad value, one line.

ALS checks every rating itself (``spark_gpu_mf.validation``, Spark's messages), but inside the
fit's first Spark job: a bad value fails a task, Spark logs the failure (eight WARN/ERROR lines
for a string id) and the message names neither the row nor what to do. The jobs count each
kind of bad value first, in one aggregation that cannot fail (``try_cast``, no
``raise_error``), and stop with one line: the column and what it holds, how many rows, one
example row (a second, short query, only then) and a hint. A file's columns are checked as
read (CSV: strings), so that the casts the jobs apply afterwards cannot fail either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from spark_gpu_mf.jobs.common import JobError, format_count

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

#: What to do about ids ALS cannot take. The one place to change when the jobs or ALS learn
#: to index ids themselves.
ID_HINT = (
    "ALS needs integer ids in the int range: map other ids to integers first, e.g. with "
    "pyspark.ml.feature.StringIndexer"
)
RATING_HINT = "ALS needs a number for every rating"
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1


@dataclass(frozen=True)
class _Check:
    """One kind of bad value: ``condition`` marks its rows."""

    role: str
    condition: Column
    problem: str  # "are not integers", ...
    hint: str


def check_ratings(df: DataFrame, sources: dict[str, str], labels: dict[str, str] | None = None):
    """Raise ``JobError`` (one line) for the first kind of bad value in ``df``'s rating columns.

    Parameters
    ----------
    df : DataFrame
        The ratings as read: ``sources`` maps each role ("user", "item", "rating") to its column.
    labels : dict, optional
        How messages name each role's column (default: its name, quoted).

    Types are checked without reading the data; values by one aggregation job.
    """
    from pyspark.sql import functions as F

    labels = labels or {role: repr(name) for role, name in sources.items()}
    types = {role: df.schema[name].dataType for role, name in sources.items()}
    columns = {role: F.col(f"`{name}`") for role, name in sources.items()}
    checks = [
        *_id_checks("user", columns["user"], types["user"], labels["user"]),
        *_id_checks("item", columns["item"], types["item"], labels["item"]),
        *_rating_checks(columns["rating"], types["rating"], labels["rating"]),
    ]
    example = F.concat_ws(
        ", ",
        *[
            F.concat(
                F.lit(f"{labels[role].strip(chr(39))}="),
                F.coalesce(columns[role].cast("string"), F.lit("null")),
            )
            for role in sources
        ],
    )
    # Counts only: an example per check as well would make the aggregation's plan wider than
    # the 25 fields Spark prints before it logs a warning. The example is a second, short job
    # when something is wrong.
    found = df.agg(
        F.count(F.lit(1)).alias("rows"), *[F.count_if(check.condition) for check in checks]
    ).first()
    for check, count in zip(checks, found[1:]):
        if count:
            row = df.where(check.condition).select(example).first()[0]
            raise JobError(
                f"column {labels[check.role]} ({types[check.role].simpleString()}): "
                f"{format_count(count)} of {format_count(found['rows'])} values {check.problem}, "
                f"e.g. the row {row}; {check.hint}"
            )


def _id_checks(role: str, column: Column, dtype, label: str) -> list[_Check]:
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    def check(condition, problem):
        return _Check(role, condition, problem, ID_HINT)

    if isinstance(dtype, T.StringType):
        parsed = column.try_cast("long")
        return [
            check(column.isNull(), f"are null, not {role} ids"),
            check(column.isNotNull() & parsed.isNull(), "are not integers"),
            check(~parsed.between(_INT_MIN, _INT_MAX), "are outside the int range"),
        ]
    if not isinstance(dtype, T.NumericType):
        raise JobError(
            f"column {label} ({dtype.simpleString()}) holds no {role} ids; {ID_HINT}"
        )
    checks = [check(column.isNull(), f"are null, not {role} ids")]
    if isinstance(dtype, (T.FloatType, T.DoubleType)):
        checks.append(check(F.isnan(column), "are NaN"))
    if isinstance(dtype, (T.FloatType, T.DoubleType, T.DecimalType)):
        checks.append(check(column != F.floor(column), "have a fractional part"))
    if not isinstance(dtype, (T.IntegerType, T.ShortType, T.ByteType)):
        checks.append(check(~column.between(_INT_MIN, _INT_MAX), "are outside the int range"))
    return checks


def _rating_checks(column: Column, dtype, label: str) -> list[_Check]:
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    from spark_gpu_mf.validation import FLOAT32_MAX

    checks = []
    if isinstance(dtype, T.StringType):
        parsed = column.try_cast("double")
        checks.append(
            _Check("rating", column.isNotNull() & parsed.isNull(), "are not numbers", RATING_HINT)
        )
        missing = column.isNull() | (parsed.isNotNull() & F.isnan(parsed))
    elif isinstance(dtype, T.NumericType):
        parsed = column.cast("double")
        missing = column.isNull() | F.isnan(parsed)
    else:
        raise JobError(f"column {label} ({dtype.simpleString()}) holds no ratings; {RATING_HINT}")
    return checks + [
        _Check("rating", missing, "are null or NaN", RATING_HINT),
        _Check(
            "rating",
            F.abs(parsed) > F.lit(FLOAT32_MAX),
            "are infinite or beyond float32's range (|r| > 3.4e38)",
            "ALS keeps ratings as float32 and refuses to train on infinities",
        ),
    ]
