"""spark-submit job: MascotMF's storage modes (fp32, fp16, mascot) against time and accuracy.

``spark-submit jobs/sgd_benchmark.py --help``. For every data set (generated power-law ratings of
one or more sizes, MovieLens 100K and/or Spark's bundled sample file, from
``spark_gpu_mf.jobs.benchmarking``; 20% held out through ``validationIndicatorCol``), every rank
and every seed, MascotMF is fitted once per storage mode (``mascot+rounding``: mascot with our
``roundingThreshold`` rule) with the same seed, blocks and epochs (the MASCOT authors' settings
unless overridden), and ``--repeats`` times in round-robin order so that load from other processes
spreads over all modes. Per mode the job reports, each the best (minimum) over repeats:

* the median wall time of an epoch (epochs 2.. : epoch 1 includes the Python workers' Numba
  cache load) and of its SGD work alone (time tasks spent in the update function, summed over a
  sub-epoch's tasks, summed over the epoch: the CPU cost the storage mode changes), and the
  ratios to fp32;
* the held-out RMSE after the last epoch (float32 predictions, as ``ALSModel.transform``) and its
  difference to fp32 (same seed), how many groups ended in FP32 and the share of all updates
  that ran on FP32 rows (the summary's ``fp32PerEpoch`` line gives it per epoch).

It also times the CPU kernel alone (``mascot_numba.cell_sgd``, no Spark) on the largest cell of
every data set, fp32 against fp16 storage, in nanoseconds per rating: the clean measurement of
what FP16 storage does to the arithmetic and memory traffic of one task. docs/mascot.md quotes
the tables.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from spark_gpu_mf.jobs import benchmarking, common
from spark_gpu_mf.jobs.common import SparkJob
from spark_gpu_mf.mascot import MascotMF
from spark_gpu_mf.sgd import mascot_tasks
from spark_gpu_mf.sgd.mascot_numba import cell_sgd
from spark_gpu_mf.sgd.stratified import assign_blocks

JOB = "sgd_benchmark"
# "mascot+rounding": storage "mascot" with our rounding switch rule (--rounding-threshold) on top
# of the paper's.
STORAGES = ("fp32", "fp16", "mascot", "mascot+rounding")
DEFAULT_STORAGES = ("fp32", "fp16", "mascot")

EPILOG = """\
examples:
  spark-submit --driver-memory 4g jobs/sgd_benchmark.py            # 1M + sample, rank 64 and 128
  spark-submit --driver-memory 6g jobs/sgd_benchmark.py --ratings 1000000,10000000 --repeats 1
  spark-submit jobs/sgd_benchmark.py --datasets sample --ranks 64 --max-iter 20
  spark-submit jobs/sgd_benchmark.py --datasets ml-100k,generated --ranks 128 --seeds 1,2,3 \
      --storages fp32,fp16,mascot,mascot+rounding        # MovieLens 100K: pip-downloaded once
"""


@dataclass
class Dataset:
    name: str
    description: str
    frame: Any  # DataFrame with a boolean "holdout" column
    train: tuple[np.ndarray, np.ndarray, np.ndarray]
    num_train: int
    num_test: int


@dataclass
class Run:
    dataset: str
    rank: int
    storage: str
    repeat: int
    seed: int
    fit_seconds: float
    setup_seconds: float
    epoch_seconds: float  # median over epochs 2..
    compute_seconds: float  # median over epochs 2.. of the summed task time
    overhead_seconds: float  # median over epochs 2..
    validation_rmse: float
    fp32_user_groups: int
    fp32_item_groups: int
    num_user_groups: int
    num_item_groups: int
    validation_curve: list[float] = field(default_factory=list)
    fp32_user_share: list[float] = field(default_factory=list)  # per epoch, of the updates
    fp32_item_share: list[float] = field(default_factory=list)
    fp32_line: str = ""


def build_parser() -> argparse.ArgumentParser:
    parser = common.new_parser(
        JOB,
        "Fit MascotMF with fp32, fp16 and mascot storage on generated and sample ratings; report "
        "epoch times, SGD work, held-out RMSE and the CPU kernel's speed per storage.",
        EPILOG,
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--datasets",
        default="generated,sample",
        help="comma-separated: generated (power-law, planted low-rank model), ml-100k "
        "(MovieLens 100K, fetched once from the recbole 1.2.1 wheel) and/or sample (pyspark's "
        "data/mllib/als/sample_movielens_ratings.txt)",
    )
    data.add_argument(
        "--ratings", default="1000000", help="comma-separated sizes of generated data sets"
    )
    data.add_argument("--test-fraction", type=common.fraction, default=0.2, help="held out")
    data.add_argument("--data-seed", type=int, default=0, help="seed of data and split")
    fit = parser.add_argument_group("MascotMF (defaults: the MASCOT authors' settings)")
    fit.add_argument("--ranks", default="64,128", help="comma-separated ranks")
    fit.add_argument(
        "--storages",
        default=",".join(DEFAULT_STORAGES),
        help="storage modes, fp32 first: " + ", ".join(STORAGES) + " (mascot with "
        "--rounding-threshold)",
    )
    fit.add_argument("--max-iter", type=common.positive_int, default=50, help="epochs")
    fit.add_argument("--step-size", type=float, default=0.01, help="alpha")
    fit.add_argument("--init-std", type=float, default=0.01, help="std of the initial factors")
    fit.add_argument(
        "--sample-step-size",
        type=float,
        default=0.05,
        help="alpha on the sample file: with 40 ratings per user, the authors' 0.01 from "
        "initStd 0.01 is still near the initial RMSE after 50 epochs",
    )
    fit.add_argument(
        "--sample-init-std", type=float, default=0.1, help="initStd on the sample file"
    )
    fit.add_argument("--error-threshold", type=float, default=20.0, help="theta of g-switching")
    fit.add_argument(
        "--rounding-threshold",
        type=float,
        default=0.3,
        help="roundingThreshold of the mascot+rounding mode",
    )
    fit.add_argument("--num-blocks", type=int, default=0, help="DSGD blocks (0: task slots)")
    fit.add_argument(
        "--backend", choices=("auto", "cupy", "numpy"), default="numpy", help="executor math"
    )
    fit.add_argument(
        "--seeds", default="1", help="comma-separated MascotMF seeds; every mode runs each"
    )
    fit.add_argument(
        "--repeats", type=common.positive_int, default=2, help="fits per mode; best time kept"
    )
    fit.add_argument(
        "--kernel-repeats", type=common.positive_int, default=7, help="CPU kernel timings"
    )
    out = parser.add_argument_group("outputs")
    out.add_argument("--json-out", metavar="PATH", help="every run and the tables, as JSON")
    out.add_argument("--markdown-out", metavar="PATH", help="the tables as Markdown")
    out.add_argument("--plot-out", metavar="PATH", help="PNG: held-out RMSE per epoch")
    common.add_common_arguments(parser)
    return parser


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise common.JobError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise common.JobError(f"{option} must be positive integers, got {text!r}")
    return values


def load_datasets(spark, args) -> list[Dataset]:
    import pandas as pd

    result = []
    for name in benchmarking.parse_dataset_names(args.datasets):
        sizes = _ints(args.ratings, "--ratings") if name == "generated" else [0]
        for size in sizes:
            data = benchmarking.load_ratings(
                spark, name, num_ratings=size, test_fraction=args.test_fraction,
                seed=args.data_seed,
            )  # fmt: skip
            label = f"generated {size / 1e6:g}M" if name == "generated" else name
            holdout = np.repeat([False, True], [len(data.train[0]), len(data.test[0])])
            columns = [np.concatenate([a, b]) for a, b in zip(data.train, data.test)]
            pdf = pd.DataFrame(
                {"user": columns[0], "item": columns[1], "rating": columns[2], "holdout": holdout}
            ).astype({"user": "int32", "item": "int32", "rating": "float32"})
            parallelism = spark.sparkContext.defaultParallelism
            frame = spark.createDataFrame(pdf).coalesce(parallelism).cache()
            frame.count()
            result.append(
                Dataset(label, data.description.replace(name, label, 1), frame, data.train,
                        len(data.train[0]), len(data.test[0]))
            )  # fmt: skip
    return result


def fit_once(dataset: Dataset, rank: int, storage: str, repeat: int, seed: int, args) -> Run:
    sample = dataset.name == "sample"
    rounding = storage == "mascot+rounding"
    estimator = MascotMF(
        rank=rank,
        maxIter=args.max_iter,
        stepSize=args.sample_step_size if sample else args.step_size,
        initStd=args.sample_init_std if sample else args.init_std,
        storage="mascot" if rounding else storage,
        errorThreshold=args.error_threshold,
        roundingThreshold=args.rounding_threshold if rounding else 0.0,
        numBlocks=args.num_blocks,
        seed=seed,
        backend=args.backend,
        validationIndicatorCol="holdout",
    )
    started = time.perf_counter()
    model = estimator.fit(dataset.frame)
    fit_seconds = time.perf_counter() - started
    summary = model.summary
    steady = summary.iterations[1:] or summary.iterations
    details = summary.details
    switching = storage.startswith("mascot")
    return Run(
        dataset=dataset.name,
        rank=rank,
        storage=storage,
        repeat=repeat,
        seed=seed,
        fit_seconds=fit_seconds,
        setup_seconds=summary.setup_seconds,
        epoch_seconds=statistics.median(e["seconds"] for e in steady),
        compute_seconds=statistics.median(e["computeSeconds"] for e in steady),
        overhead_seconds=statistics.median(e["overheadSeconds"] for e in steady),
        validation_rmse=float(summary.iterations[-1]["validationRmse"]),
        fp32_user_groups=len(details["fp32UserGroups"]) if switching else 0,
        fp32_item_groups=len(details["fp32ItemGroups"]) if switching else 0,
        num_user_groups=details["numUserGroups"],
        num_item_groups=details["numItemGroups"],
        validation_curve=[float(x) for x in summary.metric("validationRmse")],
        fp32_user_share=[float(x) for x in summary.metric("fp32UserShare")],
        fp32_item_share=[float(x) for x in summary.metric("fp32ItemShare")],
        fp32_line=details["fp32PerEpoch"],
    )


def kernel_timing(dataset: Dataset, rank: int, num_blocks: int, repeats: int) -> dict[str, Any]:
    """ns per rating of ``cell_sgd`` on the data set's largest cell, fp32 vs fp16 storage.

    The cell, its blocks and its visiting order are built in NumPy as the stratified machinery
    builds them; timings interleave the two modes and keep the minimum thread CPU time.
    """
    user, item, rating = dataset.train
    layouts = []
    for ids in (user, item):
        unique, counts = np.unique(ids, return_counts=True)
        layouts.append(assign_blocks("", unique, counts, num_blocks))
    ub, ul = layouts[0].locate(user)
    ib, il = layouts[1].locate(item)
    sizes = np.zeros((num_blocks, num_blocks), np.int64)
    np.add.at(sizes, (ub, ib), 1)
    bu, bi = np.unravel_index(int(np.argmax(sizes)), sizes.shape)
    mask = (ub == bu) & (ib == bi)
    users, items, ratings = ul[mask], il[mask], rating[mask].astype(np.float32)
    order = np.random.default_rng(0).permutation(len(ratings))
    users, items, ratings = users[order], items[order], ratings[order]
    rows_u, rows_i = layouts[0].num_rows[bu], layouts[1].num_rows[bi]
    rng = np.random.default_rng(1)
    start_u = rng.normal(0, 0.1, (rows_u, rank)).astype(np.float32)
    start_i = rng.normal(0, 0.1, (rows_i, rank)).astype(np.float32)
    best = {}
    for _ in range(repeats):
        for storage in ("fp32", "fp16"):
            flags = np.array([storage == "fp32"])
            user_state = mascot_tasks.layout(start_u, np.zeros(rows_u, np.int32), flags)
            item_state = mascot_tasks.layout(start_i, np.zeros(rows_i, np.int32), flags)
            empty_sums, empty_squares = np.zeros((0, rank)), np.zeros(0)
            empty_rounding = np.zeros((0, 2))
            u8 = flags.astype(np.uint8)
            started = time.thread_time()
            cell_sgd(
                users, items, ratings,
                user_state["half"], user_state["single"], user_state["slot"],
                user_state["group"], u8,
                item_state["half"], item_state["single"], item_state["slot"],
                item_state["group"], u8,
                0.005, 0.015, False, 1, 0.05, empty_sums, empty_squares, empty_sums, empty_squares,
                empty_rounding, empty_rounding,
            )  # fmt: skip
            seconds = time.thread_time() - started
            best[storage] = min(best.get(storage, math.inf), seconds)
    ns = {s: 1e9 * best[s] / len(ratings) for s in best}
    return {
        "dataset": dataset.name,
        "rank": rank,
        "cellRatings": len(ratings),
        "userRows": int(rows_u),
        "itemRows": int(rows_i),
        "workingSetMiB": {
            s: (rows_u + rows_i) * rank * (4 if s == "fp32" else 2) / 2**20 for s in ns
        },
        "nsPerRating": ns,
        "fp16OverFp32": ns["fp16"] / ns["fp32"],
    }


def table_rows(runs: list[Run]) -> list[dict[str, Any]]:
    rows = []
    keys = list(dict.fromkeys((r.dataset, r.rank, r.seed) for r in runs))
    for name, rank, seed in keys:
        mine = [r for r in runs if (r.dataset, r.rank, r.seed) == (name, rank, seed)]
        best = {}
        for storage in dict.fromkeys(r.storage for r in mine):
            of_mode = [r for r in mine if r.storage == storage]
            if len({r.validation_rmse for r in of_mode}) != 1:
                raise RuntimeError(
                    f"{name} rank {rank} seed {seed} {storage}: repeats gave different models"
                )
            best[storage] = {
                "epoch": min(r.epoch_seconds for r in of_mode),
                "compute": min(r.compute_seconds for r in of_mode),
                "overhead": min(r.overhead_seconds for r in of_mode),
                "fit": min(r.fit_seconds for r in of_mode),
                "run": of_mode[0],
            }
        base = best.get("fp32")
        for storage, b in best.items():
            run = b["run"]
            rows.append(
                {
                    "dataset": name,
                    "rank": rank,
                    "seed": seed,
                    "storage": storage,
                    "epochSeconds": b["epoch"],
                    "sgdSeconds": b["compute"],
                    "overheadSeconds": b["overhead"],
                    "fitSeconds": b["fit"],
                    "epochOverFp32": b["epoch"] / base["epoch"] if base else None,
                    "sgdOverFp32": b["compute"] / base["compute"] if base else None,
                    "validationRmse": run.validation_rmse,
                    "rmseMinusFp32": (
                        run.validation_rmse - base["run"].validation_rmse if base else None
                    ),
                    "fp32Groups": f"{run.fp32_user_groups}/{run.num_user_groups} users, "
                    f"{run.fp32_item_groups}/{run.num_item_groups} items",
                    "fp32UpdateShare": _mean_share(run),
                    "fp32PerEpoch": run.fp32_line,
                    "repeats": len([r for r in mine if r.storage == storage]),
                }
            )
    return rows


def _mean_share(run: Run) -> float:
    """Share of all updates of the fit (both sides, every epoch) that ran on FP32 rows."""
    shares = run.fp32_user_share + run.fp32_item_share
    return float(np.mean(shares)) if shares else 0.0


def markdown(rows, kernels, data) -> str:
    def ratio(x):
        return "-" if x is None else f"{x:.2f}"

    lines = ["Data sets (20% held out):", ""]
    lines += [f"* {d.description}" for d in data]
    lines += [
        "",
        (
            "| data | rank | seed | storage | epoch s | / fp32 | SGD work s | / fp32 | Spark s | "
            "held-out RMSE | - fp32 | FP32 groups at the end | updates on FP32 rows |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = "-" if r["rmseMinusFp32"] is None else f"{r['rmseMinusFp32']:+.4f}"
        switching = r["storage"].startswith("mascot")
        share = f"{100 * r['fp32UpdateShare']:.0f}%" if switching else "-"
        lines.append(
            f"| {r['dataset']} | {r['rank']} | {r['seed']} | {r['storage']} | "
            f"{r['epochSeconds']:.3f} | {ratio(r['epochOverFp32'])} | {r['sgdSeconds']:.3f} | "
            f"{ratio(r['sgdOverFp32'])} | {r['overheadSeconds']:.3f} | "
            f"{r['validationRmse']:.4f} | {diff} | {r['fp32Groups'] if switching else '-'} | "
            f"{share} |"
        )
    lines += ["", "Updates on FP32 rows per epoch (mascot modes):", ""]
    lines += [
        f"* {r['dataset']} rank {r['rank']} seed {r['seed']} {r['storage']}: {r['fp32PerEpoch']}"
        for r in rows
        if r["storage"].startswith("mascot")
    ]
    lines += [
        "",
        "CPU kernel alone (largest cell, one thread, minimum of repeats):",
        "",
        (
            "| data | rank | cell ratings | rows (user + item) | working set fp32 / fp16 MiB | "
            "fp32 ns/rating | fp16 ns/rating | fp16 / fp32 |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in kernels:
        lines.append(
            f"| {k['dataset']} | {k['rank']} | {k['cellRatings']:,} | "
            f"{k['userRows']:,} + {k['itemRows']:,} | {k['workingSetMiB']['fp32']:.1f} / "
            f"{k['workingSetMiB']['fp16']:.1f} | {k['nsPerRating']['fp32']:.1f} | "
            f"{k['nsPerRating']['fp16']:.1f} | {k['fp16OverFp32']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: list[Run], path: str) -> None:
    """Per data set and rank, two panels with one quantity each: the held-out RMSE of every
    non-fp32 mode minus fp32's (same seed) per epoch, and the share of the updates that ran on
    FP32 rows per epoch in the mascot modes (users solid, items dashed). One line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r.dataset for r in runs))
    ranks = list(dict.fromkeys(r.rank for r in runs))
    colors = {"fp16": "tab:orange", "mascot": "tab:blue", "mascot+rounding": "tab:green"}
    figure, axes = plt.subplots(
        2 * len(ranks),
        len(names),
        figsize=(max(6.0, 4.2 * len(names)), 5.2 * len(ranks)),
        squeeze=False,
    )
    for row, rank in enumerate(ranks):
        for column, name in enumerate(names):
            gap_axis, share_axis = axes[2 * row][column], axes[2 * row + 1][column]
            mine = [r for r in runs if (r.dataset, r.rank) == (name, rank) and r.repeat == 0]
            fp32 = {r.seed: np.array(r.validation_curve) for r in mine if r.storage == "fp32"}
            labelled = set()
            for r in mine:
                if r.storage == "fp32" or r.seed not in fp32:
                    continue
                label = None if r.storage in labelled else r.storage
                labelled.add(r.storage)
                difference = np.array(r.validation_curve) - fp32[r.seed]
                epochs = range(1, len(difference) + 1)
                color = colors.get(r.storage)
                gap_axis.plot(epochs, difference, color=color, lw=1, label=label)
                if r.storage.startswith("mascot"):
                    share_axis.plot(epochs, r.fp32_user_share, color=color, lw=1, label=label)
                    share_axis.plot(epochs, r.fp32_item_share, color=color, lw=1, ls="--")
            gap_axis.axhline(0.005, color="grey", ls="--", lw=0.8, label="+0.005")
            gap_axis.axhline(0.0, color="black", lw=0.5)
            gap_axis.set(title=f"{name}, rank {rank}", xlabel="epoch", ylabel="RMSE - fp32's")
            gap_axis.set_ylim(-0.004, 0.012)
            gap_axis.legend(fontsize=7)
            share_axis.set(
                title="users solid, items dashed",
                xlabel="epoch",
                ylabel="updates on FP32 rows",
                ylim=(0, 1.02),
            )
            share_axis.legend(fontsize=7)
    figure.suptitle("MascotMF against fp32 storage (CPU, Numba, local[2]), one line per seed")
    figure.tight_layout()
    figure.savefig(common.local_output(path, "the plot"), dpi=100)
    plt.close(figure)


def run(args) -> None:
    ranks = _ints(args.ranks, "--ranks")
    seeds = _ints(args.seeds, "--seeds")
    storages = [s.strip() for s in args.storages.split(",") if s.strip()]
    if not storages or set(storages) - set(STORAGES):
        raise common.JobError(f"--storages takes fp32, fp16, mascot; got {args.storages!r}")
    with SparkJob(JOB) as job:
        spark = job.spark
        job.phase("load data")
        data = load_datasets(spark, args)
        num_blocks = args.num_blocks or spark.sparkContext.defaultParallelism
        job.phase("warm-up fit (Python workers, Numba)")
        MascotMF(maxIter=1, rank=8, numBlocks=args.num_blocks, backend=args.backend).fit(
            data[-1].frame
        )
        runs: list[Run] = []
        for dataset in data:
            for rank in ranks:
                for seed in seeds:
                    for repeat in range(args.repeats):
                        for storage in storages:
                            job.phase(
                                f"{dataset.name} rank {rank} seed {seed} {storage} "
                                f"repeat {repeat + 1}"
                            )
                            runs.append(fit_once(dataset, rank, storage, repeat, seed, args))
                            last = runs[-1]
                            common.logger.info(
                                "%s rank %d seed %d %s repeat %d: epoch %.3fs, SGD work %.3fs, "
                                "held-out RMSE %.4f; %s",
                                dataset.name, rank, seed, storage, repeat + 1,
                                last.epoch_seconds, last.compute_seconds, last.validation_rmse,
                                last.fp32_line,
                            )  # fmt: skip
        kernels = [
            kernel_timing(dataset, rank, num_blocks, args.kernel_repeats)
            for dataset in data
            for rank in ranks
        ]
        rows = table_rows(runs)
        text = markdown(rows, kernels, data)
        print(text)
        if args.markdown_out:
            with open(common.local_output(args.markdown_out, "the table"), "w") as f:
                f.write(text)
        if args.json_out:
            common.write_json(
                args.json_out,
                {
                    "settings": {k: v for k, v in vars(args).items() if k != "verbose"},
                    "numBlocks": num_blocks,
                    "datasets": {d.name: d.description for d in data},
                    "spark": {"master": spark.sparkContext.master, "version": spark.version},
                    "table": rows,
                    "kernels": kernels,
                    "runs": [asdict(r) for r in runs],
                },
            )
        if args.plot_out:
            plot(runs, args.plot_out)


def main(argv=None) -> None:
    sys.exit(common.run_job(build_parser(), run, argv))


if __name__ == "__main__":
    main()
