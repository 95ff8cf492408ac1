"""What the benchmark jobs share: data sets, the held-out split and RMSE, Markdown tables, plots.

``jobs/benchmark.py`` (ALS against Spark's), ``jobs/sgd_benchmark.py`` (MascotMF's storage modes)
and ``jobs/pruned_benchmark.py`` (PrunedMF's pruning rates) measure on the same data the same
way:

* data sets by name: ``generated`` (seeded power-law ratings with a planted low-rank model, any
  size), ``sample`` (Spark's bundled ``sample_movielens_ratings.txt``, 1,501 ratings) and
  ``ml-100k`` (MovieLens 100K, fetched once from the ``recbole==1.2.1`` wheel into a cache by
  :func:`spark_gpu_mf.jobs.real_data.movielens_100k_path`; never needed by the tests);
* a seeded random held-out split (:func:`spark_gpu_mf.datasets.train_test_split`);
* held-out RMSE over the test ratings whose user and item were trained (``coldStartStrategy
  ="drop"``), from collected factors, in float64;
* Markdown tables and PNG plots in which every axis shows one quantity (two quantities of
  different scales on one axis hide one of them);
* the confs that make our ALS take each dataflow (:data:`DATAFLOW_CONFS`, set for a block by
  ``spark_gpu_mf.spark.session.runtime_confs``), for ``jobs/benchmark.py`` and
  ``jobs/incremental_benchmark.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from spark_gpu_mf.conf import BROADCAST_THRESHOLD, SINGLE_TASK_MAX_RATINGS
from spark_gpu_mf.jobs.common import JobError, local_output

__all__ = [
    "DATAFLOW_CONFS",
    "DATASETS",
    "Panel",
    "RatingData",
    "held_out_rmse",
    "load_ratings",
    "markdown_table",
    "model_factors",
    "parse_dataset_names",
    "write_plot",
]

# The confs that make our ALS take each dataflow; "auto" sets nothing (the size thresholds
# decide, as for users). The one place to change when the dataflow confs change.
DATAFLOW_CONFS = {
    "auto": {},
    "single": {SINGLE_TASK_MAX_RATINGS.key: str(2**31 - 1)},
    "broadcast": {SINGLE_TASK_MAX_RATINGS.key: "0", BROADCAST_THRESHOLD.key: "1t"},
    "messages": {SINGLE_TASK_MAX_RATINGS.key: "0", BROADCAST_THRESHOLD.key: "0"},
}


DATASETS = ("generated", "sample", "ml-100k")

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass
class RatingData:
    """One data set split into training and held-out ratings (int32, int32, float32 arrays)."""

    name: str
    description: str
    train: Arrays
    test: Arrays


def parse_dataset_names(text: str, allowed: Sequence[str] = DATASETS) -> list[str]:
    """The comma-separated ``--datasets`` value as a list, or a ``JobError`` naming the choices."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise JobError(f"--datasets takes {', '.join(allowed)}; got {text!r}")
    return names


def _as_arrays(user, item, rating) -> Arrays:
    return (
        np.asarray(user).astype(np.int32),
        np.asarray(item).astype(np.int32),
        np.asarray(rating).astype(np.float32),
    )


def load_ratings(
    spark, name: str, *, num_ratings: int = 1_000_000, test_fraction: float = 0.2, seed: int = 0
) -> RatingData:
    """Data set ``name`` (see :data:`DATASETS`) with ``test_fraction`` held out at random.

    ``num_ratings`` is the size of ``generated``; ``seed`` seeds its generator and the split.
    """
    from spark_gpu_mf import datasets

    if name == "generated":
        data = datasets.generate_ratings(num_ratings, seed=seed)
        arrays = _as_arrays(*data.as_tuple())
        description = (
            f"generated: {len(data):,} ratings of {len(np.unique(data.user)):,} users and "
            f"{len(np.unique(data.item)):,} items, power-law popularity, planted rank "
            f"{data.planted.rank} model, noise {data.planted.noise}"
        )
    elif name == "sample":
        table = datasets.read_spark_sample(spark).toArrow()
        arrays = _as_arrays(*(table.column(c).to_numpy() for c in ("user", "item", "rating")))
        description = f"sample: Spark's sample_movielens_ratings.txt, {len(arrays[0]):,} ratings"
    elif name == "ml-100k":
        from spark_gpu_mf.jobs.real_data import movielens_100k_path

        try:
            path = movielens_100k_path()
        except RuntimeError as error:
            raise JobError(str(error)) from None
        table = datasets.read_movielens(spark, path, "ml-100k").toArrow()
        arrays = _as_arrays(*(table.column(c).to_numpy() for c in ("user", "item", "rating")))
        description = (
            f"ml-100k: MovieLens 100K ({len(arrays[0]):,} ratings of "
            f"{len(np.unique(arrays[0])):,} users and {len(np.unique(arrays[1])):,} movies, "
            "1-5 stars; from the recbole 1.2.1 wheel)"
        )
    else:
        raise JobError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")
    train, test = datasets.train_test_split(arrays, test_fraction, seed=seed)
    held_out = f"{100 * test_fraction:g}% held out (seed {seed})"
    return RatingData(name, f"{description}; {held_out}", train, test)


def model_factors(model) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``((user ids, P), (item ids, Q))`` of a fitted ALS model, ids ascending."""
    from spark_gpu_mf.spark.factors import collect_factors

    return collect_factors(model.userFactors), collect_factors(model.itemFactors)


def held_out_rmse(users, items, test: Arrays) -> tuple[float, int]:
    """RMSE of ``P[u] . Q[i]`` (float64) over the test ratings whose user and item both have
    factors, and how many those are.

    ``users`` / ``items`` are ``(ascending ids, factor matrix)`` pairs, as
    :func:`model_factors` returns them.
    """
    (user_ids, P), (item_ids, Q) = users, items
    user, item, rating = test
    u = np.clip(np.searchsorted(user_ids, user), 0, max(len(user_ids) - 1, 0))
    i = np.clip(np.searchsorted(item_ids, item), 0, max(len(item_ids) - 1, 0))
    known = (
        (user_ids[u] == user) & (item_ids[i] == item)
        if len(user_ids) and len(item_ids)
        else (np.zeros(len(user), bool))
    )
    if not known.any():
        return float("nan"), 0
    u, i, rating = u[known], i[known], rating[known]
    squared = 0.0
    # In slices: gathering every test pair's factors at once would take 12 GB at 12.5M pairs.
    for start in range(0, len(u), _PAIRS_PER_SLICE):
        part = slice(start, start + _PAIRS_PER_SLICE)
        predicted = np.einsum("nk,nk->n", P[u[part]].astype(np.float64), Q[i[part]])
        squared += float(np.sum((rating[part].astype(np.float64) - predicted) ** 2))
    return float(np.sqrt(squared / len(u))), len(u)


_PAIRS_PER_SLICE = 1 << 20


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; cells are written with ``str`` (format numbers before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


@dataclass
class Panel:
    """One axis of a plot: one quantity (``ylabel``) against ``xlabel``, one or more series.

    ``series``: ``(label, xs, ys, style)`` with a matplotlib format string as style. ``bands``:
    ``(low, high, label)`` horizontal reference bands, ``lines``: ``(y, label)`` reference lines,
    both in the panel's unit.
    """

    title: str
    xlabel: str
    ylabel: str
    series: list[tuple[str, Sequence[float], Sequence[float], str]]
    bands: Sequence[tuple[float, float, str]] = ()
    lines: Sequence[tuple[float, str]] = ()


def write_plot(path: str, panels: Sequence[Panel], title: str, *, columns: int = 0) -> None:
    """A PNG with one axis per panel (``columns`` per row; 0: all in one row)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise JobError("plots need matplotlib: pip install 'spark-gpu-mf[jobs]'") from None
    if not panels:
        raise JobError("nothing to plot")
    columns = columns or len(panels)
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.6 * rows), squeeze=False)
    for axis in axes.flat[len(panels) :]:
        axis.set_visible(False)
    for axis, panel in zip(axes.flat, panels):
        for low, high, label in panel.bands:
            axis.axhspan(low, high, color="grey", alpha=0.2, label=label)
        for y, label in panel.lines:
            axis.axhline(y, color="grey", ls="--", lw=0.8, label=label)
        for label, xs, ys, style in panel.series:
            axis.plot(xs, ys, style, label=label)
        axis.set(title=panel.title, xlabel=panel.xlabel, ylabel=panel.ylabel)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(local_output(path, "the plot"), dpi=100)
    plt.close(figure)
