"""MascotMF: the g-switching rules, the CPU kernel against a float64 reference, and the estimator
end to end on Spark (schedule, switching, determinism, the ALSModel it produces, pipelines).

The float64 reference re-derives the update from the formulas (FP32 arithmetic replaced by
float64, storage rounding applied on every store) and borrows only the definition of the
schedule from the stratified machinery (blocks, the seeded order inside a cell, the seeded order
of strata) and MascotMF's seeded initial factors, so both runs visit the same ratings in the same
order from the same start.
"""

from __future__ import annotations

import doctest
import inspect
import itertools
import math

import numpy as np
import pytest
from numba import njit
from pyspark.errors import IllegalArgumentException
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.evaluation import RegressionEvaluator
from pyspark.ml.recommendation import ALSModel as SparkALSModel
from pyspark.ml.tuning import CrossValidator, ParamGridBuilder

from spark_gpu_mf import MascotMF
from spark_gpu_mf.backends.numba_intrinsics import (
    float_to_half,
    from_half_bits,
    half_to_float,
    to_half_bits,
)
from spark_gpu_mf.model import ALSModel
from spark_gpu_mf.sgd import cells as cells_module
from spark_gpu_mf.sgd import mascot_tasks
from spark_gpu_mf.sgd.cells import Cell
from spark_gpu_mf.sgd.mascot_groups import GroupPrecision, count_groups, is_check_epoch
from spark_gpu_mf.sgd.mascot_numba import cell_sgd
from spark_gpu_mf.sgd.mascot_train import fp32_line, learning_rate
from spark_gpu_mf.sgd.stratified import assign_blocks, strata_order
from spark_gpu_mf.spark.factors import collect_factors

SMALL = {"rank": 8, "maxIter": 8, "stepSize": 0.05, "initStd": 0.1, "numBlocks": 2, "seed": 3,
         "backend": "numpy"}  # fmt: skip
# The first measurement (epoch 1) falls while updates are still aligned, so later estimates are
# about 1% of it on this data: a threshold of 0.015 switches some groups at different checks.
SWITCHING = {**SMALL, "maxIter": 10, "firstCheckEpoch": 1, "checkInterval": 2,
             "errorThreshold": 0.015, "numUserGroups": 4, "numItemGroups": 4,
             "sampleRatio": 0.5}  # fmt: skip


# --------------------------------------------------------------------------- g-switching rules


def test_groups_by_rating_count_never_split_equal_counts():
    counts = np.array([5, 1, 1, 2, 9, 2, 2, 3, 1, 7, 100, 3])
    groups = count_groups(counts, 4)  # target ceil(12 / 4) = 3 rows per group
    order = np.argsort(counts, kind="stable")
    assert np.all(np.diff(groups[order]) >= 0)  # ascending count -> ascending group
    for value in np.unique(counts):
        assert len(set(groups[counts == value].tolist())) == 1
    # 1,1,1 | 2,2,2 | 3,3,5 | 7,9,100
    assert groups.tolist() == [2, 0, 0, 1, 3, 1, 1, 2, 0, 3, 3, 2]
    assert count_groups(np.full(10, 4), 100).tolist() == [0] * 10  # fewer groups than asked
    assert count_groups(np.arange(1000), 100).max() == 99
    assert count_groups(np.zeros(0, np.int64), 3).shape == (0,)


def test_check_epochs_follow_the_authors_rule():
    checks = [e for e in range(50) if is_check_epoch(e, 5, 2, 50)]
    assert checks == list(range(5, 49, 2))  # 5, 7, ..., 47; never the last epoch
    assert [e for e in range(10) if is_check_epoch(e, 0, 3, 10)] == [0, 3, 6]


def test_switching_is_relative_to_the_first_measurement_and_permanent():
    precision = GroupPrecision.create(3, start_fp32=False)
    sums = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    squares = np.array([1.0, 4.0, 0.0])  # group 2: no sampled update, not measured
    assert precision.check(5, sums, squares, threshold=2.0).tolist() == []
    np.testing.assert_array_equal(precision.errors[5][:2], [1.0, 1.0])
    assert np.isnan(precision.errors[5][2]) and np.isnan(precision.baseline[2])
    # group 0 grows 3x (> 2): switches; group 1 grows 1.5x; group 2 gets its baseline now
    sums = np.array([[3.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    squares = np.array([3.0, 6.0, 1.0])
    assert precision.check(7, sums, squares, threshold=2.0).tolist() == [0]
    assert precision.fp32.tolist() == [True, False, False]
    assert precision.switched_at.tolist() == [7, -1, -1]
    assert precision.errors[7][2] == 1.0
    # FP32 groups are no longer measured, and never switch back
    assert precision.check(9, sums * 0, squares, threshold=2.0).tolist() == []
    assert precision.fp32.tolist() == [True, False, False]
    assert np.isnan(precision.errors[9][0])
    assert GroupPrecision.create(2, start_fp32=True).check(5, sums[:2], squares[:2], 2.0).size == 0


def _model_switching(checks, num_groups, threshold, rounding_threshold):
    """A plain-Python model of g-switching: per check ``(epoch, sums, squares, rounding)``, the
    paper's rule (``|S|^2 / N`` over its first measurement > ``threshold``) and ours (share of
    the sampled updates float16 rounding changes > ``rounding_threshold``, when > 0). Returns the
    epoch each group switched after (-1: never)."""
    switched_at = [-1] * num_groups
    baseline = [None] * num_groups
    for epoch, sums, squares, rounding in checks:
        switching = []
        for group in range(num_groups):
            if switched_at[group] >= 0:
                continue  # FP32 groups are not measured again
            if squares[group] > 0:
                raw = float(sum(x * x for x in sums[group])) / float(squares[group])
                if baseline[group] is None:
                    baseline[group] = raw
                elif baseline[group] > 0 and raw / baseline[group] > threshold:
                    switching.append(group)
            lost, step = rounding[group]
            if rounding_threshold > 0 and step > 0 and lost / step > rounding_threshold:
                switching.append(group)
        for group in switching:
            switched_at[group] = epoch
    return switched_at


def _noisy_checks(rng, num_groups, rank, epochs):
    """Check-epoch statistics of groups with 0-3 sampled updates (the ratio of small, noisy
    numbers the paper's estimate becomes on small data) and of groups with many, whose updates
    grow more aligned and whose rounding share grows, both with noise."""
    samples = rng.choice([0, 1, 2, 3, 40, 200], size=num_groups)
    checks = []
    for step, epoch in enumerate(epochs):
        sums, squares, rounding = np.zeros((num_groups, rank)), np.zeros(num_groups), []
        for group in range(num_groups):
            mean = rng.normal(0, 1, rank) * 0.05 * step
            updates = mean + rng.normal(0, 1, (samples[group], rank))
            sums[group] = updates.sum(axis=0)
            squares[group] = float((updates**2).sum())
            size = squares[group] * 1e-6
            rounding.append((size * min(1.0, 0.03 * step * rng.lognormal(0, 0.5)), size))
        checks.append((epoch, sums, squares, np.array(rounding)))
    return checks


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("rounding_threshold", [0.0, 0.1, 0.3])
def test_switching_rules_match_a_plain_model_on_noisy_statistics(seed, rounding_threshold):
    rng = np.random.default_rng(seed)
    num_groups, rank = 24, 5
    epochs = [e for e in range(30) if is_check_epoch(e, 5, 2, 30)]
    checks = _noisy_checks(rng, num_groups, rank, epochs)
    threshold = float(rng.choice([1.5, 3.0, 20.0]))
    precision = GroupPrecision.create(num_groups, start_fp32=False)
    for epoch, sums, squares, rounding in checks:
        precision.check(epoch, sums, squares, threshold, rounding, rounding_threshold)
    expected = _model_switching(checks, num_groups, threshold, rounding_threshold)
    assert precision.switched_at.tolist() == expected
    assert precision.fp32.tolist() == [e >= 0 for e in expected]
    # the recorded shares are the model's for every group still measured
    epoch, _, _, rounding = checks[0]
    measured = rounding[:, 1] > 0
    np.testing.assert_allclose(
        precision.rounding[epoch][measured], rounding[measured, 0] / rounding[measured, 1]
    )
    assert np.isnan(precision.rounding[epoch][~measured]).all()


def test_rounding_rule_switches_on_its_own_at_any_check():
    precision = GroupPrecision.create(3, start_fp32=False)
    sums, squares = np.ones((3, 2)), np.full(3, 2.0)
    rounding = np.array([[0.6, 1.0], [0.1, 1.0], [0.0, 0.0]])  # group 2: nothing sampled
    # the first check only sets the paper's baselines, but the absolute rule may switch
    assert precision.check(5, sums, squares, 20.0, rounding, 0.5).tolist() == [0]
    np.testing.assert_allclose(precision.rounding[5][:2], [0.6, 0.1])
    assert precision.check(7, sums, squares, 20.0, rounding * [[1, 1], [6, 1], [1, 1]],
                           0.5).tolist() == [1]  # fmt: skip
    assert np.isnan(precision.rounding[7][0])  # FP32 now: not measured
    # threshold 0 turns the rule off: the paper's rule alone decides
    again = GroupPrecision.create(3, start_fp32=False)
    assert again.check(5, sums, squares, 20.0, rounding, 0.0).size == 0
    assert again.check(7, sums, squares, 20.0, rounding * 10, 0.0).size == 0


def test_fp32_line_merges_epochs_with_equal_shares():
    shares = [(0, 0)] * 3 + [(0.123, 0)] * 2 + [(0.4, 0.031)]
    iterations = [
        {"iteration": n + 1, "fp32UserShare": u, "fp32ItemShare": i}
        for n, (u, i) in enumerate(shares)
    ]
    assert fp32_line(iterations) == (
        "updates on fp32 rows (user/item %) by epoch: 1-3 0/0, 4-5 12/0, 6 40/3"
    )
    assert fp32_line([]).endswith("none")


def test_learning_rate_schedule():
    assert learning_rate(0.01, 0.1, 0) == 0.01
    assert math.isclose(learning_rate(0.01, 0.1, 4), 0.01 / 1.8)
    assert learning_rate(0.01, 0.0, 30) == 0.01


# --------------------------------------------------------------------------- storage


def test_layout_dense_and_relayout_keep_values():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(9, 5)).astype(np.float32)
    group = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2], np.int32)
    before = np.array([False, True, False])
    state = mascot_tasks.layout(values, group, before)
    assert state["half"].shape == (6, 5) and state["single"].shape == (3, 5)
    stored = mascot_tasks.dense(state, before)
    np.testing.assert_array_equal(stored[group == 1], values[group == 1])
    np.testing.assert_array_equal(
        stored[group != 1], from_half_bits(to_half_bits(values))[group != 1]
    )
    after = np.array([True, True, False])
    moved = mascot_tasks.relayout(state, before, after)
    assert moved["half"].shape == (3, 5) and moved["single"].shape == (6, 5)
    np.testing.assert_array_equal(mascot_tasks.dense(moved, after), stored)  # exact widening


def test_half_bits_round_like_numpy_and_cuda():
    x = np.array([1.0, 1 + 2**-11, 1 + 3 * 2**-11, 65504.0, 65520.0, -(2.0**-25), 1e-8], np.float32)
    with np.errstate(over="ignore"):  # 65520 rounds to infinity, on purpose
        bits = to_half_bits(x)
        expected = x.astype(np.float16).astype(np.float32)
    assert bits.dtype == np.uint16
    np.testing.assert_array_equal(from_half_bits(bits), expected)
    assert from_half_bits(bits)[1] == 1.0 and from_half_bits(bits)[2] == 1 + 2**-9  # ties to even
    assert np.isinf(from_half_bits(bits)[4])


@njit
def _widen_all(bits, out):
    for j in range(bits.shape[0]):
        out[j] = half_to_float(bits[j])


@njit
def _narrow_all(values, out):
    for j in range(values.shape[0]):
        out[j] = float_to_half(values[j])


def test_numba_half_intrinsics_are_exact_conversions():
    bits = np.arange(1 << 16, dtype=np.uint16)
    widened = np.empty(bits.size, np.float32)
    _widen_all(bits, widened)
    reference = bits.view(np.float16).astype(np.float32)
    same = (widened == reference) | (np.isnan(widened) & np.isnan(reference))
    assert same.all()  # every float16 value, infinities and NaNs included
    rng = np.random.default_rng(3)
    values = np.concatenate(
        [rng.normal(0, 1, 200_000), rng.normal(0, 3e4, 1000), 2.0 ** rng.uniform(-26, -12, 10_000),
         (1 + (2 * np.arange(1000) + 1) * 2.0**-11)]  # halfway cases: ties to even
    ).astype(np.float32)  # fmt: skip
    narrowed = np.empty(values.size, np.uint16)
    _narrow_all(values, narrowed)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(narrowed, values.astype(np.float16).view(np.uint16))


# --------------------------------------------------------------------------- CPU kernel


def _reference_cell(users, items, ratings, P, Q, P32, Q32, lr, reg):
    """float64 SGD over one cell; rows stored back rounded to float32 or float16 per row."""
    sse = 0.0
    for u, i, r in zip(users, items, ratings):
        p, q = P[u].astype(np.float64), Q[i].astype(np.float64)
        e = float(r) - p @ q
        sse += e * e
        new_p = p + lr * (e * q - reg * p)
        new_q = q + lr * (e * p - reg * q)
        P[u] = new_p.astype(np.float32) if P32[u] else new_p.astype(np.float16)
        Q[i] = new_q.astype(np.float32) if Q32[i] else new_q.astype(np.float16)
    return sse


@pytest.mark.parametrize("storage", ["fp32", "fp16", "mixed"])
def test_cpu_kernel_matches_a_float64_reference(storage):
    rng = np.random.default_rng(7)
    rank, rows_u, rows_i, n = 24, 12, 9, 400
    group_u = rng.integers(0, 3, rows_u).astype(np.int32)
    group_i = rng.integers(0, 3, rows_i).astype(np.int32)
    flags = {"fp32": [True] * 3, "fp16": [False] * 3, "mixed": [True, False, False]}[storage]
    flags = np.array(flags)
    user = mascot_tasks.layout(rng.normal(0, 0.3, (rows_u, rank)), group_u, flags)
    item = mascot_tasks.layout(rng.normal(0, 0.3, (rows_i, rank)), group_i, flags)
    P, Q = mascot_tasks.dense(user, flags), mascot_tasks.dense(item, flags)
    users = rng.integers(0, rows_u, n).astype(np.int32)
    items = rng.integers(0, rows_i, n).astype(np.int32)
    ratings = rng.uniform(1, 5, n).astype(np.float32)
    sums = {k: np.zeros((3, rank)) for k in ("u", "i")}
    squares = {k: np.zeros(3) for k in ("u", "i")}
    fp32_u8 = flags.astype(np.uint8)
    sse = cell_sgd(
        users, items, ratings,
        user["half"], user["single"], user["slot"], user["group"], fp32_u8,
        item["half"], item["single"], item["slot"], item["group"], fp32_u8,
        0.03, 0.02, False, 1, 0.0, sums["u"], squares["u"], sums["i"], squares["i"],
        np.zeros((3, 2)), np.zeros((3, 2)),
    )  # fmt: skip
    ref_sse = _reference_cell(users, items, ratings, P, Q, flags[group_u], flags[group_i], 0.03,
                              0.02)  # fmt: skip
    got_p, got_q = mascot_tasks.dense(user, flags), mascot_tasks.dense(item, flags)
    assert math.isclose(sse, ref_sse, rel_tol=1e-3)
    for got, ref in ((got_p, P), (got_q, Q)):
        if storage == "fp32":
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
        else:  # one float16 step where float32 and float64 arithmetic round differently
            scale = np.abs(ref).max()
            assert np.abs(got - ref).max() <= 4 * 2.0**-11 * scale
            assert np.mean(np.abs(got - ref) <= 1e-5 * scale) > 0.8
        fp16_rows = ~flags[(group_u if got is got_p else group_i)]
        np.testing.assert_array_equal(  # stored values are exact float16 values
            got[fp16_rows], got[fp16_rows].astype(np.float16).astype(np.float32)
        )


def test_cpu_kernel_statistics_are_the_sampled_update_sums():
    rng = np.random.default_rng(8)
    rank, n = 6, 50
    flags = np.array([False, True])  # group 1 FP32: not measured
    group_u = np.array([0, 1, 0, 1], np.int32)
    group_i = np.array([0, 0, 1], np.int32)
    user = mascot_tasks.layout(rng.normal(0, 0.3, (4, rank)), group_u, flags)
    item = mascot_tasks.layout(rng.normal(0, 0.3, (3, rank)), group_i, flags)
    P, Q = mascot_tasks.dense(user, flags), mascot_tasks.dense(item, flags)
    users = rng.integers(0, 4, n).astype(np.int32)
    items = rng.integers(0, 3, n).astype(np.int32)
    ratings = rng.uniform(1, 5, n).astype(np.float32)
    sums_u, squares_u, rounding_u = np.zeros((2, rank)), np.zeros(2), np.zeros((2, 2))
    sums_i, squares_i, rounding_i = np.zeros((2, rank)), np.zeros(2), np.zeros((2, 2))
    fp32_u8 = flags.astype(np.uint8)
    cell_sgd(
        users, items, ratings,
        user["half"], user["single"], user["slot"], user["group"], fp32_u8,
        item["half"], item["single"], item["slot"], item["group"], fp32_u8,
        0.05, 0.01, True, 1, 0.2, sums_u, squares_u, sums_i, squares_i, rounding_u, rounding_i,
    )  # fmt: skip
    expected_u, expected_i = np.zeros((2, rank)), np.zeros((2, rank))
    expected_rounding_u, expected_rounding_i = np.zeros((2, 2)), np.zeros((2, 2))
    for t, (u, i, r) in enumerate(zip(users, items, ratings)):
        p, q = P[u].astype(np.float64), Q[i].astype(np.float64)
        e = float(r) - p @ q
        gp, gq = e * q - 0.01 * p, e * p - 0.01 * q
        new_p, new_q = p + 0.05 * gp, q + 0.05 * gq
        if t >= n - 10:  # the last ceil(0.2 * 50) updates
            expected_u[group_u[u]] += gp
            expected_i[group_i[i]] += gq
            for expected, group, new, g in (
                (expected_rounding_u, group_u[u], new_p, gp),
                (expected_rounding_i, group_i[i], new_q, gq),
            ):
                lost = new.astype(np.float16).astype(np.float64) - new
                expected[group] += (lost @ lost, 0.05**2 * (g @ g))
        P[u] = new_p.astype(np.float32 if flags[group_u[u]] else np.float16)
        Q[i] = new_q.astype(np.float32 if flags[group_i[i]] else np.float16)
    expected_u[1] = 0.0  # FP32 group
    expected_i[1] = 0.0
    expected_rounding_u[1] = expected_rounding_i[1] = 0.0
    np.testing.assert_allclose(sums_u, expected_u, atol=2e-3)
    np.testing.assert_allclose(sums_i, expected_i, atol=2e-3)
    assert squares_u[1] == 0 and squares_u[0] > 0 and squares_i[0] > 0 and squares_i[1] == 0
    # float16 rounding of the sampled updates: the share rounding changes, as a float64 model
    # computes it from the same old values (float32 and float64 arithmetic move a value across a
    # float16 rounding boundary only rarely, and then the squared error barely changes)
    np.testing.assert_allclose(rounding_u, expected_rounding_u, rtol=0.05)
    np.testing.assert_allclose(rounding_i, expected_rounding_i, rtol=0.05)
    assert rounding_u[0, 0] > 0 and rounding_u[0, 1] > 0


def test_overflow_raises_instead_of_leaving_infinities():
    rng = np.random.default_rng(9)
    flags = np.array([False])
    users = mascot_tasks.layout(rng.normal(0, 1.0, (2, 4)), np.zeros(2, np.int32), flags)
    items = mascot_tasks.layout(rng.normal(0, 1.0, (2, 4)), np.zeros(2, np.int32), flags)
    cell = Cell(0, 0, np.array([0, 1] * 20, np.int32), np.array([0, 1] * 20, np.int32),
                np.full(40, 5e4, np.float32))  # fmt: skip
    settings = {"lr": 1.0, "reg": 0.0, "collect": False, "sample_ratio": 0.05, "epoch": 3,
                "user_group_fp32": flags.astype(np.uint8),
                "item_group_fp32": flags.astype(np.uint8),
                "backend": "numpy"}  # fmt: skip
    with pytest.raises(FloatingPointError, match="diverged in epoch 3"):
        mascot_tasks.update_cell(cell, users, items, settings)


# --------------------------------------------------------------------------- Spark


@pytest.fixture(scope="module")
def fit(sample):
    """``fit(**params)``: a model on the sample, fitted once per distinct params."""
    frame, _ = sample
    models = {}

    def fitted(**params):
        key = tuple(sorted({**SMALL, **params}.items()))
        if key not in models:
            models[key] = MascotMF(**dict(key)).fit(frame)
        return models[key]

    return fitted


def _reference_fit(arrays, params):
    """The same DSGD schedule as a float64 NumPy run (FP32 storage: float32 stored values)."""
    user, item, rating = arrays
    b, rank = params["numBlocks"], params["rank"]
    layouts = []
    for ids in (user, item):
        unique, counts = np.unique(ids, return_counts=True)
        layouts.append(assign_blocks("", unique, counts, b))
    users_layout, items_layout = layouts
    P = [v.astype(np.float64) for v in mascot_tasks.initial_values(
        users_layout.ids, rank, params["initStd"], params["seed"], 0)]  # fmt: skip
    Q = [v.astype(np.float64) for v in mascot_tasks.initial_values(
        items_layout.ids, rank, params["initStd"], params["seed"], 1)]  # fmt: skip
    ub, ul = users_layout.locate(user)
    ib, il = items_layout.locate(item)
    cells = {}
    for bu in range(b):
        for bi in range(b):
            mask = (ub == bu) & (ib == bi)
            order = cells_module.cell_order(ul[mask], il[mask], rating[mask], params["seed"],
                                            (0, bu, bi))  # fmt: skip
            cells[bu, bi] = (ul[mask][order], il[mask][order], rating[mask][order])
    for epoch in range(params["maxIter"]):
        lr = learning_rate(params["stepSize"], 0.1, epoch)
        for stratum in strata_order(b, params["seed"], epoch):
            for bu in range(b):
                bi = (bu + stratum) % b
                for u, i, r in zip(*cells[bu, bi]):
                    p, q = P[bu][u].copy(), Q[bi][i].copy()
                    e = float(r) - p @ q
                    P[bu][u] = (p + lr * (e * q - 0.015 * p)).astype(np.float32)
                    Q[bi][i] = (q + lr * (e * p - 0.015 * q)).astype(np.float32)
    return (
        (np.concatenate(users_layout.ids), np.concatenate(P)),
        (np.concatenate(items_layout.ids), np.concatenate(Q)),
    )


def _factors(model):
    return collect_factors(model.userFactors), collect_factors(model.itemFactors)


def test_fp32_fit_is_the_float64_reference_schedule(fit, sample):
    _, arrays = sample
    params = {**SMALL, "storage": "fp32", "maxIter": 4}
    model = fit(**params)
    for (ids, got), (ref_ids, ref) in zip(_factors(model), _reference_fit(arrays, params)):
        order = np.argsort(ref_ids)
        np.testing.assert_array_equal(ids, ref_ids[order])
        np.testing.assert_allclose(got, ref[order], rtol=1e-3, atol=2e-5)


def test_switching_is_monotone_and_only_at_check_epochs(fit):
    model = fit(**SWITCHING, storage="mascot")
    summary = model.summary
    checks = [e["iteration"] for e in summary.iterations if e["checkEpoch"]]
    assert checks == [2, 4, 6, 8]  # 0-based 1, 3, 5, 7; never the last epoch
    for side in ("User", "Item"):
        counts = summary.metric(f"fp32{side}Groups")
        assert all(a <= b for a, b in itertools.pairwise(counts))
        for before, after, entry in zip(counts, counts[1:], summary.iterations[1:]):
            if after > before:
                assert entry["checkEpoch"] and entry["iteration"] > checks[0]
        groups = summary.details[f"{side.lower()}Groups"]
        switched = {g["group"]: g["switchedAfterEpoch"] for g in groups if g["fp32"]}
        assert sorted(switched) == summary.details[f"fp32{side}Groups"]
        assert all(epoch in checks[1:] for epoch in switched.values())
    assert summary.details["fp32UserGroups"] or summary.details["fp32ItemGroups"]
    assert summary.details["arithmetic"].startswith("fp32")


def test_rounding_rule_on_spark_and_the_fp32_share_of_every_epoch(fit, sample):
    paper = fit(**SWITCHING, storage="mascot").summary
    both = fit(**SWITCHING, storage="mascot", roundingThreshold=1e-4).summary
    checks = [e["iteration"] for e in both.iterations if e["checkEpoch"]]
    history = both.details["userRoundingHistory"]
    assert sorted(history) == checks  # measured at every check, the first one too
    shares = [x for x in history[checks[0]] if x is not None]
    assert shares and all(0 <= x <= 1.5 for x in shares)
    for side in ("user", "item"):
        groups = both.details[f"{side}Groups"]
        # a group that exceeds the rounding threshold switches at that very check
        for check in checks:
            rounding = both.details[f"{side}RoundingHistory"][check]
            for group, share in enumerate(rounding):
                if share is not None and share > 1e-4:
                    assert groups[group]["switchedAfterEpoch"] == check
        name = side.capitalize()
        assert len(both.details[f"fp32{name}Groups"]) >= len(paper.details[f"fp32{name}Groups"])
    # the share of an epoch's updates on FP32 rows: the ratings of the rows whose group was FP32
    # during the epoch (a group is a range of rating counts), over all ratings
    _, arrays = sample
    for summary in (paper, both):
        for side, ids in zip(("user", "item"), arrays):
            counts = np.unique(ids, return_counts=True)[1]
            for entry in summary.iterations:
                fp32_ratings = sum(
                    counts[(counts >= g["minRatings"]) & (counts <= g["maxRatings"])].sum()
                    for g in summary.details[f"{side}Groups"]
                    if g["switchedAfterEpoch"] is not None
                    and g["switchedAfterEpoch"] < entry["iteration"]
                )  # fmt: skip
                share = entry[f"fp32{side.capitalize()}Share"]
                assert math.isclose(share, fp32_ratings / len(ids), abs_tol=1e-12)
        assert summary.details["fp32PerEpoch"] == fp32_line(summary.iterations)
    assert both.metric("fp32UserShare")[-1] > 0 or both.metric("fp32ItemShare")[-1] > 0


def test_small_fits_run_in_the_driver_with_the_spark_roads_result(spark, sample):
    """The driver road (collected ratings, cells in threads) builds the same blocks and cells
    and visits them in the same order as the Spark road: identical factors and summary."""
    _, (user, item, rating) = sample
    import pandas as pd

    held_out = np.random.default_rng(1).random(len(user)) < 0.2
    frame = spark.createDataFrame(
        pd.DataFrame({"user": user, "item": item, "rating": rating, "holdout": held_out})
    )
    params = {**SWITCHING, "storage": "mascot", "roundingThreshold": 1e-4,
              "validationIndicatorCol": "holdout"}  # fmt: skip
    key = "spark.gpumf.sgd.inDriverMaxRatings"
    models = {}
    try:
        for setting in ("auto", "0"):
            spark.conf.set(key, setting)
            models[setting] = MascotMF(**params).fit(frame)
        spark.conf.set(key, str(len(user) - 1))  # one rating too many: the Spark road
        too_many = MascotMF(**{**params, "maxIter": 1}).fit(frame)
    finally:
        spark.conf.unset(key)
    driver, on_spark = models["auto"], models["0"]
    assert driver.summary.details["epochsIn"] == "driver"
    assert on_spark.summary.details["epochsIn"] == too_many.summary.details["epochsIn"] == "spark"
    for (ids_a, a), (ids_b, b) in zip(_factors(driver), _factors(on_spark)):
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_array_equal(a, b)
    for name in ("trainRmse", "validationRmse", "fp32UserShare", "fp32ItemShare"):
        assert driver.summary.metric(name) == on_spark.summary.metric(name), name
    for name in (
        "numRatings",
        "numValidation",
        "numValidationUnknown",
        "userGroups",
        "itemGroups",
        "fp32PerEpoch",
        "userRoundingHistory",
        "itemErrorHistory",
    ):
        assert driver.summary.details[name] == on_spark.summary.details[name], name  # fmt: skip


def test_mascot_without_switches_is_fp16_and_fp16_values_are_halves(fit):
    fp16 = fit(storage="fp16")
    never = fit(storage="mascot", errorThreshold=1e12, firstCheckEpoch=1)
    assert sum(never.summary.metric("fp32UserGroups")) == 0
    for (ids_a, a), (ids_b, b) in zip(_factors(fp16), _factors(never)):
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, a.astype(np.float16).astype(np.float32))
    fp32 = fit(storage="fp32")
    assert not np.array_equal(_factors(fp32)[0][1], _factors(fp16)[0][1])


def test_same_seed_and_blocks_give_identical_factors(fit, sample, spark):
    frame, _arrays = sample
    model = fit(**SWITCHING, storage="mascot")
    shuffled = frame.repartition(5, "rating")  # other partitions and row order
    again = MascotMF(**SWITCHING, storage="mascot").fit(shuffled)
    for (ids_a, a), (ids_b, b) in zip(_factors(model), _factors(again)):
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_array_equal(a, b)
    assert again.summary.metric("trainRmse") == model.summary.metric("trainRmse")


def test_validation_rmse_and_summary(spark, sample):
    _, (user, item, rating) = sample
    import pandas as pd

    held_out = np.random.default_rng(0).random(len(user)) < 0.2
    frame = spark.createDataFrame(
        pd.DataFrame({"u": user, "i": item, "r": rating, "holdout": held_out})
    )
    model = MascotMF(**SMALL, userCol="u", itemCol="i", ratingCol="r",
                     validationIndicatorCol="holdout").fit(frame)  # fmt: skip
    summary = model.summary
    assert summary.details["numRatings"] == int((~held_out).sum())
    assert summary.details["numValidation"] + summary.details["numValidationUnknown"] == int(
        held_out.sum()
    )
    validation = summary.metric("validationRmse")
    assert len(validation) == SMALL["maxIter"] and validation[-1] < validation[0]
    assert all(e["seconds"] > 0 and e["learningRate"] > 0 for e in summary.iterations)
    # the summary's last validation RMSE is the model's own held-out RMSE
    (users, P), (items, Q) = _factors(model)
    u, i = np.searchsorted(users, user), np.searchsorted(items, item)
    known = (
        held_out
        & (users[np.minimum(u, len(users) - 1)] == user)
        & (items[np.minimum(i, len(items) - 1)] == item)
    )
    prediction = np.einsum("nk,nk->n", P[u[known]], Q[i[known]])
    rmse = math.sqrt(np.mean((rating[known] - prediction) ** 2))
    assert math.isclose(validation[-1], rmse, rel_tol=1e-5)


def test_model_is_an_als_model_spark_can_load(fit, sample, spark, temp_path):
    frame, _ = sample
    model = fit(storage="fp16").copy()  # copy: the cold start setter must not leak to others
    assert isinstance(model, ALSModel) and model.rank == SMALL["rank"]
    test = spark.createDataFrame([(0, 2), (1, 3), (999, 1)], ["user", "item"])
    predictions = {(r.user, r.item): r.prediction for r in model.transform(test).collect()}
    assert math.isnan(predictions[(999, 1)]) and not math.isnan(predictions[(0, 2)])
    dropped = model.setColdStartStrategy("drop").transform(test)
    assert dropped.count() == 2
    model.setColdStartStrategy("nan")
    recs = model.recommendForAllUsers(3)
    assert recs.count() == frame.select("user").distinct().count()
    assert all(len(r.recommendations) == 3 for r in recs.collect())
    path = temp_path + "/mascot_model"
    model.save(path)
    loaded = SparkALSModel.load(path)
    assert loaded.rank == model.rank
    spark_predictions = {(r.user, r.item): r.prediction for r in loaded.transform(test).collect()}
    assert spark_predictions[(0, 2)] == predictions[(0, 2)]


def test_pipeline_and_cross_validator(spark, sample, temp_path):
    frame, _ = sample
    mascot = MascotMF(**{**SMALL, "maxIter": 3}, coldStartStrategy="drop")
    pipeline_model = Pipeline(stages=[mascot]).fit(frame)
    path = temp_path + "/pipeline"
    pipeline_model.save(path)
    assert PipelineModel.load(path).transform(frame).count() == frame.count()
    grid = ParamGridBuilder().addGrid(mascot.storage, ["fp16"]).build()
    evaluator = RegressionEvaluator(metricName="rmse", labelCol="rating")
    cv = CrossValidator(estimator=mascot, estimatorParamMaps=grid, evaluator=evaluator,
                        numFolds=2, seed=1)  # fmt: skip
    cv_model = cv.fit(frame)
    assert len(cv_model.avgMetrics) == 1 and np.isfinite(cv_model.avgMetrics[0])
    assert isinstance(cv_model.bestModel, ALSModel)


def test_params_defaults_setters_and_errors(spark, sample):
    estimator = MascotMF()
    signature = inspect.signature(MascotMF.__init__).parameters
    set_params = inspect.signature(MascotMF.setParams).parameters
    for name, parameter in signature.items():
        if name in ("self",):
            continue
        assert set_params[name].default == parameter.default, name
        if parameter.default is not None:
            assert estimator.getOrDefault(name) == parameter.default, name
        setter = getattr(estimator, "set" + name[0].upper() + name[1:])
        assert setter(estimator.getOrDefault(name) if parameter.default is not None else "v")
    assert (estimator.getRank(), estimator.getMaxIter(), estimator.getStepSize()) == (128, 50, 0.02)
    assert estimator.getStorage() == "mascot" and estimator.getErrorThreshold() == 20.0
    assert MascotMF().getSeed() == MascotMF().getSeed()  # fixed, not Python's salted hash()
    frame, _ = sample
    for param, value in [("storage", "bf16"), ("sampleRatio", 0.0), ("rank", 0),
                         ("checkInterval", 0), ("numUserGroups", 0)]:  # fmt: skip
        with pytest.raises(IllegalArgumentException, match=f"{param} given invalid value"):
            MascotMF(**{**SMALL, param: value}).fit(frame)
    with pytest.raises(IllegalArgumentException, match="must be of type boolean"):
        MascotMF(**SMALL, validationIndicatorCol="rating").fit(frame)


def test_docstring_example_runs(spark):
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(MascotMF, "MascotMF", globs={"spark": spark, "MascotMF": MascotMF}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0
