"""ALSModel behaves like Spark's: transform, cold start, recommendFor*, persistence, pipelines."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.evaluation import RegressionEvaluator
from pyspark.ml.feature import SQLTransformer
from pyspark.ml.recommendation import ALS as SparkALS
from pyspark.ml.recommendation import ALSModel as SparkALSModel
from pyspark.ml.tuning import CrossValidator, CrossValidatorModel, ParamGridBuilder
from pyspark.sql import functions as F

from spark_gpu_mf import ALS, ALSModel, datasets
from spark_gpu_mf.errors import DamagedModelError
from spark_gpu_mf.spark.factors import collect_factors


@pytest.fixture(scope="module")
def ratings(spark):
    data = datasets.generate_ratings(4000, num_users=200, num_items=120, seed=21)
    return datasets.to_dataframe(spark, data).cache()


@pytest.fixture(scope="module")
def fitted(ratings):
    """Our model and Spark's, fitted with the same params (exact solver: same factors)."""
    params = dict(rank=6, maxIter=3, seed=4, numUserBlocks=3, numItemBlocks=2)
    return ALS(solver="cholesky", **params).fit(ratings), SparkALS(**params).fit(ratings)


def test_transform_output_equals_sparks_for_known_and_unknown_ids(spark, fitted):
    ours, theirs = fitted
    test = spark.createDataFrame(
        [(0, 1, "a"), (1, 999_999, "b"), (999_999, 2, "c"), (-5, -7, "d"), (3, 4, "e")],
        ["user", "item", "tag"],
    )
    mine, spark_rows = ours.transform(test), theirs.transform(test)
    assert mine.schema == spark_rows.schema
    mine_rows = sorted(mine.collect(), key=lambda r: r.tag)
    spark_rows = sorted(spark_rows.collect(), key=lambda r: r.tag)
    for a, b in zip(mine_rows, spark_rows):
        assert a[:3] == b[:3]
        assert (np.isnan(a.prediction) and np.isnan(b.prediction)) or abs(
            a.prediction - b.prediction
        ) <= 1e-4 * max(1.0, abs(b.prediction))


def test_cold_start_drop_removes_rows_with_unknown_ids(spark, fitted):
    ours, theirs = fitted
    test = spark.createDataFrame([(0, 1), (1, 999_999), (999_999, 2)], ["user", "item"])
    for model in (ours, theirs):
        model.setColdStartStrategy("drop")
    try:
        assert ours.transform(test).count() == theirs.transform(test).count() == 1
    finally:
        ours.setColdStartStrategy("nan")
        theirs.setColdStartStrategy("nan")


def test_prediction_column_clash_fails_like_spark(spark, fitted):
    from pyspark.errors import IllegalArgumentException

    ours, theirs = fitted
    test = spark.createDataFrame([(0, 1, 0.0)], ["user", "item", "prediction"])
    messages = []
    for model in (theirs, ours):
        with pytest.raises(IllegalArgumentException) as caught:
            model.transform(test).collect()
        messages.append(str(caught.value).splitlines()[0])
    assert messages[0] == messages[1]


def _recommendations(df):
    return {row[0]: [(e[0], e[1]) for e in row[1]] for row in df.collect()}


def _assert_same_recommendations(mine, theirs, k):
    assert mine.keys() == theirs.keys()
    for key, spark_list in theirs.items():
        ours = mine[key]
        assert len(ours) == len(spark_list) == min(k, len(spark_list))
        np.testing.assert_allclose(
            [s for _, s in ours], [s for _, s in spark_list], rtol=1e-5, atol=1e-6
        )
        spark_scores = dict(spark_list)
        for item, score in ours:  # same items, except where scores tie within rounding
            if item not in spark_scores:
                assert abs(score - spark_list[-1][1]) <= 1e-5


@pytest.mark.parametrize("threshold", ["256m", "0"], ids=["broadcast", "cross-join"])
def test_recommend_for_all_matches_spark(spark, fitted, threshold):
    ours, theirs = fitted
    spark.conf.set("spark.gpumf.broadcastThreshold", threshold)
    try:
        for method, k in (("recommendForAllUsers", 10), ("recommendForAllItems", 7)):
            mine_df = getattr(ours, method)(k)
            spark_df = getattr(theirs, method)(k)
            assert [f.name for f in mine_df.schema] == [f.name for f in spark_df.schema]
            assert mine_df.schema["recommendations"] == spark_df.schema["recommendations"]
            _assert_same_recommendations(_recommendations(mine_df), _recommendations(spark_df), k)
    finally:
        spark.conf.unset("spark.gpumf.broadcastThreshold")


@pytest.mark.parametrize("spare_bytes", [0, -1], ids=["broadcast", "cross-join"])
def test_recommend_over_sparks_factors_in_many_partitions_matches_spark(spark, fitted, spare_bytes):
    """Our model holding Spark's factor DataFrames, split into more partitions than cores, with
    the broadcast threshold exactly at (or one byte under) the destination side's size."""
    _, theirs = fitted
    users = theirs.userFactors.repartition(7)
    items = theirs.itemFactors.repartition(5)
    ours = ALSModel._create(theirs.rank, users, items).setBlockSize(5)
    threshold = items.count() * theirs.rank * 4 + spare_bytes
    spark.conf.set("spark.gpumf.broadcastThreshold", str(threshold))
    try:
        mine_df = ours.recommendForAllUsers(4)
        if spare_bytes == 0:  # one scoring task per core, not per source partition
            assert mine_df.rdd.getNumPartitions() == spark.sparkContext.defaultParallelism
        assert mine_df.schema == theirs.recommendForAllUsers(4).schema
        _assert_same_recommendations(
            _recommendations(mine_df), _recommendations(theirs.recommendForAllUsers(4)), 4
        )
    finally:
        spark.conf.unset("spark.gpumf.broadcastThreshold")


def test_recommend_more_than_exists_returns_everything(fitted):
    ours, theirs = fitted
    mine = _recommendations(ours.recommendForAllUsers(10_000))
    _assert_same_recommendations(
        mine, _recommendations(theirs.recommendForAllUsers(10_000)), 10_000
    )


def test_recommend_for_subsets_collapses_duplicates_and_skips_unknown_ids(spark, fitted):
    ours, theirs = fitted
    users = spark.createDataFrame([(0,), (0,), (3,), (987_654,)], ["user"])
    items = spark.createDataFrame([(1,), (5,), (5,), (-1,)], ["item"])
    mine = _recommendations(ours.recommendForUserSubset(users, 5))
    assert set(mine) == {0, 3}
    _assert_same_recommendations(mine, _recommendations(theirs.recommendForUserSubset(users, 5)), 5)
    mine = _recommendations(ours.recommendForItemSubset(items, 4))
    assert set(mine) == {1, 5}
    _assert_same_recommendations(mine, _recommendations(theirs.recommendForItemSubset(items, 4)), 4)


def test_ties_put_the_larger_id_first_like_spark(spark):
    from spark_gpu_mf.spark.factors import factors_dataframe

    users = factors_dataframe(spark, np.array([0]), np.array([[1.0, 0.0]], np.float32))
    items = factors_dataframe(
        spark, np.array([5, 9, 2, 7]), np.array([[1, 0], [1, 0], [0.5, 0], [1, 0]], np.float32)
    )
    model = ALSModel._create(2, users, items)
    recs = model.recommendForAllUsers(2).collect()[0].recommendations
    assert [r.item for r in recs] == [9, 7]


def test_saved_model_loads_in_spark_and_back(spark, fitted, ratings, tmp_path):
    ours, theirs = fitted
    path = str(tmp_path / "ours")
    ours.save(path)
    in_spark = SparkALSModel.load(path)
    assert in_spark.rank == ours.rank
    test = ratings.limit(50)
    assert in_spark.transform(test).collect() == ours.transform(test).collect()
    reloaded = ALSModel.load(path)
    assert (reloaded.rank, reloaded.uid) == (ours.rank, ours.uid)
    assert reloaded.transform(test).collect() == ours.transform(test).collect()
    assert not reloaded.hasSummary and ours.hasSummary


def test_metadata_has_sparks_layout_and_params(spark, fitted, tmp_path):
    ours, theirs = fitted
    ours.save(str(tmp_path / "ours"))
    theirs.save(str(tmp_path / "spark"))

    def metadata(name):
        folder = tmp_path / name / "metadata"
        part = [f for f in os.listdir(folder) if f.startswith("part-")]
        return json.loads(open(folder / part[0]).read())

    mine, spark_meta = metadata("ours"), metadata("spark")
    for key in ("class", "paramMap", "defaultParamMap", "rank", "sparkVersion"):
        assert mine[key] == spark_meta[key], key
    assert sorted(os.listdir(tmp_path / "ours")) == ["itemFactors", "metadata", "userFactors"]
    for part in ("userFactors", "itemFactors"):
        assert (
            spark.read.parquet(str(tmp_path / "ours" / part)).schema
            == spark.read.parquet(str(tmp_path / "spark" / part)).schema
        )


def test_loading_a_model_reads_on_the_driver_what_sparks_readers_read(spark, fitted, tmp_path):
    """A classic session loads a model without a job: the metadata's first line and the
    schema the Parquet writer stored are read on the driver, and equal what
    ``spark.read.text`` and the schema inference give, for our saved model and Spark's."""
    from spark_gpu_mf.spark import session

    tracker = spark.sparkContext.statusTracker()
    for name, model in zip(("ours", "spark"), fitted):
        path = str(tmp_path / name)
        model.save(path)
        metadata = f"{path}/metadata"
        assert session.first_line(spark, metadata) == spark.read.text(metadata).first().value
        for part in ("userFactors", "itemFactors"):
            stored = session.stored_parquet_schema(spark, f"{path}/{part}")
            inferred = spark.read.parquet(f"{path}/{part}").schema
            assert spark.read.schema(stored).parquet(f"{path}/{part}").schema == inferred
        before = set(tracker.getJobIdsForGroup())
        loaded = ALSModel.load(path)
        assert set(tracker.getJobIdsForGroup()) == before, name
        for got, want in ((loaded.userFactors, model.userFactors),
                          (loaded.itemFactors, model.itemFactors)):  # fmt: skip
            for a, b in zip(collect_factors(got), collect_factors(want)):
                np.testing.assert_array_equal(a, b)
    # A compressed text file is read through its codec, as Spark reads it.
    lines = spark.createDataFrame([("first",), ("second",)], "value string").coalesce(1)
    lines.write.option("compression", "gzip").text(str(tmp_path / "gz"))
    assert session.first_line(spark, str(tmp_path / "gz")) == "first"
    assert session.first_line(spark, str(tmp_path / "nowhere")) is None


def test_sparks_saved_model_loads_as_ours(spark, fitted, ratings, tmp_path):
    _, theirs = fitted
    path = str(tmp_path / "spark")
    theirs.write().overwrite().save(path)
    loaded = ALSModel.load(path)
    test = ratings.limit(50)
    assert loaded.transform(test).collect() == theirs.transform(test).collect()
    assert loaded.getBlockSize() == theirs.getBlockSize()


def test_save_refuses_to_overwrite_unless_asked_like_spark(fitted, tmp_path):
    ours, _ = fitted
    path = str(tmp_path / "m")
    ours.save(path)
    with pytest.raises(IOError, match="already exists. To overwrite it, please use"):
        ours.save(path)
    ours.write().overwrite().save(path)
    assert ALSModel.load(path).rank == ours.rank


def test_saving_over_a_path_fails_with_sparks_message_for_estimator_and_model(fitted, tmp_path):
    ours, theirs = fitted
    for mine, spark_instance in ((ALS(), SparkALS()), (ours, theirs)):
        messages = []
        for instance, name in ((spark_instance, "spark"), (mine, "ours")):
            path = str(tmp_path / type(instance).__name__ / name)
            instance.save(path)
            with pytest.raises(Exception) as caught:
                instance.save(path)
            text = str(caught.value)
            message = text[text.index("Path ") :].splitlines()[0]
            messages.append(message.replace(path, "<path>"))
        assert messages[1] == messages[0]
        assert isinstance(caught.value, IOError)  # Spark's is a java.io.IOException


def test_damaged_models_name_what_is_wrong(spark, fitted, tmp_path):
    import shutil

    ours, _ = fitted
    path = tmp_path / "m"
    ours.save(str(path))
    shutil.rmtree(path / "itemFactors")
    with pytest.raises(DamagedModelError, match="itemFactors/ is missing"):
        ALSModel.load(str(path))
    with pytest.raises(DamagedModelError, match="path does not exist"):
        ALSModel.load(str(tmp_path / "nowhere"))
    other = tmp_path / "estimator"
    ALS().save(str(other))
    with pytest.raises(DamagedModelError, match="Expected class name .*ALSModel but found"):
        ALSModel.load(str(other))


def test_estimator_save_load_keeps_every_param(tmp_path):
    als = ALS(
        rank=7,
        maxIter=3,
        regParam=0.2,
        implicitPrefs=True,
        solver="cholesky",
        cgIterations=9,
        precision="fp16",
        backend="numpy",
        seed=5,
    )
    path = str(tmp_path / "als")
    als.save(path)
    loaded = ALS.load(path)
    assert loaded.uid == als.uid
    assert {p.name: v for p, v in loaded.extractParamMap().items()} == {
        p.name: v for p, v in als.extractParamMap().items()
    }


def test_pipeline_and_pipeline_model_persistence(spark, ratings, tmp_path):
    cleaner = SQLTransformer(statement="SELECT user, item, rating FROM __THIS__ WHERE rating > 1")
    pipeline = Pipeline(stages=[cleaner, ALS(rank=4, maxIter=2, seed=1)])
    model = pipeline.fit(ratings)
    expected = model.transform(ratings).orderBy("user", "item").collect()
    pipeline.save(str(tmp_path / "pipeline"))
    assert len(Pipeline.load(str(tmp_path / "pipeline")).getStages()) == 2
    model.save(str(tmp_path / "pipeline_model"))
    loaded = PipelineModel.load(str(tmp_path / "pipeline_model"))
    assert loaded.transform(ratings).orderBy("user", "item").collect() == expected


def test_cross_validator_selects_and_persists(spark, ratings, tmp_path):
    als = ALS(maxIter=2, seed=1, coldStartStrategy="drop")
    grid = ParamGridBuilder().addGrid(als.rank, [2, 6]).addGrid(als.regParam, [0.05, 0.5]).build()
    evaluator = RegressionEvaluator(metricName="rmse", labelCol="rating")
    cv = CrossValidator(
        estimator=als, estimatorParamMaps=grid, evaluator=evaluator, numFolds=2, seed=3
    )
    model = cv.fit(ratings)
    assert len(model.avgMetrics) == 4 and all(np.isfinite(model.avgMetrics))
    assert isinstance(model.bestModel, ALSModel)
    best = int(np.argmin(model.avgMetrics))
    assert model.bestModel.rank == grid[best][als.rank]
    model.save(str(tmp_path / "cv"))
    loaded = CrossValidatorModel.load(str(tmp_path / "cv"))
    assert loaded.avgMetrics == model.avgMetrics
    assert loaded.bestModel.transform(ratings).count() == ratings.count()


def test_fitted_model_copy_keeps_factors_and_uid(fitted):
    ours, _ = fitted
    copied = ours.copy({ours.predictionCol: "score"})
    assert copied.uid == ours.uid and copied.rank == ours.rank
    assert copied.getPredictionCol() == "score" and ours.getPredictionCol() == "prediction"
    ids, factors = collect_factors(copied.userFactors)
    assert len(ids) == len(collect_factors(ours.userFactors)[0])


def test_factor_dataframes_have_sparks_schema(fitted):
    ours, theirs = fitted
    assert ours.userFactors.schema == theirs.userFactors.schema
    assert ours.itemFactors.schema == theirs.itemFactors.schema
    assert ours.userFactors.filter(F.size("features") != ours.rank).count() == 0


def test_a_models_repeated_recommend_calls_collect_its_candidates_once(spark, fitted):
    """The candidates are collected (a job) and broadcast on the first call; the model's later
    calls reuse them, with the same lists."""
    ours, _ = fitted
    model = ALSModel._create(ours.rank, ours.userFactors, ours.itemFactors)
    tracker = spark.sparkContext.statusTracker()
    jobs, lists = [], []
    for _ in range(3):
        before = set(tracker.getJobIdsForGroup())
        result = model.recommendForAllUsers(5)  # lazy: any job here is the collection
        jobs.append(len(set(tracker.getJobIdsForGroup()) - before))
        lists.append(_recommendations(result))
    assert jobs[0] >= 1 and jobs[1] == jobs[2] == 0
    assert lists[0] == lists[1] == lists[2]
