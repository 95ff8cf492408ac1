"""Training on a real multi-process standalone cluster gives the same model as local mode.

Every fit runs in one spark-submit application (``tests/cluster/fit_job.py``), one case after the
other: equality per dataflow, Spark's task retry per dataflow, and last an executor killed mid-fit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from spark_gpu_mf.jobs.standalone import StandaloneCluster
from spark_gpu_mf.spark.factors import collect_factors
from tests.cluster import fit_job
from tests.conftest import DATAFLOW_CONFS

pytestmark = pytest.mark.cluster

JOB = str(Path(__file__).parent / "cluster" / "fit_job.py")
FAIL_FIRST_ATTEMPT = {"spark.gpumf.test.failFirstAttempt": "true"}
DATAFLOWS = ["single task", "broadcast", "messages"]
SAME_MODEL_CASES = {"broadcast": "cholesky", "single task": "cg", "messages": "cg"}
KILL_ITERATIONS = 12


def _cases() -> list[dict]:
    cases = [
        {"name": f"same-{d}", "solver": s, "maxIter": 5, "conf": DATAFLOW_CONFS[d]}
        for d, s in SAME_MODEL_CASES.items()
    ]
    cases += [
        {"name": f"retry-{d}", "solver": "cg", "maxIter": 5,
         "conf": {**FAIL_FIRST_ATTEMPT, **DATAFLOW_CONFS[d]}}
        for d in DATAFLOWS
    ]
    # Last: one Spark job per half-iteration, logged on the driver, so the kill lands mid-fit.
    cases.append({"name": "kill", "solver": "cg", "maxIter": KILL_ITERATIONS,
                  "conf": DATAFLOW_CONFS["messages"]})
    return [{**case, "name": case["name"].replace(" ", "-")} for case in cases]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    standalone = StandaloneCluster(workers=2, cores=1, log_dir=tmp_path_factory.mktemp("cluster"))
    try:
        yield standalone.start()
    finally:
        standalone.stop()


@pytest.fixture(scope="module")
def cluster_run(cluster, tmp_path_factory):
    """The one application of every case; kills an executor at the kill case's 3rd iteration."""
    output = tmp_path_factory.mktemp("cluster_fits")
    process = cluster.start_submit(JOB, str(output), json.dumps(_cases()))
    log, killed, in_kill_case = [], None, False
    deadline = time.time() + 900
    for line in process.stdout:
        log.append(line)
        in_kill_case = in_kill_case or "fit_job: case kill" in line
        if in_kill_case and killed is None and f"ALS iteration 3/{KILL_ITERATIONS}" in line:
            executors = cluster.executor_pids()
            assert len(executors) == 2, executors
            killed = executors[0]
            os.kill(killed, signal.SIGKILL)
        assert time.time() < deadline, "the cluster fits did not finish in 15 minutes"
    returncode = process.wait(timeout=60)
    return {"output": output, "log": "".join(log), "returncode": returncode, "killed": killed}


@pytest.fixture(scope="module")
def local_fits(spark):
    """Local-mode fits of fit_job's data, by (solver, maxIter), computed once."""
    fits = {}

    def get(solver, max_iter=5):
        if (solver, max_iter) not in fits:
            fits[solver, max_iter] = fit_job.fit(spark, solver, max_iter)
        return fits[solver, max_iter]

    return get


def case_result(run, name: str) -> dict:
    assert run["returncode"] == 0, run["log"][-3000:]
    return json.loads((run["output"] / name / "result.json").read_text())


def assert_same_model(run, name: str, model, rmse) -> dict:
    remote = case_result(run, name)
    factors = np.load(run["output"] / name / "factors.npz")
    assert remote["rmse"] == pytest.approx(rmse, rel=1e-4)
    for side, df in (("user", model.userFactors), ("item", model.itemFactors)):
        ids, local = collect_factors(df)
        np.testing.assert_array_equal(factors[f"{side}_ids"], ids)
        np.testing.assert_allclose(factors[f"{side}_factors"], local, atol=1e-4)
    return remote


@pytest.mark.parametrize("dataflow", list(SAME_MODEL_CASES))
def test_standalone_cluster_fit_equals_local_mode(cluster, cluster_run, local_fits, dataflow):
    name = f"same-{dataflow.replace(' ', '-')}"
    remote = assert_same_model(cluster_run, name, *local_fits(SAME_MODEL_CASES[dataflow]))
    assert remote["master"] == cluster.url
    assert remote["executors"] >= 3  # the driver plus one executor per worker
    assert remote["failedTasks"] == 0


@pytest.mark.parametrize("dataflow", DATAFLOWS)
def test_tasks_failing_their_first_attempt_are_retried_to_the_same_model(
    cluster_run, local_fits, dataflow
):
    name = f"retry-{dataflow.replace(' ', '-')}"
    remote = assert_same_model(cluster_run, name, *local_fits("cg"))
    assert remote["failedTasks"] >= 1
    assert "failure injected by spark.gpumf.test.failFirstAttempt" in cluster_run["log"]


def test_killing_an_executor_mid_fit_still_completes_the_same_model(cluster_run, local_fits):
    assert cluster_run["killed"] is not None, "the fit never logged iteration 3:\n" + (
        cluster_run["log"][-3000:]
    )
    assert f"ALS iteration {KILL_ITERATIONS}/{KILL_ITERATIONS}" in cluster_run["log"]
    assert_same_model(cluster_run, "kill", *local_fits("cg", KILL_ITERATIONS))


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
