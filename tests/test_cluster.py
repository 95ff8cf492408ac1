"""Training on a real multi-process standalone cluster gives the same model as local mode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pyspark.ml.evaluation import RegressionEvaluator

from spark_gpu_mf import ALS, datasets
from spark_gpu_mf.spark.factors import collect_factors
from tests.cluster.standalone import StandaloneCluster

pytestmark = pytest.mark.cluster

JOB = str(Path(__file__).parent / "cluster" / "fit_job.py")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    standalone = StandaloneCluster(workers=2, cores=1, log_dir=tmp_path_factory.mktemp("cluster"))
    try:
        yield standalone.start()
    finally:
        standalone.stop()


def _local_fit(spark, solver):
    """The same fit as fit_job.py, in this test session's local mode."""
    data = datasets.generate_ratings(20_000, seed=13)
    train, test = datasets.train_test_split(data, 0.2, seed=14)
    model = ALS(rank=8, maxIter=5, seed=3, solver=solver, numUserBlocks=4, numItemBlocks=3,
                coldStartStrategy="drop").fit(datasets.to_dataframe(spark, train))
    rmse = RegressionEvaluator(labelCol="rating").evaluate(
        model.transform(datasets.to_dataframe(spark, test))
    )
    return model, rmse


@pytest.mark.parametrize("solver", ["cholesky", "cg"])
def test_standalone_cluster_fit_equals_local_mode(spark, cluster, tmp_path, solver):
    result = cluster.submit(JOB, str(tmp_path), solver)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads((tmp_path / "result.json").read_text())
    assert remote["master"] == cluster.url
    assert remote["executors"] >= 3  # the driver plus one executor per worker
    factors = np.load(tmp_path / "factors.npz")
    model, local_rmse = _local_fit(spark, solver)
    assert remote["rmse"] == pytest.approx(local_rmse, rel=1e-4)
    for side, df in (("user", model.userFactors), ("item", model.itemFactors)):
        ids, local = collect_factors(df)
        np.testing.assert_array_equal(factors[f"{side}_ids"], ids)
        np.testing.assert_allclose(factors[f"{side}_factors"], local, atol=1e-4)
