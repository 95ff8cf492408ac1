"""The stratified-SGD machinery (spark_gpu_mf.sgd.stratified / cells) that MascotMF and PrunedMF
share: layout, packing, cell order, strata, and a whole DSGD run against a float64 NumPy SGD of
the same schedule."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from pyspark import cloudpickle
from pyspark.sql import functions as F

from spark_gpu_mf.sgd import cells as cells_module
from spark_gpu_mf.sgd.cells import TRAIN, VALIDATION, pack_arrays, unpack_arrays
from spark_gpu_mf.sgd.stratified import (
    StratifiedRunner,
    assign_blocks,
    build_strata,
    strata_order,
)

# The update functions below run in Spark's Python workers, which cannot import this module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

RANK = 3


# --------------------------------------------------------------------------- pure helpers


def test_assign_blocks_balances_counts_and_is_deterministic():
    rng = np.random.default_rng(0)
    ids = rng.permutation(np.arange(-500, 500)).astype(np.int32)
    counts = (rng.pareto(1.2, ids.size) * 10 + 1).astype(np.int64)
    layout = assign_blocks("user", ids, counts, 4)
    totals = [int(c.sum()) for c in layout.counts]
    assert max(totals) - min(totals) <= counts.max()
    assert sorted(np.concatenate(layout.ids).tolist()) == sorted(ids.tolist())
    for block_ids in layout.ids:
        assert np.all(np.diff(block_ids) > 0)
    again = assign_blocks("user", ids[::-1].copy(), counts[::-1].copy(), 4)
    for a, b in zip(layout.ids, again.ids):
        np.testing.assert_array_equal(a, b)
    block, row = layout.locate(np.array([ids[7], 10_000], np.int32))
    assert layout.ids[block[0]][row[0]] == ids[7]
    assert block[1] == -1 and row[1] == -1


def test_pack_round_trip_and_safety():
    arrays = {
        "half": np.arange(12, dtype=np.uint16).reshape(4, 3),
        "single": np.zeros((0, 3), np.float32),
        "flags": np.array([True, False, True]),
        "scalar": np.float64(2.5),
        "big": np.random.default_rng(1).normal(size=(5, 7)),
    }
    back = unpack_arrays(pack_arrays(arrays))
    assert sorted(back) == sorted(arrays)
    for name, value in arrays.items():
        assert back[name].dtype == np.asarray(value).dtype
        assert back[name].shape == np.shape(value)
        np.testing.assert_array_equal(back[name], value)
    back["half"][0, 0] = 99  # private, writable copies
    with pytest.raises(TypeError, match="plain dtypes"):
        pack_arrays({"bad": np.array([object()])})
    with pytest.raises(ValueError, match="magic"):
        unpack_arrays(b"pickle me")


def test_cell_order_depends_on_contents_not_arrival_order():
    rng = np.random.default_rng(2)
    users = rng.integers(0, 20, 200).astype(np.int32)
    items = rng.integers(0, 30, 200).astype(np.int32)
    ratings = rng.integers(1, 6, 200).astype(np.float32)
    order = cells_module.cell_order(users, items, ratings, 5, (0, 1, 2))
    shuffle = rng.permutation(200)
    other = cells_module.cell_order(users[shuffle], items[shuffle], ratings[shuffle], 5, (0, 1, 2))
    visit = np.stack([users[order], items[order], ratings[order]])
    visit_other = np.stack([users[shuffle][other], items[shuffle][other], ratings[shuffle][other]])
    np.testing.assert_array_equal(visit, visit_other)
    assert not np.array_equal(order, cells_module.cell_order(users, items, ratings, 6, (0, 1, 2)))


def test_strata_order_is_a_seeded_permutation():
    for b in (1, 2, 5):
        for epoch in range(4):
            order = strata_order(b, 7, epoch)
            assert sorted(order) == list(range(b))
            assert order == strata_order(b, 7, epoch)
    assert any(strata_order(6, 7, e) != strata_order(6, 8, e) for e in range(3))


# --------------------------------------------------------------------------- Spark


def _data(seed=0, n=400):
    """Ratings with negative ids, duplicates of nothing, and a held-out validation share."""
    rng = np.random.default_rng(seed)
    users = rng.choice(np.arange(-40, 40), 80, replace=False)
    items = rng.choice(np.arange(-1000, 1000, 37), 40, replace=False)
    pairs = rng.choice(80 * 40, n, replace=False)
    user = users[pairs // 40].astype(np.int32)
    item = items[pairs % 40].astype(np.int32)
    rating = rng.integers(1, 6, n).astype(np.float32)
    validation = rng.random(n) < 0.2
    return user, item, rating, validation


def _frame(spark, user, item, rating, validation, partitions=3):
    import pandas as pd

    pdf = pd.DataFrame(
        {"user": user, "item": item, "rating": rating, "is_validation": validation}
    ).astype({"user": "int32", "item": "int32", "rating": "float32"})
    return spark.createDataFrame(pdf).repartition(partitions)


def test_build_strata_covers_every_rating_once(spark):
    user, item, rating, validation = _data()
    # a validation rating of an unknown user: cold start, left out and counted
    user = np.append(user, 5000).astype(np.int32)
    item = np.append(item, item[0]).astype(np.int32)
    rating = np.append(rating, 3.0).astype(np.float32)
    validation = np.append(validation, True)
    strata = build_strata(
        spark, _frame(spark, user, item, rating, validation), num_blocks=3, seed=1,
        has_validation=True,
    )  # fmt: skip
    try:
        train = ~validation
        known = validation & np.isin(user, user[train]) & np.isin(item, item[train])
        assert not known[-1]
        assert strata.num_ratings == int(train.sum())
        assert strata.num_validation == int(known.sum())
        assert strata.num_validation_unknown == int((validation & ~known).sum())
        seen = {TRAIN: [], VALIDATION: []}
        table = strata.cells.withColumn("partition", F.spark_partition_id()).toArrow()
        assert strata.cells.rdd.getNumPartitions() == 3
        keys = set()
        for row, cell in enumerate(cells_module.cells_of_table(table)):
            ub, ib, kind = cell.user_block, cell.item_block, cell.kind
            assert table.column("partition")[row].as_py() == ub  # a user block's cells together
            assert table.column("stratum")[row].as_py() == (ib - ub) % 3
            assert (kind, ub, ib) not in keys  # one row per cell
            keys.add((kind, ub, ib))
            sizes = strata.train_sizes if kind == TRAIN else strata.validation_sizes
            assert len(cell.users) == len(cell.items) == len(cell) == sizes[ub, ib] > 0
            ids_u, ids_i = strata.users.ids[ub][cell.users], strata.items.ids[ib][cell.items]
            seen[kind] += list(zip(ids_u.tolist(), ids_i.tolist(), cell.ratings.tolist()))
        expected_train = sorted(zip(user[~validation].tolist(), item[~validation].tolist(),
                                    rating[~validation].tolist()))  # fmt: skip
        assert sorted(seen[TRAIN]) == expected_train
        assert sorted(seen[VALIDATION]) == sorted(
            zip(user[known].tolist(), item[known].tolist(), rating[known].tolist())
        )
        # counts per row are training counts
        for layout, column in ((strata.users, user), (strata.items, item)):
            for ids, counts in zip(layout.ids, layout.counts):
                for row_id, count in zip(ids.tolist(), counts.tolist()):
                    assert count == int(((column == row_id) & ~validation).sum())
    finally:
        strata.release()


# A plain float64 SGD as the per-cell update: the test's stand-in for an estimator.


def plain_sgd_update(cell, users, items, settings):
    P, Q = users["factors"], items["factors"]
    lr, reg = settings["lr"], settings["reg"]
    sse = 0.0
    for u, i, r in zip(cell.users, cell.items, cell.ratings):
        p, q = P[u].copy(), Q[i].copy()
        e = float(r) - float(p @ q)
        sse += e * e
        P[u] = p + lr * (e * q - reg * p)
        Q[i] = q + lr * (e * p - reg * q)
    np.add.at(users["visits"], cell.users, 1)  # extra per-row state travels with the factors
    return {"sse": np.array(sse), "count": np.array([len(cell), 1.0])}


def squared_error(cell, users, items, settings):
    P, Q = users["factors"], items["factors"]
    e = cell.ratings - np.einsum("nk,nk->n", P[cell.users], Q[cell.items])
    return {"sse": np.array(float(e @ e)), "count": np.array(float(len(cell)))}


def _initial(layout, seed, side):
    return [
        {
            "factors": np.random.default_rng([seed, side, b]).normal(0.5, 0.1, (n, RANK)),
            "visits": np.zeros(n, np.int64),
        }
        for b, n in enumerate(layout.num_rows)
    ]


def _reference(strata, user, item, rating, epochs, lr, reg, seed):
    """The same schedule in NumPy: cells recomputed from the raw arrays, float64 SGD."""
    b = strata.num_blocks
    users_init, items_init = _initial(strata.users, seed, 0), _initial(strata.items, seed, 1)
    P = [s["factors"].copy() for s in users_init]
    Q = [s["factors"].copy() for s in items_init]
    ub, ul = strata.users.locate(user)
    ib, il = strata.items.locate(item)
    cells = {}
    for bu in range(b):
        for bi in range(b):
            mask = (ub == bu) & (ib == bi)
            order = cells_module.cell_order(ul[mask], il[mask], rating[mask], seed, (0, bu, bi))
            cells[bu, bi] = (ul[mask][order], il[mask][order], rating[mask][order])
    sse = []
    for epoch in range(epochs):
        total = 0.0
        for stratum in strata_order(b, seed, epoch):
            for bu in range(b):
                bi = (bu + stratum) % b
                for u, i, r in zip(*cells[bu, bi]):
                    p, q = P[bu][u].copy(), Q[bi][i].copy()
                    e = float(r) - float(p @ q)
                    total += e * e
                    P[bu][u] = p + lr * (e * q - reg * p)
                    Q[bi][i] = q + lr * (e * p - reg * q)
        sse.append(total)
    return P, Q, sse


def _run(spark, frame, num_blocks, seed, epochs=3, lr=0.05, reg=0.02):
    strata = build_strata(spark, frame, num_blocks=num_blocks, seed=seed, has_validation=True)
    runner = StratifiedRunner(
        strata,
        plain_sgd_update,
        user_state=_initial(strata.users, seed, 0),
        item_state=_initial(strata.items, seed, 1),
        label="test",
    )
    runs = [runner.run_epoch(e, {"lr": lr, "reg": reg}, max_iter=epochs) for e in range(epochs)]
    return strata, runner, runs


@pytest.mark.parametrize(
    "num_blocks, shortcut", [(1, True), (3, True), (3, False)], ids=["1-rdd", "3-rdd", "3-df"]
)
def test_runner_matches_a_float64_reference_of_the_same_schedule(spark, num_blocks, shortcut):
    """Both roads of an epoch: the classic session's RDD shortcut and the DataFrame dataflow."""
    user, item, rating, validation = _data(seed=num_blocks)
    frame = _frame(spark, user, item, rating, validation)
    spark.conf.set("spark.gpumf.sgd.jvmShortcut", str(shortcut).lower())
    try:
        strata, runner, runs = _run(spark, frame, num_blocks, seed=11)
    finally:
        spark.conf.unset("spark.gpumf.sgd.jvmShortcut")
    try:
        train = ~validation
        P, Q, sse = _reference(strata, user[train], item[train], rating[train], 3, 0.05, 0.02, 11)
        for b in range(num_blocks):
            np.testing.assert_array_equal(runner.state("user")[b]["factors"], P[b])
            np.testing.assert_array_equal(runner.state("item")[b]["factors"], Q[b])
            np.testing.assert_array_equal(
                runner.state("user")[b]["visits"], 3 * strata.users.counts[b]
            )
        for run, expected in zip(runs, sse):
            assert run.statistics["count"][0] == train.sum()
            assert run.statistics["count"][1] == np.count_nonzero(strata.train_sizes)
            np.testing.assert_allclose(run.statistics["sse"], expected, rtol=1e-12)
            assert len(run.sub_epochs) == num_blocks
            assert all(0 < s.max_task_seconds <= s.sum_task_seconds for s in run.sub_epochs)
            assert run.overhead_seconds < run.seconds
        assert runs[-1].statistics["sse"] < runs[0].statistics["sse"]
        stats, seconds = runner.evaluate(squared_error)  # on the driver: few ratings
        in_spark, _ = runner.evaluate(squared_error, on_driver=False)
        assert in_spark.keys() == stats.keys()
        for name in stats:
            np.testing.assert_array_equal(in_spark[name], stats[name])
        ub, ul = strata.users.locate(user[validation])
        ib, il = strata.items.locate(item[validation])
        known = (ub >= 0) & (ib >= 0)
        prediction = np.array(
            [P[a][x] @ Q[c][y] for a, x, c, y in zip(ub[known], ul[known], ib[known], il[known])]
        )
        errors = rating[validation][known] - prediction
        np.testing.assert_allclose(stats["sse"], errors @ errors, rtol=1e-12)
        assert stats["count"] == known.sum() and seconds > 0
    finally:
        runner.close()
        strata.release()


def test_same_seed_same_factors_whatever_the_input_partitioning(spark):
    user, item, rating, validation = _data(seed=4)
    first = _frame(spark, user, item, rating, validation, partitions=2)
    shuffled = np.random.default_rng(0).permutation(len(user))
    second = _frame(
        spark, user[shuffled], item[shuffled], rating[shuffled], validation[shuffled], partitions=5
    )
    results = []
    for frame in (first, second):
        strata, runner, _ = _run(spark, frame, 2, seed=3, epochs=2)
        results.append([s["factors"] for side in ("user", "item") for s in runner.state(side)])
        runner.close()
        strata.release()
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_strata_share_no_block(spark):
    user, item, rating, validation = _data(seed=5)
    strata = build_strata(spark, _frame(spark, user, item, rating, validation), num_blocks=4,
                          seed=0, has_validation=True)  # fmt: skip
    runner = StratifiedRunner(
        strata, plain_sgd_update, user_state=_initial(strata.users, 0, 0),
        item_state=_initial(strata.items, 0, 1),
    )  # fmt: skip
    try:
        covered = set()
        for pairs in runner._strata_cells:
            assert len({u for u, _ in pairs}) == len(pairs) == len({i for _, i in pairs})
            covered |= set(pairs)
        assert covered == {tuple(p) for p in np.argwhere(strata.train_sizes > 0).tolist()}
        with pytest.raises(ValueError, match="expected 4 user blocks"):
            runner.set_state("user", runner.state("user")[:2])
    finally:
        runner.close()
        strata.release()
