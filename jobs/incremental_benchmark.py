"""spark-submit job: warm start and fold-in against a full refit, side by side in one run.

``spark-submit jobs/incremental_benchmark.py --help``. On generated ratings (power-law
popularity, planted low-rank model; ``--test-fraction`` held out), per dataflow:

* **Warm start.** "Yesterday's" model is fitted without a random ``--new-fraction`` of today's
  training ratings. Today's full refit (cold, ``--max-iter`` iterations) is timed against fits
  of today's ratings warm-started from yesterday's model (``initialModel``: by default its
  saved path, as a daily retrain gives it, so loading the model is part of the warm fit) with a few
  iterations, and against cold fits with as few iterations: fit seconds, their ratio to the
  full refit's, and held-out RMSE.
* **Fold-in.** A model is fitted without ``--fold-in-fraction`` of the users; those users are
  then folded in from their training ratings (``foldInUsers``). Held-out RMSE on their test
  ratings is compared with the full refit's, which trained with them.

Every fit uses the same params and seed; fits of one dataflow run back to back, so compare
ratios within one run (the machine may be shared). Held-out RMSE leaves out test ratings whose
user or item has no factors (``coldStartStrategy="drop"``), through ``jobs.metrics``. A small
fit and fold-in run first, so Python worker start-up and kernel compilation are not timed; per
dataflow, yesterday's fit comes before the timed refits and a small warm start (the held-out
users' ratings) before the timed warm starts, so neither pays the first use of its path.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import numpy as np

from spark_gpu_mf import ALS, datasets
from spark_gpu_mf.jobs import common
from spark_gpu_mf.jobs.benchmarking import DATAFLOW_CONFS
from spark_gpu_mf.jobs.common import SparkJob
from spark_gpu_mf.jobs.metrics import rating_metrics
from spark_gpu_mf.spark.session import runtime_confs

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)

JOB = "incremental_benchmark"

EPILOG = """\
examples:
  spark-submit --driver-memory 4g jobs/incremental_benchmark.py          # 1M ratings, rank 64
  python jobs/incremental_benchmark.py --ratings 100000 --dataflows single --markdown-out t.md
"""


def build_parser():
    parser = common.new_parser(
        JOB,
        "Warm start from yesterday's model and fold-in of held-out users, against a full refit "
        "in the same run: fit seconds and held-out RMSE.",
        EPILOG,
    )
    parser.add_argument("--ratings", type=common.positive_int, default=1_000_000,
                        help="generated ratings (before the test split)")
    parser.add_argument("--test-fraction", type=common.fraction, default=0.2, help="held out")
    parser.add_argument("--new-fraction", type=common.fraction, default=0.05,
                        help="share of today's training ratings yesterday's model lacks")
    parser.add_argument("--fold-in-fraction", type=common.fraction, default=0.1,
                        help="share of users left out of training and folded in")
    parser.add_argument("--rank", type=common.positive_int, default=64)
    parser.add_argument("--max-iter", type=common.positive_int, default=10,
                        help="iterations of the full refit (and of yesterday's model)")
    parser.add_argument("--warm-iters", default="1,2,3",
                        help="comma-separated iterations of the warm-started (and short cold) fits")
    parser.add_argument("--dataflows", default="single,broadcast,messages",
                        help="comma-separated: auto, single, broadcast, messages")
    parser.add_argument("--repeats", type=common.positive_int, default=2,
                        help="timed fits of the full refit and of each warm fit (median kept)")
    parser.add_argument("--initial-model", choices=("saved", "memory"), default="saved",
                        help="warm-start from yesterday's model saved and passed as a path (what a "
                        "daily retrain does; loading is timed), or from the fitted model object")
    parser.add_argument("--model-dir", metavar="PATH",
                        help="where yesterday's models are saved with --initial-model saved "
                        "(default: a temporary local directory, removed at the end; on a cluster "
                        "give storage every executor reads)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=1, help="ALS seed")
    parser.add_argument("--json-out", metavar="PATH", help="everything, as JSON")
    parser.add_argument("--markdown-out", metavar="PATH", help="the tables as Markdown")
    common.add_common_arguments(parser)
    return parser  # fmt: skip


def _timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def _fit(args, frame, max_iter, initial=None):
    """A fit and its wall seconds (the factors are materialized inside ``fit``)."""
    als = ALS(rank=args.rank, maxIter=max_iter, seed=args.seed)
    if initial is not None:
        als.setInitialModel(initial)
    return _timed(lambda: als.fit(frame))


def _rmse(model, test) -> float:
    return rating_metrics(model, test, "rating")["rmse"]


def split(args):
    """``{name: Ratings}``: today's training ratings, yesterday's, those without the held-out
    users, the held-out users' training ratings, the test ratings and theirs."""
    data = datasets.generate_ratings(args.ratings, seed=args.data_seed)
    train, test = datasets.train_test_split(data, args.test_fraction, seed=args.data_seed)
    rng = np.random.default_rng(args.data_seed + 1)
    new = np.zeros(len(train), bool)
    new[rng.permutation(len(train))[: round(len(train) * args.new_fraction)]] = True
    users = np.unique(train.user)
    held_users = rng.choice(users, round(len(users) * args.fold_in_fraction), replace=False)
    held = np.isin(train.user, held_users)
    return {
        "today": train,
        "yesterday": train.take(~new),
        "without": train.take(~held),
        "held": train.take(held),
        "test": test,
        "test of held users": test.take(np.isin(test.user, held_users)),
    }


def run_dataflow(job: SparkJob, args, frames, dataflow: str, warm_iters) -> dict:
    log = common.logger.info
    with runtime_confs(job.spark, DATAFLOW_CONFS[dataflow]):
        job.phase(f"{dataflow}: yesterday's model")
        yesterday, yesterday_s = _fit(args, frames["yesterday"], args.max_iter)
        if args.initial_model == "saved":
            path = os.path.join(args.model_dir, f"yesterday-{dataflow.replace(' ', '-')}")
            yesterday.save(path)
            yesterday = path
        # Untimed: the first warm start of a process pays the first use of its own path (the
        # model's read), as yesterday's fit paid it for the refits timed below.
        _fit(args, frames["held"], 1, initial=yesterday)
        full_s, warm_s, warm, cold_s = [], {k: [] for k in warm_iters}, {}, {}
        for repeat in range(args.repeats):
            job.phase(f"{dataflow}: full refit {repeat + 1}")
            full, seconds = _fit(args, frames["today"], args.max_iter)
            full_s.append(seconds)
            for k in warm_iters:
                job.phase(f"{dataflow}: warm start, {k} iterations, {repeat + 1}")
                warm[k], seconds = _fit(args, frames["today"], k, initial=yesterday)
                warm_s[k].append(seconds)
        warm_rmse = {k: _rmse(model, frames["test"]) for k, model in warm.items()}
        for k in warm_iters:
            job.phase(f"{dataflow}: cold, {k} iterations")
            cold, seconds = _fit(args, frames["today"], k)
            cold_s[k] = (seconds, _rmse(cold, frames["test"]))
        full_median = statistics.median(full_s)
        result = {
            "dataflow": dataflow,
            "yesterdaySeconds": yesterday_s,
            "fullRefit": {"seconds": full_s, "median": full_median,
                          "rmse": _rmse(full, frames["test"])},
            "warm": {k: {"seconds": warm_s[k], "median": statistics.median(warm_s[k]),
                         "ratio": statistics.median(warm_s[k]) / full_median,
                         "rmse": warm_rmse[k]} for k in warm_iters},
            "cold": {k: {"seconds": s, "ratio": s / full_median, "rmse": r}
                     for k, (s, r) in cold_s.items()},
        }  # fmt: skip
        log("%s: full refit %.2fs rmse %.4f", dataflow, full_median, result["fullRefit"]["rmse"])
        job.phase(f"{dataflow}: model without the held-out users")
        without, without_s = _fit(args, frames["without"], args.max_iter)

        def fold():
            folded = without.foldInUsers(frames["held"])
            folded.userFactors.count()  # the solves run here
            return folded

        job.phase(f"{dataflow}: fold-in")
        folded, fold_s = _timed(fold)
        held_test = frames["test of held users"]
        full_held, folded_held = _rmse(full, held_test), _rmse(folded, held_test)
        result["foldIn"] = {
            "withoutSeconds": without_s,
            "foldInSeconds": fold_s,
            "fullRmseOnHeldUsers": full_held,
            "foldedRmseOnHeldUsers": folded_held,
            "relativeDifference": folded_held / full_held - 1.0,
            "foldedRmseOnAll": _rmse(folded, frames["test"]),
        }
        log("%s: fold-in %.2fs, held users' rmse %.4f (full refit %.4f)", dataflow, fold_s,
            folded_held, full_held)  # fmt: skip
        return result


def markdown(results, args, sizes) -> str:
    lines = [
        f"{args.ratings:,} generated ratings ({sizes['today']:,} train, {sizes['test']:,} "
        f"test), rank {args.rank}, {args.max_iter} iterations for the full refit, default ALS "
        f"params otherwise; yesterday lacks {args.new_fraction:.0%} of today's training "
        f"ratings; {args.fold_in_fraction:.0%} of users ({sizes['held']:,} training ratings) "
        "folded in. Seconds are medians of the repeats; ratios are to the full refit of the "
        "same dataflow in the same run.",
        "",
        "| dataflow | fit | iterations | seconds | of full refit | held-out RMSE |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        full = r["fullRefit"]
        lines.append(f"| {r['dataflow']} | full refit (cold) | {args.max_iter} | "
                     f"{full['median']:.2f} | 100% | {full['rmse']:.4f} |")  # fmt: skip
        for k, w in r["warm"].items():
            lines.append(f"| {r['dataflow']} | warm start | {k} | {w['median']:.2f} | "
                         f"{w['ratio']:.0%} | {w['rmse']:.4f} |")  # fmt: skip
        for k, c in r["cold"].items():
            lines.append(f"| {r['dataflow']} | cold, as short | {k} | {c['seconds']:.2f} | "
                         f"{c['ratio']:.0%} | {c['rmse']:.4f} |")  # fmt: skip
    lines += [
        "",
        "| dataflow | fit without them s | fold-in s | RMSE of the held-out users: folded in | "
        "trained with them | difference |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        f = r["foldIn"]
        lines.append(f"| {r['dataflow']} | {f['withoutSeconds']:.2f} | {f['foldInSeconds']:.2f} "
                     f"| {f['foldedRmseOnHeldUsers']:.4f} | {f['fullRmseOnHeldUsers']:.4f} | "
                     f"{f['relativeDifference']:+.2%} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def run(args) -> None:
    warm_iters = [int(k) for k in args.warm_iters.split(",") if k.strip()]
    dataflows = [d.strip() for d in args.dataflows.split(",") if d.strip()]
    unknown = [d for d in dataflows if d not in DATAFLOW_CONFS]
    if unknown:
        raise common.JobError(f"unknown dataflow(s) {', '.join(unknown)}")
    with SparkJob(JOB) as job, tempfile.TemporaryDirectory(prefix="incremental_") as tmp:
        args.model_dir = args.model_dir or tmp
        spark = job.spark
        job.phase("generate data")
        parts = split(args)
        frames = {}
        for name, part in parts.items():
            frames[name] = datasets.to_dataframe(spark, part).cache()
            frames[name].count()
        job.phase("warm-up fit and fold-in (Python workers, compiled kernels)")
        ALS(rank=4, maxIter=1).fit(frames["held"]).foldInUsers(frames["held"]).userFactors.count()
        results = [run_dataflow(job, args, frames, d, warm_iters) for d in dataflows]
        text = markdown(results, args, {name: len(p) for name, p in parts.items()})
        print(text)
        if args.markdown_out:
            with open(common.local_output(args.markdown_out, "the tables"), "w") as f:
                f.write(text)
        if args.json_out:
            settings = {k: v for k, v in vars(args).items() if k not in ("verbose", "model_dir")}
            common.write_json(args.json_out, {
                "settings": settings,
                "spark": {"master": spark.sparkContext.master, "version": spark.version,
                          "parallelism": spark.sparkContext.defaultParallelism},
                "results": results,
            })  # fmt: skip
        for frame in frames.values():
            frame.unpersist()


def main(argv=None) -> None:
    sys.exit(common.run_job(build_parser(), run, argv))


if __name__ == "__main__":
    main()
