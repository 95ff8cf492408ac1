"""The model side on Spark Connect and on classic sessions: the same results and files on both.

Models are fitted once on the classic session; a Connect test gets the same model either by
``ALSModel._create`` over factor DataFrames made on its own session or by loading a saved one.
References are independent of our code: pyspark's own ``ALSModel`` over the same factors (loaded
from the same directory on the classic session) and NumPy.
"""

from __future__ import annotations

import numpy as np
import pytest
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.evaluation import RegressionEvaluator
from pyspark.ml.feature import StringIndexer
from pyspark.ml.recommendation import ALSModel as SparkALSModel
from pyspark.ml.tuning import (
    CrossValidator,
    CrossValidatorModel,
    ParamGridBuilder,
    TrainValidationSplit,
    TrainValidationSplitModel,
)
from pyspark.sql import functions as F

from spark_gpu_mf import ALS, ALSModel, datasets
from spark_gpu_mf.errors import DamagedModelError
from spark_gpu_mf.spark import session as spark_session
from spark_gpu_mf.spark.factors import collect_factors, factors_dataframe
from tests.conftest import functions_for
from tests.test_als_model import _assert_same_recommendations


@pytest.fixture(scope="module")
def ratings(spark):
    data = datasets.generate_ratings(1500, num_users=60, num_items=40, seed=5)
    return datasets.to_dataframe(spark, data).cache()


@pytest.fixture(scope="module")
def saved(spark, ratings, tmp_path_factory):
    """Our model fitted on the classic session, its factors as NumPy, its saved directory, and
    pyspark's own ALSModel loaded from that directory (the reference)."""
    model = ALS(rank=4, maxIter=2, seed=3, numUserBlocks=2, numItemBlocks=2).fit(ratings)
    path = str(tmp_path_factory.mktemp("connect") / "model")
    model.save(path)
    with functions_for("classic"):
        reference = SparkALSModel.load(path)
    users, items = collect_factors(model.userFactors), collect_factors(model.itemFactors)
    return model, users, items, path, reference


def _model_on(any_spark, saved) -> ALSModel:
    """The saved model's factors as a model on ``any_spark``, without loading or fitting."""
    _, (user_ids, user_factors), (item_ids, item_factors), _, _ = saved
    return ALSModel._create(
        user_factors.shape[1],
        factors_dataframe(any_spark, user_ids, user_factors),
        factors_dataframe(any_spark, item_ids, item_factors),
    )


def _factors(model: ALSModel):
    return collect_factors(model.userFactors), collect_factors(model.itemFactors)


def _assert_same_factors(model: ALSModel, users, items):
    (uids, ufac), (iids, ifac) = _factors(model)
    np.testing.assert_array_equal(uids, users[0])
    np.testing.assert_array_equal(iids, items[0])
    np.testing.assert_array_equal(ufac, users[1])
    np.testing.assert_array_equal(ifac, items[1])


def _recommendations(df):
    return {row[0]: [(e[0], e[1]) for e in row[1]] for row in df.collect()}


def _reference(reference: SparkALSModel, method: str, *args):
    """pyspark's ALSModel (a classic JVM object) answering, whatever mode the test is in."""
    with functions_for("classic"):
        return _recommendations(getattr(reference, method)(*args))


def test_the_session_module_tells_the_kinds_apart(spark, connect_spark):
    assert not spark_session.is_connect(spark) and spark_session.is_connect(connect_spark)
    assert spark_session.master(connect_spark) == spark_session.master(spark) == "local[2]"
    assert spark_session.default_parallelism(connect_spark) == 2
    assert spark_session.application_id(connect_spark) == spark.sparkContext.applicationId
    assert spark_session.broadcast(connect_spark, 1) is None


@pytest.mark.parametrize("strategy", ["nan", "drop"])
def test_transform_gives_numpy_predictions_and_cold_start(any_spark, saved, strategy):
    _, (user_ids, user_factors), (item_ids, item_factors), _, _ = saved
    model = _model_on(any_spark, saved).setColdStartStrategy(strategy)
    pairs = [(int(user_ids[0]), int(item_ids[1])), (int(user_ids[3]), int(item_ids[2]))]
    unknown = [(int(user_ids[0]), 999_999), (999_999, int(item_ids[0]))]
    test = any_spark.createDataFrame(pairs + unknown, ["user", "item"])
    rows = {(r.user, r.item): r.prediction for r in model.transform(test).collect()}
    row_of_user = {u: i for i, u in enumerate(user_ids)}
    row_of_item = {v: i for i, v in enumerate(item_ids)}
    for user, item in pairs:
        expected = user_factors[row_of_user[user]] @ item_factors[row_of_item[item]]
        np.testing.assert_allclose(rows[(user, item)], expected, rtol=1e-5)
    if strategy == "drop":
        assert set(rows) == set(pairs)
    else:
        assert all(np.isnan(rows[pair]) for pair in unknown) and len(rows) == 4


def test_recommend_for_all_equals_pysparks_over_the_same_factors(any_spark, saved):
    reference = saved[-1]
    model = _model_on(any_spark, saved)
    for method, k in (("recommendForAllUsers", 5), ("recommendForAllItems", 4)):
        mine = getattr(model, method)(k)
        with functions_for("classic"):
            assert mine.schema == getattr(reference, method)(k).schema
        _assert_same_recommendations(_recommendations(mine), _reference(reference, method, k), k)


def test_recommend_for_subsets_equals_pysparks(any_spark, spark, saved):
    reference = saved[-1]
    user_ids, item_ids = saved[1][0], saved[2][0]
    model = _model_on(any_spark, saved)
    users = [(int(user_ids[2]),), (int(user_ids[2]),), (987_654,)]
    items = [(int(item_ids[5]),), (-1,)]
    subset = any_spark.createDataFrame(users, ["user"])
    mine = _recommendations(model.recommendForUserSubset(subset, 3))
    theirs = _reference(
        reference, "recommendForUserSubset", spark.createDataFrame(users, ["user"]), 3
    )
    assert set(mine) == {int(user_ids[2])}
    _assert_same_recommendations(mine, theirs, 3)
    subset = any_spark.createDataFrame(items, ["item"])
    mine = _recommendations(model.recommendForItemSubset(subset, 2))
    theirs = _reference(
        reference, "recommendForItemSubset", spark.createDataFrame(items, ["item"]), 2
    )
    assert set(mine) == {int(item_ids[5])}
    _assert_same_recommendations(mine, theirs, 2)


def test_model_save_load_overwrite_and_errors(any_spark, saved, tmp_path):
    _, users, items, _, _ = saved
    model = _model_on(any_spark, saved).setPredictionCol("score")
    path = str(tmp_path / "m")
    model.save(path)
    with pytest.raises(IOError, match=r"^Path .*m already exists\. To overwrite it, please use"):
        model.save(path)
    model.write().overwrite().save(path)
    loaded = ALSModel.read().session(any_spark).load(path)
    assert spark_session.is_connect(loaded.userFactors.sparkSession) == (
        spark_session.is_connect(any_spark)
    )
    assert (loaded.uid, loaded.rank, loaded.getPredictionCol()) == (model.uid, 4, "score")
    _assert_same_factors(loaded, users, items)
    with pytest.raises(DamagedModelError, match="path does not exist"):
        ALSModel.read().session(any_spark).load(str(tmp_path / "nowhere"))
    ALS().write().session(any_spark).save(str(tmp_path / "estimator"))
    with pytest.raises(DamagedModelError, match="Expected class name .*ALSModel but found"):
        ALSModel.read().session(any_spark).load(str(tmp_path / "estimator"))


def test_an_interrupted_save_leaves_nothing_that_loads(any_spark, saved, tmp_path, monkeypatch):
    """Over an existing model too: Connect cannot rename, so there the old model goes first;
    classic keeps it. Either way the directory never loads as a model it is not."""
    from spark_gpu_mf.spark import persistence

    model = _model_on(any_spark, saved)
    path = str(tmp_path / "m")
    ALS().save(path)  # something else already there
    monkeypatch.setattr(
        persistence, "metadata_json", lambda *a, **k: (_ for _ in ()).throw(OSError("killed"))
    )
    with pytest.raises(OSError, match="killed"):
        model.write().overwrite().save(path)
    monkeypatch.undo()
    if spark_session.is_connect(any_spark):
        assert not (tmp_path / "m").exists()
    else:
        assert ALS.load(path).uid  # the old directory, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        [] if spark_session.is_connect(any_spark) else ["m"]
    )


def test_estimator_save_load_overwrite(any_spark, tmp_path):
    als = ALS(rank=7, regParam=0.2, solver="cholesky", precision="fp16", seed=5)
    path = str(tmp_path / "als")
    als.write().session(any_spark).save(path)
    with pytest.raises(IOError, match="already exists. To overwrite it, please use"):
        als.write().session(any_spark).save(path)
    als.setRank(3)
    als.write().overwrite().session(any_spark).save(path)
    loaded = ALS.read().session(any_spark).load(path)
    assert loaded.uid == als.uid
    assert {p.name: v for p, v in loaded.extractParamMap().items()} == {
        p.name: v for p, v in als.extractParamMap().items()
    }


def test_saved_on_connect_loads_in_pysparks_classic_loader(
    spark, connect_session, saved, tmp_path
):
    _, users, items, _, reference = saved
    path = str(tmp_path / "from_connect")
    with functions_for("connect"):
        _model_on(connect_session, saved).setColdStartStrategy("drop").save(path)
    theirs = SparkALSModel.load(path)  # classic: the JVM's ALSModel reader
    assert theirs.rank == reference.rank and theirs.getColdStartStrategy() == "drop"
    assert _recommendations(theirs.recommendForAllUsers(3)) == _reference(
        reference, "recommendForAllUsers", 3
    )
    _assert_same_factors(ALSModel.load(path), users, items)


def test_saved_on_classic_loads_in_pysparks_connect_loader_and_back(
    spark, connect_session, saved, tmp_path
):
    """pyspark's ALSModel on Connect (the server's reader and writer) reads ours, and we read
    what it writes, on either kind of session."""
    _, users, items, path, _ = saved
    resaved = str(tmp_path / "resaved_by_pyspark_on_connect")
    with functions_for("connect"):
        theirs = SparkALSModel.load(path)
        assert theirs.rank == users[1].shape[1]
        test = connect_session.createDataFrame(
            [(int(users[0][0]), int(items[0][0]))], "user int, item int"
        )
        expected = users[1][0] @ items[1][0]
        np.testing.assert_allclose(theirs.transform(test).first().prediction, expected, rtol=1e-5)
        theirs.save(resaved)
        on_connect = ALSModel.load(resaved)
        assert spark_session.is_connect(on_connect.userFactors.sparkSession)
        _assert_same_factors(on_connect, users, items)
    _assert_same_factors(ALSModel.load(resaved), users, items)


# ---------------------------------------------------------------- pipelines and tuning
@pytest.fixture(scope="module")
def named_ratings(ratings):
    """Ratings with string ids, so that a pipeline indexes them first."""
    return ratings.select(
        F.concat(F.lit("u"), F.col("user").cast("string")).alias("user_name"),
        F.concat(F.lit("i"), F.col("item").cast("string")).alias("item_name"),
        "rating",
    ).cache()


def _pipeline() -> Pipeline:
    return Pipeline(
        stages=[
            StringIndexer(inputCol="user_name", outputCol="user"),
            StringIndexer(inputCol="item_name", outputCol="item"),
            ALS(rank=3, maxIter=2, seed=1, coldStartStrategy="drop"),
        ]
    )


def _predictions(model, frame):
    rows = model.transform(frame).select("user_name", "item_name", "prediction").collect()
    return sorted((r.user_name, r.item_name, r.prediction) for r in rows)


@pytest.fixture(scope="module")
def pipeline_saved(spark, named_ratings, tmp_path_factory):
    model = _pipeline().fit(named_ratings)
    path = str(tmp_path_factory.mktemp("pipeline") / "model")
    model.save(path)
    return model, path, _predictions(model, named_ratings)


def _stage_dir(path: str, index: int) -> str:
    import os

    stages = sorted(os.listdir(os.path.join(path, "stages")))
    return os.path.join(path, "stages", stages[index])


def test_pipeline_model_comes_back_with_our_stage_and_pysparks_loader_reads_it(
    spark, named_ratings, pipeline_saved
):
    _, path, expected = pipeline_saved
    loaded = PipelineModel.load(path)
    stage = loaded.stages[2]
    assert type(stage) is ALSModel and isinstance(stage, SparkALSModel)
    assert _predictions(loaded, named_ratings) == expected
    theirs = SparkALSModel.load(_stage_dir(path, 2))
    assert type(theirs) is SparkALSModel
    assert _predictions(PipelineModel([*loaded.stages[:2], theirs]), named_ratings) == expected


def test_pipeline_model_saved_on_classic_loads_and_saves_on_connect(
    spark, connect_session, named_ratings, pipeline_saved, tmp_path
):
    _, path, expected = pipeline_saved
    local_rows = [tuple(r) for r in named_ratings.collect()]
    resaved = str(tmp_path / "resaved_on_connect")
    with functions_for("connect"):
        frame = connect_session.createDataFrame(local_rows, named_ratings.schema)
        loaded = PipelineModel.load(path)
        assert type(loaded.stages[2]) is ALSModel
        assert spark_session.is_connect(loaded.stages[2].userFactors.sparkSession)
        assert _predictions(loaded, frame) == expected
        loaded.write().overwrite().save(resaved)
        assert type(SparkALSModel.load(_stage_dir(resaved, 2))) is SparkALSModel
        _pipeline().write().overwrite().save(str(tmp_path / "unfitted"))
        stages = Pipeline.load(str(tmp_path / "unfitted")).getStages()
        assert [type(s).__name__ for s in stages] == ["StringIndexer", "StringIndexer", "ALS"]
        assert stages[2].getRank() == 3 and isinstance(stages[2], ALS)
    back = PipelineModel.load(resaved)
    assert type(back.stages[2]) is ALSModel
    assert _predictions(back, named_ratings) == expected


def test_pipeline_fits_saves_and_loads_on_connect(connect_spark, named_ratings, tmp_path):
    frame = connect_spark.createDataFrame(
        [tuple(r) for r in named_ratings.collect()], named_ratings.schema
    )
    model = _pipeline().fit(frame)
    expected = _predictions(model, frame)
    model.save(str(tmp_path / "p"))
    loaded = PipelineModel.load(str(tmp_path / "p"))
    assert type(loaded.stages[2]) is ALSModel
    assert _predictions(loaded, frame) == expected


def _cross_validator() -> CrossValidator:
    als = ALS(maxIter=2, seed=1, coldStartStrategy="drop")
    grid = ParamGridBuilder().addGrid(als.rank, [2, 4]).build()
    evaluator = RegressionEvaluator(metricName="rmse", labelCol="rating")
    return CrossValidator(
        estimator=als, estimatorParamMaps=grid, evaluator=evaluator, numFolds=2, seed=3
    )


def _train_validation_split() -> TrainValidationSplit:
    cv = _cross_validator()
    return TrainValidationSplit(
        estimator=cv.getEstimator(),
        estimatorParamMaps=cv.getEstimatorParamMaps(),
        evaluator=cv.getEvaluator(),
        trainRatio=0.7,
        seed=2,
    )


@pytest.mark.parametrize(
    "make,model_class",
    [(_cross_validator, CrossValidatorModel), (_train_validation_split, TrainValidationSplitModel)],
    ids=["cross-validator", "train-validation-split"],
)
def test_tuning_models_round_trip_between_sessions(
    spark, connect_session, ratings, tmp_path, make, model_class
):
    model = make().fit(ratings)
    metrics = model.avgMetrics if model_class is CrossValidatorModel else model.validationMetrics
    path, resaved = str(tmp_path / "tuned"), str(tmp_path / "tuned_from_connect")
    model.save(path)
    expected = model.bestModel.transform(ratings).orderBy("user", "item").collect()

    def metrics_of(loaded):
        return loaded.avgMetrics if model_class is CrossValidatorModel else loaded.validationMetrics

    with functions_for("connect"):
        loaded = model_class.load(path)
        assert type(loaded.bestModel) is ALSModel and metrics_of(loaded) == metrics
        assert spark_session.is_connect(loaded.bestModel.userFactors.sparkSession)
        loaded.write().overwrite().save(resaved)
    back = model_class.load(resaved)
    assert type(back.bestModel) is ALSModel and metrics_of(back) == metrics
    assert back.bestModel.transform(ratings).orderBy("user", "item").collect() == expected


def test_cross_validator_and_train_validation_split_fit_on_connect(
    connect_spark, ratings, tmp_path
):
    frame = connect_spark.createDataFrame(ratings.toPandas())
    cv = _cross_validator()
    model = cv.fit(frame)
    assert type(model.bestModel) is ALSModel and len(model.avgMetrics) == 2
    model.save(str(tmp_path / "cv"))
    assert type(CrossValidatorModel.load(str(tmp_path / "cv")).bestModel) is ALSModel
    tvs_model = _train_validation_split().fit(frame)
    tvs_model.save(str(tmp_path / "tvs"))
    assert type(TrainValidationSplitModel.load(str(tmp_path / "tvs")).bestModel) is ALSModel


@pytest.mark.parametrize(
    "metadata,expected",
    [
        ({"class": "org.apache.spark.ml.recommendation.ALSModel"}, None),
        (
            {
                "class": "org.apache.spark.ml.recommendation.ALSModel",
                "pythonClass": "spark_gpu_mf.model.ALSModel",
            },
            ALSModel,
        ),
        ({"class": "pyspark.ml.feature.StringIndexerModel", "pythonClass": "x.Y"}, None),
        (
            {"class": "org.apache.spark.ml.recommendation.ALSModel", "pythonClass": "os.system"},
            None,
        ),
        (
            {
                "class": "org.apache.spark.ml.recommendation.ALSModel",
                "pythonClass": "spark_gpu_mf.als.ALS",
            },
            None,
        ),
        (
            {
                "class": "org.apache.spark.ml.recommendation.ALSModel",
                "pythonClass": "spark_gpu_mf.gone.ALSModel",
            },
            None,
        ),
    ],
    ids=["spark-saved", "ours", "other-class", "foreign-module", "not-a-model", "gone"],
)
def test_only_our_own_model_classes_are_taken_from_saved_metadata(metadata, expected):
    from spark_gpu_mf.model import _saved_model_class

    assert _saved_model_class(metadata) is expected
