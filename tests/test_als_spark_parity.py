"""Our ALS against pyspark's ALS in the same Spark session: factors, predictions, metrics.

With ``solver="cholesky"`` (and ``"auto"`` up to rank 12) the same seed gives Spark's starting
factors and the same exact solves, so factors agree to float32 rounding in every dataflow, whichever
BLAS Spark loads; the CG solver is held to Spark's held-out metrics instead.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from pyspark.ml.evaluation import RankingEvaluator, RegressionEvaluator
from pyspark.ml.recommendation import ALS as SparkALS
from pyspark.sql import functions as F

from spark_gpu_mf import ALS, datasets
from spark_gpu_mf.spark.factors import collect_factors


def _rmse(predictions):
    evaluator = RegressionEvaluator(
        metricName="rmse", labelCol="rating", predictionCol="prediction"
    )
    return evaluator.evaluate(predictions)


@pytest.fixture(scope="module")
def small_ratings(spark):
    """3k ratings with sparse (negative and large) ids, so blocks are uneven."""
    data = datasets.generate_ratings(3000, num_users=150, num_items=90, ids="sparse", seed=11)
    return datasets.to_dataframe(spark, data).cache()


@pytest.fixture(scope="module")
def generated_split(spark):
    data = datasets.generate_ratings(120_000, seed=5)
    train, test = datasets.train_test_split(data, 0.2, seed=6)
    return (
        datasets.to_dataframe(spark, train, num_partitions=4).cache(),
        datasets.to_dataframe(spark, test, num_partitions=2).cache(),
    )


@pytest.fixture(scope="module")
def sample_split(spark):
    sample = datasets.read_spark_sample(spark).orderBy("user", "item")
    train, test = sample.randomSplit([0.8, 0.2], seed=1)
    return train.cache(), test.cache()




def _max_factor_difference(ours, theirs):
    our_ids, our_factors = collect_factors(ours)
    their_ids, their_factors = collect_factors(theirs)
    assert np.array_equal(our_ids, their_ids)
    return float(np.abs(our_factors - their_factors).max())


# Spark's BLAS may be Java or native (netlib loads a system libblas.so.3 / liblapack.so.3 when
# there is one): their float32 sums differ in order, so each exact solve agrees with ours to a few
# float32 ulps, not bit for bit. FLOAT32_ULP bounds one rounding; the tolerances below count them.
FLOAT32_ULP = float(np.finfo(np.float32).eps)


def test_spark_calls_the_blas_this_run_asked_for(spark):
    """SPARK_GPU_MF_TEST_BLAS (tests/conftest.py) decides Spark's BLAS; a native library that
    fails to load would silently give the Java one, and the run would not show what it claims."""
    choice = os.environ.get("SPARK_GPU_MF_TEST_BLAS", "")
    jvm = spark.sparkContext._jvm
    loaded = (
        jvm.dev.ludovic.netlib.blas.BLAS.getInstance().getClass().getSimpleName(),
        jvm.dev.ludovic.netlib.lapack.LAPACK.getInstance().getClass().getSimpleName(),
    )
    if not choice:
        pytest.skip(f"SPARK_GPU_MF_TEST_BLAS unset: Spark uses {loaded} here")
    native = loaded == ("JNIBLAS", "JNILAPACK")
    assert native == (choice != "java"), loaded


def test_doctest_example_gives_sparks_predictions_and_recommendations(spark):
    """Spark's docstring example with default params: ``solver="auto"`` is exact at rank 10."""
    df = spark.createDataFrame(
        [(0, 0, 4.0), (0, 1, 2.0), (1, 1, 3.0), (1, 2, 4.0), (2, 1, 1.0), (2, 2, 5.0)],
        ["user", "item", "rating"],
    )
    test = spark.createDataFrame([(0, 2), (1, 0), (2, 0)], ["user", "item"])
    theirs = SparkALS(rank=10, seed=0, maxIter=5).fit(df)
    ours = ALS(rank=10, seed=0, maxIter=5).fit(df)
    assert ours.summary.details["solver"] == "cholesky"
    # 5 iterations x 2 halves of solves, each off by a few ulps, on well-conditioned systems.
    rtol = 100 * FLOAT32_ULP
    mine = ours.transform(test).orderBy("user").collect()
    spark_rows = theirs.transform(test).orderBy("user").collect()
    assert [r[:2] for r in mine] == [r[:2] for r in spark_rows]
    np.testing.assert_allclose([r[2] for r in mine], [r[2] for r in spark_rows], rtol=rtol)
    for method in ("recommendForAllUsers", "recommendForAllItems"):
        mine = {r[0]: r[1] for r in getattr(ours, method)(3).collect()}
        spark_recs = {r[0]: r[1] for r in getattr(theirs, method)(3).collect()}
        assert mine.keys() == spark_recs.keys()
        for key, recs in spark_recs.items():
            assert [e[0] for e in mine[key]] == [e[0] for e in recs]
            np.testing.assert_allclose([e[1] for e in mine[key]], [e[1] for e in recs], rtol=rtol)


def test_max_iter_zero_returns_sparks_starting_factors(spark, small_ratings):
    ours = ALS(rank=6, maxIter=0, seed=42, numUserBlocks=3, numItemBlocks=4).fit(small_ratings)
    theirs = SparkALS(rank=6, maxIter=0, seed=42, numUserBlocks=3, numItemBlocks=4).fit(
        small_ratings
    )
    # Spark scales Gaussian draws by 1 / snrm2: a BLAS's snrm2 may differ by 2 ulps (scaled vs
    # plain sum of squares), then the reciprocal and the product round once each. |x| <= 1.
    atol = 4 * FLOAT32_ULP
    assert _max_factor_difference(ours.userFactors, theirs.userFactors) <= atol
    assert _max_factor_difference(ours.itemFactors, theirs.itemFactors) <= atol


@pytest.mark.parametrize("dataflow", ["single task", "broadcast", "messages"], indirect=True)
@pytest.mark.parametrize(
    "mode",
    [{}, {"implicitPrefs": True, "alpha": 2.0}, {"nonnegative": True}],
    ids=["explicit", "implicit", "nonnegative"],
)
def test_exact_solver_gives_sparks_factors(spark, small_ratings, dataflow, mode):
    params = dict(rank=5, maxIter=4, regParam=0.1, seed=7, numUserBlocks=3, numItemBlocks=4, **mode)
    ours = ALS(solver="cholesky", **params).fit(small_ratings)
    assert ours.summary.details["dataflow"] == dataflow
    theirs = SparkALS(**params).fit(small_ratings)
    assert _max_factor_difference(ours.userFactors, theirs.userFactors) < 1e-4
    assert _max_factor_difference(ours.itemFactors, theirs.itemFactors) < 1e-4


def _heldout_rmse(estimator, train, test):
    return _rmse(estimator.setColdStartStrategy("drop").fit(train).transform(test))


@pytest.mark.parametrize("rank", [10, 32])
def test_default_fit_matches_sparks_heldout_rmse_on_generated_data(generated_split, rank):
    train, test = generated_split
    theirs = _heldout_rmse(SparkALS(rank=rank, seed=3), train, test)
    ours = _heldout_rmse(ALS(rank=rank, seed=3), train, test)
    assert train.count() >= 95_000
    assert ours <= theirs * 1.005, (ours, theirs)


@pytest.mark.parametrize("seed", [3, 4])
def test_default_fit_matches_sparks_heldout_rmse_on_sparks_sample_file(sample_split, seed):
    train, test = sample_split
    theirs = _heldout_rmse(SparkALS(seed=seed), train, test)
    ours = _heldout_rmse(ALS(seed=seed), train, test)
    assert ours <= theirs * 1.005, (ours, theirs)


def _ranking_quality(model, test, metric):
    """Spark's RankingEvaluator on top-10 recommendations against each user's liked test items."""
    relevant = (
        test.filter(F.col("rating") >= 4)
        .groupBy("user")
        .agg(F.collect_list(F.col("item").cast("double")).alias("label"))
    )
    recs = model.recommendForAllUsers(10).select(
        "user", F.col("recommendations.item").cast("array<double>").alias("prediction")
    )
    joined = recs.join(relevant, "user")
    evaluator = RankingEvaluator(
        metricName=metric, k=10, labelCol="label", predictionCol="prediction"
    )
    return evaluator.evaluate(joined)


def test_implicit_ranking_quality_matches_spark(spark):
    data = datasets.generate_interactions(60_000, seed=8)
    train, test = datasets.train_test_split(data, 0.2, seed=9)
    train_df = datasets.to_dataframe(spark, train).cache()
    test_df = datasets.to_dataframe(spark, test).withColumn("rating", F.lit(5.0)).cache()
    params = dict(rank=16, maxIter=8, regParam=0.05, implicitPrefs=True, alpha=1.0, seed=2)
    ours = ALS(**params).fit(train_df)
    theirs = SparkALS(**params).fit(train_df)
    for metric in ("precisionAtK", "ndcgAtK"):
        mine, spark_value = (
            _ranking_quality(ours, test_df, metric),
            _ranking_quality(theirs, test_df, metric),
        )
        assert spark_value > 0.05, metric  # the data has signal
        assert mine >= spark_value * 0.98, (metric, mine, spark_value)


def test_nonnegative_factors_are_nonnegative_with_comparable_rmse(generated_split):
    train, test = generated_split
    model = ALS(rank=8, maxIter=6, nonnegative=True, seed=1).setColdStartStrategy("drop").fit(train)
    for factors in (model.userFactors, model.itemFactors):
        assert collect_factors(factors)[1].min() >= 0.0
    ours = _rmse(model.transform(test))
    theirs = _heldout_rmse(SparkALS(rank=8, maxIter=6, nonnegative=True, seed=1), train, test)
    assert ours <= theirs * 1.005, (ours, theirs)


def test_empty_rating_column_name_fails_like_spark(spark, small_ratings):
    """Spark's schema check rejects ratingCol="" before its all-ones branch could run."""
    from pyspark.errors import IllegalArgumentException

    messages = []
    for cls in (SparkALS, ALS):
        with pytest.raises(IllegalArgumentException) as caught:
            cls(ratingCol="").fit(small_ratings.drop("rating"))
        messages.append(str(caught.value).splitlines()[0])
    assert messages[0] == messages[1]


def test_numeric_id_types_are_cast_like_spark(spark, small_ratings):
    typed = small_ratings.select(
        F.col("user").cast("long").alias("user"),
        F.col("item").cast("double").alias("item"),
        F.col("rating").cast("decimal(10,4)").alias("rating"),
    )
    ours = ALS(rank=3, maxIter=2, seed=1, solver="cholesky").fit(typed)
    theirs = SparkALS(rank=3, maxIter=2, seed=1).fit(typed)
    assert _max_factor_difference(ours.itemFactors, theirs.itemFactors) < 1e-4
    assert ours.transform(typed).schema == theirs.transform(typed).schema
