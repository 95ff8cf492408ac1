"""spark-submit job: score a saved model on held-out ratings (RMSE, MAE, ranking metrics).

The held-out ratings are either a file (for example what ``train --test-out`` wrote) or the
part of an input that ``train --test-fraction`` held out, recomputed from the same input,
fraction and ``--data-seed``. With the train job's metrics JSON (``--training-metrics``), it
also plots the per-iteration training curve.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from spark_gpu_mf.jobs import common, inputs, metrics
from spark_gpu_mf.jobs.common import JobError, Paths, SparkJob, format_count, positive_int

JOB = "evaluate"

EPILOG = """\
examples:
  spark-gpu-mf evaluate --model /tmp/m --input /tmp/heldout.parquet --k 10
  spark-gpu-mf evaluate --model /tmp/m --input ratings.csv --test-fraction 0.2 \\
      --relevance-threshold 4 --metrics-out eval.json
  spark-gpu-mf evaluate --model /tmp/m --sample --test-fraction 0.2 \\
      --training-metrics /tmp/m.json --plot-out curve.png

metrics:
  rmse, mae        on held-out ratings whose user and item the model knows (others counted)
  precisionAtK, recallAtK, ndcgAtK, map, mapAtK
                   pyspark's RankingEvaluator: per held-out user, the model's top-k items
                   against the items the user rated in the held-out set
"""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = common.new_parser(
        JOB,
        "Score a saved model on held-out ratings: RMSE, MAE and ranking metrics (precision, "
        "recall and NDCG at k, MAP), and plot the training curve.",
        EPILOG,
        prog,
    )
    parser.add_argument("--model", required=True, metavar="PATH", help="saved model directory")
    inputs.add_input_arguments(parser, job=JOB, default_test_fraction=0.0)
    group = parser.add_argument_group("metrics")
    group.add_argument("--k", type=positive_int, default=10, help="cutoff of the ranking metrics")
    group.add_argument(
        "--relevance-threshold",
        type=float,
        metavar="RATING",
        help="only held-out ratings >= RATING count as relevant for the ranking metrics "
        "(default: every held-out rating)",
    )
    group.add_argument(
        "--no-ranking", action="store_true", help="skip the ranking metrics (RMSE and MAE only)"
    )
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument("--metrics-out", metavar="FILE", help="local JSON file of the metrics")
    outputs.add_argument(
        "--training-metrics",
        metavar="FILE",
        help="the train job's --metrics-out JSON, whose per-iteration summary --plot-out plots",
    )
    outputs.add_argument("--plot-out", metavar="FILE", help="local PNG of the training curve")
    outputs.add_argument(
        "--overwrite", action="store_true", help="replace output files that already exist"
    )
    common.add_common_arguments(parser)
    return parser


def check_arguments(args: argparse.Namespace, paths: Paths) -> dict[str, Any] | None:
    """Checks before any data is read; returns the training summary to plot, if any."""
    if args.input is None and not args.sample and args.generate is None:
        raise JobError("no held-out ratings: pass --input PATH, --sample or --generate N")
    inputs.check_input_arguments(args, paths)
    paths.require_existing(args.model, "model")
    for option in ("metrics_out", "plot_out"):
        path = getattr(args, option)
        if path:
            common.require_local_output(path, "--" + option.replace("_", "-"), args.overwrite)
    if args.plot_out and not args.training_metrics:
        raise JobError("--plot-out plots a training summary: pass --training-metrics FILE too")
    if not args.training_metrics:
        return None
    summary = common.read_json(args.training_metrics, "--training-metrics").get("trainingSummary")
    if args.plot_out and not summary:
        raise JobError(f"{args.training_metrics} has no training summary to plot")
    return summary


def needs_spark(args: argparse.Namespace) -> bool:
    return True


def run(args: argparse.Namespace) -> dict[str, Any]:
    from spark_gpu_mf import ALSModel

    with SparkJob(JOB) as job:
        spark = job.spark
        summary = check_arguments(args, Paths(spark))
        job.phase("load model")
        model = ALSModel.load(args.model)
        model_columns = {"user": model.getUserCol(), "item": model.getItemCol()}
        job.phase("read held-out ratings")
        data = inputs.load_ratings(spark, args, default_columns=model_columns, keep="test")
        columns = data.columns
        model.setUserCol(columns["user"]).setItemCol(columns["item"])
        test = data.test.cache()
        try:
            job.phase("rating metrics")
            document: dict[str, Any] = {
                "job": JOB,
                "model": args.model,
                "rank": model.rank,
                "input": data.source,
                "columns": columns,
                "testFraction": args.test_fraction,
                "dataSeed": args.data_seed,
                "heldOut": metrics.rating_metrics(model, test, columns["rating"]),
                "ranking": None,
            }
            if not args.no_ranking:
                job.phase(f"ranking metrics at k={args.k}")
                document["ranking"] = metrics.ranking_metrics(
                    model, test, columns, args.k, args.relevance_threshold
                )
                document["ranking"]["relevanceThreshold"] = args.relevance_threshold
        finally:
            test.unpersist()
    if args.metrics_out:
        common.write_json(args.metrics_out, document)
    if args.plot_out:
        from spark_gpu_mf.jobs.plots import plot_training_summary

        algorithm = summary.get("algorithm", "model")
        plot_training_summary(summary, args.plot_out, f"{algorithm} training ({args.model})")
        document["plot"] = args.plot_out
    print_result(document, args)
    return document


def print_result(document: dict[str, Any], args: argparse.Namespace) -> None:
    held_out = document["heldOut"]
    rows = []
    for name in ("rmse", "mae"):
        value = held_out[name]
        rows.append((name.upper(), "n/a (nothing scored)" if value is None else f"{value:.4f}"))
    cold = held_out["ratings"] - held_out["scored"]
    rows.append(
        (
            "ratings",
            format_count(held_out["ratings"])
            + (f" ({cold:,} of users or items the model lacks, not scored)" if cold else ""),
        )
    )
    ranking = document.get("ranking")
    if ranking:
        k = ranking["k"]
        for name, label in (
            ("precisionAtK", f"precision@{k}"),
            ("recallAtK", f"recall@{k}"),
            ("ndcgAtK", f"NDCG@{k}"),
            ("map", "MAP"),
            ("mapAtK", f"MAP@{k}"),
        ):
            value = ranking.get(name)
            rows.append((label, "n/a" if value is None else f"{value:.4f}"))
        rows.append(("ranked users", format_count(ranking["users"])))
    if args.metrics_out:
        rows.append(("metrics", args.metrics_out))
    if args.plot_out:
        rows.append(("plot", args.plot_out))
    common.print_report(f"model {args.model} on {inputs.describe_source(document['input'])}", rows)


def main(argv=None) -> None:
    sys.exit(common.run_job(build_parser(), run, argv))


if __name__ == "__main__":
    main()
