"""jobs/pruned_benchmark.py: a tiny end-to-end run in the test session, and its table logic."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "jobs" / "pruned_benchmark.py"
_spec = importlib.util.spec_from_file_location("gpumf_pruned_benchmark", _PATH)
benchmark = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = benchmark  # dataclasses look their module up
_spec.loader.exec_module(benchmark)


def _run(rate, repeat, fit, test_rmse, compute=1.0, mac=1.0):
    return benchmark.Run(
        dataset="d", rate=rate, repeat=repeat, fit_seconds=fit, setup_seconds=0.1,
        epoch_seconds=fit - 0.1, compute_seconds=compute, compute_cpu_seconds=compute / 2,
        mac_fraction=mac,
        pruned_mac_fraction=None if rate == 0 else mac, train_rmse=1.0, test_rmse=test_rmse,
        stale_test_rmse=test_rmse * 2, test_ratings=10,
    )  # fmt: skip


def test_table_takes_the_best_repeat_and_compares_with_rate_zero():
    runs = [
        _run(0.0, 0, 10.0, 1.0, compute=4.0),
        _run(0.5, 0, 6.0, 1.1, compute=1.0, mac=0.25),
        _run(0.0, 1, 8.0, 1.0, compute=5.0),
        _run(0.5, 1, 7.0, 1.1, compute=2.0, mac=0.25),
    ]
    base, pruned = benchmark.table_rows(runs, [0.0, 0.5])
    assert base["fitSpeedup"] == 1.0 and base["testRmseChange"] == 0.0
    assert pruned["fitSeconds"] == 6.0 and pruned["fitSpeedup"] == pytest.approx(8.0 / 6.0)
    assert pruned["computeSpeedup"] == pytest.approx(4.0)
    assert pruned["computeCpuSpeedup"] == pytest.approx(4.0)
    assert pruned["testRmseChange"] == pytest.approx(0.1)
    assert pruned["staleTestRmseChange"] == pytest.approx(1.2)
    assert "| d | 0.5 |" in benchmark.markdown([base, pruned])
    with pytest.raises(RuntimeError, match="different models"):
        benchmark.table_rows([*runs, _run(0.5, 2, 7.0, 1.2)], [0.0, 0.5])


def test_rates_must_start_at_zero():
    assert benchmark.parse_rates("0,0.1,0.3") == [0.0, 0.1, 0.3]
    for bad in ("0.1,0.3", "0,1.0", "0,x"):
        with pytest.raises(benchmark.common.JobError):
            benchmark.parse_rates(bad)


def test_tiny_run_on_the_sample_file(spark, tmp_path):
    out = tmp_path / "result.json"
    argv = [
        "--datasets", "sample", "--rates", "0,0.5", "--repeats", "1", "--max-iter", "2",
        "--prune-start-epoch", "1", "--rank", "4", "--json-out", str(out),
        "--markdown-out", str(tmp_path / "table.md"),
    ]  # fmt: skip
    assert benchmark.status(argv) == 0
    result = json.loads(out.read_text())
    base, pruned = result["table"]
    assert (base["rate"], pruned["rate"]) == (0.0, 0.5)
    assert base["macFraction"] == 1.0 and pruned["macFraction"] < 1.0
    assert base["testRmseChange"] == 0.0 and base["testRmse"] == base["staleTestRmse"]
    assert all(r["test_ratings"] > 250 for r in result["runs"])  # 20% of 1,501, minus cold start
    assert "paper" in (tmp_path / "table.md").read_text()
