"""jobs/benchmark.py end to end on tiny data: it runs, and its outputs say what they should.

Nothing here checks a timing (timings belong in docs/benchmarks.md, from the job itself).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

_JOB = Path(__file__).resolve().parents[1] / "jobs" / "benchmark.py"
_spec = importlib.util.spec_from_file_location("gpumf_benchmark_job", _JOB)
benchmark = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = benchmark  # dataclasses look their module up there
_spec.loader.exec_module(benchmark)


@pytest.fixture(scope="module")
def report(spark, tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark")
    result = benchmark.main(
        ["--datasets", "sample,3000", "--modes", "explicit,implicit", "--rank", "4",
         "--max-iter", "2", "--variants", "cg5,cholesky", "--recommend", "5", "--repeats", "1",
         "--out-dir", str(out), "--quiet", "--no-implicit-lib"]
    )
    return result, out


def test_every_case_has_both_estimators_metrics_and_phases(report):
    result, _ = report
    cases = {(c["dataset"], c["mode"]): c for c in result["cases"]}
    assert set(cases) == {(d, m) for d in ("sample", "3000") for m in ("explicit", "implicit")}
    for (_, mode), case in cases.items():
        metric = "auc" if mode == "implicit" else "rmse"
        assert np.isfinite(case["spark"][metric])
        assert set(case["ours"]) == {"cg5", "cholesky"}
        for variant, entry in case["ours"].items():
            assert np.isfinite(entry[metric]) and entry["speedup"] > 0
            assert set(entry["phases"]) == {"blockBuild", "hermitian", "solve", "exchange", "other"}
            assert entry["phases"]["solve"] > 0
            # Neither builds a block's matrices at rank 4: CG is matrix-free, the exact solve
            # builds each row's as it solves it (both count as solve time).
            assert entry["phases"]["hermitian"] == 0
        assert case["floorSeconds"] > 0
    assert result["environment"]["sparkBlas"]["blas"]
    assert result["environment"]["gemmGflops"]["median"] > 0


def test_exact_solver_matches_sparks_accuracy(report):
    """Same params, same seed: the Cholesky path gives Spark's factors, hence its RMSE."""
    result, _ = report
    for case in result["cases"]:
        if case["mode"] == "explicit":
            assert abs(case["ours"]["cholesky"]["rmseRelativeToSpark"]) < 1e-4


def test_recommendations_on_the_same_factors_agree(report):
    result, _ = report
    for case in result["cases"]:
        if case["mode"] == "explicit":
            agreement = case["recommend"]["agreement"]
            assert agreement["different"] == 0 and agreement["missing"] == 0
            assert agreement["identical"] + agreement["tiesOnly"] == agreement["users"] > 0


def test_outputs_are_written(report):
    result, out = report
    assert json.loads((out / "benchmark.json").read_text())["cases"] == json.loads(
        json.dumps(result["cases"], default=float)
    )
    table = (out / "benchmark.md").read_text()
    assert "| Spark ALS |" in table and "| ours (cg5) |" in table and "FLOP floor" in table
    assert (out / "benchmark.png").stat().st_size > 0


def test_flop_count_of_a_fit():
    k = 4
    per_iteration = 2 * 10 * (2 * k * k + 2 * k) + (3 + 2) * (k**3 / 3 + 2 * k * k)
    assert benchmark.fit_flops(10, 3, 2, k, 7, implicit=False) == pytest.approx(7 * per_iteration)
    assert benchmark.fit_flops(10, 3, 2, k, 1, implicit=True) == pytest.approx(
        per_iteration + 5 * 2 * k * k
    )


def test_variant_names():
    assert benchmark.variant_params("default") == {}
    assert benchmark.variant_params("cholesky") == {"solver": "cholesky"}
    assert benchmark.variant_params("cg3-fp16") == {
        "solver": "cg", "cgIterations": 3, "precision": "fp16"
    }


@pytest.fixture(scope="module")
def dataflow_report(spark, tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark-dataflows")
    result = benchmark.main(
        ["--datasets", "sample", "--modes", "explicit", "--rank", "4", "--max-iter", "1",
         "--variants", "default", "--dataflow", "all", "--training-rmse-cost", "--recommend", "0",
         "--repeats", "1", "--out-dir", str(out), "--quiet"]
    )
    return result, out


def test_dataflow_all_gives_one_row_per_dataflow_with_spark_ratios(dataflow_report):
    result, out = dataflow_report
    (case,) = result["cases"]
    ran = {"single": "single task", "broadcast": "broadcast", "messages": "messages"}
    assert set(case["ours"]) == {f"default, {name}" for name in ran}
    table = (out / "benchmark.md").read_text()
    for name, entry in ((e["dataflow"], e) for e in case["ours"].values()):
        assert entry["dataflowRun"] == ran[name]
        assert entry["speedup"] > 0 and abs(entry["rmseRelativeToSpark"]) < 0.05
        assert entry["trainingRmse"]["fitSeconds"]["median"] > 0
        assert entry["trainingRmse"]["dataflowRun"]
        assert f"| ours (default, {name}) | {ran[name]} |" in table
    assert "trainingRmse=true costs" in table
    assert result["params"]["dataflowConfs"]["messages"] == benchmark.DATAFLOW_CONFS["messages"]


def test_connect_fits_both_estimators_on_a_connect_session(tmp_path):
    """``--connect`` as a user runs it, in its own process: a Connect client session turns the
    whole process to Connect mode (pyspark's rule), which the test session must not inherit."""
    import subprocess

    subprocess.run(
        [sys.executable, str(_JOB), "--connect", "--datasets", "sample", "--modes", "explicit",
         "--rank", "4", "--max-iter", "1", "--variants", "default", "--recommend", "0",
         "--repeats", "1", "--out-dir", str(tmp_path), "--quiet"],
        check=True, timeout=600,
    )  # fmt: skip
    result = json.loads((tmp_path / "benchmark.json").read_text())
    assert result["environment"]["connect"] is True
    (case,) = result["cases"]
    assert np.isfinite(case["spark"]["rmse"])
    (entry,) = case["ours"].values()
    assert "error" not in entry
    assert np.isfinite(entry["rmse"])
    assert abs(entry["rmse"] - case["spark"]["rmse"]) < 0.05 * case["spark"]["rmse"]
    assert "through a Spark Connect session" in (tmp_path / "benchmark.md").read_text()


def test_first_fit_report_gives_medians_ranges_and_speedups(tmp_path, monkeypatch):
    """``--first-fit`` alternates fresh processes (faked here: each returns its timings) and
    reports every estimator's median and range, and the speedups over Spark's first fit."""
    calls = []
    seconds = {"spark": [6.0, 8.0, 7.0], "ours": [1.0, 2.0, 1.5]}

    def fake_process(args, who):
        calls.append(who)
        fit = seconds[who][sum(c == who for c in calls) - 1]
        return {"who": who, "ratings": 100_000, "fitSeconds": fit, "importSeconds": 1.0,
                "secondFitSeconds": fit / 2, "untilFirstFitSeconds": fit + 9,
                "sessionSeconds": 4.0, **({"singleTaskIn": "driver"} if who == "ours" else {})}

    monkeypatch.setattr(benchmark, "_fresh_process_fit", fake_process)
    report = benchmark.main(["--first-fit", "--repeats", "3", "--out-dir", str(tmp_path),
                             "--quiet"])
    assert calls == ["spark", "ours", "ours", "spark", "spark", "ours"]
    assert report["params"]["dataset"] == "100k"
    ours = report["firstFit"]["ours"]
    assert ours["fitSeconds"]["median"] == 1.5 and ours["fitSeconds"]["max"] == 2.0
    assert ours["speedup"] == pytest.approx(7.0 / 1.5)
    assert ours["speedupWithImport"] == pytest.approx(8.0 / 2.5)
    table = (tmp_path / "benchmark.md").read_text()
    assert "| ours | driver | 1.50 [1.00-2.00] | 4.7 |" in table
    assert json.loads((tmp_path / "benchmark.json").read_text())["mode"] == "first fit"


def test_the_100k_data_set_has_movielens_100ks_shape():
    data = benchmark.generated("100k", False, 0)
    assert len(data) == 100_000
    assert len(np.unique(data.user)) == 943 and len(np.unique(data.item)) == 1682


@pytest.mark.slow  # two fresh Spark applications
def test_first_fit_runs_each_estimator_in_a_fresh_process(tmp_path):
    import subprocess

    subprocess.run(
        [sys.executable, str(_JOB), "--first-fit", "--datasets", "2000",
         "--repeats", "1", "--out-dir", str(tmp_path), "--quiet"],
        check=True, timeout=900,
    )  # fmt: skip
    report = json.loads((tmp_path / "benchmark.json").read_text())
    runs = report["runs"]
    assert [r["ratings"] for r in runs["spark"]] == [2000]
    assert runs["ours"][0]["singleTaskIn"] == "driver"
    assert "ours (in a task)" not in runs  # a third process, only with --first-fit-in-task
    assert report["firstFit"]["ours"]["speedup"] > 0
    assert runs["ours"][0]["params"]["rank"] == runs["spark"][0]["params"]["rank"] == 10


def test_conf_settings_are_parsed_and_refused_without_a_value():
    args = benchmark.parse_args(["--conf", "spark.gpumf.als.adaptiveExecution = true",
                                 "--conf", "spark.sql.shuffle.partitions=3"])  # fmt: skip
    assert args.conf == [("spark.gpumf.als.adaptiveExecution", "true"),
                         ("spark.sql.shuffle.partitions", "3")]  # fmt: skip
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--conf", "spark.sql.shuffle.partitions"])
