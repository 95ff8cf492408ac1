"""spark-submit job: fit a recommender on ratings, report held-out metrics, save the model.

Run it as ``spark-gpu-mf train [options]`` (the console entry point adds the project's Spark
configs), or ``spark-submit jobs/train.py [options]`` with your own. With no options it fits
``ALS`` on 200,000 generated ratings with 20% held out and prints the held-out RMSE and the
fit time, then fits Spark's own ALS with the same params in the same session and prints its
fit time and held-out RMSE beside ours (``--compare-spark``).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from spark_gpu_mf.conf import TRAINING_RMSE
from spark_gpu_mf.jobs import common, estimators, inputs, metrics
from spark_gpu_mf.jobs.common import JobError, Paths, SparkJob, format_count
from spark_gpu_mf.jobs.plots import plot_training_summary, step_unit

JOB = "train"

EPILOG = """\
examples:
  spark-gpu-mf train                                  # ALS on generated data, 20% held out,
                                                      # then Spark's ALS on it to compare
  spark-gpu-mf train --sample --model-out /tmp/m --metrics-out /tmp/m.json
  spark-gpu-mf train --input ratings.csv --user-col userId --item-col movieId \\
      --rank 32 --max-iter 15 --reg-param 0.05 --model-out hdfs:///models/als
  spark-gpu-mf train --input ml-1m/ratings.dat --estimator mascot --param storage=mascot
  spark-gpu-mf train --input events.parquet --implicit-prefs --alpha 40 --test-fraction 0

outputs:
  --model-out     the model in Spark's ALSModel format (pyspark's ALSModel.load reads it)
  --metrics-out   JSON: data, params, fit seconds, held-out rmse/mae, per-iteration summary
  --test-out      the held-out ratings as Parquet, for the evaluate job
  --plot-out      PNG of the per-iteration curve (with --training-rmse: training RMSE)
"""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = common.new_parser(
        JOB,
        "Fit ALS (or MascotMF / PrunedMF) on ratings, report held-out RMSE and MAE, and save "
        "the model in Spark's format.",
        EPILOG,
        prog,
    )
    inputs.add_input_arguments(parser, job=JOB, default_test_fraction=0.2)
    estimators.add_estimator_arguments(parser)
    group = parser.add_argument_group("training")
    group.add_argument(
        "--training-rmse",
        action="store_true",
        help="compute the training RMSE after every iteration (one extra pass each; sets "
        "spark.gpumf.trainingRmse) for the log, the metrics JSON and the plot",
    )
    group.add_argument(
        "--compare-spark",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="then fit pyspark's own ALS with the same params on the same data in the same "
        "session, and report its fit time and held-out RMSE beside ours (default: on when no "
        "input option is given, the demo run on generated data; ALS only)",
    )
    group.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="Spark checkpoint directory, so that checkpointInterval truncates the lineage of "
        "long runs (needed on clusters for more than about 30 iterations)",
    )
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument("--model-out", metavar="PATH", help="where to save the model")
    outputs.add_argument("--metrics-out", metavar="FILE", help="local JSON file of metrics")
    outputs.add_argument(
        "--test-out", metavar="PATH", help="write the held-out ratings here (Parquet)"
    )
    outputs.add_argument("--plot-out", metavar="FILE", help="local PNG of the per-iteration curve")
    outputs.add_argument(
        "--overwrite", action="store_true", help="replace outputs that already exist"
    )
    common.add_common_arguments(parser)
    return parser


def check_arguments(args: argparse.Namespace, paths: Paths) -> None:
    """Everything that can be checked before any data is read (``spark-gpu-mf`` also runs it
    before spark-submit), so that mistakes cost no cluster time."""
    inputs.check_input_arguments(args, paths)
    demo = args.input is None and not args.sample and args.generate is None
    if demo:
        args.generate = inputs.DEFAULT_GENERATED_RATINGS
    if args.compare_spark is None:
        args.compare_spark = demo and args.estimator == "als"
    if args.compare_spark and args.estimator != "als":
        raise JobError("--compare-spark compares ALS with Spark's: use it with --estimator als")
    if args.test_out and args.test_fraction <= 0:
        raise JobError("--test-out needs a held-out split: --test-fraction must be > 0")
    for option in ("model_out", "test_out"):
        if getattr(args, option):
            paths.require_new(getattr(args, option), _option(option), args.overwrite)
    for option in ("metrics_out", "plot_out"):
        if getattr(args, option):
            common.require_local_output(getattr(args, option), _option(option), args.overwrite)
    # Unknown estimators, params and values fail here too.
    estimators.build_estimator(args)


def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def needs_spark(args: argparse.Namespace) -> bool:
    """``--list-params`` is answered without starting Spark."""
    return not args.list_params


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The job: returns the metrics document it reports (and writes with ``--metrics-out``)."""
    if args.list_params:
        print(estimators.describe_params(estimators.build_estimator(args)))
        return {}
    with SparkJob(JOB) as job:
        spark = job.spark
        check_arguments(args, Paths(spark))
        if args.training_rmse:
            job.set_conf(TRAINING_RMSE.key, "true")
        if args.checkpoint_dir:
            spark.sparkContext.setCheckpointDir(args.checkpoint_dir)
        job.phase("read ratings")
        data = inputs.load_ratings(spark, args)
        estimator = estimators.build_estimator(args, data.columns)
        job.phase(f"fit {type(estimator).__name__}")
        common.logger.info(
            "fitting %s on %s", type(estimator).__name__, inputs.describe_source(data.source)
        )
        started = time.perf_counter()
        model = estimator.fit(data.train)
        fit_seconds = time.perf_counter() - started
        summary = model.summary.to_dict() if getattr(model, "hasSummary", False) else None
        document = {
            "job": JOB,
            "estimator": args.estimator,
            "params": estimators.param_values(estimator),
            "input": data.source,
            "columns": data.columns,
            "testFraction": args.test_fraction,
            "dataSeed": args.data_seed,
            "fitSeconds": fit_seconds,
            "trainRatings": (summary or {}).get("details", {}).get("numRatings")
            or data.train.count(),
            "heldOut": None,
            "model": args.model_out,
            "sparkVersion": spark.version,
            "master": spark.sparkContext.master,
            "trainingSummary": summary,
        }
        if data.test is not None:
            job.phase("held-out metrics")
            mean = data.train.agg({data.columns["rating"]: "avg"}).first()[0]
            document["heldOut"] = metrics.rating_metrics(
                model, data.test, data.columns["rating"], baseline=mean
            )
        if args.compare_spark:
            document["sparkAls"] = _fit_spark_als(job, estimator, data)
        if args.model_out:
            job.phase("save model")
            writer = model.write()
            (writer.overwrite() if args.overwrite else writer).save(args.model_out)
        if args.test_out:
            job.phase("write held-out ratings")
            mode = "overwrite" if args.overwrite else "errorifexists"
            data.test.write.mode(mode).parquet(args.test_out)
    if args.metrics_out:
        common.write_json(args.metrics_out, document)
    if args.plot_out:
        if summary is None:
            raise JobError(f"--plot-out: {type(estimator).__name__} produced no training summary")
        plot_training_summary(summary, args.plot_out, f"{type(estimator).__name__} training")
    print_result(document, type(estimator).__name__, args)
    return document


def _fit_spark_als(job: SparkJob, estimator, data: inputs.Ratings) -> dict[str, Any]:
    """pyspark's ALS with our estimator's params, fit after ours on the same training data in
    the same session (so it meets a warm JVM, as ours did not), and its held-out metrics."""
    twin = estimators.spark_als_like(estimator)
    job.phase("fit Spark's ALS for comparison")
    common.logger.info("fitting pyspark.ml.recommendation.ALS with the same params, to compare")
    started = time.perf_counter()
    model = twin.fit(data.train)
    result = {"fitSeconds": time.perf_counter() - started, "heldOut": None}
    if data.test is not None:
        job.phase("Spark's ALS: held-out metrics")
        result["heldOut"] = metrics.rating_metrics(model, data.test, data.columns["rating"])
    return result


def print_result(document: dict[str, Any], estimator_name: str, args: argparse.Namespace) -> None:
    summary = document.get("trainingSummary") or {}
    iterations = summary.get("iterations") or []
    fit = f"{document['fitSeconds']:.1f} s"
    if iterations:
        per_iteration = sum(entry.get("seconds", 0.0) for entry in iterations) / len(iterations)
        unit = step_unit(summary)
        fit += (
            f" (setup {summary.get('setup_seconds', 0.0):.1f} s, {len(iterations)} {unit}s "
            f"of {per_iteration:.2f} s)"
        )
    rows = [("fit time", fit)]
    spark_als = document.get("sparkAls")
    if spark_als:
        theirs = spark_als["fitSeconds"]
        rows.append(
            (
                "Spark ALS fit time",
                f"{theirs:.1f} s (pyspark.ml.recommendation.ALS, same params and data, same "
                f"session, after ours: ours {theirs / document['fitSeconds']:.1f}x faster)",
            )
        )
    held_out = document.get("heldOut")
    if held_out:
        rmse = held_out["rmse"]
        rows.append(("held-out RMSE", "n/a" if rmse is None else f"{rmse:.4f}"))
        theirs = ((spark_als or {}).get("heldOut") or {}).get("rmse")
        if theirs is not None:
            rows.append(("Spark ALS held-out RMSE", f"{theirs:.4f}"))
        if held_out.get("mae") is not None:
            rows.append(("held-out MAE", f"{held_out['mae']:.4f}"))
        if held_out.get("baselineRmse") is not None:
            rows.append(
                ("global-mean RMSE", f"{held_out['baselineRmse']:.4f} (no model, for scale)")
            )
        cold = held_out["ratings"] - held_out["scored"]
        rows.append(
            (
                "held-out ratings",
                f"{format_count(held_out['ratings'])}"
                + (f" ({cold:,} of unseen users or items, not scored)" if cold else ""),
            )
        )
    else:
        rows.append(("held-out RMSE", "none (--test-fraction 0)"))
    rows.append(("train ratings", format_count(document.get("trainRatings"))))
    rows.append(("model", args.model_out or "not saved (--model-out PATH)"))
    if args.metrics_out:
        rows.append(("metrics", args.metrics_out))
    if args.test_out:
        rows.append(("held-out set", args.test_out))
    if args.plot_out:
        rows.append(("plot", args.plot_out))
    title = f"{estimator_name} on {inputs.describe_source(document['input'])}"
    common.print_report(title, rows)


def main(argv=None) -> None:
    sys.exit(common.run_job(build_parser(), run, argv))


if __name__ == "__main__":
    main()
