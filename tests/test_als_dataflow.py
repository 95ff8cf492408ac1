"""The two dataflows keep their promises about what crosses the network."""

from __future__ import annotations

import pytest

from spark_gpu_mf import ALS, datasets
from spark_gpu_mf.spark import als_train
from tests.conftest import DATAFLOW_CONFS, dataflow_confs


def test_message_half_iterations_shuffle_only_the_messages(spark, monkeypatch):
    """Spark must reuse the cached blocks' partitioning: the only exchange of a half-iteration is
    our explicit repartition of the messages, never one Spark adds to satisfy the cogroup."""
    plans = []
    original = als_train._Trainer._half_messages

    def spy(self, dst, src, src_outbox, dst_outbox, label):
        out = original(self, dst, src, src_outbox, dst_outbox, label)
        plans.append(self.truncated_from[id(out)]._jdf.queryExecution().executedPlan().toString())
        return out

    monkeypatch.setattr(als_train._Trainer, "_half_messages", spy)
    with dataflow_confs(spark, "messages"):
        ALS(rank=4, maxIter=2, numUserBlocks=3, numItemBlocks=5).fit(
            datasets.generate_dataframe(spark, 4000, seed=3)
        )
    assert len(plans) == 4
    for plan in plans:
        assert "ENSURE_REQUIREMENTS" not in plan
        assert "REPARTITION_BY_NUM" in plan


def test_broadcast_half_iterations_have_no_shuffle(spark, monkeypatch):
    jobs = []
    original = als_train._Trainer._half_broadcast

    def spy(self, *args, **kwargs):
        tracker = self.sc.statusTracker()
        before = set(tracker.getJobIdsForGroup())
        out = original(self, *args, **kwargs)
        for job in set(tracker.getJobIdsForGroup()) - before:
            # Stages whose output already exists (the cached blocks' lineage) are skipped.
            stages = [tracker.getStageInfo(s) for s in tracker.getJobInfo(job).stageIds]
            jobs.append(sum(1 for s in stages if s is not None and s.numCompletedTasks > 0))
        return out

    monkeypatch.setattr(als_train._Trainer, "_half_broadcast", spy)
    with dataflow_confs(spark, "broadcast"):
        model = ALS(rank=4, maxIter=2).fit(datasets.generate_dataframe(spark, 4000, seed=3))
    assert model.summary.details["dataflow"] == "broadcast"
    assert jobs and all(stages == 1 for stages in jobs)  # one stage: no shuffle


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


def test_both_arrow_roads_into_a_task_give_it_the_same_batches(spark, monkeypatch):
    """``map_in_arrow_rows`` feeds a mapInArrow body from ``toArrowBatchRdd`` in classic Spark
    and through ``mapInArrow`` where that is missing: the same rows in the same batches."""
    from spark_gpu_mf.spark import arrow_input

    ratings = datasets.generate_dataframe(spark, 25_000, seed=5).repartition(3).coalesce(1)
    assert arrow_input.arrow_batch_rdd(ratings) is not None  # the fast road is open here
    fast = arrow_input.map_in_arrow_rows(ratings, _batch_summary, "rows long, user_sum long")
    monkeypatch.setattr(arrow_input, "arrow_batch_rdd", lambda df: None)
    slow = arrow_input.map_in_arrow_rows(ratings, _batch_summary, "rows long, user_sum long")
    assert fast == slow
    assert sum(r["rows"] for r in fast) == 25_000 and len(fast) > 1


def test_a_single_task_fit_is_the_same_whichever_road_its_input_takes(spark, monkeypatch):
    import numpy as np

    from spark_gpu_mf.spark import arrow_input

    ratings = datasets.generate_dataframe(spark, 3000, seed=6).repartition(3).cache()
    with dataflow_confs(spark, "single task"):
        fast = ALS(rank=4, maxIter=3, seed=1).fit(ratings)
        monkeypatch.setattr(arrow_input, "arrow_batch_rdd", lambda df: None)
        slow = ALS(rank=4, maxIter=3, seed=1).fit(ratings)
    for side in ("userFactors", "itemFactors"):
        ours, theirs = (
            np.stack(getattr(m, side).orderBy("id").toPandas()["features"]) for m in (fast, slow)
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
