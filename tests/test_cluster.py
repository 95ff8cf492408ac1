"""Training on a real multi-process standalone cluster gives the same model as local mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spark_gpu_mf.jobs.standalone import StandaloneCluster
from spark_gpu_mf.spark.factors import collect_factors
from tests.cluster import fit_job
from tests.conftest import DATAFLOW_CONFS

pytestmark = pytest.mark.cluster

JOB = str(Path(__file__).parent / "cluster" / "fit_job.py")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    standalone = StandaloneCluster(workers=2, cores=1, log_dir=tmp_path_factory.mktemp("cluster"))
    try:
        yield standalone.start()
    finally:
        standalone.stop()


def _local_fit(spark, solver, max_iter=5):
    """The same fit as fit_job.py, in this test session's local mode."""
    return fit_job.fit(spark, solver, 20_000, max_iter)


def assert_same_model(output: Path, model, rmse):
    factors = np.load(output / "factors.npz")
    remote = json.loads((output / "result.json").read_text())
    assert remote["rmse"] == pytest.approx(rmse, rel=1e-4)
    for side, df in (("user", model.userFactors), ("item", model.itemFactors)):
        ids, local = collect_factors(df)
        np.testing.assert_array_equal(factors[f"{side}_ids"], ids)
        np.testing.assert_allclose(factors[f"{side}_factors"], local, atol=1e-4)
    return remote


@pytest.mark.parametrize(
    "solver,dataflow", [("cholesky", "broadcast"), ("cg", "single task"), ("cg", "messages")]
)
def test_standalone_cluster_fit_equals_local_mode(spark, cluster, tmp_path, solver, dataflow):
    result = cluster.submit(JOB, str(tmp_path), "--solver", solver, conf=DATAFLOW_CONFS[dataflow])
    assert result.returncode == 0, result.stderr[-3000:]
    remote = assert_same_model(tmp_path, *_local_fit(spark, solver))
    assert remote["master"] == cluster.url
    assert remote["executors"] >= 3  # the driver plus one executor per worker


@pytest.mark.parametrize("dataflow", ["single task", "broadcast", "messages"])
def test_tasks_failing_their_first_attempt_are_retried_to_the_same_model(
    spark, cluster, tmp_path, dataflow
):
    conf = {"spark.gpumf.test.failFirstAttempt": "true", **DATAFLOW_CONFS[dataflow]}
    result = cluster.submit(JOB, str(tmp_path), "--solver", "cg", conf=conf)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "failure injected by spark.gpumf.test.failFirstAttempt" in result.stderr
    assert_same_model(tmp_path, *_local_fit(spark, "cg"))


def test_killing_an_executor_mid_fit_still_completes_the_same_model(spark, cluster, tmp_path):
    import signal
    import time

    process = cluster.start_submit(
        JOB,
        str(tmp_path),
        "--solver",
        "cg",
        "--max-iter",
        "12",
        conf=DATAFLOW_CONFS["messages"],  # one Spark job per half-iteration, logged on the driver
    )
    killed = None
    log = []
    deadline = time.time() + 600
    for line in process.stdout:
        log.append(line)
        if killed is None and "ALS iteration 3/12" in line:
            executors = cluster.executor_pids()
            assert len(executors) == 2, executors
            killed = executors[0]
            os.kill(killed, signal.SIGKILL)
        assert time.time() < deadline, "the fit did not finish in 10 minutes"
    assert process.wait(timeout=60) == 0, "".join(log[-60:])
    assert killed is not None, "the fit never logged iteration 3:\n" + "".join(log[-40:])
    assert "ALS iteration 12/12" in "".join(log)
    assert_same_model(tmp_path, *_local_fit(spark, "cg", max_iter=12))


def test_the_starter_stops_every_process_when_its_block_fails(tmp_path):
    pids = []
    with pytest.raises(RuntimeError, match="stop here"):
        with StandaloneCluster(workers=1, cores=1, memory="512m", log_dir=tmp_path) as started:
            pids = [p.pid for p in started.processes]
            assert len(pids) == 2 and all(os.path.exists(f"/proc/{pid}") for pid in pids)
            raise RuntimeError("stop here")
    assert pids and not any(os.path.exists(f"/proc/{pid}") for pid in pids)


def _processes_naming(text: str) -> list[int]:
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline") as f:
                if text in f.read():
                    pids.append(int(entry))
        except OSError:
            pass
    return pids


@pytest.mark.slow  # ~100 s: its own cluster, a driver and warm-up fits of both estimators
def test_benchmark_on_its_own_standalone_cluster_reports_memory_per_worker(tmp_path):
    job = Path(__file__).resolve().parents[1] / "jobs" / "benchmark.py"
    result = subprocess.run(
        [sys.executable, str(job), "--cluster", "standalone", "--executor-memory", "1g",
         "--driver-memory", "1g", "--datasets", "sample", "--modes", "explicit", "--rank", "4",
         "--max-iter", "1", "--variants", "default", "--recommend", "0", "--repeats", "1",
         "--out-dir", str(tmp_path), "--quiet"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "benchmark.json").read_text())
    master = report["environment"]["master"]
    assert master.startswith("spark://127.0.0.1:")
    assert report["environment"]["cluster"]["executorMemory"] == "1g"
    (case,) = report["cases"]
    for entry in (case["spark"], *case["ours"].values()):
        assert len(entry["peakExecutorMiB"]) == 2 and min(entry["peakExecutorMiB"]) > 0
        assert all(s <= p for s, p in zip(entry["executorMiBAtStart"], entry["peakExecutorMiB"]))
    assert "peak executor MiB per worker" in (tmp_path / "benchmark.md").read_text()
    assert _processes_naming(master) == []  # the benchmark stopped its master and workers
