"""jobs/incremental_benchmark.py: a tiny end-to-end run in the test session."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from spark_gpu_mf.jobs import common

_PATH = Path(__file__).resolve().parents[1] / "jobs" / "incremental_benchmark.py"
_spec = importlib.util.spec_from_file_location("gpumf_incremental_benchmark", _PATH)
benchmark = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = benchmark
_spec.loader.exec_module(benchmark)


def test_tiny_run_reports_warm_start_and_fold_in(spark, tmp_path):
    out = tmp_path / "result.json"
    argv = [
        "--ratings", "4000", "--rank", "4", "--max-iter", "3", "--warm-iters", "1",
        "--dataflows", "single", "--repeats", "1", "--json-out", str(out),
        "--markdown-out", str(tmp_path / "table.md"),
    ]  # fmt: skip
    assert common.run_job(benchmark.build_parser(), benchmark.run, argv) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert result["dataflow"] == "single"
    warm, full = result["warm"]["1"], result["fullRefit"]
    assert warm["ratio"] == warm["median"] / full["median"]
    # Yesterday's 3 iterations plus 1 land near the full refit; a cold single one does not.
    assert warm["rmse"] < result["cold"]["1"]["rmse"]
    fold = result["foldIn"]
    assert fold["relativeDifference"] == fold["foldedRmseOnHeldUsers"] / fold[
        "fullRmseOnHeldUsers"
    ] - 1.0
    assert "fold-in s" in (tmp_path / "table.md").read_text()
