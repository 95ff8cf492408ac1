"""``ALS(indexIds=True)``: long and string ids, against the same data indexed to ints by hand.

The documented index (distinct ids sorted, numbered from 0) is reproduced here with NumPy; the
int fit of the hand-indexed data is the reference for factors, predictions, recommendations and
fold-in, which the indexed model must give under the original ids.
"""

from __future__ import annotations

import numpy as np
import pytest
from pyspark.errors import IllegalArgumentException
from pyspark.ml.recommendation import ALSModel as SparkALSModel
from pyspark.sql import functions as F
from pyspark.sql import types as T

from spark_gpu_mf import ALS, ALSModel, datasets
from tests.conftest import functions_for

PARAMS = dict(rank=4, maxIter=3, seed=5, numUserBlocks=3, numItemBlocks=2, solver="cholesky")
LONG_BASE = 9_000_000_000  # beyond Integer range


@pytest.fixture(scope="module")
def data():
    return datasets.generate_ratings(2000, num_users=90, num_items=45, seed=12)


def _originals(data):
    """Users as long ids beyond int range (order kept), items as strings (order not kept)."""
    users = LONG_BASE + data.user.astype(np.int64) * 3
    items = np.array([f"item-{(i * 7919) % 1000:04d}-{i}" for i in data.item])
    return users, items


def _by_hand(values):
    """The documented index: sorted distinct values numbered from 0."""
    keys = np.unique(values)
    return keys, np.searchsorted(keys, values).astype(np.int32)


def _frame(spark, users, items, ratings, user_type="long"):
    rows = list(zip(users.tolist(), items.tolist(), ratings.tolist()))
    return spark.createDataFrame(rows, f"user {user_type}, item string, rating float")


def _factor_dict(df):
    return {r.id: np.asarray(r.features, np.float32) for r in df.collect()}


@pytest.fixture(scope="module")
def fits(spark, data):
    users, items = _originals(data)
    user_keys, user_ints = _by_hand(users)
    item_keys, item_ints = _by_hand(items)
    original = _frame(spark, users, items, data.rating).cache()
    by_hand = datasets.to_dataframe(spark, (user_ints, item_ints, data.rating)).cache()
    ints = ALS(**PARAMS).fit(by_hand)
    return dict(original=original, users=user_keys, items=item_keys, ints=ints, data=data,
                model=ALS(indexIds=True, **PARAMS).fit(original))  # fmt: skip


@pytest.mark.parametrize("dataflow", ["single task", "broadcast", "messages"], indirect=True)
def test_long_and_string_ids_give_the_factors_of_the_hand_indexed_ints(fits, dataflow):
    model = ALS(indexIds=True, **PARAMS).fit(fits["original"])
    assert model.userFactors.schema["id"].dataType == T.LongType()
    assert model.itemFactors.schema["id"].dataType == T.StringType()
    for mine, theirs, keys in (
        (model.userFactors, fits["ints"].userFactors, fits["users"]),
        (model.itemFactors, fits["ints"].itemFactors, fits["items"]),
    ):
        mine, theirs = _factor_dict(mine), _factor_dict(theirs)
        assert sorted(mine) == sorted(keys.tolist())
        for i, key in enumerate(keys.tolist()):
            np.testing.assert_array_equal(mine[key], theirs[i])


def test_transform_and_recommendations_speak_the_original_ids(spark, fits):
    model, ints, users, items = fits["model"], fits["ints"], fits["users"], fits["items"]
    pairs = [(int(users[0]), str(items[1])), (int(users[5]), str(items[0])), (7, "unknown")]
    test = spark.createDataFrame(pairs, "user long, item string")
    got = {(r.user, r.item): r.prediction for r in model.transform(test).collect()}
    reference = ints.transform(spark.createDataFrame([(0, 1), (5, 0)], ["user", "item"]))
    expected = {(int(users[r.user]), str(items[r.item])): r.prediction for r in
                reference.collect()}  # fmt: skip
    for pair, value in expected.items():
        assert got[pair] == pytest.approx(value, rel=1e-6)
    assert np.isnan(got[(7, "unknown")])

    mine = {r.user: [(e.item, e.rating) for e in r.recommendations]
            for r in model.recommendForAllUsers(5).collect()}  # fmt: skip
    theirs = {int(users[r.user]): [(str(items[e.item]), e.rating) for e in r.recommendations]
              for r in ints.recommendForAllUsers(5).collect()}  # fmt: skip
    assert mine == theirs
    subset = spark.createDataFrame([(str(items[3]),), (str(items[3]),), ("nope",)], ["item"])
    mine = {r.item: [(e.user, e.rating) for e in r.recommendations]
            for r in model.recommendForItemSubset(subset, 3).collect()}  # fmt: skip
    theirs = {str(items[r.item]): [(int(users[e.user]), e.rating) for e in r.recommendations]
              for r in ints.recommendForAllItems(3).collect() if r.item == 3}  # fmt: skip
    assert mine == theirs


def test_saved_mapping_loads_back_and_sparks_loader_refuses_it(fits, tmp_path):
    model = fits["model"]
    path = str(tmp_path / "indexed")
    model.save(path)
    loaded = ALSModel.load(path)
    for a, b in ((loaded.userFactors, model.userFactors), (loaded.itemFactors,
                                                           model.itemFactors)):  # fmt: skip
        mine, theirs = _factor_dict(a), _factor_dict(b)
        assert mine.keys() == theirs.keys()
        assert all(np.array_equal(mine[k], theirs[k]) for k in mine)
    with functions_for("classic"):
        with pytest.raises(Exception, match="Expected class name org.apache.spark.ml."
                                            "recommendation.ALSModel but found class name "
                                            "spark_gpu_mf.model.ALSModel"):  # fmt: skip
            SparkALSModel.load(path)


def test_ids_spark_refuses_still_fail_by_default_and_bad_types_are_named(spark, fits):
    original = fits["original"]
    with pytest.raises(IllegalArgumentException, match="must be of type numeric"):
        ALS(**PARAMS).fit(original)
    doubles = original.withColumn("user", F.col("user").cast("double"))
    with pytest.raises(IllegalArgumentException, match="With indexIds=True, column user must"):
        ALS(indexIds=True, **PARAMS).fit(doubles)
    nulls = original.withColumn("item", F.when(F.col("rating") > 4, None).otherwise(F.col("item")))
    with pytest.raises(Exception, match="item Ids MUST NOT be Null"):
        ALS(indexIds=True, **PARAMS).fit(nulls)


def test_fold_in_and_warm_start_with_original_ids(spark, fits):
    model, ints, users, items = fits["model"], fits["ints"], fits["users"], fits["items"]
    data = fits["data"]
    # A new user (a long id the model lacks) and a known one, both rating known items.
    new_user = int(users.max()) + 1
    rows = [(new_user, str(items[0]), 4.0), (new_user, str(items[2]), 2.0),
            (int(users[1]), str(items[0]), 5.0), (new_user, "unknown item", 1.0)]  # fmt: skip
    folded = model.foldInUsers(spark.createDataFrame(rows, "user long, item string, rating "
                                                           "float"))  # fmt: skip
    reference = ints.foldInUsers(spark.createDataFrame(
        [(len(users), 0, 4.0), (len(users), 2, 2.0), (1, 0, 5.0)], ["user", "item", "rating"]
    ))  # fmt: skip
    mine, theirs = _factor_dict(folded.userFactors), _factor_dict(reference.userFactors)
    assert len(mine) == len(users) + 1
    np.testing.assert_array_equal(mine[new_user], theirs[len(users)])
    np.testing.assert_array_equal(mine[int(users[1])], theirs[1])
    recs = folded.recommendForUserSubset(spark.createDataFrame([(new_user,)], "user long"), 2)
    assert [r.user for r in recs.collect()] == [new_user]

    # Warm start from the indexed model: known ids start from its factors.
    start = ALS(indexIds=True, initialModel=model, **{**PARAMS, "maxIter": 0}).fit(
        fits["original"]
    )
    assert _factor_dict(start.userFactors).keys() == _factor_dict(model.userFactors).keys()
    for a, b in ((start.userFactors, model.userFactors), (start.itemFactors, model.itemFactors)):
        mine, theirs = _factor_dict(a), _factor_dict(b)
        assert all(np.array_equal(mine[k], theirs[k]) for k in mine)
    with pytest.raises(IllegalArgumentException, match="initialModel has user ids of type bigint"):
        ALS(initialModel=model, **PARAMS).fit(
            datasets.to_dataframe(spark, (data.user, data.item, data.rating))
        )


def test_string_ids_on_spark_connect(connect_spark, fits):
    data = fits["data"]
    users, items = _originals(data)
    original = _frame(connect_spark, users.astype(str), items, data.rating, user_type="string")
    model = ALS(indexIds=True, **PARAMS).fit(original)
    mine = {r.user: [e.item for e in r.recommendations]
            for r in model.recommendForAllUsers(3).collect()}  # fmt: skip
    assert mine.keys() == {str(k) for k in fits["users"]}
    assert all(len(v) == 3 and set(v) <= set(fits["items"].tolist()) for v in mine.values())
    assert model.userFactors.schema["id"].dataType == T.StringType()
