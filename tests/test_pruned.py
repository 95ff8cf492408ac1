"""PrunedMF end to end on Spark, against an independent float64 NumPy run of the same schedule.

The reference below re-derives everything the estimator does from the raw ratings: the rating
scale, LIBMF's AdaGrad SGD, the normal-fit thresholds (scipy), the joint-sparsity order and the
first-insignificant-dimension break. It borrows only the definition of the schedule from the
stratified machinery (which rows form which block, the seeded visiting order inside a cell, the
seeded order of strata) and PrunedMF's seeded initial factors, so that both runs visit the same
ratings in the same order from the same start.
"""

from __future__ import annotations

import doctest
import inspect

import numpy as np
import pytest
from pyspark.errors import IllegalArgumentException
from pyspark.ml.recommendation import ALSModel as SparkALSModel
from scipy import optimize, stats

from spark_gpu_mf.model import ALSModel
from spark_gpu_mf.pruned import PrunedMF
from spark_gpu_mf.sgd import cells as cells_module
from spark_gpu_mf.sgd.pruned_tasks import FACTORS, initial_state
from spark_gpu_mf.sgd.stratified import assign_blocks, strata_order
from spark_gpu_mf.spark.factors import collect_factors

SETTINGS = {
    "rank": 6, "maxIter": 3, "pruneStartEpoch": 1, "numBlocks": 2, "seed": 5, "backend": "numpy"
}  # fmt: skip


@pytest.fixture(scope="module")
def fit(sample):
    """``fit(**params)``: a PrunedMF model on the sample, fitted once per distinct params (each
    fit costs seconds of Spark jobs, and several tests look at the same one)."""
    frame, _ = sample
    models = {}

    def fitted(**params):
        key = tuple(sorted({**SETTINGS, **params}.items()))
        if key not in models:
            models[key] = PrunedMF(**dict(key)).fit(frame)
        return models[key]

    return fitted


# --------------------------------------------------------------------------- reference


def reference_fit(user, item, rating, *, rank, max_iter, prune_start, rate, num_blocks, seed,
                  step=0.1, reg=0.1, init_std=0.1, regrowth=False):  # fmt: skip
    """PrunedMF in float64 NumPy: (user ids, P, item ids, Q, MACs per epoch, thresholds), with
    P and Q in rating units and the thresholds in the same units. ``regrowth``: each update
    also covers the first insignificant dimension."""
    scale = float(np.std(rating.astype(np.float64)))
    scaled = (rating.astype(np.float64) / scale).astype(np.float32).astype(np.float64)
    reg = reg / scale
    layouts = []
    for ids in (user, item):
        unique, counts = np.unique(ids, return_counts=True)
        layouts.append(assign_blocks("x", unique, counts, num_blocks))
    P = [
        s[FACTORS].astype(np.float64)
        for s in initial_state(layouts[0].ids, rank, init_std, seed, 0)
    ]
    Q = [
        s[FACTORS].astype(np.float64)
        for s in initial_state(layouts[1].ids, rank, init_std, seed, 1)
    ]
    GP = [np.ones(len(p)) for p in P]
    GQ = [np.ones(len(q)) for q in Q]
    ub, ul = layouts[0].locate(user)
    ib, il = layouts[1].locate(item)
    cells = {}
    for bu in range(num_blocks):
        for bi in range(num_blocks):
            mask = (ub == bu) & (ib == bi)
            order = cells_module.cell_order(
                ul[mask], il[mask], scaled[mask].astype(np.float32), seed, (0, bu, bi)
            )
            cells[bu, bi] = (ul[mask][order], il[mask][order], scaled[mask][order])
    t_p = t_q = 0.0
    macs_per_epoch = []
    for epoch in range(max_iter):
        if epoch == prune_start:
            t_p, t_q, order = reference_plan(np.concatenate(P), np.concatenate(Q), rate)
            P = [p[:, order] for p in P]
            Q = [q[:, order] for q in Q]
        macs = 0
        for stratum in strata_order(num_blocks, seed, epoch):
            for bu in range(num_blocks):
                bi = (bu + stratum) % num_blocks
                p_block, q_block = P[bu], Q[bi]
                for u, i, r in zip(*cells[bu, bi]):
                    small = (np.abs(p_block[u]) < t_p) | (np.abs(q_block[i]) < t_q)
                    stop = int(np.argmax(small)) if small.any() else rank
                    error = r - p_block[u, :stop] @ q_block[i, :stop]
                    updated = min(stop + 1, rank) if regrowth else stop
                    p, q = p_block[u, :updated].copy(), q_block[i, :updated].copy()
                    gp, gq = -error * q + reg * p, -error * p + reg * q
                    p_block[u, :updated] = p - step / np.sqrt(GP[bu][u]) * gp
                    q_block[i, :updated] = q - step / np.sqrt(GQ[bi][i]) * gq
                    GP[bu][u] += gp @ gp / rank
                    GQ[bi][i] += gq @ gq / rank
                    macs += stop
        macs_per_epoch.append(macs)
    root = np.sqrt(scale)
    return (
        np.concatenate(layouts[0].ids), np.concatenate(P) * root,
        np.concatenate(layouts[1].ids), np.concatenate(Q) * root,
        macs_per_epoch, (t_p * root, t_q * root),
    )  # fmt: skip


def reference_plan(P, Q, rate):
    """Thresholds by scipy root finding on the fitted normal's CDF; order by joint sparsity."""
    thresholds = []
    for M in (P, Q):
        fitted = stats.norm(M.mean(), M.std())
        if rate == 0:
            thresholds.append(0.0)
            continue

        def excess_mass(t, fitted=fitted):
            return fitted.cdf(t) - fitted.cdf(-t) - rate

        hi = abs(M.mean()) + 40 * M.std()
        thresholds.append(optimize.brentq(excess_mass, 0, hi, xtol=1e-15))
    sp = (np.abs(P) < thresholds[0]).mean(axis=0)
    sq = (np.abs(Q) < thresholds[1]).mean(axis=0)
    return thresholds[0], thresholds[1], np.argsort(sp * sq, kind="stable")


def predictions(user_ids, P, item_ids, Q, thresholds=(0.0, 0.0)):
    """Every user x item prediction (rows and columns by ascending id); with thresholds, each
    dot product stops at the pair's first dimension where either factor is below its threshold."""
    P, Q = P[np.argsort(user_ids)], Q[np.argsort(item_ids)]
    products = P[:, None, :] * Q[None, :, :]
    small = (np.abs(P)[:, None, :] < thresholds[0]) | (np.abs(Q)[None, :, :] < thresholds[1])
    kept = np.cumsum(small, axis=2) == 0  # before the first insignificant dimension
    return (products * kept).sum(axis=2)


def fitted_matrix(model):
    users, P = collect_factors(model.userFactors)
    items, Q = collect_factors(model.itemFactors)
    return users, P, items, Q


# --------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize(
    "rate, truncate, regrowth, num_blocks",
    [(0.0, True, False, 2), (0.3, True, False, 2), (0.3, False, False, 2), (0.3, True, True, 2),
     (0.3, False, True, 1)],
)  # fmt: skip
def test_fit_equals_the_float64_reference_of_the_same_schedule(
    sample, fit, rate, truncate, regrowth, num_blocks
):
    """truncateFactors=True: the model's dot products are the reference's pruned predictions;
    False: the model's factors are the reference's factors. One block runs in the driver."""
    _, (user, item, rating) = sample
    model = fit(pruningRate=rate, truncateFactors=truncate, regrowth=regrowth, numBlocks=num_blocks)
    assert model.summary.details["inDriver"] == (num_blocks == 1)
    users, P, items, Q = fitted_matrix(model)
    ref_users, ref_P, ref_items, ref_Q, ref_macs, ref_thresholds = reference_fit(
        user, item, rating, rank=6, max_iter=3, prune_start=1, rate=rate,
        num_blocks=num_blocks, seed=5, regrowth=regrowth,
    )  # fmt: skip
    np.testing.assert_array_equal(users, np.sort(ref_users))
    np.testing.assert_array_equal(items, np.sort(ref_items))
    # Every threshold comparison went the same way, so the multiply-adds agree exactly.
    got_macs = [round(e["macFraction"] * 6 * len(rating)) for e in model.summary.iterations]
    assert got_macs == ref_macs
    expected = predictions(
        ref_users, ref_P, ref_items, ref_Q, ref_thresholds if truncate else (0, 0)
    )
    np.testing.assert_allclose(predictions(users, P, items, Q), expected, atol=2e-4, rtol=1e-4)
    if not truncate:
        np.testing.assert_allclose(P, ref_P[np.argsort(ref_users)], atol=1e-4)
    if rate == 0:
        assert ref_macs == [6 * len(rating)] * 3
    else:
        assert all(m < 6 * len(rating) for m in ref_macs[1:])


def test_regrowth_lengthens_the_dot_products(fit):
    """Same seed and schedule: letting the first insignificant entry learn lets rows regain
    dimensions, so the pruned epochs execute more multiply-adds than under DP-MF's rule."""
    frozen = fit(pruningRate=0.3, truncateFactors=True)
    regrown = fit(pruningRate=0.3, truncateFactors=True, regrowth=True)
    assert regrown.summary.details["regrowth"] and not frozen.summary.details["regrowth"]
    assert frozen.summary.metric("macFraction")[0] == regrown.summary.metric("macFraction")[0]
    assert regrown.summary.details["macFraction"] > frozen.summary.details["macFraction"]


def test_one_block_in_the_driver_equals_one_block_through_spark(spark, sample, fit):
    """spark.gpumf.sgd.inDriverMaxRatings=0 sends a one-block fit through Spark's jobs: the same
    cells in the same order give the same factors."""
    frame, _ = sample
    in_driver = fit(pruningRate=0.3, truncateFactors=False, numBlocks=1)
    spark.conf.set("spark.gpumf.sgd.inDriverMaxRatings", "0")
    try:
        through_spark = PrunedMF(**{**SETTINGS, "numBlocks": 1, "truncateFactors": False}).fit(
            frame
        )
    finally:
        spark.conf.unset("spark.gpumf.sgd.inDriverMaxRatings")
    assert not through_spark.summary.details["inDriver"]
    assert through_spark.summary.metric("macFraction") == in_driver.summary.metric("macFraction")
    for a, b in zip(fitted_matrix(in_driver), fitted_matrix(through_spark)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_rate_zero_is_plain_sgd_up_to_the_column_permutation(fit):
    """pruningRate=0 (thresholds fitted, columns reordered after epoch 1) gives the model of a run
    that never starts pruning: the order is the identity (all joint sparsities are 0) and the
    break never fires, so the factors are equal, not just the products P Q^T."""
    zero = fit(pruningRate=0.0, truncateFactors=True)
    never = fit(pruningRate=0.3, pruneStartEpoch=3, truncateFactors=True)
    assert zero.summary.details["pruning"]["columnOrder"] == list(range(6))
    assert "pruning" not in never.summary.details
    for a, b in zip(fitted_matrix(zero), fitted_matrix(never)):
        np.testing.assert_array_equal(a, b)


def test_summary_and_determinism(sample, fit):
    frame, _ = sample
    first = fit(pruningRate=0.3, truncateFactors=True)
    again = PrunedMF(pruningRate=0.3, **SETTINGS).fit(frame.repartition(3))
    for a, b in zip(fitted_matrix(first), fitted_matrix(again)):
        np.testing.assert_array_equal(a, b)
    summary = first.summary
    assert summary.algorithm == "pruned" and summary.totalIterations == 3
    assert summary.metric("pruned") == [False, True, True]
    fractions = summary.metric("macFraction")
    assert fractions[0] == 1.0 and all(0 < f < 1 for f in fractions[1:])
    assert all(np.isfinite(summary.metric("trainRmse")))
    assert all(s > 0 for s in summary.metric("seconds"))
    assert all(c >= 0 for c in summary.metric("computeCpuSeconds"))
    details = summary.details
    assert details["numRatings"] == 1501 and details["numBlocks"] == 2
    assert 0 < details["truncatedShareUser"] < 1 and 0 < details["truncatedShareItem"] < 1
    plan = details["pruning"]
    assert sorted(plan["columnOrder"]) == list(range(6))
    js = np.array(plan["sparsityUser"]) * np.array(plan["sparsityItem"])
    assert np.all(np.diff(js[plan["columnOrder"]]) >= 0)  # densest first
    assert first.summary.to_json()


def test_model_round_trip_through_sparks_alsmodel(sample, fit, temp_path):
    frame, _ = sample
    model = fit(pruningRate=0.3, truncateFactors=False).copy()
    model.setColdStartStrategy("drop")
    path = temp_path + "/pruned_model"
    model.save(path)
    spark_model = SparkALSModel.load(path)
    ours = ALSModel.load(path)
    assert spark_model.rank == ours.rank == 6
    test = frame.limit(50)
    expected = sorted(r.prediction for r in model.transform(test).collect())
    for loaded in (spark_model, ours):
        got = sorted(r.prediction for r in loaded.transform(test).collect())
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert model.uid == spark_model.uid


# --------------------------------------------------------------------------- params and input


def test_params_signature_defaults_and_setters():
    estimator = PrunedMF()
    expected = {
        "rank": 30, "maxIter": 20, "stepSize": 0.1, "regParam": 0.1, "initStd": 0.1,
        "optimizer": "adagrad", "pruningRate": 0.3, "pruneStartEpoch": 2,
        "truncateFactors": True, "regrowth": False, "numBlocks": 0,
        "userCol": "user", "itemCol": "item", "ratingCol": "rating",
        "predictionCol": "prediction", "coldStartStrategy": "nan", "blockSize": 4096,
        "backend": "auto",
        # Java's hashCode of the class name, as Spark's JVM estimators: the same in every process
        "seed": -1238614425,
    }  # fmt: skip
    for method in (PrunedMF.__init__, PrunedMF.setParams):
        parameters = dict(inspect.signature(method).parameters)
        parameters.pop("self")
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters.values())
        assert {name: p.default for name, p in parameters.items()} == expected
    assert {name: estimator.getOrDefault(name) for name in expected} == expected
    values = {"Rank": 8, "MaxIter": 3, "StepSize": 0.05, "RegParam": 0.2, "InitStd": 0.01,
              "Optimizer": "sgd", "PruningRate": 0.5, "PruneStartEpoch": 1, "NumBlocks": 3,
              "TruncateFactors": False, "Regrowth": True,
              "Seed": 7, "UserCol": "u", "ItemCol": "i", "RatingCol": "r", "PredictionCol": "p",
              "ColdStartStrategy": "drop", "BlockSize": 64, "Backend": "numpy"}  # fmt: skip
    for suffix, value in values.items():
        assert getattr(estimator, "set" + suffix)(value) is estimator
        assert getattr(estimator, "get" + suffix)() == value
    with pytest.raises(TypeError):
        PrunedMF(10)


@pytest.mark.parametrize(
    "param, value",
    [("pruningRate", 1.0), ("pruningRate", -0.1), ("optimizer", "adam"), ("rank", 0),
     ("stepSize", 0.0), ("pruneStartEpoch", -1)],
)  # fmt: skip
def test_invalid_params_fail_before_any_job(spark, sample, param, value):
    frame, _ = sample
    estimator = PrunedMF(**{param: value})
    with pytest.raises(IllegalArgumentException, match=f"parameter {param} given invalid value"):
        estimator.fit(frame)


def test_bad_ratings_fail_with_sparks_message(spark):
    frame = spark.createDataFrame(
        [(0, 0, 1.0), (1, 1, float("nan"))], "user int, item int, rating double"
    )
    with pytest.raises(Exception, match="Ratings MUST NOT be Null or NaN"):
        PrunedMF(**SETTINGS).fit(frame)


def test_docstring_example_runs(spark):
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(PrunedMF, "PrunedMF", globs={"spark": spark, "PrunedMF": PrunedMF}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0
