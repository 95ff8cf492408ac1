"""The per-iteration plot of a training summary (a PNG the jobs write with ``--plot-out``).

Panels: the error curves (``trainRmse``, ``validationRmse``, ...), then one panel per other
quantity an estimator reports (PrunedMF's ``macFraction``, MascotMF's ``learningRate``, its FP32
group counts ``fp32UserGroups`` and ``fp32ItemGroups`` together, and the shares of each side's
updates that ran on FP32 rows), and the seconds per iteration. Every axis shows one quantity: a
learning rate of 0.01 drawn on the axis of group counts up to 100 would be a flat line at zero.
Time breakdowns (``...Seconds``) and flags stay in the metrics JSON.
"""

from __future__ import annotations

from typing import Any

from spark_gpu_mf.jobs.common import JobError, local_output

# Per-iteration entries that are bookkeeping, not curves.
_NOT_METRICS = {"iteration", "seconds"}
_SGD_ALGORITHMS = ("mascot", "pruned")


def metric_names(summary: dict[str, Any]) -> list[str]:
    """Numeric per-iteration metrics of a summary dict, in first-seen order (no flags, no
    time breakdowns)."""
    names: list[str] = []
    for entry in summary.get("iterations", []):
        for name, value in entry.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if (
                numeric
                and name not in _NOT_METRICS
                and not name.endswith("Seconds")
                and name not in names
            ):
                names.append(name)
    return names


def step_unit(summary: dict[str, Any]) -> str:
    """What one entry of ``iterations`` is: an ALS iteration or an SGD epoch."""
    return "epoch" if summary.get("algorithm") in _SGD_ALGORITHMS else "iteration"


def is_share_metric(name: str) -> bool:
    return name.endswith("Share")


def is_error_metric(name: str) -> bool:
    lowered = name.lower()
    return lowered.endswith(("rmse", "mae", "loss"))


def quantity(name: str) -> str:
    """What a metric measures, for sharing an axis: the user and item variants of a count are
    one quantity (``fp32UserGroups`` and ``fp32ItemGroups`` -> ``fp32Groups``)."""
    return name.replace("User", "").replace("Item", "")


def plot_training_summary(summary: dict[str, Any], path: str, title: str) -> None:
    """Write a PNG of a training summary's per-iteration curves.

    Parameters
    ----------
    summary : dict
        ``TrainingSummary.to_dict()``: ``{"algorithm", "iterations": [{"iteration",
        "seconds", ...metrics}], "setup_seconds", ...}``.
    path : str
        Local ``.png`` path (its directory is created).
    title : str
        Figure title, e.g. the estimator and the data.
    """
    iterations = summary.get("iterations") or []
    if not iterations:
        raise JobError("the training summary has no iterations to plot")
    target = local_output(path, "a plot")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise JobError("--plot-out needs matplotlib: pip install 'spark-gpu-mf[jobs]'") from None

    steps = [entry["iteration"] for entry in iterations]
    unit = step_unit(summary)
    names = metric_names(summary)
    others: dict[str, list[str]] = {}
    for name in names:
        if not is_error_metric(name):
            others.setdefault(quantity(name), []).append(name)
    groups = [("error", [n for n in names if is_error_metric(n)]), *others.items()]
    groups = [(label, members) for label, members in groups if members]
    columns = min(len(groups) + 1, 3)
    rows = -(-(len(groups) + 1) // columns)
    figure, grid = plt.subplots(rows, columns, figsize=(5.5 * columns, 4 * rows), squeeze=False)
    axes = list(grid.flat)
    for axis in axes[len(groups) + 1 :]:
        axis.set_visible(False)
    axes = axes[: len(groups) + 1]
    for axis in axes:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axis, (label, members) in zip(axes, groups):
        for name in members:
            points = [(s, e[name]) for s, e in zip(steps, iterations) if e.get(name) is not None]
            axis.plot(*zip(*points), marker="o", label=name)
        axis.set_xlabel(unit)
        axis.set_ylabel(label)
        axis.set_title(f"{label} per {unit}")
        if label == "share":
            axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
        axis.legend()
    seconds_axis = axes[-1]
    seconds_axis.bar(steps, [entry.get("seconds", 0.0) for entry in iterations], color="#4c72b0")
    seconds_axis.set_xlabel(unit)
    seconds_axis.set_ylabel("seconds")
    setup = summary.get("setup_seconds")
    setup_text = f" (setup {setup:.1f} s)" if isinstance(setup, (int, float)) else ""
    seconds_axis.set_title(f"time per {unit}{setup_text}")
    seconds_axis.grid(alpha=0.3, axis="y")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(target, dpi=100)
    plt.close(figure)
