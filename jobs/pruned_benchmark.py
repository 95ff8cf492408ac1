"""spark-submit job: PrunedMF's pruning rate against speed and accuracy (the DP-MF table).

``spark-submit jobs/pruned_benchmark.py --help``. For every data set (generated power-law ratings
and Spark's bundled sample file, 20% held out) and every pruning rate, PrunedMF is fitted with the
same seed, blocks and epochs, ``--repeats`` times in round-robin order (so that load from other
processes spreads over all rates), and the job reports per rate:

* speedup over rate 0 of the whole ``fit`` (Spark included), of the epochs (setup excluded) and of
  the per-cell SGD work alone, as wall time (tasks' time in the update function, summed over
  tasks) and as CPU time of the kernel calls (which other processes on the cores do not
  inflate); each is the best (minimum) of the repeats, the usual estimate under interference;
* the executed multiply-add fraction over all epochs and over the pruned epochs only;
* held-out RMSE of the default model (``truncateFactors=True``: its dot products are the pruned
  predictions) and its change relative to rate 0; the same for the untruncated factors' full dot
  products (the DP-MF authors' default prediction); the last epoch's training RMSE.

Each fit runs with ``truncateFactors=False`` and both RMSEs are computed from its factors: the
truncated model's prediction is exactly the pruned dot product with the fit's thresholds
(``pruned_math.truncate_rows``), and truncation itself is one NumPy pass on the driver.

The paper (arXiv 2404.04265, abstract) reports 1.2-1.65x end-to-end speedups for at most 20.08%
more error, with the authors' LIBMF fork on one machine; docs/pruned.md puts the two side by side.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from spark_gpu_mf import datasets
from spark_gpu_mf.jobs import common
from spark_gpu_mf.jobs.common import SparkJob
from spark_gpu_mf.pruned import PrunedMF
from spark_gpu_mf.sgd import pruned_math
from spark_gpu_mf.sgd.pruned_numba import ADAGRAD, sgd_cell
from spark_gpu_mf.sgd.pruned_tasks import ACCUMULATOR, FACTORS, initial_state
from spark_gpu_mf.spark.factors import collect_factors

JOB = "pruned_benchmark"
PAPER_SPEEDUP = (1.2, 1.65)
PAPER_MAX_ERROR_INCREASE = 0.2008

EPILOG = """\
examples:
  spark-submit jobs/pruned_benchmark.py                       # 1M generated + sample, 3 repeats
  spark-submit jobs/pruned_benchmark.py --ratings 5000000 --repeats 2 --json-out r.json
  spark-submit jobs/pruned_benchmark.py --datasets sample --rates 0,0.3 --repeats 1
"""


@dataclass
class Dataset:
    name: str
    description: str
    train: Any  # DataFrame
    train_arrays: tuple[np.ndarray, np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass
class Run:
    dataset: str
    rate: float
    repeat: int
    fit_seconds: float
    setup_seconds: float
    epoch_seconds: float
    compute_seconds: float
    compute_cpu_seconds: float
    mac_fraction: float
    pruned_mac_fraction: float | None
    train_rmse: float
    test_rmse: float
    stale_test_rmse: float
    test_ratings: int
    thresholds: list[float] = field(default_factory=list)


def build_parser() -> argparse.ArgumentParser:
    parser = common.new_parser(
        JOB,
        "Fit PrunedMF at several pruning rates on generated and sample ratings; report wall-time "
        "speedup, executed multiply-add fraction and held-out RMSE change against rate 0.",
        EPILOG,
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--datasets",
        default="generated,sample",
        help="comma-separated: generated (power-law, planted low-rank model) and/or sample "
        "(pyspark's data/mllib/als/sample_movielens_ratings.txt)",
    )
    data.add_argument(
        "--ratings", type=common.positive_int, default=1_000_000, help="generated ratings"
    )
    data.add_argument("--test-fraction", type=common.fraction, default=0.2, help="held out")
    data.add_argument("--data-seed", type=int, default=0, help="seed of data and split")
    fit = parser.add_argument_group("PrunedMF (defaults: the DP-MF authors' settings)")
    fit.add_argument("--rates", default="0,0.1,0.3,0.5", help="pruning rates; 0 first")
    fit.add_argument("--rank", type=common.positive_int, default=30, help="latent factors")
    fit.add_argument("--max-iter", type=common.positive_int, default=20, help="epochs")
    fit.add_argument("--prune-start-epoch", type=int, default=2, help="unpruned epochs")
    fit.add_argument("--num-blocks", type=common.positive_int, default=2, help="DSGD blocks")
    fit.add_argument(
        "--backend", choices=("auto", "cupy", "numpy"), default="numpy", help="executor math"
    )
    fit.add_argument("--seed", type=int, default=0, help="PrunedMF seed")
    fit.add_argument(
        "--repeats", type=common.positive_int, default=3, help="fits per rate; best time kept"
    )
    fit.add_argument(
        "--kernel-repeats",
        type=int,
        default=3,
        help="also run the algorithm without Spark (one cell, the Numba kernel on the driver) "
        "this many times per rate; 0 skips it",
    )
    out = parser.add_argument_group("outputs")
    out.add_argument("--json-out", metavar="PATH", help="every run and the table, as JSON")
    out.add_argument("--markdown-out", metavar="PATH", help="the table as Markdown")
    out.add_argument("--plot-out", metavar="PATH", help="PNG: speedup and RMSE change vs rate")
    common.add_common_arguments(parser)
    return parser


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise common.JobError(f"--rates must be comma-separated numbers, got {text!r}") from None
    if not rates or rates[0] != 0.0 or any(not 0 <= r < 1 for r in rates):
        raise common.JobError(f"--rates must start with 0 and lie in [0, 1), got {text!r}")
    return rates


def load_datasets(spark, args) -> list[Dataset]:
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = set(names) - {"generated", "sample"}
    if unknown or not names:
        raise common.JobError(f"--datasets takes generated and/or sample, got {args.datasets!r}")
    result = []
    for name in names:
        if name == "generated":
            data = datasets.generate_ratings(args.ratings, seed=args.data_seed)
            description = (
                f"generated: {len(data):,} ratings, power-law users and items, planted rank "
                f"{data.planted.rank} model"
            )
            arrays = data.as_tuple()
        else:
            table = datasets.read_spark_sample(spark).toArrow()
            arrays = tuple(table.column(c).to_numpy() for c in ("user", "item", "rating"))
            description = f"Spark's sample_movielens_ratings.txt: {len(arrays[0]):,} ratings"
        train, test = datasets.train_test_split(arrays, args.test_fraction, seed=args.data_seed)
        frame = datasets.to_dataframe(spark, train, num_partitions=args.num_blocks).cache()
        frame.count()
        result.append(Dataset(name, description, frame, train, test))
    return result


def held_out_rmse(model, test, thresholds=(0.0, 0.0)) -> tuple[float, int]:
    """RMSE over the held-out ratings whose user and item were trained, of ``P[u] . Q[i]``
    truncated by ``pruned_math.truncate_rows`` at ``thresholds`` (model units; 0: untouched)."""
    users, P = collect_factors(model.userFactors)
    items, Q = collect_factors(model.itemFactors)
    return factors_rmse(users, P, items, Q, test, thresholds)


def factors_rmse(users, P, items, Q, test, thresholds=(0.0, 0.0)) -> tuple[float, int]:
    """``held_out_rmse`` of factor matrices whose rows belong to the sorted ids ``users``,
    ``items``."""
    P, _ = pruned_math.truncate_rows(P, thresholds[0])
    Q, _ = pruned_math.truncate_rows(Q, thresholds[1])
    user, item, rating = test
    u = np.clip(np.searchsorted(users, user), 0, len(users) - 1)
    i = np.clip(np.searchsorted(items, item), 0, len(items) - 1)
    known = (users[u] == user) & (items[i] == item)
    predicted = np.einsum("nk,nk->n", P[u[known]].astype(np.float64), Q[i[known]])
    errors = rating[known] - predicted
    return float(np.sqrt(np.mean(errors**2))), int(known.sum())


def fit_once(dataset: Dataset, rate: float, repeat: int, args) -> Run:
    estimator = PrunedMF(
        rank=args.rank,
        maxIter=args.max_iter,
        pruningRate=rate,
        pruneStartEpoch=args.prune_start_epoch,
        numBlocks=args.num_blocks,
        seed=args.seed,
        backend=args.backend,
        truncateFactors=False,
    )
    started = time.perf_counter()
    model = estimator.fit(dataset.train)
    fit_seconds = time.perf_counter() - started
    summary = model.summary
    plan = summary.details.get("pruning", {})
    root = math.sqrt(summary.details["ratingScale"])  # thresholds are in training scale
    thresholds = [root * plan.get("thresholdUser", 0.0), root * plan.get("thresholdItem", 0.0)]
    test_rmse, test_ratings = held_out_rmse(model, dataset.test, thresholds)
    stale_test_rmse, _ = held_out_rmse(model, dataset.test)
    pruned = [e["macFraction"] for e in summary.iterations if e["pruned"]]
    return Run(
        dataset=dataset.name,
        rate=rate,
        repeat=repeat,
        fit_seconds=fit_seconds,
        setup_seconds=summary.setup_seconds,
        epoch_seconds=float(sum(summary.metric("seconds"))),
        compute_seconds=float(sum(summary.metric("computeSeconds"))),
        compute_cpu_seconds=float(sum(summary.metric("computeCpuSeconds"))),
        mac_fraction=float(summary.details["macFraction"]),
        pruned_mac_fraction=float(np.mean(pruned)) if pruned else None,
        train_rmse=float(summary.metric("trainRmse")[-1]),
        test_rmse=test_rmse,
        stale_test_rmse=stale_test_rmse,
        test_ratings=test_ratings,
        thresholds=thresholds,
    )


def kernel_study(dataset: Dataset, rate: float, args) -> dict[str, Any]:
    """PrunedMF's algorithm without Spark: every training rating in one cell, one fixed shuffled
    order, the Numba kernel on one core (the closest analogue to the authors' single-machine
    LIBMF measurement). Returns the kernel's CPU seconds over all epochs, the executed MAC
    fraction and the held-out RMSEs."""
    user, item, rating = dataset.train_arrays
    users, u = np.unique(user, return_inverse=True)
    items, i = np.unique(item, return_inverse=True)
    u, i = u.astype(np.int32), i.astype(np.int32)
    scale = float(np.std(rating.astype(np.float64))) or 1.0
    scaled = (rating / scale).astype(np.float32)
    order = np.random.default_rng(args.seed).permutation(len(rating))
    u, i, scaled = u[order], i[order], scaled[order]
    (user_state,) = initial_state([users], args.rank, 0.1, args.seed, 0)
    (item_state,) = initial_state([items], args.rank, 0.1, args.seed, 1)
    P, GP = user_state[FACTORS], user_state[ACCUMULATOR]
    Q, GQ = item_state[FACTORS], item_state[ACCUMULATOR]
    t_p = t_q = 0.0
    cpu = macs = 0.0
    for epoch in range(args.max_iter):
        if epoch == args.prune_start_epoch:
            plan = pruned_math.plan_pruning(P, Q, rate)
            t_p, t_q = plan.threshold_p, plan.threshold_q
            P = pruned_math.permute_columns(P, plan.order)
            Q = pruned_math.permute_columns(Q, plan.order)
        started = time.process_time()
        _, epoch_macs = sgd_cell(u, i, scaled, P, Q, GP, GQ, 0.1, 0.1 / scale, t_p, t_q, ADAGRAD)
        cpu += time.process_time() - started
        macs += epoch_macs
    root = math.sqrt(scale)
    P, Q = P * root, Q * root
    test_rmse, _ = factors_rmse(users, P, items, Q, dataset.test, (t_p * root, t_q * root))
    stale_rmse, _ = factors_rmse(users, P, items, Q, dataset.test)
    return {
        "dataset": dataset.name,
        "rate": rate,
        "cpuSeconds": cpu,
        "macFraction": macs / (args.rank * len(rating) * args.max_iter),
        "testRmse": test_rmse,
        "staleTestRmse": stale_rmse,
    }


def kernel_rows(studies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best CPU time per (data set, rate) and the changes against rate 0."""
    rows = []
    for name in dict.fromkeys(s["dataset"] for s in studies):
        mine = [s for s in studies if s["dataset"] == name]
        rates = list(dict.fromkeys(s["rate"] for s in mine))
        best = {
            r: min((s for s in mine if s["rate"] == r), key=lambda s: s["cpuSeconds"])
            for r in rates
        }
        base = best[rates[0]]
        for rate in rates:
            row = dict(best[rate])
            row["cpuSpeedup"] = base["cpuSeconds"] / row["cpuSeconds"]
            row["testRmseChange"] = row["testRmse"] / base["testRmse"] - 1.0
            row["staleTestRmseChange"] = row["staleTestRmse"] / base["testRmse"] - 1.0
            rows.append(row)
    return rows


def kernel_markdown(rows: list[dict[str, Any]]) -> str:
    header = (
        "| data | pruning rate | kernel CPU s | speedup | MACs executed | test RMSE | change "
        "| untruncated: test RMSE (change) |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['rate']:g} | {r['cpuSeconds']:.2f} | {r['cpuSpeedup']:.2f}x "
            f"| {100 * r['macFraction']:.1f}% | {r['testRmse']:.4f} | "
            f"{100 * r['testRmseChange']:+.1f}% | {r['staleTestRmse']:.4f} "
            f"({100 * r['staleTestRmseChange']:+.1f}%) |"
        )
    return "\n".join(lines) + "\n"


def table_rows(runs: list[Run], rates: list[float]) -> list[dict[str, Any]]:
    """One row per (data set, rate): best times, speedups over rate 0, accuracy change."""
    rows = []
    for name in dict.fromkeys(r.dataset for r in runs):
        best = {}
        for rate in rates:
            mine = [r for r in runs if r.dataset == name and r.rate == rate]
            if len({r.test_rmse for r in mine}) != 1:
                raise RuntimeError(f"{name} rate {rate}: repeats gave different models")
            best[rate] = {
                "fit": min(r.fit_seconds for r in mine),
                "epochs": min(r.epoch_seconds for r in mine),
                "compute": min(r.compute_seconds for r in mine),
                "cpu": min(r.compute_cpu_seconds for r in mine),
                "run": mine[0],
            }
        base = best[rates[0]]
        for rate in rates:
            b, run = best[rate], best[rate]["run"]
            rows.append(
                {
                    "dataset": name,
                    "rate": rate,
                    "fitSeconds": b["fit"],
                    "epochSeconds": b["epochs"],
                    "computeSeconds": b["compute"],
                    "fitSpeedup": base["fit"] / b["fit"],
                    "epochSpeedup": base["epochs"] / b["epochs"],
                    "computeSpeedup": base["compute"] / b["compute"],
                    "computeCpuSeconds": b["cpu"],
                    "computeCpuSpeedup": base["cpu"] / b["cpu"],
                    "macFraction": run.mac_fraction,
                    "prunedMacFraction": run.pruned_mac_fraction,
                    "testRmse": run.test_rmse,
                    "testRmseChange": run.test_rmse / base["run"].test_rmse - 1.0,
                    "staleTestRmse": run.stale_test_rmse,
                    "staleTestRmseChange": run.stale_test_rmse / base["run"].test_rmse - 1.0,
                    "trainRmse": run.train_rmse,
                    "trainRmseChange": run.train_rmse / base["run"].train_rmse - 1.0,
                    "repeats": len([r for r in runs if r.dataset == name and r.rate == rate]),
                }
            )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    header = (
        "| data | pruning rate | fit s | speedup: fit | epochs | SGD wall | SGD CPU | MACs "
        "executed (pruned epochs) | test RMSE | change | untruncated: test RMSE (change) |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['rate']:g} | {r['fitSeconds']:.1f} | {r['fitSpeedup']:.2f}x "
            f"| {r['epochSpeedup']:.2f}x | {r['computeSpeedup']:.2f}x "
            f"| {r['computeCpuSpeedup']:.2f}x | {pct(r['macFraction'])} "
            f"({pct(r['prunedMacFraction'])}) | {r['testRmse']:.4f} | "
            f"{100 * r['testRmseChange']:+.1f}% | {r['staleTestRmse']:.4f} "
            f"({100 * r['staleTestRmseChange']:+.1f}%) |"
        )
    lines.append(
        f"| paper (4 data sets, LIBMF) | - | - | {PAPER_SPEEDUP[0]}-{PAPER_SPEEDUP[1]}x | - | - "
        f"| - | - | - | <= +{100 * PAPER_MAX_ERROR_INCREASE:.2f}% | - |"
    )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(dict.fromkeys(r["dataset"] for r in rows))
    for name, color in zip(names, plt.get_cmap("tab10").colors):
        mine = [r for r in rows if r["dataset"] == name]
        rates = [r["rate"] for r in mine]
        left.plot(rates, [r["fitSpeedup"] for r in mine], "o-", color=color, label=f"{name}: fit")
        left.plot(rates, [r["computeCpuSpeedup"] for r in mine], "s--", color=color,
                  label=f"{name}: SGD CPU")  # fmt: skip
        left.plot(rates, [1 / r["macFraction"] for r in mine], ":", color=color,
                  label=f"{name}: 1 / MACs")  # fmt: skip
        right.plot(rates, [100 * r["testRmseChange"] for r in mine], "o-", color=color,
                   label=name)  # fmt: skip
        right.plot(rates, [100 * r["staleTestRmseChange"] for r in mine], "x:", color=color,
                   label=f"{name}: untruncated")  # fmt: skip
    left.axhspan(*PAPER_SPEEDUP, color="grey", alpha=0.2, label="paper 1.2-1.65x")
    left.set(xlabel="pruning rate", ylabel="speedup over rate 0")
    right.axhline(100 * PAPER_MAX_ERROR_INCREASE, color="grey", ls="--", label="paper <= 20.08%")
    right.set(xlabel="pruning rate", ylabel="held-out RMSE change (%)")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    figure.suptitle("PrunedMF (CPU, Numba, local[2]) against pruning rate 0")
    figure.tight_layout()
    figure.savefig(common.local_output(path, "the plot"), dpi=110)
    plt.close(figure)


def run(args) -> None:
    rates = parse_rates(args.rates)
    with SparkJob(JOB) as job:
        spark = job.spark
        job.phase("load data")
        data = load_datasets(spark, args)
        job.phase("warm-up fit (Python workers, Numba)")
        PrunedMF(maxIter=1, rank=args.rank, numBlocks=args.num_blocks, backend=args.backend).fit(
            data[-1].train
        )
        runs: list[Run] = []
        for dataset in data:
            for repeat in range(args.repeats):
                for rate in rates:
                    job.phase(f"{dataset.name} rate {rate} repeat {repeat + 1}")
                    runs.append(fit_once(dataset, rate, repeat, args))
                    last = runs[-1]
                    common.logger.info(
                        "%s rate %g repeat %d: fit %.2fs, SGD work %.2fs, MACs %.1f%%, test "
                        "RMSE %.4f",
                        dataset.name, rate, repeat + 1, last.fit_seconds, last.compute_seconds,
                        100 * last.mac_fraction, last.test_rmse,
                    )  # fmt: skip
        rows = table_rows(runs, rates)
        text = markdown(rows)
        studies = []
        if args.kernel_repeats:
            job.phase("kernel study (driver only)")
            for dataset in data:
                for _ in range(args.kernel_repeats):
                    studies += [kernel_study(dataset, rate, args) for rate in rates]
            text += "\nWithout Spark (one cell, one core, CPU time of the kernel):\n\n"
            text += kernel_markdown(kernel_rows(studies))
        print("\n".join(d.description for d in data))
        print(text)
        if args.markdown_out:
            with open(common.local_output(args.markdown_out, "the table"), "w") as f:
                f.write(text)
        if args.json_out:
            common.write_json(
                args.json_out,
                {
                    "settings": {k: v for k, v in vars(args).items() if k != "verbose"},
                    "datasets": {d.name: d.description for d in data},
                    "spark": {"master": spark.sparkContext.master, "version": spark.version},
                    "table": rows,
                    "runs": [asdict(r) for r in runs],
                    "kernel": kernel_rows(studies) if studies else [],
                },
            )
        if args.plot_out:
            plot(rows, args.plot_out)
        if any(math.isnan(r["testRmse"]) for r in rows):
            raise common.JobError("a fit produced NaN predictions")


def status(argv=None) -> int:
    """Run the job; the exit status (0 on success; one error line on stderr otherwise)."""
    return common.run_job(build_parser(), run, argv)


def main(argv=None) -> None:
    sys.exit(status(argv))


if __name__ == "__main__":
    main()
