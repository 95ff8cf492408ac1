"""Bad input fails ALS.fit and ALSModel.transform with Spark's messages; nothing changes quietly."""

from __future__ import annotations

import re

import numpy as np
import pytest
from pyspark.errors import IllegalArgumentException
from pyspark.ml.recommendation import ALS as SparkALS
from pyspark.sql import functions as F

from spark_gpu_mf import ALS


@pytest.fixture(scope="module")
def good(spark):
    return spark.createDataFrame(
        [(0, 0, 4.0), (0, 1, 2.0), (1, 1, 3.0), (1, 2, 4.0), (2, 1, 1.0), (2, 2, 5.0)],
        ["user", "item", "rating"],
    )


def _first_line(error: BaseException) -> str:
    """The error's Spark message; the offending value is masked, since which bad row a task
    meets first depends on row order."""
    text = str(error)
    for marker in (
        "[USER_RAISED_EXCEPTION]",
        "[CAST_OVERFLOW]",
        "requirement failed",
        "[FIELD_NOT",
    ):
        if marker in text:
            text = text[text.index(marker) :]
            break
    line = re.sub(r"but got \S+", "but got <value>", text.splitlines()[0])
    return re.sub(r"The value \S+ of the type", "The value <value> of the type", line)


def _both_fail(dataset, **params):
    """Fit Spark's ALS and ours on ``dataset``; both must fail; return their key messages."""
    messages = []
    for cls in (SparkALS, ALS):
        with pytest.raises(Exception) as caught:
            cls(maxIter=1, rank=2, **params).fit(dataset)
        messages.append(_first_line(caught.value))
    return messages


BAD_DATA = {
    "null int user": lambda df: df.withColumn(
        "user", F.when(F.col("user") == 1, None).otherwise(F.col("user")).cast("int")
    ),
    "null long item": lambda df: df.withColumn(
        "item", F.when(F.col("item") == 1, None).otherwise(F.col("item")).cast("long")
    ),
    "fractional user": lambda df: df.withColumn("user", F.col("user") + 0.5),
    "out of int range item (non-ANSI cast)": lambda df: df.withColumn(
        "item", F.col("item").cast("long") + 3_000_000_000
    ),
    "string user": lambda df: df.withColumn("user", F.col("user").cast("string")),
    "boolean item": lambda df: df.withColumn("item", F.col("item") > 0),
    "null rating": lambda df: df.withColumn(
        "rating", F.when(F.col("user") == 2, None).otherwise(F.col("rating"))
    ),
    "NaN rating": lambda df: df.withColumn(
        "rating", F.when(F.col("user") == 2, float("nan")).otherwise(F.col("rating"))
    ),
    "+inf rating": lambda df: df.withColumn(
        "rating", F.when(F.col("user") == 2, float("inf")).otherwise(F.col("rating"))
    ),
    "-inf rating": lambda df: df.withColumn(
        "rating", F.when(F.col("user") == 2, float("-inf")).otherwise(F.col("rating"))
    ),
    "string rating": lambda df: df.withColumn("rating", F.col("rating").cast("string")),
    "missing rating column": lambda df: df.drop("rating"),
    "missing user column": lambda df: df.drop("user"),
    "empty input": lambda df: df.limit(0),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_input_fails_with_sparks_message(spark, good, case):
    spark.conf.set("spark.sql.ansi.enabled", "false" if "non-ANSI" in case else "true")
    try:
        spark_message, ours = _both_fail(BAD_DATA[case](good))
    finally:
        spark.conf.unset("spark.sql.ansi.enabled")
    if case == "empty input":  # Spark names its internal RDD; the requirement text is the same
        assert spark_message.startswith("requirement failed: No ratings available from")
        assert ours.startswith("requirement failed: No ratings available from")
    else:
        assert ours == spark_message


def test_out_of_int_range_ids_under_ansi_fail_with_sparks_cast_error(spark, good):
    spark_message, ours = _both_fail(
        good.withColumn("user", F.col("user").cast("long") + 3_000_000_000)
    )
    assert "CAST_OVERFLOW" in spark_message and ours == spark_message


def test_float32_overflowing_ratings_fail_instead_of_becoming_infinity(spark, good):
    """Spark would cast 1e300 to float Infinity silently; we refuse it with Spark's wording."""
    with pytest.raises(Exception, match="Ratings MUST NOT be Infinity, but got 1.0E300"):
        ALS(maxIter=1, rank=2).fit(good.withColumn("rating", F.lit(1e300)))


def test_schema_errors_are_raised_before_any_job(spark, good):
    tracker = spark.sparkContext.statusTracker()
    before = len(tracker.getJobIdsForGroup())
    with pytest.raises(IllegalArgumentException, match="must be of type numeric"):
        ALS().fit(good.withColumn("user", F.col("user").cast("string")))
    assert len(tracker.getJobIdsForGroup()) == before


def test_negative_and_large_ids_are_legal(spark, good):
    shifted = good.withColumn("user", F.col("user") - 2_000_000_000).withColumn(
        "item", F.col("item") * 1_000_000_000
    )
    ours = ALS(maxIter=2, rank=2, seed=1, solver="cholesky").fit(shifted)
    theirs = SparkALS(maxIter=2, rank=2, seed=1).fit(shifted)
    assert sorted(r.id for r in ours.userFactors.collect()) == sorted(
        r.id for r in theirs.userFactors.collect()
    )


def test_transform_rejects_null_and_fractional_ids_like_spark(spark, good):
    ours = ALS(maxIter=1, rank=2).fit(good)
    theirs = SparkALS(maxIter=1, rank=2).fit(good)
    for bad in (
        good.withColumn("user", F.lit(None).cast("int")),
        good.withColumn("item", F.col("item") + 0.25),
    ):
        messages = []
        for model in (theirs, ours):
            with pytest.raises(Exception) as caught:
                model.transform(bad).collect()
            messages.append(_first_line(caught.value))
        assert messages[0] == messages[1]


def test_duplicate_pairs_count_twice_as_in_spark(spark, good):
    """A repeated (user, item) pair is two observations: it weighs twice in that row's fit."""
    doubled = good.union(good.filter(F.col("user") == 0))
    ours = ALS(maxIter=3, rank=2, seed=2, solver="cholesky").fit(doubled)
    theirs = SparkALS(maxIter=3, rank=2, seed=2).fit(doubled)
    mine = {r.id: r.features for r in ours.userFactors.collect()}
    spark_factors = {r.id: r.features for r in theirs.userFactors.collect()}
    for key, value in spark_factors.items():
        assert mine[key] == pytest.approx(value, abs=1e-5)


@pytest.mark.parametrize("case", ["null int user", "null rating", "NaN rating"])
def test_bad_values_in_a_cached_input_fail_with_sparks_message(spark, good, case):
    """A cached input is read as it is, not copied into a validated cache first, so the checks
    run inside the training job: the message must not change."""
    spark.conf.set("spark.sql.ansi.enabled", "true")
    bad = BAD_DATA[case](good).cache()
    try:
        spark_message, ours = _both_fail(bad)
    finally:
        spark.conf.unset("spark.sql.ansi.enabled")
        bad.unpersist()
    assert ours == spark_message


def test_a_cached_and_an_uncached_input_give_the_same_model(spark, sample):
    cached, _ = sample
    uncached = cached.select("*").withColumn("rating", F.col("rating") + 0.0)
    assert not uncached.storageLevel.useMemory
    als = ALS(rank=4, maxIter=3, regParam=0.1, seed=1)
    factors = [
        np.stack(als.fit(frame).userFactors.orderBy("id").toPandas()["features"])
        for frame in (cached, uncached)
    ]
    np.testing.assert_array_equal(factors[0], factors[1])
