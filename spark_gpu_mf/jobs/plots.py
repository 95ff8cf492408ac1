"""The per-iteration plot of a training summary (a PNG the jobs write with ``--plot-out``)."""

from __future__ import annotations

from typing import Any

from spark_gpu_mf.jobs.common import JobError, local_output

# Per-iteration entries that are bookkeeping, not curves.
_NOT_METRICS = {"iteration", "seconds"}


def metric_names(summary: dict[str, Any]) -> list[str]:
    """Per-iteration metrics present in a summary dict (e.g. ``trainRmse``), in first-seen order."""
    names: list[str] = []
    for entry in summary.get("iterations", []):
        for name, value in entry.items():
            if name not in _NOT_METRICS and name not in names and isinstance(value, (int, float)):
                names.append(name)
    return names


def plot_training_summary(summary: dict[str, Any], path: str, title: str) -> None:
    """Write a PNG: each per-iteration metric (left) and the seconds per iteration (right).

    Parameters
    ----------
    summary : dict
        ``TrainingSummary.to_dict()``: ``{"algorithm", "iterations": [{"iteration",
        "seconds", ...metrics}], ...}``.
    path : str
        Local ``.png`` path.
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
    except ImportError:
        raise JobError("--plot-out needs matplotlib: pip install 'spark-gpu-mf[jobs]'") from None

    steps = [entry["iteration"] for entry in iterations]
    unit = "epoch" if summary.get("algorithm") in ("mascot", "pruned") else "iteration"
    names = metric_names(summary)
    panels = 2 if names else 1
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    axes = axes[0]
    if names:
        for name in names:
            values = [entry.get(name) for entry in iterations]
            points = [(s, v) for s, v in zip(steps, values) if v is not None]
            axes[0].plot(*zip(*points), marker="o", label=name)
        axes[0].set_xlabel(unit)
        axes[0].set_ylabel("metric")
        axes[0].set_title("per-" + unit + " metrics")
        axes[0].grid(alpha=0.3)
        axes[0].legend()
    seconds_axis = axes[-1]
    seconds_axis.bar(steps, [entry.get("seconds", 0.0) for entry in iterations], color="#4c72b0")
    seconds_axis.set_xlabel(unit)
    seconds_axis.set_ylabel("seconds")
    setup = summary.get("setup_seconds")
    seconds_axis.set_title(
        f"time per {unit}" + (f" (setup {setup:.1f} s)" if isinstance(setup, (int, float)) else "")
    )
    seconds_axis.grid(alpha=0.3, axis="y")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(target, dpi=100)
    plt.close(figure)
