"""MascotMF and PrunedMF on a Spark Connect session: the fit runs through the DataFrame API alone
and gives the same model as the classic session's fit (which takes the RDD shortcut,
``sgd/jvm_epochs.py``) for the same data and seed.

Only ``fit``, the factor DataFrames, ``summary`` and ``transform`` are used on Connect here.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from spark_gpu_mf import MascotMF, PrunedMF
from spark_gpu_mf.spark import session as sessions
from spark_gpu_mf.spark.factors import collect_factors
from tests.conftest import functions_for

MASCOT = {"rank": 4, "maxIter": 3, "stepSize": 0.05, "initStd": 0.1, "numBlocks": 2, "seed": 7,
          "backend": "numpy", "firstCheckEpoch": 1, "checkInterval": 1, "errorThreshold": 0.02,
          "numUserGroups": 3, "numItemGroups": 3}  # fmt: skip
PRUNED = {"rank": 4, "maxIter": 3, "pruneStartEpoch": 1, "pruningRate": 0.3, "numBlocks": 2,
          "seed": 5, "backend": "numpy"}  # fmt: skip


def _fit(estimator, frames, kind):
    with functions_for(kind):
        model = estimator.fit(frames[kind])
        ids_and_factors = {side: collect_factors(getattr(model, side))
                           for side in ("userFactors", "itemFactors")}  # fmt: skip
        table = model.transform(frames[kind]).select("user", "item", "prediction").toArrow()
    order = np.lexsort((table.column("item").to_numpy(), table.column("user").to_numpy()))
    return model, ids_and_factors, table.column("prediction").to_numpy()[order]


@pytest.fixture(scope="module")
def ratings_table():
    """A few hundred ratings of a planted rank-2 model (ids with gaps and negatives)."""
    rng = np.random.default_rng(11)
    users = rng.choice(np.arange(-30, 90), 60, replace=False)
    items = rng.choice(np.arange(0, 400, 7), 40, replace=False)
    pairs = rng.choice(60 * 40, 700, replace=False)
    p, q = rng.normal(1.0, 0.4, (60, 2)), rng.normal(1.0, 0.4, (40, 2))
    score = np.einsum("nk,nk->n", p[pairs // 40], q[pairs % 40])
    rating = np.clip(np.round(score * 2 + rng.normal(0, 0.3, len(pairs))), 1, 5)
    return pa.table(
        {
            "user": pa.array(users[pairs // 40].astype(np.int32)),
            "item": pa.array(items[pairs % 40].astype(np.int32)),
            "rating": pa.array(rating.astype(np.float32)),
        }
    )


@pytest.fixture(scope="module")
def frames(spark, connect_session, ratings_table):
    """The same ratings as a classic and as a Connect DataFrame."""
    with functions_for("classic"):
        classic = spark.createDataFrame(ratings_table).repartition(3).cache()
    with functions_for("connect"):
        connect = connect_session.createDataFrame(ratings_table)
    return {"classic": classic, "connect": connect}


def _assert_same_fit(first, second):
    (model, factors, predictions), (other, other_factors, other_predictions) = first, second
    for side in ("userFactors", "itemFactors"):
        ids, values = factors[side]
        np.testing.assert_array_equal(other_factors[side][0], ids)
        np.testing.assert_array_equal(other_factors[side][1], values)
        assert len(ids) > 0 and np.abs(values).max() > 0
    assert other.rank == model.rank
    # PrunedMF's rating scale is a Spark aggregate, summed in an order that depends on the input
    # partitioning; the float32 factors do not see its last bits, the float64 RMSE does.
    np.testing.assert_allclose(
        [e["trainRmse"] for e in other.summary.iterations],
        [e["trainRmse"] for e in model.summary.iterations],
        rtol=1e-14,
    )
    np.testing.assert_array_equal(other_predictions, predictions)
    assert np.isfinite(predictions).all()


@pytest.mark.parametrize("storage", ["fp32", "fp16", "mascot"])
def test_mascot_fit_on_connect_equals_the_classic_fit(frames, storage):
    classic = _fit(MascotMF(storage=storage, **MASCOT), frames, "classic")
    connect = _fit(MascotMF(storage=storage, **MASCOT), frames, "connect")
    _assert_same_fit(classic, connect)
    for name in ("fp32UserGroups", "fp32ItemGroups", "userErrorHistory"):
        assert connect[0].summary.details[name] == classic[0].summary.details[name]


def test_pruned_fit_on_connect_equals_the_classic_fit(frames):
    classic = _fit(PrunedMF(**PRUNED), frames, "classic")
    connect = _fit(PrunedMF(**PRUNED), frames, "connect")
    _assert_same_fit(classic, connect)
    assert connect[0].summary.details["pruning"] == classic[0].summary.details["pruning"]


def test_classic_dataframe_dataflow_equals_the_shortcut(spark, frames):
    """The DataFrame road on a classic session (the shortcut turned off) gives the same model."""
    shortcut = _fit(MascotMF(storage="mascot", **MASCOT), frames, "classic")
    spark.conf.set("spark.gpumf.sgd.jvmShortcut", "false")
    try:
        dataframe = _fit(MascotMF(storage="mascot", **MASCOT), frames, "classic")
    finally:
        spark.conf.unset("spark.gpumf.sgd.jvmShortcut")
    _assert_same_fit(shortcut, dataframe)


def test_default_number_of_blocks_on_connect_is_the_task_slots(spark, connect_session):
    """Without ``spark.default.parallelism`` a Connect session counts ``range``'s partitions."""
    with functions_for("connect"):
        counted = sessions.range_partitions(connect_session)
    assert counted == spark.sparkContext.defaultParallelism == 2
