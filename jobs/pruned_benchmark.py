"""spark-submit job: PrunedMF's pruning rate against speed and accuracy (the DP-MF table).

``spark-submit jobs/pruned_benchmark.py --help``. For every data set (generated power-law ratings,
MovieLens 100K and/or Spark's bundled sample file, 20% held out; ``spark_gpu_mf.jobs.benchmarking``)
every PrunedMF seed and every pruning rate (with ``--regrowth`` also each nonzero rate with
``regrowth=True``), PrunedMF is fitted with the same blocks and epochs, ``--repeats`` times in
round-robin order (so that load from other processes spreads over all rates), and the job reports
per seed and variant, against rate 0 of the same seed:

* speedup over rate 0 of the whole ``fit`` (Spark included), of the epochs (setup excluded) and of
  the per-cell SGD work alone, as wall time (tasks' time in the update function, summed over
  tasks) and as CPU time of the kernel calls (which other processes on the cores do not
  inflate); each is the best (minimum) of the repeats, the usual estimate under interference;
* the executed multiply-add fraction over all epochs and over the pruned epochs only;
* held-out RMSE of the default model (``truncateFactors=True``: its dot products are the pruned
  predictions) and its change relative to rate 0; the same for the untruncated factors' full dot
  products (the DP-MF authors' default prediction); the last epoch's training RMSE and its
  change (the paper's error figures may be training error);

and a summary over the seeds (mean and range of every change). With ``--als`` it also fits
``spark_gpu_mf.ALS`` with its defaults on the same split, for the RMSE and fit time a user would
compare with.

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
from spark_gpu_mf.jobs import benchmarking, common
from spark_gpu_mf.jobs.benchmarking import Panel, RatingData, markdown_table
from spark_gpu_mf.jobs.common import SparkJob
from spark_gpu_mf.pruned import PrunedMF
from spark_gpu_mf.sgd import pruned_math
from spark_gpu_mf.sgd.pruned_numba import ADAGRAD, sgd_cell
from spark_gpu_mf.sgd.pruned_tasks import ACCUMULATOR, FACTORS, initial_state

JOB = "pruned_benchmark"
PAPER_SPEEDUP = (1.2, 1.65)
PAPER_MAX_ERROR_INCREASE = 0.2008

EPILOG = """\
examples:
  spark-submit jobs/pruned_benchmark.py                  # 1M generated + MovieLens 100K
  spark-submit jobs/pruned_benchmark.py --datasets ml-100k --rates 0,0.3 --regrowth \
      --seeds 0,1,2 --als --json-out r.json
  spark-submit jobs/pruned_benchmark.py --datasets sample --rates 0,0.3 --repeats 1
"""


@dataclass
class Dataset:
    name: str
    description: str
    train: Any  # DataFrame
    train_arrays: tuple[np.ndarray, np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray, np.ndarray]
    num_blocks: int = 0


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
    seed: int = 0
    regrowth: bool = False
    in_driver: bool = False


def build_parser() -> argparse.ArgumentParser:
    parser = common.new_parser(
        JOB,
        "Fit PrunedMF at several pruning rates on generated, MovieLens 100K and/or sample "
        "ratings; report wall-time speedup, executed multiply-add fraction and held-out and "
        "training RMSE change against rate 0.",
        EPILOG,
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--datasets",
        default="generated,ml-100k",
        help="comma-separated: generated (power-law, planted low-rank model), ml-100k "
        "(MovieLens 100K, fetched once from the recbole 1.2.1 wheel) and/or sample (pyspark's "
        "data/mllib/als/sample_movielens_ratings.txt)",
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
    fit.add_argument(
        "--num-blocks",
        type=int,
        default=0,
        help="DSGD blocks; 0 is PrunedMF's default (one per task slot, or one block in the "
        "driver for a small local fit)",
    )
    fit.add_argument(
        "--regrowth", action="store_true", help="also fit every nonzero rate with regrowth=True"
    )
    fit.add_argument(
        "--als", action="store_true", help="also fit spark_gpu_mf.ALS with its defaults"
    )
    fit.add_argument(
        "--backend", choices=("auto", "cupy", "numpy"), default="numpy", help="executor math"
    )
    fit.add_argument("--seeds", default="0", help="comma-separated PrunedMF seeds")
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


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise common.JobError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise common.JobError("--seeds needs at least one seed")
    return seeds


def load_datasets(spark, args) -> list[Dataset]:
    result = []
    for name in benchmarking.parse_dataset_names(args.datasets):
        data: RatingData = benchmarking.load_ratings(
            spark, name, num_ratings=args.ratings, test_fraction=args.test_fraction,
            seed=args.data_seed,
        )  # fmt: skip
        partitions = args.num_blocks or spark.sparkContext.defaultParallelism
        frame = datasets.to_dataframe(spark, data.train, num_partitions=partitions).cache()
        frame.count()
        result.append(Dataset(name, data.description, frame, data.train, data.test))
    return result


def factors_rmse(users, P, items, Q, test, thresholds=(0.0, 0.0)) -> tuple[float, int]:
    """Held-out RMSE of factor matrices whose rows belong to the sorted ids ``users``, ``items``,
    each row truncated by ``pruned_math.truncate_rows`` at ``thresholds`` (0: untouched)."""
    P, _ = pruned_math.truncate_rows(P, thresholds[0])
    Q, _ = pruned_math.truncate_rows(Q, thresholds[1])
    return benchmarking.held_out_rmse((users, P), (items, Q), test)


def fit_once(dataset: Dataset, rate: float, repeat: int, args, seed: int = 0,
             regrowth: bool = False) -> Run:  # fmt: skip
    estimator = PrunedMF(
        rank=args.rank,
        maxIter=args.max_iter,
        pruningRate=rate,
        pruneStartEpoch=args.prune_start_epoch,
        numBlocks=args.num_blocks,
        seed=seed,
        backend=args.backend,
        truncateFactors=False,
        regrowth=regrowth,
    )
    started = time.perf_counter()
    model = estimator.fit(dataset.train)
    fit_seconds = time.perf_counter() - started
    summary = model.summary
    plan = summary.details.get("pruning", {})
    root = math.sqrt(summary.details["ratingScale"])  # thresholds are in training scale
    thresholds = [root * plan.get("thresholdUser", 0.0), root * plan.get("thresholdItem", 0.0)]
    (users, P), (items, Q) = benchmarking.model_factors(model)
    test_rmse, test_ratings = factors_rmse(users, P, items, Q, dataset.test, thresholds)
    stale_test_rmse, _ = factors_rmse(users, P, items, Q, dataset.test)
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
        seed=seed,
        regrowth=regrowth,
        in_driver=bool(summary.details.get("inDriver")),
    )


def fit_als(dataset: Dataset) -> tuple[float, float]:
    """``spark_gpu_mf.ALS()`` with every default, once: fit seconds and held-out RMSE."""
    from spark_gpu_mf import ALS

    started = time.perf_counter()
    model = ALS().fit(dataset.train)
    seconds = time.perf_counter() - started
    return seconds, benchmarking.held_out_rmse(*benchmarking.model_factors(model), dataset.test)[0]


def kernel_study(dataset: Dataset, rate: float, args, seed: int = 0,
                 regrowth: bool = False) -> dict[str, Any]:  # fmt: skip
    """PrunedMF's algorithm without Spark: every training rating in one cell, one fixed shuffled
    order, the Numba kernel on one core (the closest analogue to the authors' single-machine
    LIBMF measurement). Returns the kernel's CPU seconds over all epochs, the executed MAC
    fraction, the last epoch's training RMSE and the held-out RMSEs."""
    user, item, rating = dataset.train_arrays
    users, u = np.unique(user, return_inverse=True)
    items, i = np.unique(item, return_inverse=True)
    u, i = u.astype(np.int32), i.astype(np.int32)
    scale = float(np.std(rating.astype(np.float64))) or 1.0
    scaled = (rating / scale).astype(np.float32)
    order = np.random.default_rng(seed & 0xFFFFFFFF).permutation(len(rating))
    u, i, scaled = u[order], i[order], scaled[order]
    (user_state,) = initial_state([users], args.rank, 0.1, seed, 0)
    (item_state,) = initial_state([items], args.rank, 0.1, seed, 1)
    P, GP = user_state[FACTORS], user_state[ACCUMULATOR]
    Q, GQ = item_state[FACTORS], item_state[ACCUMULATOR]
    t_p = t_q = 0.0
    cpu = macs = sse = 0.0
    for epoch in range(args.max_iter):
        if epoch == args.prune_start_epoch:
            plan = pruned_math.plan_pruning(P, Q, rate)
            t_p, t_q = plan.threshold_p, plan.threshold_q
            P = pruned_math.permute_columns(P, plan.order)
            Q = pruned_math.permute_columns(Q, plan.order)
        started = time.process_time()
        sse, epoch_macs = sgd_cell(
            u, i, scaled, P, Q, GP, GQ, 0.1, 0.1 / scale, t_p, t_q, ADAGRAD, regrowth
        )
        cpu += time.process_time() - started
        macs += epoch_macs
    root = math.sqrt(scale)
    P, Q = P * root, Q * root
    test_rmse, _ = factors_rmse(users, P, items, Q, dataset.test, (t_p * root, t_q * root))
    stale_rmse, _ = factors_rmse(users, P, items, Q, dataset.test)
    return {
        "dataset": dataset.name,
        "seed": seed,
        "rate": rate,
        "regrowth": regrowth,
        "cpuSeconds": cpu,
        "macFraction": macs / (args.rank * len(rating) * args.max_iter),
        "trainRmse": math.sqrt(sse / len(rating)) * scale,
        "testRmse": test_rmse,
        "staleTestRmse": stale_rmse,
    }


def _variant(rate: float, regrowth: bool) -> str:
    return f"{rate:g}" + (" + regrowth" if regrowth else "")


def kernel_rows(studies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best CPU time per (data set, seed, variant) and the changes against rate 0."""
    rows = []
    for name, seed in dict.fromkeys((s["dataset"], s.get("seed", 0)) for s in studies):
        mine = [s for s in studies if s["dataset"] == name and s.get("seed", 0) == seed]
        variants = list(dict.fromkeys((s["rate"], s.get("regrowth", False)) for s in mine))
        best = {
            v: min((s for s in mine if (s["rate"], s.get("regrowth", False)) == v),
                   key=lambda s: s["cpuSeconds"])
            for v in variants
        }  # fmt: skip
        base = best[(0.0, False)] if (0.0, False) in best else best[variants[0]]
        for variant in variants:
            row = dict(best[variant])
            row["cpuSpeedup"] = base["cpuSeconds"] / row["cpuSeconds"]
            row["testRmseChange"] = row["testRmse"] / base["testRmse"] - 1.0
            row["staleTestRmseChange"] = row["staleTestRmse"] / base["testRmse"] - 1.0
            if "trainRmse" in row:
                row["trainRmseChange"] = row["trainRmse"] / base["trainRmse"] - 1.0
            rows.append(row)
    return rows


def kernel_markdown(rows: list[dict[str, Any]]) -> str:
    header = ["data", "seed", "pruning rate", "kernel CPU s", "speedup", "MACs executed",
              "test RMSE", "change", "train RMSE change",
              "untruncated: test RMSE (change)"]  # fmt: skip
    return markdown_table(
        header,
        [
            [r["dataset"], r.get("seed", 0), _variant(r["rate"], r.get("regrowth", False)),
             f"{r['cpuSeconds']:.2f}", f"{r['cpuSpeedup']:.2f}x", f"{100 * r['macFraction']:.1f}%",
             f"{r['testRmse']:.4f}", f"{100 * r['testRmseChange']:+.1f}%",
             f"{100 * r.get('trainRmseChange', float('nan')):+.1f}%",
             f"{r['staleTestRmse']:.4f} ({100 * r['staleTestRmseChange']:+.1f}%)"]
            for r in rows
        ],
    )  # fmt: skip


def table_rows(runs: list[Run], rates: list[float] | None = None) -> list[dict[str, Any]]:
    """One row per (data set, seed, variant): best times, speedups and accuracy change against
    rate 0 of the same data set and seed."""
    rows = []
    for name, seed in dict.fromkeys((r.dataset, r.seed) for r in runs):
        mine = [r for r in runs if r.dataset == name and r.seed == seed]
        variants = list(dict.fromkeys((r.rate, r.regrowth) for r in mine))
        if rates is not None:
            variants = [v for rate in rates for v in variants if v[0] == rate]
        best = {}
        for variant in variants:
            of_variant = [r for r in mine if (r.rate, r.regrowth) == variant]
            if len({r.test_rmse for r in of_variant}) != 1:
                raise RuntimeError(f"{name} variant {variant}: repeats gave different models")
            best[variant] = {
                "fit": min(r.fit_seconds for r in of_variant),
                "epochs": min(r.epoch_seconds for r in of_variant),
                "compute": min(r.compute_seconds for r in of_variant),
                "cpu": min(r.compute_cpu_seconds for r in of_variant),
                "run": of_variant[0],
                "repeats": len(of_variant),
            }
        base = best.get((0.0, False)) or best[variants[0]]
        for variant in variants:
            b, run = best[variant], best[variant]["run"]
            rows.append(
                {
                    "dataset": name,
                    "seed": seed,
                    "rate": variant[0],
                    "regrowth": variant[1],
                    "inDriver": run.in_driver,
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
                    "repeats": b["repeats"],
                }
            )
    return rows


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(rows: list[dict[str, Any]]) -> str:
    header = ["data", "pruning rate", "seed", "fit s", "speedup: fit", "epochs", "SGD wall",
              "SGD CPU", "MACs executed (pruned epochs)", "test RMSE", "change",
              "train RMSE change", "untruncated: test RMSE (change)"]  # fmt: skip
    body = [
        [r["dataset"], _variant(r["rate"], r.get("regrowth", False)), r.get("seed", 0),
         f"{r['fitSeconds']:.1f}", f"{r['fitSpeedup']:.2f}x", f"{r['epochSpeedup']:.2f}x",
         f"{r['computeSpeedup']:.2f}x", f"{r['computeCpuSpeedup']:.2f}x",
         f"{_pct(r['macFraction'])} ({_pct(r['prunedMacFraction'])})", f"{r['testRmse']:.4f}",
         f"{100 * r['testRmseChange']:+.1f}%", f"{100 * r.get('trainRmseChange', 0.0):+.1f}%",
         f"{r['staleTestRmse']:.4f} ({100 * r['staleTestRmseChange']:+.1f}%)"]
        for r in rows
    ]  # fmt: skip
    body.append(
        ["paper (4 data sets, LIBMF)", "-", "-", "-", f"{PAPER_SPEEDUP[0]}-{PAPER_SPEEDUP[1]}x",
         "-", "-", "-", "-", "-", f"<= +{100 * PAPER_MAX_ERROR_INCREASE:.2f}%", "-", "-"]
    )  # fmt: skip
    return markdown_table(header, body)


def summary_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (data set, variant), over the seeds: mean and range of each change, mean MACs."""
    result = []
    for key in dict.fromkeys((r["dataset"], r["rate"], r["regrowth"]) for r in rows):
        mine = [r for r in rows if (r["dataset"], r["rate"], r["regrowth"]) == key]
        entry = {"dataset": key[0], "rate": key[1], "regrowth": key[2], "seeds": len(mine)}
        for name in ("testRmse", "testRmseChange", "trainRmseChange", "staleTestRmseChange",
                     "macFraction", "fitSeconds", "fitSpeedup", "computeCpuSpeedup"):  # fmt: skip
            values = [r[name] for r in mine]
            entry[name] = float(np.mean(values))
            entry[name + "Range"] = [float(min(values)), float(max(values))]
        result.append(entry)
    return result


def summary_markdown(summary: list[dict[str, Any]]) -> str:
    def spread(entry, name):
        low, high = entry[name + "Range"]
        return f"{100 * entry[name]:+.1f}% ({100 * low:+.1f} to {100 * high:+.1f})"

    return markdown_table(
        ["data", "pruning rate", "seeds", "test RMSE", "test RMSE change (range)",
         "train RMSE change (range)", "MACs executed", "fit s", "speedup: fit", "SGD CPU"],
        [
            [e["dataset"], _variant(e["rate"], e["regrowth"]), e["seeds"], f"{e['testRmse']:.4f}",
             spread(e, "testRmseChange"), spread(e, "trainRmseChange"),
             _pct(e["macFraction"]), f"{e['fitSeconds']:.2f}", f"{e['fitSpeedup']:.2f}x",
             f"{e['computeCpuSpeedup']:.2f}x"]
            for e in summary
        ],
    )  # fmt: skip


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Three panels, one quantity each: speedup, held-out RMSE change, executed MACs; one series
    per data set (and per regrowth setting), seeds averaged."""
    summary = summary_rows(rows)
    panels = {
        "speedup": Panel("fit speedup over rate 0", "pruning rate", "speedup (x)", [],
                         bands=[(*PAPER_SPEEDUP, "paper 1.2-1.65x")]),
        "rmse": Panel("held-out RMSE change", "pruning rate", "change vs rate 0 (%)", [],
                      lines=[(100 * PAPER_MAX_ERROR_INCREASE, "paper <= 20.08%")]),
        "macs": Panel("multiply-adds executed", "pruning rate", "share of unpruned (%)", []),
    }  # fmt: skip
    for name in dict.fromkeys(e["dataset"] for e in summary):
        for regrowth in (False, True):
            mine = [
                e for e in summary
                if e["dataset"] == name and (e["rate"] == 0 or e["regrowth"] == regrowth)
            ]  # fmt: skip
            if regrowth and not any(e["regrowth"] for e in mine):
                continue
            label = name + (" + regrowth" if regrowth else "")
            style = "s--" if regrowth else "o-"
            rates = [e["rate"] for e in mine]
            panels["speedup"].series.append((label, rates, [e["fitSpeedup"] for e in mine], style))
            panels["rmse"].series.append(
                (label, rates, [100 * e["testRmseChange"] for e in mine], style)
            )
            panels["macs"].series.append(
                (label, rates, [100 * e["macFraction"] for e in mine], style)
            )
    benchmarking.write_plot(
        path, list(panels.values()), "PrunedMF (CPU, Numba) against pruning rate 0, seeds averaged"
    )


def run(args) -> None:
    rates = parse_rates(args.rates)
    seeds = parse_seeds(args.seeds)
    variants = [(r, False) for r in rates]
    if args.regrowth:
        variants += [(r, True) for r in rates if r > 0]
    with SparkJob(JOB) as job:
        spark = job.spark
        job.phase("load data")
        data = load_datasets(spark, args)
        job.phase("warm-up fit (Python workers, Numba)")
        PrunedMF(maxIter=1, rank=args.rank, numBlocks=args.num_blocks, backend=args.backend).fit(
            data[-1].train
        )
        runs: list[Run] = []
        als = []
        for dataset in data:
            als_fits = []
            for seed in seeds:
                for repeat in range(args.repeats):
                    if args.als and seed == seeds[0]:  # interleaved with PrunedMF's fits
                        job.phase(f"{dataset.name}: ALS with its defaults, repeat {repeat + 1}")
                        als_fits.append(fit_als(dataset))
                    for rate, regrowth in variants:
                        job.phase(f"{dataset.name} seed {seed} rate {_variant(rate, regrowth)} "
                                  f"repeat {repeat + 1}")  # fmt: skip
                        runs.append(fit_once(dataset, rate, repeat, args, seed, regrowth))
                        last = runs[-1]
                        common.logger.info(
                            "%s seed %d rate %s repeat %d: fit %.2fs, SGD work %.2fs, MACs "
                            "%.1f%%, test RMSE %.4f, train RMSE %.4f",
                            dataset.name, seed, _variant(rate, regrowth), repeat + 1,
                            last.fit_seconds, last.compute_seconds, 100 * last.mac_fraction,
                            last.test_rmse, last.train_rmse,
                        )  # fmt: skip
            if als_fits:
                als.append({"dataset": dataset.name, "fitSeconds": min(s for s, _ in als_fits),
                            "testRmse": als_fits[0][1], "repeats": len(als_fits)})  # fmt: skip
        rows = table_rows(runs)
        summary = summary_rows(rows)
        text = "Data sets:\n\n" + "".join(f"* {d.description}\n" for d in data)
        text += f"\nPer seed (through Spark, {spark.sparkContext.master}):\n\n" + markdown(rows)
        text += "\nOver the seeds:\n\n" + summary_markdown(summary)
        if als:
            text += "\nspark_gpu_mf.ALS with its defaults on the same split:\n\n"
            text += markdown_table(
                ["data", "fit s", "test RMSE"],
                [[a["dataset"], f"{a['fitSeconds']:.2f}", f"{a['testRmse']:.4f}"] for a in als],
            )
        studies = []
        if args.kernel_repeats:
            job.phase("kernel study (driver only)")
            for dataset in data:
                for seed in seeds:
                    for _ in range(args.kernel_repeats):
                        studies += [kernel_study(dataset, rate, args, seed, regrowth)
                                    for rate, regrowth in variants]  # fmt: skip
            text += "\nWithout Spark (one cell, one core, CPU time of the kernel):\n\n"
            text += kernel_markdown(kernel_rows(studies))
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
                    "summary": summary,
                    "als": als,
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
