"""spark_gpu_mf.jobs.benchmarking, the benchmark jobs' shared helpers: held-out RMSE against a
float64 loop written from its definition, the split, the table and plot writers, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from spark_gpu_mf.jobs import benchmarking
from spark_gpu_mf.jobs.common import JobError


@pytest.mark.parametrize("pairs_per_slice", [1 << 20, 2], ids=["one-slice", "slices-of-2"])
def test_held_out_rmse_scores_known_pairs_like_a_plain_loop(monkeypatch, pairs_per_slice):
    monkeypatch.setattr(benchmarking, "_PAIRS_PER_SLICE", pairs_per_slice)
    rng = np.random.default_rng(0)
    user_ids, item_ids = np.array([2, 5, 9], np.int32), np.array([1, 4], np.int32)
    P = rng.normal(size=(3, 4)).astype(np.float32)
    Q = rng.normal(size=(2, 4)).astype(np.float32)
    # (7, 1) and (2, 3) have a user or an item without factors: cold start, not scored.
    test = (
        np.array([2, 9, 5, 7, 2], np.int32),
        np.array([4, 1, 1, 1, 3], np.int32),
        np.array([1.0, 3.5, -2.0, 4.0, 5.0], np.float32),
    )
    squares = []
    for u, i, r in zip(*test):
        if u in user_ids and i in item_ids:
            p = P[list(user_ids).index(u)].astype(np.float64)
            q = Q[list(item_ids).index(i)].astype(np.float64)
            squares.append((float(r) - p @ q) ** 2)
    rmse, scored = benchmarking.held_out_rmse((user_ids, P), (item_ids, Q), test)
    assert scored == 3
    assert rmse == pytest.approx(np.sqrt(np.mean(squares)), rel=1e-12)


def test_held_out_rmse_with_nothing_known_is_nan():
    ids, factors = np.array([1], np.int32), np.ones((1, 2), np.float32)
    test = (np.array([5], np.int32), np.array([1], np.int32), np.array([1.0], np.float32))
    rmse, scored = benchmarking.held_out_rmse((ids, factors), (ids, factors), test)
    assert scored == 0 and np.isnan(rmse)


def test_dataset_names_are_checked():
    assert benchmarking.parse_dataset_names("generated, ML-100K") == ["generated", "ml-100k"]
    for bad in ("", "movielens", "sample,nope"):
        with pytest.raises(JobError, match="--datasets takes generated, sample, ml-100k"):
            benchmarking.parse_dataset_names(bad)


def test_generated_data_is_split_as_asked(spark):
    data = benchmarking.load_ratings(spark, "generated", num_ratings=2_000, test_fraction=0.25)
    assert len(data.test[0]) == 500 and len(data.train[0]) == 1_500
    assert [a.dtype for a in data.train] == [np.int32, np.int32, np.float32]
    again = benchmarking.load_ratings(spark, "generated", num_ratings=2_000, test_fraction=0.25)
    for a, b in zip(data.test, again.test):
        np.testing.assert_array_equal(a, b)
    assert "25% held out (seed 0)" in data.description


def test_markdown_table():
    text = benchmarking.markdown_table(["a", "b"], [[1, "x"], [2.5, "y"]])
    assert text == "| a | b |\n|---|---|\n| 1 | x |\n| 2.5 | y |\n"


def test_plot_has_one_axis_per_panel(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    panels = [
        benchmarking.Panel("speed", "rate", "speedup (x)", [("d", [0, 1], [1.0, 2.0], "o-")],
                           bands=[(1.2, 1.65, "paper")]),
        benchmarking.Panel("error", "rate", "change (%)", [("d", [0, 1], [0.0, 5.0], "o-")],
                           lines=[(20.0, "paper")]),
        benchmarking.Panel("work", "rate", "MACs (%)", [("d", [0, 1], [100.0, 35.0], "o-")]),
    ]  # fmt: skip
    path = tmp_path / "plot.png"
    benchmarking.write_plot(str(path), panels, "title", columns=2)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    visible = [a for a in figures[0].axes if a.get_visible()]
    assert [a.get_ylabel() for a in visible] == ["speedup (x)", "change (%)", "MACs (%)"]
    with pytest.raises(JobError, match="nothing to plot"):
        benchmarking.write_plot(str(path), [], "title")
