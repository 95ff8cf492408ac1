"""Warm start (``ALS.initialModel``): known ids start from the model's factors, new ones as usual.

References: a cold fit with ``maxIter=0`` gives Spark's starting factors, which the new ids must
keep; one exact iteration is checked against a float64 NumPy solve of the items from the warm
starting users, in every dataflow.
"""

from __future__ import annotations

import numpy as np
import pytest
from pyspark.errors import IllegalArgumentException

from spark_gpu_mf import ALS, ALSModel, datasets
from spark_gpu_mf.spark.factors import collect_factors, factors_dataframe
from tests.test_fold_in import reference_fold_in

PARAMS = dict(rank=4, seed=7, numUserBlocks=3, numItemBlocks=2, regParam=0.1)


@pytest.fixture(scope="module")
def days(spark):
    """Yesterday's ratings and today's: the same plus new users and items."""
    data = datasets.generate_ratings(2500, num_users=100, num_items=50, seed=3)
    yesterday = (data.user < 80) & (data.item < 40)
    return (
        datasets.to_dataframe(spark, data.take(yesterday)).cache(),
        datasets.to_dataframe(spark, data).cache(),
        data,
    )


@pytest.fixture(scope="module")
def yesterday_model(days):
    return ALS(maxIter=3, solver="cholesky", **PARAMS).fit(days[0])


def _arrays(model):
    return collect_factors(model.userFactors), collect_factors(model.itemFactors)


@pytest.mark.parametrize("dataflow", ["single task", "broadcast", "messages"], indirect=True)
def test_known_ids_start_from_the_model_and_new_ids_from_sparks_start(
    days, yesterday_model, dataflow
):
    today = days[1]
    cold = _arrays(ALS(maxIter=0, **PARAMS).fit(today))
    warm = _arrays(ALS(maxIter=0, initialModel=yesterday_model, **PARAMS).fit(today))
    for (old_ids, old), (cold_ids, cold_f), (ids, factors) in zip(
        _arrays(yesterday_model), cold, warm
    ):
        np.testing.assert_array_equal(ids, cold_ids)
        known = np.isin(ids, old_ids)
        assert known.any() and (~known).any()
        np.testing.assert_array_equal(factors[~known], cold_f[~known])
        np.testing.assert_array_equal(factors[known], old[np.searchsorted(old_ids, ids[known])])


@pytest.mark.parametrize("dataflow", ["single task", "broadcast", "messages"], indirect=True)
def test_one_warm_iteration_solves_items_from_the_warm_users(days, yesterday_model, dataflow):
    _, today, data = days
    start = ALS(maxIter=0, initialModel=yesterday_model, **PARAMS).fit(today)
    (user_ids, users), _ = _arrays(start)
    one = ALS(maxIter=1, solver="cholesky", initialModel=yesterday_model, **PARAMS).fit(today)
    item_ids, items = collect_factors(one.itemFactors)
    systems = reference_fold_in(data.item, data.user, data.rating, user_ids, users, reg=0.1)
    for row, item in enumerate(item_ids):
        np.testing.assert_allclose(items[row], np.linalg.solve(*systems[int(item)]), rtol=2e-4,
                                   atol=1e-5)  # fmt: skip


def test_a_few_warm_iterations_reach_a_long_cold_fit(days, yesterday_model):
    today = days[1]
    long = ALS(maxIter=15, solver="cholesky", **PARAMS).fit(today)
    short_cold = ALS(maxIter=2, solver="cholesky", **PARAMS).fit(today)
    short_warm = ALS(maxIter=2, solver="cholesky", initialModel=yesterday_model, **PARAMS).fit(
        today
    )

    def rmse(model):
        from pyspark.ml.evaluation import RegressionEvaluator

        return RegressionEvaluator(labelCol="rating").evaluate(model.transform(today))

    assert rmse(short_warm) < rmse(short_cold)
    assert rmse(short_warm) <= rmse(long) * 1.05


def test_initial_model_by_path_and_in_a_saved_estimator(spark, days, yesterday_model, tmp_path):
    today = days[1]
    path = str(tmp_path / "yesterday")
    yesterday_model.save(path)
    by_model = _arrays(ALS(maxIter=1, initialModel=yesterday_model, **PARAMS).fit(today))
    by_path = _arrays(ALS(maxIter=1, initialModel=path, **PARAMS).fit(today))
    estimator = ALS(maxIter=1, initialModel=yesterday_model, **PARAMS)
    estimator.save(str(tmp_path / "estimator"))
    loaded = ALS.load(str(tmp_path / "estimator"))
    assert loaded.getInitialModel() == str(tmp_path / "estimator" / "initialModel")
    by_saved = _arrays(loaded.fit(today))
    for a, b, c in zip(by_model, by_path, by_saved):
        for x, y, z in zip(a, b, c):
            np.testing.assert_array_equal(x, y)
            np.testing.assert_array_equal(x, z)


def test_rank_mismatch_fails_before_any_job(spark, days, yesterday_model):
    tracker = spark.sparkContext.statusTracker()
    before = len(tracker.getJobIdsForGroup())
    with pytest.raises(IllegalArgumentException, match="initialModel has rank 4 but this ALS"):
        ALS(rank=5, initialModel=yesterday_model).fit(days[1])
    assert len(tracker.getJobIdsForGroup()) == before
    with pytest.raises(TypeError, match="initialModel must be a path"):
        ALS(initialModel=3)


def test_warm_start_on_spark_connect(connect_spark, yesterday_model, days):
    data = days[2]
    today = datasets.to_dataframe(connect_spark, data)
    (uids, ufac), (iids, ifac) = _arrays(yesterday_model)
    initial = ALSModel._create(
        4,
        factors_dataframe(connect_spark, uids, ufac),
        factors_dataframe(connect_spark, iids, ifac),
    )
    warm = _arrays(ALS(maxIter=0, initialModel=initial, **PARAMS).fit(today))
    (ids, factors), _ = warm
    known = np.isin(ids, uids)
    np.testing.assert_array_equal(factors[known], ufac[np.searchsorted(uids, ids[known])])
