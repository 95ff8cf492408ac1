"""Reliability: long runs, memory limits, numerical safety, persistence, determinism.

Retries of failed tasks and a killed executor are tested on a real cluster in test_cluster.py.
"""

from __future__ import annotations

import logging
import os
import re

import numpy as np
import pytest
from pyspark.ml.recommendation import ALS as SparkALS
from pyspark.sql import functions as F

from spark_gpu_mf import ALS, ALSModel, datasets
from spark_gpu_mf.backends import numpy_backend
from spark_gpu_mf.errors import DamagedModelError
from spark_gpu_mf.spark import persistence
from spark_gpu_mf.spark.factors import collect_factors
from tests.conftest import dataflow_confs


@pytest.fixture(scope="module")
def ratings(spark):
    data = datasets.generate_ratings(6000, num_users=300, num_items=150, seed=31)
    return datasets.to_dataframe(spark, data).cache()


@pytest.fixture
def checkpoint_dir(spark, tmp_path):
    """Set a checkpoint directory for one test, then unset it (SparkContext has no public unset)."""
    sc = spark.sparkContext
    sc.setCheckpointDir(str(tmp_path / "checkpoints"))
    yield tmp_path / "checkpoints"
    getattr(sc._jsc.sc(), "checkpointDir_$eq")(sc._jvm.scala.Option.apply(None))


def _factors(model):
    return collect_factors(model.userFactors), collect_factors(model.itemFactors)


def _assert_identical(a, b):
    for (ids_a, fa), (ids_b, fb) in zip(_factors(a), _factors(b)):
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_array_equal(fa, fb)


@pytest.mark.parametrize("dataflow", ["single task", "broadcast", "messages"], indirect=True)
def test_same_seed_gives_identical_factors_whatever_the_input_partitioning(ratings, dataflow):
    params = dict(rank=6, maxIter=4, seed=9, numUserBlocks=3, numItemBlocks=2)
    first = ALS(**params).fit(ratings)
    _assert_identical(first, ALS(**params).fit(ratings.repartition(7)))
    _assert_identical(first, ALS(**params).fit(ratings.orderBy(F.rand(5))))


def test_a_tiny_memory_budget_gives_identical_factors(spark, ratings):
    params = dict(rank=6, maxIter=3, seed=2)
    spark.conf.set("spark.gpumf.memoryBudget", "4k")
    try:
        tiny = ALS(**params).fit(ratings)
    finally:
        spark.conf.unset("spark.gpumf.memoryBudget")
    _assert_identical(tiny, ALS(**params).fit(ratings))


def test_the_memory_budget_bounds_what_a_block_solve_allocates():
    """Peak NumPy allocations of one block's solve follow spark.gpumf.memoryBudget where the
    normal equations are built (Cholesky above rank 32, FP16 CG); matrix-free FP32 CG and the
    row-by-row exact solve never hold them."""
    import tracemalloc

    rng = np.random.default_rng(0)
    counts = rng.integers(1, 50, 2000)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    indices = rng.integers(0, 500, indptr[-1]).astype(np.int32)
    values = rng.normal(size=indptr[-1]).astype(np.float32)
    # (solver, precision, rank, whether it builds matrices): the exact solve at ranks up to
    # numpy_backend._ROW_BY_ROW_MAX_RANK builds one row's matrix at a time.
    cases = [("cholesky", "fp32", 40, True), ("cg", "fp16", 32, True),
             ("cg", "fp32", 32, False), ("cholesky", "fp32", 16, False)]  # fmt: skip
    for solver, precision, rank, builds in cases:
        Y = rng.normal(size=(500, rank)).astype(np.float32)
        output_bytes = 2000 * rank * 4
        all_matrices = 2000 * rank * rank * 4
        peaks = {}
        for budget in (1 << 20, 1 << 30):
            config = numpy_backend.SolveConfig(
                rank=rank, reg_param=0.1, solver=solver, precision=precision,
                memory_budget_bytes=budget,
            )  # fmt: skip
            numpy_backend.update_block(indptr, indices, values, Y, None, config)  # compiles
            tracemalloc.start()
            numpy_backend.update_block(indptr, indices, values, Y, None, config)
            peaks[budget] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peaks[1 << 20] <= 4 * (1 << 20) + output_bytes, (solver, peaks)
        if builds:
            assert peaks[1 << 20] < peaks[1 << 30] / 2, (solver, rank, peaks)
        else:
            # the per-rating weights (3 x 8 bytes) and the output, never the matrices
            assert max(peaks.values()) < 32 * indptr[-1] + 2 * output_bytes, (solver, peaks)
            assert max(peaks.values()) < all_matrices / 4, (solver, rank, peaks)


def test_long_runs_checkpoint_and_finish(spark, ratings, checkpoint_dir):
    with dataflow_confs(spark, "messages"):  # the dataflow whose lineage grows
        # Six checkpoints, each cutting a lineage five iterations long.
        model = ALS(rank=3, maxIter=30, checkpointInterval=5, seed=1).fit(ratings.limit(1500))
    assert model.summary.totalIterations == 30
    assert np.isfinite(_factors(model)[0][1]).all()
    leftovers = [p for p in checkpoint_dir.rglob("spark-gpu-mf-als-*")]
    assert leftovers == []  # every checkpoint of ours is deleted once the fit is done


def test_checkpointing_off_is_said_out_loud(spark, ratings, caplog):
    with dataflow_confs(spark, "messages"), caplog.at_level(logging.WARNING, logger="spark_gpu_mf"):
        ALS(rank=3, maxIter=2, checkpointInterval=1, seed=1).fit(ratings.limit(500))
    assert any("checkpointing is off" in r.getMessage() for r in caplog.records)


def test_regparam_zero_with_a_singular_system_fails_with_sparks_message(spark):
    # user 0 rated one item: at rank 4 with no regularization its system is singular.
    df = spark.createDataFrame(
        [(0, 0, 4.0), (1, 0, 3.0), (1, 1, 2.0), (2, 1, 5.0)], ["user", "item", "rating"]
    )
    messages = []
    for cls, extra in ((SparkALS, {}), (ALS, {"solver": "cholesky"})):
        with pytest.raises(Exception) as caught:
            cls(rank=4, regParam=0.0, maxIter=1, seed=1, **extra).fit(df)
        text = str(caught.value)
        assert "because A is not positive definite" in text, text[-500:]
        messages.append(text[text.index("LAPACK.dppsv") :].splitlines()[0])
    # The pivot where the factorization stops depends on the LAPACK Spark loads (Java: 3,
    # OpenBLAS: 4, on a system whose exact pivot is 0): compare the message around it.
    pivots = [int(re.search(r"LAPACK.dppsv returned (\d+)", m).group(1)) for m in messages]
    assert all(1 <= p <= 4 for p in pivots), messages
    assert [re.sub(r"returned \d+", "returned N", m) for m in messages] == [
        re.sub(r"returned \d+", "returned N", messages[0])
    ] * 2


def test_fp16_on_a_huge_rating_scale_never_gives_non_finite_factors(spark, ratings):
    scaled = ratings.withColumn("rating", F.col("rating") * 2500)
    model = ALS(rank=8, maxIter=3, precision="fp16", seed=1, regParam=0.01).fit(scaled)
    for _, factors in _factors(model):
        assert np.isfinite(factors).all()


def test_implicit_input_without_a_positive_rating_is_refused(spark, ratings):
    from pyspark.errors import IllegalArgumentException

    with pytest.raises(IllegalArgumentException, match="at least one positive rating"):
        ALS(implicitPrefs=True).fit(ratings.withColumn("rating", F.lit(0.0)))


def test_an_interrupted_save_leaves_nothing_that_loads(spark, ratings, tmp_path, monkeypatch):
    model = ALS(rank=3, maxIter=1).fit(ratings)
    path = tmp_path / "model"
    calls = []
    original = persistence.metadata_json

    def crash(*args, **kwargs):  # factors are written; the metadata never is
        calls.append(1)
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(persistence, "metadata_json", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save(str(path))
    assert calls and not path.exists()
    assert not any(p.name.startswith("model.saving-") for p in tmp_path.iterdir())
    monkeypatch.setattr(persistence, "metadata_json", original)
    model.save(str(path))
    assert ALSModel.load(str(path)).rank == 3


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda p: _write_metadata(p, "not json"), "not valid JSON"),
        (
            lambda p: _write_metadata(
                p,
                '{"class": "org.apache.spark.ml.recommendation.ALSModel",'
                ' "uid": "x", "paramMap": {}}',
            ),
            "no valid rank",
        ),
        (lambda p: _remove(p / "metadata"), "metadata is missing"),
        (lambda p: _replace_factors(p), "must have columns id int and features array<float>"),
    ],
    ids=["bad-json", "no-rank", "no-metadata", "wrong-factor-schema"],
)
def test_loading_a_damaged_model_names_what_is_wrong(spark, ratings, tmp_path, damage, message):
    model = ALS(rank=3, maxIter=1).fit(ratings)
    path = tmp_path / "model"
    model.save(str(path))
    damage(path)
    with pytest.raises(DamagedModelError, match=message):
        ALSModel.load(str(path))


def _write_metadata(path, text):
    for part in (path / "metadata").glob("part-*"):
        part.write_text(text + "\n")
    for crc in (path / "metadata").glob(".*.crc"):
        crc.unlink()


def _remove(path):
    import shutil

    shutil.rmtree(path)


def _replace_factors(path):
    from pyspark.sql import SparkSession

    _remove(path / "userFactors")
    SparkSession.getActiveSession().createDataFrame(
        [(1, "x")], "id int, features string"
    ).write.parquet(str(path / "userFactors"))


def test_saving_over_a_model_keeps_the_old_one_until_the_new_one_is_complete(
    spark, ratings, tmp_path, monkeypatch
):
    old = ALS(rank=3, maxIter=1, seed=1).fit(ratings)
    path = str(tmp_path / "model")
    old.save(path)
    new = ALS(rank=5, maxIter=1, seed=1).fit(ratings)
    monkeypatch.setattr(
        persistence, "metadata_json", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full"))
    )
    with pytest.raises(OSError, match="disk full"):
        new.write().overwrite().save(path)
    assert ALSModel.load(path).rank == 3
    assert os.listdir(tmp_path) == ["model"]
