"""ALS and ALSModel expose Spark's params with Spark's names, defaults, accessors and errors."""

from __future__ import annotations

import inspect

import pytest
from pyspark import StorageLevel
from pyspark.errors import IllegalArgumentException
from pyspark.ml.recommendation import ALS as SparkALS
from pyspark.ml.recommendation import ALSModel as SparkALSModel

from spark_gpu_mf import ALS, ALSModel

OUR_PARAMS = {
    "solver": "auto",
    "cgIterations": 5,
    "precision": "fp32",
    "backend": "auto",
    "indexIds": False,
}
# Ours without a default (like pyspark's optional params): unset means "not used".
OUR_UNSET_PARAMS = {"initialModel"}


def _defaults(instance):
    return {p.name: instance.getOrDefault(p) for p in instance.params if instance.hasDefault(p)}


def test_every_spark_param_exists_with_the_same_default_and_doc(spark):
    ours, spark = ALS(), SparkALS()
    spark_defaults = _defaults(spark)
    our_defaults = _defaults(ours)
    for name, value in spark_defaults.items():
        assert our_defaults[name] == value, name
        assert ours.getParam(name).doc == spark.getParam(name).doc, name
    assert {p.name for p in spark.params} | set(OUR_PARAMS) | OUR_UNSET_PARAMS == {
        p.name for p in ours.params
    }
    assert not any(ours.isDefined(name) for name in OUR_UNSET_PARAMS)
    assert {k: our_defaults[k] for k in OUR_PARAMS} == OUR_PARAMS


def test_constructor_and_setParams_signatures_match_the_defaults(spark):
    ours = ALS()
    spark_signature = inspect.signature(SparkALS.__init__).parameters
    for method in (ALS.__init__, ALS.setParams):
        parameters = inspect.signature(method).parameters
        for name, parameter in parameters.items():
            if name == "self":
                continue
            assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, name
            if name == "seed" or name in OUR_UNSET_PARAMS:
                assert parameter.default is None
                continue
            assert parameter.default == ours.getOrDefault(name), (method.__name__, name)
            if name in spark_signature:
                assert parameter.default == spark_signature[name].default, name
    with pytest.raises(TypeError):
        ALS(10)  # keyword-only, like Spark's


def test_every_spark_setter_and_getter_exists_and_round_trips(spark):
    ours = ALS()
    for name in dir(SparkALS):
        if name.startswith(("set", "get")) and callable(getattr(SparkALS, name)):
            assert hasattr(ours, name), name
    values = {
        "Rank": 7,
        "MaxIter": 3,
        "RegParam": 0.5,
        "NumUserBlocks": 3,
        "NumItemBlocks": 4,
        "ImplicitPrefs": True,
        "Alpha": 2.0,
        "UserCol": "u",
        "ItemCol": "i",
        "RatingCol": "r",
        "Nonnegative": True,
        "IntermediateStorageLevel": "MEMORY_ONLY",
        "FinalStorageLevel": "DISK_ONLY",
        "ColdStartStrategy": "drop",
        "PredictionCol": "p",
        "CheckpointInterval": 5,
        "Seed": 42,
        "BlockSize": 128,
        "Solver": "cholesky",
        "CgIterations": 5,
        "Precision": "fp16",
        "Backend": "numpy",
    }
    for suffix, value in values.items():
        assert getattr(ours, "set" + suffix)(value) is ours
        assert getattr(ours, "get" + suffix)() == value
    ours.setNumBlocks(6)
    assert (ours.getNumUserBlocks(), ours.getNumItemBlocks()) == (6, 6)
    # Like Spark's, the constructor has no predictionCol keyword.
    kwargs = {
        name[0].lower() + name[1:]: v for name, v in values.items() if name != "PredictionCol"
    }

    def named(instance):
        return {p.name: v for p, v in instance.extractParamMap().items()}

    expected = named(ours) | {"numUserBlocks": 3, "numItemBlocks": 4, "predictionCol": "prediction"}
    assert named(ALS(**kwargs)) == named(ALS().setParams(**kwargs)) == expected


def test_type_conversion_errors_match_spark_at_set_time(spark):
    for cls in (ALS, SparkALS):
        with pytest.raises(TypeError, match='Invalid param value given for param "rank"'):
            cls(rank=1.5)


def test_model_params_and_defaults_match_sparks_fitted_model(spark):
    df = spark.createDataFrame([(0, 0, 1.0), (1, 1, 2.0)], ["user", "item", "rating"])
    spark_model = SparkALS(maxIter=1, rank=2).fit(df)
    assert {p.name for p in ALSModel().params} == {p.name for p in spark_model.params}
    assert _defaults(ALSModel()) == _defaults(spark_model)
    ours = ALS(maxIter=1, rank=2).fit(df)
    assert _defaults(ours) == _defaults(spark_model)
    for name in dir(SparkALSModel):
        if name.startswith(("set", "get", "recommendFor")):
            assert hasattr(ours, name), name


INVALID = [
    ("rank", 0),
    ("maxIter", -1),
    ("regParam", -1.0),
    ("numUserBlocks", 0),
    ("numItemBlocks", 0),
    ("alpha", -0.5),
    ("checkpointInterval", 0),
    ("intermediateStorageLevel", "NONE"),
    ("intermediateStorageLevel", "BOGUS"),
    ("finalStorageLevel", "BOGUS"),
    ("intermediateStorageLevel", "MEMORY_AND_DISK_DESER"),  # pyspark's name, not the JVM's
    ("finalStorageLevel", "memory_only"),
    ("coldStartStrategy", "foo"),
    ("blockSize", 0),
]


@pytest.mark.parametrize("name,value", INVALID)
def test_invalid_values_fail_fit_with_sparks_message(spark, name, value):
    df = spark.createDataFrame([(0, 0, 1.0), (1, 1, 2.0)], ["user", "item", "rating"])
    messages = []
    for cls in (SparkALS, ALS):
        estimator = cls(**{name: value})
        with pytest.raises(IllegalArgumentException) as caught:
            estimator.fit(df)
        messages.append(str(caught.value).splitlines()[0].replace(estimator.uid, "<uid>"))
    assert messages[0] == messages[1]
    assert messages[1] == f"<uid> parameter {name} given invalid value {value}."


@pytest.mark.parametrize(
    "name,value", [("solver", "lu"), ("cgIterations", 0), ("precision", "fp8"), ("backend", "tpu")]
)
def test_invalid_values_of_our_params_fail_fit_like_sparks(spark, name, value):
    df = spark.createDataFrame([(0, 0, 1.0)], ["user", "item", "rating"])
    als = ALS(**{name: value})
    with pytest.raises(IllegalArgumentException, match=f"{als.uid} parameter {name} given invalid"):
        als.fit(df)


def test_cold_start_strategy_is_case_insensitive_like_spark(spark):
    df = spark.createDataFrame([(0, 0, 1.0), (1, 1, 2.0)], ["user", "item", "rating"])
    model = ALS(coldStartStrategy="DROP", maxIter=1, rank=2).fit(df)
    test = spark.createDataFrame([(0, 0), (5, 0)], ["user", "item"])
    assert [r.user for r in model.transform(test).collect()] == [0]


SPARK_LEVEL_NAMES = ["MEMORY_AND_DISK", "MEMORY_ONLY_SER_2"]  # the default; a JVM-only name


def _sparks_cached_level(spark, rdd_name):
    """Level of Spark's most recently persisted RDD called ``rdd_name``, as pyspark's type."""
    persistent = spark.sparkContext._jsc.getPersistentRDDs()
    ids = sorted(int(i) for i in persistent.keySet() if persistent.get(i).name() == rdd_name)
    level = persistent.get(ids[-1]).getStorageLevel()
    return StorageLevel(
        level.useDisk(),
        level.useMemory(),
        level.useOffHeap(),
        level.deserialized(),
        level.replication(),
    )


@pytest.mark.parametrize("name", SPARK_LEVEL_NAMES)
def test_factors_are_cached_at_the_level_spark_caches_them(spark, name):
    """Spark reads the names with the JVM's StorageLevel.fromString (the *_SER names exist,
    MEMORY_AND_DISK is deserialized), not with pyspark's table."""
    # Data of its own per level: Spark reuses a cache entry for the same plan, whatever the level.
    first = float(SPARK_LEVEL_NAMES.index(name))
    rows = [(0, 0, first), (1, 1, 2.0), (0, 1, 3.0)]
    df = spark.createDataFrame(rows, ["user", "item", "rating"])
    levels = {"intermediateStorageLevel": name, "finalStorageLevel": name}
    theirs = SparkALS(maxIter=1, rank=2, **levels).fit(df)  # held: the JVM keeps RDDs weakly
    ours = ALS(maxIter=1, rank=2, **levels).fit(df)
    for side in ("userFactors", "itemFactors"):
        assert getattr(ours, side).storageLevel == _sparks_cached_level(spark, side), (name, side)
    assert theirs.rank == ours.rank
