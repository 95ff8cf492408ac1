"""Fold-in (``ALSModel.foldInUsers`` / ``foldInItems``) against a float64 NumPy solve.

The reference builds each row's normal equations from their definition (Spark's ALS-WR and
implicit formulas, written out here in float64) and solves them with ``numpy.linalg.solve``;
nonnegative solves are checked by the optimality (KKT) conditions of the constrained problem.
"""

from __future__ import annotations

import numpy as np
import pytest
from pyspark.errors import IllegalArgumentException
from pyspark.ml.recommendation import ALSModel as SparkALSModel

from spark_gpu_mf import ALS, ALSModel, datasets
from spark_gpu_mf.backends import numpy_backend
from spark_gpu_mf.backends.solve_config import SolveConfig
from spark_gpu_mf.executor.fold_in import exact, fold_in_inputs
from spark_gpu_mf.spark.factors import collect_factors, factors_dataframe
from tests.conftest import functions_for


def reference_fold_in(keys, others, ratings, fixed_ids, fixed, *, reg, implicit=False, alpha=1.0):
    """``{key: (A, b)}`` in float64, straight from the formulas (unknown others left out)."""
    row_of = {int(i): r for r, i in enumerate(fixed_ids)}
    Y = fixed.astype(np.float64)
    rank = Y.shape[1]
    systems = {}
    for key in np.unique(keys):
        mine = [(row_of[int(o)], float(r)) for k, o, r in zip(keys, others, ratings)
                if k == key and int(o) in row_of]  # fmt: skip
        if not mine:
            continue
        A, b, n = np.zeros((rank, rank)), np.zeros(rank), 0
        if implicit:
            A += Y.T @ Y
        for row, r in mine:
            q = Y[row]
            if implicit:
                c1 = alpha * abs(r)
                A += c1 * np.outer(q, q)
                if r > 0:
                    b += (1 + c1) * q
                    n += 1
            else:
                A += np.outer(q, q)
                b += r * q
                n += 1
        systems[int(key)] = (A + reg * n * np.eye(rank), b)
    return systems


def _problem(seed, rank=6, n_keys=25, n_fixed=40, n_ratings=300):
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, n_keys, n_ratings).astype(np.int32) * 7 - 30
    others = rng.integers(0, n_fixed + 5, n_ratings).astype(np.int32)  # 5 unknown others
    ratings = rng.normal(3.0, 1.5, n_ratings).astype(np.float32)
    fixed_ids = rng.permutation(n_fixed).astype(np.int32)
    fixed = rng.normal(0.0, 0.5, (n_fixed, rank)).astype(np.float32)
    return keys, others, ratings, fixed_ids, fixed


def _kkt(A, b, x, tol):
    """x >= 0, gradient >= 0 where x == 0 and == 0 where x > 0 (min x'Ax/2 - b'x, x >= 0)."""
    g = A @ x - b
    scale = max(1.0, float(np.abs(b).max()))
    assert np.all(x >= 0)
    assert np.all(g[x <= 1e-7] >= -tol * scale)
    assert np.all(np.abs(g[x > 1e-7]) <= tol * scale)


@pytest.mark.parametrize("implicit", [False, True])
def test_fold_in_solves_the_normal_equations_exactly(implicit):
    keys, others, ratings, fixed_ids, fixed = _problem(1)
    config = exact(SolveConfig(rank=6, reg_param=0.3, implicit=implicit, alpha=2.0, solver="cg"))
    block, src = fold_in_inputs(keys, others, ratings, fixed_ids, fixed)
    yty = numpy_backend.gram(fixed) if implicit else None
    x = numpy_backend.update_block(
        block.indptr, block.indices, block.ratings, src, None, config, yty
    )
    systems = reference_fold_in(
        keys, others, ratings, fixed_ids, fixed, reg=0.3, implicit=implicit, alpha=2.0
    )
    assert sorted(systems) == block.ids.tolist()
    for row, key in enumerate(block.ids):
        expected = np.linalg.solve(*systems[int(key)])
        np.testing.assert_allclose(x[row], expected, rtol=1e-5, atol=1e-6)


def test_nonnegative_fold_in_meets_the_optimality_conditions():
    keys, others, ratings, fixed_ids, fixed = _problem(2)
    ratings = ratings - 3.0  # negative targets, so the constraint binds for some factors
    config = exact(SolveConfig(rank=6, reg_param=0.2, nonnegative=True))
    block, src = fold_in_inputs(keys, others, ratings, fixed_ids, fixed)
    x = numpy_backend.update_block(
        block.indptr, block.indices, block.ratings, src, None, config, None
    )
    systems = reference_fold_in(keys, others, ratings, fixed_ids, fixed, reg=0.2)
    assert (x == 0).any() and (x > 0).any()
    for row, key in enumerate(block.ids):
        _kkt(*systems[int(key)], x[row].astype(np.float64), tol=1e-4)


# ----------------------------------------------------------------------------- on Spark


@pytest.fixture(scope="module")
def split(spark):
    """A model fitted without a tenth of the users, and those users' ratings."""
    data = datasets.generate_ratings(3000, num_users=120, num_items=60, seed=8)
    users = np.unique(data.user)
    held = np.isin(data.user, users[::10])
    train = datasets.to_dataframe(spark, data.take(~held)).cache()
    model = ALS(rank=5, maxIter=4, seed=2, regParam=0.15, numUserBlocks=3, numItemBlocks=2).fit(
        train
    )
    return model, data.take(held), collect_factors(model.userFactors), data.take(~held)


def _on(any_spark, model: ALSModel) -> ALSModel:
    """``model``'s factors as a model on ``any_spark`` (classic or Connect)."""
    users, items = collect_factors(model.userFactors), collect_factors(model.itemFactors)
    on = ALSModel._create(
        model.rank,
        factors_dataframe(any_spark, *users),
        factors_dataframe(any_spark, *items),
        training=model._training,
    )
    return model._copyValues(on)


def test_fold_in_users_adds_numpy_solved_users_and_keeps_the_rest(any_spark, split):
    model, held, (user_ids, user_factors), _ = split
    on = _on(any_spark, model)
    item_ids, item_factors = collect_factors(on.itemFactors)
    ratings = any_spark.createDataFrame(
        list(zip(held.user.tolist(), held.item.tolist(), held.rating.tolist())),
        ["user", "item", "rating"],
    )
    folded = on.foldInUsers(ratings)
    ids, factors = collect_factors(folded.userFactors)
    new = np.unique(held.user)
    assert sorted(ids.tolist()) == sorted(set(user_ids.tolist()) | set(new.tolist()))
    row = {int(i): r for r, i in enumerate(ids)}
    for i, u in enumerate(user_ids):  # the model's users are untouched
        np.testing.assert_array_equal(factors[row[int(u)]], user_factors[i])
    systems = reference_fold_in(
        held.user, held.item, held.rating, item_ids, item_factors, reg=0.15
    )
    assert sorted(systems) == sorted(new.tolist())
    for user, (A, b) in systems.items():
        np.testing.assert_allclose(factors[row[user]], np.linalg.solve(A, b), rtol=1e-5,
                                   atol=1e-6)  # fmt: skip
    np.testing.assert_array_equal(collect_factors(folded.itemFactors)[1], item_factors)
    # Right away usable: recommendations for the new users, in Spark's shape.
    subset = any_spark.createDataFrame([(int(u),) for u in new[:3]], ["user"])
    recs = {r.user: r.recommendations for r in folded.recommendForUserSubset(subset, 4).collect()}
    assert sorted(recs) == sorted(int(u) for u in new[:3])
    for user, entries in recs.items():
        scores = item_factors @ factors[row[user]]
        best = np.sort(scores)[::-1][:4]
        np.testing.assert_allclose([e.rating for e in entries], best, rtol=1e-5)


def test_fold_in_refreshes_known_items_and_honours_implicit_and_nonnegative(spark, split):
    model, held, (user_ids, user_factors), train = split
    # Some items' training ratings (known users) plus the held-out users' ratings of them,
    # which the model cannot use: those users have no factors.
    items = np.unique(train.item)[::7]
    mine = np.concatenate([np.flatnonzero(np.isin(d.item, items)) for d in (train,)])
    chosen = train.take(mine)
    extra = held.take(np.isin(held.item, items))
    users = np.concatenate([chosen.user, extra.user])
    item_col = np.concatenate([chosen.item, extra.item])
    values = np.concatenate([chosen.rating, extra.rating]) - 3.0
    ratings = spark.createDataFrame(
        list(zip(users.tolist(), item_col.tolist(), values.tolist())), ["user", "item", "rating"]
    )
    folded = model.foldInItems(ratings, implicitPrefs=True, alpha=3.0, nonnegative=True)
    ids, factors = collect_factors(folded.itemFactors)
    systems = reference_fold_in(
        item_col, users, values, user_ids, user_factors, reg=0.15, implicit=True, alpha=3.0
    )
    row = {int(i): r for r, i in enumerate(ids)}
    assert len(extra) and sorted(systems) == sorted(items.tolist())
    for item, (A, b) in systems.items():
        _kkt(A, b, factors[row[item]].astype(np.float64), tol=1e-4)
    untouched = [i for i in collect_factors(model.itemFactors)[0] if int(i) not in systems]
    before = dict(zip(*[a.tolist() for a in collect_factors(model.itemFactors)]))
    for item in untouched:
        np.testing.assert_array_equal(factors[row[int(item)]], before[int(item)])


def test_fold_in_on_a_model_spark_saved_needs_the_fit_settings(spark, split, tmp_path):
    model, held, _, _ = split
    path = str(tmp_path / "model")
    model.save(path)
    with functions_for("classic"):
        SparkALSModel.load(path).save(path + "-spark")  # saved by Spark itself
    loaded = ALSModel.load(path + "-spark")
    ratings = spark.createDataFrame(
        list(zip(held.user.tolist(), held.item.tolist(), held.rating.tolist())),
        ["user", "item", "rating"],
    )
    with pytest.raises(IllegalArgumentException, match="Fold-in needs the fit's regParam"):
        loaded.foldInUsers(ratings)
    again = loaded.foldInUsers(ratings, regParam=0.15, implicitPrefs=False, alpha=1.0,
                               nonnegative=False)  # fmt: skip
    np.testing.assert_array_equal(
        collect_factors(again.userFactors)[1], collect_factors(model.foldInUsers(ratings)
                                                               .userFactors)[1]
    )  # fmt: skip


def test_fold_in_settings_survive_our_save(split, tmp_path):
    model = split[0]
    path = str(tmp_path / "ours")
    model.save(path)
    assert ALSModel.load(path)._training == model._training
    assert model._training["regParam"] == 0.15
