"""The two dataflows keep their promises about what crosses the network."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from spark_gpu_mf import ALS, datasets
from spark_gpu_mf.spark import als_train
from tests.conftest import DATAFLOW_CONFS, dataflow_confs, functions_for


def test_half_iterations_shuffle_only_the_messages(spark, monkeypatch):
    """Spark must reuse the cached blocks' partitioning: the only exchange of a half-iteration is
    our explicit repartition of the messages, never one Spark adds to satisfy the cogroup."""
    plans = []
    original = als_train._Exchange.solve

    def spy(self, side, iteration):
        original(self, side, iteration)
        plans.append(self.outbox[side]._jdf.queryExecution().executedPlan().toString())

    monkeypatch.setattr(als_train._Exchange, "solve", spy)
    with dataflow_confs(spark, "messages"):
        model = ALS(rank=4, maxIter=2, numUserBlocks=3, numItemBlocks=5).fit(
            datasets.generate_dataframe(spark, 4000, seed=3)
        )
    assert model.summary.details["dataflow"] == "messages"
    assert len(plans) == 4
    for plan in plans:
        assert "ENSURE_REQUIREMENTS" not in plan
        assert "REPARTITION_BY_NUM" in plan


@pytest.mark.parametrize("keep_adaptive", [False, True], ids=["default", "adaptiveExecution"])
def test_the_distributed_fit_runs_without_aqe_and_restores_the_session(
    spark, monkeypatch, keep_adaptive
):
    """AQE is off while the exchange plans its half-iterations (unless
    ``spark.gpumf.als.adaptiveExecution`` keeps it), and the session's own setting is back
    afterwards, whether it was set or not."""
    key = "spark.sql.adaptive.enabled"
    seen = []
    original = als_train._Exchange.solve

    def spy(self, side, iteration):
        original(self, side, iteration)
        plan = self.outbox[side]._jdf.queryExecution().executedPlan().toString()
        seen.append((spark.conf.get(key), plan.startswith("AdaptiveSparkPlan")))

    monkeypatch.setattr(als_train._Exchange, "solve", spy)
    ratings = datasets.generate_dataframe(spark, 2000, seed=3)
    spark.conf.set("spark.gpumf.als.adaptiveExecution", str(keep_adaptive).lower())
    try:
        for before in ("true", None):
            if before is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, before)
            unset_value = spark.conf.get(key, None)
            with dataflow_confs(spark, "messages"):
                ALS(rank=3, maxIter=1, numUserBlocks=2, numItemBlocks=2).fit(ratings)
            assert spark.conf.get(key, None) == (before if before is not None else unset_value)
    finally:
        spark.conf.unset("spark.gpumf.als.adaptiveExecution")
        spark.conf.unset(key)
    assert len(seen) == 4
    assert all(s == (str(keep_adaptive).lower(), keep_adaptive) for s in seen), seen


def test_each_iterations_query_plan_graph_stays_the_same_size(spark):
    """Spark's SQL listener keeps a plan graph per query: the exchange's per-iteration query must
    not reach back through earlier iterations (it once grew 2.6x per iteration and filled the
    driver's heap after ~12 iterations)."""
    store = spark._jsparkSession.sharedState().statusStore()
    ratings = datasets.generate_dataframe(spark, 3000, seed=4).cache()
    ratings.count()
    before = store.executionsList().size()
    with dataflow_confs(spark, "messages"):
        ALS(rank=3, maxIter=7, numUserBlocks=3, numItemBlocks=3, seed=2).fit(ratings)
    executions = store.executionsList()
    sizes = {}
    for index in range(before, executions.size()):
        execution = executions.apply(index)
        description = execution.description() or ""
        if "ALS: iteration " in description:
            iteration = int(description.split("iteration ")[1].split("/")[0])
            sizes[iteration] = store.planGraph(execution.executionId()).allNodes().size()
    assert sorted(sizes) == list(range(1, 8)), sizes
    assert len(set(sizes[i] for i in range(2, 8))) == 1, sizes


@pytest.mark.parametrize("name", ["broadcast", "messages"])
def test_every_iteration_costs_the_same_tasks(spark, name):
    """Each iteration reads the last one's cached outboxes and nothing older: the tasks Spark
    runs grow linearly with the iterations (a lost cache or a plan that re-reads the history
    would recompute earlier solves, and the growth would not be linear)."""
    ratings = datasets.generate_dataframe(spark, 4000, seed=3).cache()
    ratings.count()
    tracker = spark.sparkContext.statusTracker()
    tasks = {}
    with dataflow_confs(spark, name):
        for iterations in (1, 2, 3):
            before = set(tracker.getJobIdsForGroup())
            ALS(rank=4, maxIter=iterations, numUserBlocks=4, numItemBlocks=4).fit(ratings)
            stages = [
                tracker.getStageInfo(s)
                for job in set(tracker.getJobIdsForGroup()) - before
                for s in tracker.getJobInfo(job).stageIds
            ]
            tasks[iterations] = sum(s.numCompletedTasks for s in stages if s is not None)
    assert tasks[3] - tasks[2] == tasks[2] - tasks[1] > 0


def test_a_built_cache_gives_its_row_count_without_a_job(spark):
    """``cached_row_count``: the rows of a fully built cache (and of a projection of it), and
    None where Spark has not counted them (no cache, a cache not built yet, a filter)."""
    from spark_gpu_mf.spark import session
    from spark_gpu_mf.validation import validated_ratings

    def frame():
        return spark.range(1000).selectExpr(
            "cast(id % 17 as int) u", "cast(id % 5 as int) i", "cast(id as float) r"
        )

    assert session.cached_row_count(validated_ratings(frame(), "u", "i", "r")) is None
    cached = frame().cache()
    try:
        assert session.cached_row_count(validated_ratings(cached, "u", "i", "r")) is None
        assert cached.count() == 1000
        assert session.cached_row_count(validated_ratings(cached, "u", "i", "r")) == 1000
        assert session.cached_row_count(cached.filter("u > 3")) is None
    finally:
        cached.unpersist()


def _job_descriptions(spark, since: int) -> list:
    store = spark.sparkContext._jsc.sc().statusStore()
    jobs = store.jobsList(None)
    found = []
    for index in range(jobs.size()):
        job = jobs.apply(index)
        if job.jobId() >= since and job.description().isDefined():
            found.append(job.description().get())
    return found


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])
def test_a_distributed_fit_of_a_built_cache_runs_no_count_job(spark, cached):
    """Above singleTaskMaxRatings a cached input's own row count decides the dataflow; an
    uncached input is counted (as it is cached for the fit)."""
    ratings = datasets.generate_dataframe(spark, 3000, seed=5)
    if cached:
        ratings = ratings.cache()
        ratings.count()
    first = spark.sparkContext.statusTracker().getJobIdsForGroup()
    since = max(first, default=-1) + 1
    try:
        with dataflow_confs(spark, "broadcast"):
            model = ALS(rank=4, maxIter=1, seed=1).fit(ratings)
    finally:
        ratings.unpersist()
    assert model.summary.details["numRatings"] == 3000
    counted = [d for d in _job_descriptions(spark, since) if d.endswith("count ratings")]
    assert bool(counted) == (not cached)


def test_small_fits_run_in_one_task_whatever_the_number_of_iterations(spark):
    ratings = datasets.generate_dataframe(spark, 4000, seed=3).cache()
    ratings.count()
    tracker = spark.sparkContext.statusTracker()
    jobs = {}
    with dataflow_confs(spark, "single task"):
        for iterations in (1, 6):
            before = set(tracker.getJobIdsForGroup())
            model = ALS(rank=4, maxIter=iterations).fit(ratings)
            jobs[iterations] = len(set(tracker.getJobIdsForGroup()) - before)
            assert model.summary.details["dataflow"] == "single task"
            assert model.summary.totalIterations == iterations
    assert jobs[1] == jobs[6]


def test_the_dataflow_confs_cover_every_dataflow():
    assert set(DATAFLOW_CONFS) == {"single task", "broadcast", "messages"}


def _numpy_training_rmse(model, ratings):
    import numpy as np

    users = dict(zip(*[model.userFactors.toPandas()[c] for c in ("id", "features")]))
    items = dict(zip(*[model.itemFactors.toPandas()[c] for c in ("id", "features")]))
    frame = ratings.toPandas()
    predicted = [
        np.dot(np.asarray(users[u], np.float64), np.asarray(items[i], np.float64))
        for u, i in zip(frame["user"], frame["item"])
    ]
    return float(np.sqrt(np.mean((frame["rating"].to_numpy(np.float64) - predicted) ** 2)))


@pytest.mark.parametrize("params", [{}, {"implicitPrefs": True}], ids=["explicit", "implicit"])
def test_every_dataflow_reports_the_same_training_rmse_and_summary(spark, params):
    """``spark.gpumf.trainingRmse`` never changes the dataflow; each reports one RMSE per
    iteration, the last equal to a float64 NumPy RMSE of the model's own factors."""
    import numpy as np

    ratings = datasets.generate_dataframe(spark, 3000, seed=8).cache()
    summaries = {}
    spark.conf.set("spark.gpumf.trainingRmse", "true")
    try:
        for name in DATAFLOW_CONFS:
            with dataflow_confs(spark, name):
                model = ALS(rank=4, maxIter=3, seed=5, numUserBlocks=3, numItemBlocks=2,
                            **params).fit(ratings)  # fmt: skip
            summary = model.summary
            assert summary.details["dataflow"] == name
            rmse = summary.metric("trainRmse")
            assert len(rmse) == 3 and all(r is not None and r > 0 for r in rmse)
            np.testing.assert_allclose(rmse[-1], _numpy_training_rmse(model, ratings), rtol=1e-6)
            summaries[name] = summary
    finally:
        spark.conf.unset("spark.gpumf.trainingRmse")
    reference = summaries["single task"]
    for name, summary in summaries.items():
        np.testing.assert_allclose(
            summary.metric("trainRmse"), reference.metric("trainRmse"), rtol=1e-9
        )
        assert summary.totalIterations == reference.totalIterations == 3
        for key in ("numUsers", "numItems", "numRatings"):
            assert summary.details[key] == reference.details[key]
        assert set(summary.details["phaseSeconds"]) == {"hermitian", "solve"}


def test_each_block_sends_one_message_per_partition_of_the_other_side():
    """The broadcast dataflow's messages: every solved block reaches each partition of the other
    side once, whole; the message dataflow's: each partition gets, once, exactly the rows that
    its blocks need (the union over its blocks), with their ids."""
    import numpy as np
    import pyarrow as pa

    from spark_gpu_mf.executor import als_tasks
    from spark_gpu_mf.executor.blocks import Block, build_blocks

    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 40, 500), rng.integers(0, 30, 500)
    ratings = rng.random(500).astype(np.float32)
    rows = build_blocks(users, items, ratings, 4, 3)
    for row in rows:
        row.update(pkey=7, known_rows=b"", known_factors=b"")
    batch = pa.Table.from_pylist(rows).to_batches()
    for whole in (True, False):
        route = als_tasks.Route(other_keys=(11, 12), whole_blocks=whole)
        out = pa.Table.from_batches(
            list(als_tasks.initial_outbox(iter(batch), rank=2, side_seed=1, route=route,
                                          implicit=False))
        ).to_pylist()  # fmt: skip
        factors = [r for r in out if r["kind"] == als_tasks.FACTORS]
        owns = [r for r in out if r["kind"] == als_tasks.OWN]
        assert len(owns) == len(rows)
        if whole:
            assert len(factors) == len(rows) * 2
            assert all(r["dst"] == als_tasks.EVERY_BLOCK for r in factors)
            assert {r["pkey"] for r in factors} == {11, 12}
        else:
            assert all(r["dst"] == als_tasks.EVERY_BLOCK for r in factors)
            for row in rows:
                block = Block.from_row(row)
                sent = {r["pkey"]: np.frombuffer(r["ids"], np.int32) for r in factors
                        if r["src"] == block.block}  # fmt: skip
                assert len(sent) == len([r for r in factors if r["src"] == block.block])
                # Other blocks 0 and 2 live in the partition keyed 11, block 1 in 12.
                needed = {
                    key: np.unique(np.concatenate(
                        [block.ids[block.rows_needed_by(o)] for o in others]))
                    for key, others in ((11, (0, 2)), (12, (1,)))
                }  # fmt: skip
                needed = {key: ids for key, ids in needed.items() if len(ids)}
                assert sent.keys() == needed.keys()
                for key, ids in needed.items():
                    np.testing.assert_array_equal(sent[key], ids)
                    payload = [r["payload"] for r in factors
                               if r["src"] == block.block and r["pkey"] == key][0]  # fmt: skip
                    assert len(payload) == len(ids) * 2 * 4


def _packing_case():
    import numpy as np
    import pyarrow as pa

    from spark_gpu_mf.executor.blocks import PackedSide

    rng = np.random.default_rng(3)
    users, items = rng.integers(-3, 50, 400), rng.integers(0, 20, 400)
    ratings = rng.random(400).astype(np.float32)
    batch = pa.record_batch({"user": pa.array(users, pa.int32()),
                             "item": pa.array(items, pa.int32()),
                             "rating": pa.array(ratings)})  # fmt: skip
    sides = [
        PackedSide("user", "item", 4, 3, (10, 11)),
        PackedSide("item", "user", 3, 4, (20, 21, 22)),
    ]
    return {"user": users, "item": items}, ratings, batch, sides


def test_one_pass_packs_each_sides_ratings_for_its_partitions_in_input_order():
    """``pack_ratings`` keys both sides from one batch: per side and partition, the ratings of
    the blocks that partition holds (block ``b`` = ``id mod blocks``, non-negative as in Spark,
    in partition ``b mod partitions``), in the batch's order, nothing lost or repeated."""
    import numpy as np
    import pyarrow as pa

    from spark_gpu_mf.executor.blocks import pack_ratings

    columns, ratings, batch, sides = _packing_case()
    rows = pa.Table.from_batches(list(pack_ratings(iter([batch]), sides))).to_pylist()
    for index, side in enumerate(sides):
        keys, others = columns[side.key_col], columns[side.other_col]
        partition = np.mod(np.mod(keys, side.num_blocks), side.num_partitions)
        packed = {r["part"]: r for r in rows if r["side"] == index}
        assert len(packed) == len([r for r in rows if r["side"] == index])
        assert set(packed) == set(np.unique(partition).tolist())
        for p, row in packed.items():
            mine = partition == p
            np.testing.assert_array_equal(np.frombuffer(row["keys"], np.int32), keys[mine])
            np.testing.assert_array_equal(np.frombuffer(row["others"], np.int32), others[mine])
            np.testing.assert_array_equal(np.frombuffer(row["values"], np.float32), ratings[mine])
            assert row["known"] is False


def test_one_task_builds_both_sides_blocks_of_a_partition_as_build_block_does():
    """``build_packed_blocks`` gets partition ``p``'s packed ratings of both sides (one shuffle
    for both) and returns each side's blocks of that partition, equal to
    ``build_block`` of that block's ratings, keyed by the side's partition key."""
    import numpy as np
    import pyarrow as pa

    from spark_gpu_mf.executor.blocks import build_block, build_packed_blocks, pack_ratings

    columns, ratings, batch, sides = _packing_case()
    halves = [batch.slice(0, 150), batch.slice(150)]
    packed = pa.Table.from_batches(list(pack_ratings(iter(halves), sides)))
    part = np.asarray(packed.column("part"))
    for p in range(3):
        group = packed.filter(pa.array(part == p))
        built = pa.Table.from_batches(
            list(build_packed_blocks(iter(group.to_batches()), sides, rank=2))
        ).to_pylist()
        for index, side in enumerate(sides):
            keys, others = columns[side.key_col], columns[side.other_col]
            blocks = np.mod(keys, side.num_blocks)
            expected = [b for b in range(side.num_blocks)
                        if b % side.num_partitions == p and (blocks == b).any()]  # fmt: skip
            mine = [r for r in built if r["side"] == index]
            assert [r["block"] for r in mine] == expected
            for row in mine:
                b = row["block"]
                assert row["pkey"] == side.partition_keys[p]
                reference = build_block(
                    b, keys[blocks == b], others[blocks == b], ratings[blocks == b],
                    side.num_other_blocks,
                )  # fmt: skip
                for column, value in reference.items():
                    assert row[column] == value, column
                assert row["known_rows"] == row["known_factors"] == b""


def test_a_warm_starts_factors_reach_the_blocks_holding_their_ids():
    """``pack_known_factors`` packs a model's factors like the ratings, and the build gives
    each block the rows of it the model knows with their factors, equal to a lookup of the
    model by id: ids the ratings lack are left out, new ids get none, negative ids count."""
    import numpy as np
    import pyarrow as pa

    from spark_gpu_mf.executor.blocks import (
        build_packed_blocks,
        known_of_row,
        pack_known_factors,
        pack_ratings,
    )

    columns, ratings, batch, sides = _packing_case()
    model, known = _known_case(columns, sides)
    packed = pa.Table.from_batches(
        list(pack_ratings(iter([batch]), sides))
        + list(pack_known_factors(iter(known.to_batches(max_chunksize=50)), sides, rank=3))
    )
    part = np.asarray(packed.column("part"))
    checked = 0
    for p in range(3):
        group = packed.filter(pa.array(part == p))
        built = pa.Table.from_batches(
            list(build_packed_blocks(iter(group.to_batches()), sides, rank=3))
        ).to_pylist()
        for row in built:
            ids = np.frombuffer(row["ids"], np.int32)
            rows, factors = known_of_row(row, rank=3)
            in_model = [j for j, i in enumerate(ids.tolist()) if i in model[row["side"]]]
            np.testing.assert_array_equal(rows, in_model)
            expected = [model[row["side"]][ids[j]] for j in in_model]
            np.testing.assert_array_equal(factors, np.reshape(expected, (-1, 3)))
            checked += len(rows)
    assert checked == sum(len(m) - 2 for m in model.values())


def _known_case(columns, sides, rank=3):
    """A warm start's model of the packing case: ``({side: {id: factors}}, its Arrow table
    (side, id, features))``, with two thirds of today's ids, and ids today's ratings lack."""
    import numpy as np
    import pyarrow as pa

    from spark_gpu_mf.executor.blocks import factor_table

    rng = np.random.default_rng(5)
    model = {}
    for index, side in enumerate(sides):
        ids = np.unique(columns[side.key_col])
        kept = rng.permutation(ids)[: len(ids) * 2 // 3]  # the others are new today
        ids = np.concatenate([kept, [1000 + index, -77]])  # ids today's ratings lack
        model[index] = dict(zip(ids.tolist(), rng.standard_normal((len(ids), rank), np.float32)))
    known = pa.concat_tables(
        factor_table(np.array(list(m)), np.array(list(m.values()))).append_column(
            "side", pa.array([index] * len(m), pa.int32())
        )
        for index, m in model.items()
    ).select(["side", "id", "features"])
    return model, known


def test_the_rdd_roads_keyed_rows_build_the_blocks_of_the_dataframe_road():
    """Classic sessions shuffle the packed rows as ``(part, row)`` pairs (``keyed_by_part``)
    and build with ``build_keyed_blocks``; Spark Connect shuffles them as a DataFrame and
    builds with ``build_packed_blocks``. For the same rows of a partition, ratings and a warm
    start's factors alike, both give the same blocks."""
    import numpy as np
    import pyarrow as pa

    from spark_gpu_mf.executor.binding import bind
    from spark_gpu_mf.executor.blocks import (
        build_keyed_blocks,
        build_packed_blocks,
        build_partition,
        keyed_by_part,
        pack_known_factors,
        pack_ratings,
    )

    columns, _, batch, sides = _packing_case()
    _, known = _known_case(columns, sides)
    packs = [
        (bind(pack_ratings, sides=sides), [batch.slice(0, 150), batch.slice(150)]),
        (bind(pack_known_factors, sides=sides, rank=3), known.to_batches(max_chunksize=50)),
    ]
    pairs = [pair for pack, batches in packs for pair in keyed_by_part(iter(batches), pack)]
    packed = pa.Table.from_batches(
        [packed for pack, batches in packs for packed in pack(iter(batches))]
    )
    assert [part for part, _ in pairs] == packed.column("part").to_pylist()
    built = 0
    for p in range(3):
        keyed = list(build_keyed_blocks(
            iter([pair for pair in pairs if build_partition(pair[0]) == p]), sides, rank=3
        ))  # fmt: skip
        group = packed.filter(pa.array(np.asarray(packed.column("part")) == p))
        framed = pa.Table.from_batches(
            list(build_packed_blocks(iter(group.to_batches()), sides, rank=3))
        ).to_pylist()
        assert keyed == framed
        built += len(keyed)
    assert built > 0 and list(build_keyed_blocks(iter([]), sides, rank=3)) == []


def test_a_damaged_initial_model_fails_the_build_with_its_rank():
    import pyarrow as pa
    import pytest

    from spark_gpu_mf.executor.blocks import pack_known_factors

    _, _, _, sides = _packing_case()
    known = pa.table({
        "side": pa.array([0, 0], pa.int32()),
        "id": pa.array([1, 2], pa.int32()),
        "features": pa.array([[1.0, 2.0], [3.0]], pa.list_(pa.float32())),
    })  # fmt: skip
    with pytest.raises(ValueError, match="factor row of 1 features .* its rank is 2"):
        list(pack_known_factors(iter(known.to_batches()), sides, rank=2))


def test_a_packed_column_over_2_gib_fails_instead_of_wrapping_its_offsets():
    """Arrow binary offsets are int32: more bytes in one column would wrap around silently."""
    import numpy as np
    import pytest

    from spark_gpu_mf.executor.blocks import _binary_array

    assert _binary_array(np.array([0, 2, 5]), b"abcde").to_pylist() == [b"ab", b"cde"]
    with pytest.raises(ValueError, match="at most 2 GiB"):
        _binary_array(np.array([0, 2**31]), b"x")


def test_a_blocks_starting_outbox_takes_the_known_rows_from_the_model():
    """``initial_outbox`` sends Spark's starting factors of a block with the known rows the
    build gave it replaced: equal to ``initial_factors`` with those rows overwritten."""
    import numpy as np
    import pyarrow as pa

    from spark_gpu_mf.backends.spark_random import initial_factors
    from spark_gpu_mf.executor import als_tasks
    from spark_gpu_mf.executor.blocks import build_blocks

    rng = np.random.default_rng(1)
    users, items = rng.integers(0, 40, 300), rng.integers(0, 30, 300)
    rows = build_blocks(users, items, rng.random(300).astype(np.float32), 4, 3)
    known = {}
    for row in rows:
        n = row["num_rows"]
        picked = np.sort(rng.choice(n, n // 2, replace=False)).astype(np.int32)
        factors = rng.standard_normal((len(picked), 5), np.float32)
        known[row["block"]] = (picked, factors)
        row.update(pkey=7, known_rows=picked.tobytes(), known_factors=factors.tobytes())
    route = als_tasks.Route(other_keys=(11,), whole_blocks=True)
    out = pa.Table.from_batches(
        list(als_tasks.initial_outbox(iter(pa.Table.from_pylist(rows).to_batches()), rank=5,
                                      side_seed=9, route=route, implicit=False))
    ).to_pylist()  # fmt: skip
    owns = {r["src"]: np.frombuffer(r["payload"], np.float32).reshape(-1, 5)
            for r in out if r["kind"] == als_tasks.OWN}  # fmt: skip
    assert sorted(owns) == sorted(known)
    for row in rows:
        expected = initial_factors(row["num_rows"], 5, 9, row["block"]).copy()
        picked, factors = known[row["block"]]
        expected[picked] = factors
        np.testing.assert_array_equal(owns[row["block"]], expected)


def test_a_side_too_wide_for_one_task_falls_back_to_the_distributed_dataflow(spark):
    """The single task checks the factor size itself (the driver only counts the ratings): when
    a side's factors exceed broadcastThreshold it stops, and the messages dataflow fits the
    same factors."""
    import numpy as np

    ratings = datasets.generate_dataframe(spark, 3000, seed=4).cache()
    threshold = 50 * 4 * 4  # 50 rows of rank-4 factors: fewer than either side has
    spark.conf.set("spark.gpumf.singleTaskMaxRatings", "auto")
    spark.conf.set("spark.gpumf.broadcastThreshold", str(threshold))
    try:
        model = ALS(rank=4, maxIter=3, seed=2).fit(ratings)
    finally:
        spark.conf.unset("spark.gpumf.singleTaskMaxRatings")
        spark.conf.unset("spark.gpumf.broadcastThreshold")
    assert model.summary.details["dataflow"] == "messages"
    with dataflow_confs(spark, "single task"):
        reference = ALS(rank=4, maxIter=3, seed=2).fit(ratings)
    assert reference.summary.details["dataflow"] == "single task"
    for side in ("userFactors", "itemFactors"):
        ours, expected = (
            np.stack(getattr(m, side).orderBy("id").toPandas()["features"])
            for m in (model, reference)
        )
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


def _batch_summary(batches):
    import pyarrow as pa

    for batch in batches:
        users = batch.column("user").to_numpy()
        yield pa.RecordBatch.from_pydict({"rows": [len(users)], "user_sum": [int(users.sum())]})


def _batch_summary_rows(batches):
    for summary in _batch_summary(batches):
        yield from summary.to_pylist()


def test_both_arrow_roads_into_a_task_give_it_the_same_batches(spark, monkeypatch):
    """``map_in_arrow_rows`` feeds a mapInArrow body from ``toArrowBatchRdd`` in classic
    Spark and through ``mapInArrow`` where that is missing: the same rows in the same
    batches. ``map_arrow_batches`` gives a body the batches of the first road."""
    from spark_gpu_mf.spark import arrow_input

    ratings = datasets.generate_dataframe(spark, 25_000, seed=5).repartition(3).coalesce(1)
    schema = "rows long, user_sum long"
    assert arrow_input.arrow_batch_rdd(ratings) is not None  # the fast road is open here
    fast = arrow_input.map_in_arrow_rows(ratings, _batch_summary, schema)
    batches = arrow_input.map_arrow_batches(ratings, _batch_summary_rows).collect()
    monkeypatch.setattr(arrow_input, "arrow_batch_rdd", lambda df, batch_rows=None: None)
    slow = arrow_input.map_in_arrow_rows(ratings, _batch_summary, schema)
    assert arrow_input.map_arrow_batches(ratings, _batch_summary_rows) is None
    assert fast == slow == batches
    assert sum(r["rows"] for r in fast) == 25_000 and len(fast) > 1


def test_the_fast_road_reads_batches_of_the_rows_asked_and_leaves_the_conf_as_it_was(spark):
    """``batch_rows`` sizes the batches of ``toArrowBatchRdd`` for one call: the session's
    ``maxRecordsPerBatch`` (set or unset) is what it was, and sizes the next call's batches."""
    from spark_gpu_mf import conf
    from spark_gpu_mf.spark import arrow_input

    key = conf.ARROW_MAX_RECORDS_PER_BATCH
    ratings = datasets.generate_dataframe(spark, 25_000, seed=5).coalesce(1)
    before = spark.conf.get(key, None)
    try:
        for setting in (None, "7000"):
            if setting is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, setting)
            asked = arrow_input.map_arrow_batches(ratings, _batch_summary_rows, batch_rows=4096)
            assert spark.conf.get(key, None) == setting
            assert [r["rows"] for r in asked.collect()] == [4096] * 6 + [25_000 - 6 * 4096]
        default = arrow_input.map_arrow_batches(ratings, _batch_summary_rows)
        assert [r["rows"] for r in default.collect()] == [7000] * 3 + [4000]
    finally:
        if before is None:
            spark.conf.unset(key)
        else:
            spark.conf.set(key, before)


@pytest.mark.parametrize("dataflow", ["broadcast", "messages"], indirect=True)
def test_a_distributed_fit_is_the_same_whichever_road_its_block_build_takes(
    spark, monkeypatch, dataflow
):
    """A classic session shuffles the packed ratings and a warm start's factors as an RDD,
    Spark Connect as a DataFrame: the same blocks, so the same factors bit for bit, cold and
    warm."""
    import numpy as np

    from spark_gpu_mf.spark import als_train, arrow_input

    ratings = datasets.generate_dataframe(spark, 3000, seed=6).repartition(3).cache()
    initial = ALS(rank=4, maxIter=1, seed=3).fit(ratings)
    roads = []
    original = als_train.map_arrow_batches

    def watched(*args, **kwargs):
        rdd = original(*args, **kwargs)
        roads.append("rdd" if rdd is not None else "frame")
        return rdd

    monkeypatch.setattr(als_train, "map_arrow_batches", watched)
    fits = {}
    for road in ("rdd", "frame"):
        if road == "frame":
            monkeypatch.setattr(arrow_input, "arrow_batch_rdd", lambda df, batch_rows=None: None)
        fits[road] = [
            ALS(rank=4, maxIter=2, seed=1).fit(ratings),
            ALS(rank=4, maxIter=1, seed=1, initialModel=initial).fit(ratings),
        ]
    # Ratings, ratings, known factors; then ratings twice: known factors follow the ratings.
    assert roads == ["rdd"] * 3 + ["frame"] * 2
    for model in fits["rdd"] + fits["frame"]:
        assert model.summary.details["dataflow"] == dataflow
    for rdd_model, frame_model in zip(fits["rdd"], fits["frame"]):
        for side in ("userFactors", "itemFactors"):
            ours, theirs = (
                np.stack(getattr(m, side).orderBy("id").toPandas()["features"])
                for m in (rdd_model, frame_model)
            )
            np.testing.assert_array_equal(ours, theirs)


def test_a_single_task_fit_is_the_same_whichever_road_its_input_takes(spark, monkeypatch):
    import numpy as np

    from spark_gpu_mf.spark import arrow_input

    ratings = datasets.generate_dataframe(spark, 3000, seed=6).repartition(3).cache()
    with dataflow_confs(spark, "single task"), in_a_task(spark):
        fast = ALS(rank=4, maxIter=3, seed=1).fit(ratings)
        monkeypatch.setattr(arrow_input, "arrow_batch_rdd", lambda df, batch_rows=None: None)
        slow = ALS(rank=4, maxIter=3, seed=1).fit(ratings)
    assert fast.summary.details["singleTaskIn"] == slow.summary.details["singleTaskIn"] == "task"
    for side in ("userFactors", "itemFactors"):
        ours, theirs = (
            np.stack(getattr(m, side).orderBy("id").toPandas()["features"]) for m in (fast, slow)
        )
        np.testing.assert_array_equal(ours, theirs)


@contextmanager
def in_a_task(spark):
    """Single-task fits in this block run in a Spark task, not in the driver's process."""
    spark.conf.set("spark.gpumf.singleTaskInDriverMaxRatings", "0")
    try:
        yield
    finally:
        spark.conf.unset("spark.gpumf.singleTaskInDriverMaxRatings")


@pytest.mark.parametrize(
    "params",
    [{}, {"implicitPrefs": True, "solver": "cholesky"}, {"nonnegative": True}],
    ids=["cg", "implicit-cholesky", "nonnegative"],
)
def test_a_small_local_fit_runs_in_the_driver_with_the_factors_of_a_task(spark, params):
    """Local mode, NumPy backend: a small single-task fit runs in the driver's own process
    (no Python worker to start) and gives the Spark task's factors bit for bit."""
    import numpy as np

    ratings = datasets.generate_dataframe(spark, 3000, seed=6).cache()
    with dataflow_confs(spark, "single task"):
        here = ALS(rank=4, maxIter=3, seed=1, **params).fit(ratings)
        with in_a_task(spark):
            there = ALS(rank=4, maxIter=3, seed=1, **params).fit(ratings)
    assert here.summary.details["singleTaskIn"] == "driver"
    assert there.summary.details["singleTaskIn"] == "task"
    for side in ("userFactors", "itemFactors"):
        ours, theirs = (
            np.stack(getattr(m, side).orderBy("id").toPandas()["features"]) for m in (here, there)
        )
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize(
    "params",
    [{}, {"implicitPrefs": True}, {"solver": "cholesky"}, {"nonnegative": True}],
    ids=["cg", "implicit", "cholesky", "nonnegative"],
)
def test_every_dataflow_fits_the_same_factors_bit_for_bit(spark, params):
    """The single task solves its blocks in row ranges on threads, the broadcast dataflow block
    by block in tasks, the message dataflow from gathered messages: rows are solved on their
    own, so all three give the same bits."""
    import numpy as np

    ratings = datasets.generate_dataframe(spark, 3000, seed=7).cache()
    factors = {}
    for name in DATAFLOW_CONFS:
        with dataflow_confs(spark, name):
            model = ALS(rank=4, maxIter=3, seed=3, numUserBlocks=3, numItemBlocks=2, **params).fit(
                ratings
            )
        assert model.summary.details["dataflow"] == name
        factors[name] = [
            np.stack(getattr(model, side).orderBy("id").toPandas()["features"])
            for side in ("userFactors", "itemFactors")
        ]
    for name in ("broadcast", "messages"):
        for ours, theirs in zip(factors["single task"], factors[name]):
            np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("name", list(DATAFLOW_CONFS))
def test_every_dataflow_fits_on_spark_connect_with_the_classic_factors(
    spark, connect_session, name
):
    """The fit goes through the DataFrame API alone: on a Connect session every dataflow runs
    (no SparkContext, RDD or broadcast variable) and gives the classic session's bits."""
    import numpy as np

    frame = datasets.generate_dataframe(spark, 3000, seed=9).toPandas()
    factors = {}
    for kind, session in (("classic", spark), ("connect", connect_session)):
        with functions_for(kind):
            ratings = session.createDataFrame(frame)
            with dataflow_confs(session, name):
                model = ALS(rank=4, maxIter=2, seed=4, numUserBlocks=3, numItemBlocks=2).fit(
                    ratings
                )
            assert model.summary.details["dataflow"] == name
            factors[kind] = [
                np.stack(getattr(model, side).orderBy("id").toPandas()["features"])
                for side in ("userFactors", "itemFactors")
            ]
    for classic, connect in zip(factors["classic"], factors["connect"]):
        np.testing.assert_array_equal(classic, connect)
