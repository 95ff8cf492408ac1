"""spark-submit job: write a saved model's top-N recommendations as Parquet or CSV.

For all users (``recommendForAllUsers``), all items (``recommendForAllItems``), or a list of
ids (``recommendForUserSubset`` / ``recommendForItemSubset``). Ids the model does not know are
left out, as in Spark.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from spark_gpu_mf.jobs import common
from spark_gpu_mf.jobs.common import JobError, Paths, SparkJob, format_count, positive_int

JOB = "recommend"

EPILOG = """\
examples:
  spark-gpu-mf recommend --model /tmp/m --output /tmp/recs            # top 10 items per user
  spark-gpu-mf recommend --model /tmp/m --for items --num 20 --output /tmp/item_recs
  spark-gpu-mf recommend --model /tmp/m --ids 1,7,42 --output recs.csv --output-format csv
  spark-gpu-mf recommend --model /tmp/m --ids-file users.txt --output s3a://bucket/recs

layouts:
  nested  one row per user: (user, recommendations array<struct<item, rating>>), the schema
          of Spark's ALSModel.recommendForAllUsers (Parquet only)
  flat    one row per recommendation: (user, rank, item, rating), rank 1 = best (Parquet, CSV)
  (for --for items, swap user and item)
"""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = common.new_parser(
        JOB,
        "Write a saved model's top-N recommendations for all users, all items or a list of ids, "
        "as Parquet or CSV.",
        EPILOG,
        prog,
    )
    parser.add_argument("--model", required=True, metavar="PATH", help="saved model directory")
    parser.add_argument("--output", required=True, metavar="PATH", help="output directory")
    parser.add_argument(
        "--for",
        dest="target",
        choices=("users", "items"),
        default="users",
        help="users: the top items of each user; items: the top users of each item",
    )
    parser.add_argument("--num", type=positive_int, default=10, help="recommendations per id")
    ids = parser.add_mutually_exclusive_group()
    ids.add_argument(
        "--ids", metavar="ID,ID,...", help="only these user (or item) ids, comma-separated"
    )
    ids.add_argument(
        "--ids-file",
        metavar="PATH",
        help="only the ids in this text file, one per line (any file system Spark reads)",
    )
    parser.add_argument(
        "--output-format", choices=("parquet", "csv"), default="parquet", help="file format"
    )
    parser.add_argument(
        "--layout",
        choices=("nested", "flat"),
        help="nested (Spark's recommendForAll* schema) or flat rows; default: nested for "
        "Parquet, flat for CSV (CSV cannot hold arrays)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    common.add_common_arguments(parser)
    return parser


def check_arguments(args: argparse.Namespace, paths: Paths) -> list[int] | None:
    """Checks before any work; returns the ``--ids`` list, parsed."""
    paths.require_existing(args.model, "model")
    if args.ids_file:
        paths.require_existing(args.ids_file, "--ids-file")
    paths.require_new(args.output, "output", args.overwrite)
    if args.layout is None:
        args.layout = "flat" if args.output_format == "csv" else "nested"
    if args.output_format == "csv" and args.layout == "nested":
        raise JobError("CSV cannot hold the nested layout's arrays: use --layout flat or Parquet")
    if args.ids is None:
        return None
    return parse_ids(args.ids)


def parse_ids(text: str) -> list[int]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values:
        raise JobError("--ids is empty: give comma-separated integer ids, e.g. --ids 1,7,42")
    ids = []
    for value in values:
        try:
            ids.append(int(value))
        except ValueError:
            raise JobError(f"--ids: {value!r} is not an integer id") from None
        if not -(2**31) <= ids[-1] < 2**31:
            raise JobError(f"--ids: {value} is outside the int range of ALS ids")
    return ids


def needs_spark(args: argparse.Namespace) -> bool:
    return True


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pyspark.sql import functions as F

    from spark_gpu_mf import ALSModel

    with SparkJob(JOB) as job:
        spark = job.spark
        id_list = check_arguments(args, Paths(spark))
        job.phase("load model")
        model = ALSModel.load(args.model)
        for_users = args.target == "users"
        source_col = model.getUserCol() if for_users else model.getItemCol()
        target_col = model.getItemCol() if for_users else model.getUserCol()
        requested = None
        job.phase(
            f"top {args.num} for {'a list of ' if id_list or args.ids_file else 'all '}"
            f"{args.target}"
        )
        if id_list is None and args.ids_file is None:
            recommend = model.recommendForAllUsers if for_users else model.recommendForAllItems
            recommendations = recommend(args.num)
        else:
            wanted = _ids_frame(spark, id_list, args.ids_file, source_col)
            requested = len(id_list) if id_list is not None else None
            subset = model.recommendForUserSubset if for_users else model.recommendForItemSubset
            recommendations = subset(wanted, args.num)
        if args.layout == "flat":
            recommendations = recommendations.select(
                source_col, F.posexplode("recommendations").alias("position", "entry")
            ).select(
                source_col,
                (F.col("position") + 1).alias("rank"),
                F.col(f"entry.{target_col}").alias(target_col),
                F.col("entry.rating").alias("rating"),
            )
        job.phase("write recommendations")
        writer = recommendations.write.mode("overwrite" if args.overwrite else "errorifexists")
        if args.output_format == "csv":
            writer.option("header", True).csv(args.output)
            written = spark.read.option("header", True).csv(args.output)
        else:
            writer.parquet(args.output)
            written = spark.read.parquet(args.output)
        job.phase("count written rows")
        rows = written.count()
        ids = rows if args.layout == "nested" else written.select(source_col).distinct().count()
    document = {
        "job": JOB,
        "model": args.model,
        "for": args.target,
        "num": args.num,
        "output": args.output,
        "format": args.output_format,
        "layout": args.layout,
        "rows": rows,
        "ids": ids,
        "requestedIds": requested,
    }
    print_result(document)
    return document


def _ids_frame(spark, id_list, ids_file, column: str):
    """A one-column DataFrame of the wanted ids, named like the model's id column."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    if id_list is not None:
        schema = T.StructType([T.StructField(column, T.IntegerType(), False)])
        return spark.createDataFrame([(i,) for i in id_list], schema)
    lines = spark.read.text(ids_file).select(F.trim(F.col("value")).alias("value"))
    # Malformed lines fail with Spark's CAST_INVALID_INPUT message (ANSI mode).
    return lines.where(F.col("value") != "").select(F.col("value").cast("int").alias(column))


def print_result(document: dict[str, Any]) -> None:
    ids_label = "users" if document["for"] == "users" else "items"
    ids = format_count(document["ids"])
    if document["requestedIds"] is not None:
        ids += f" of {document['requestedIds']:,} requested (unknown ids are left out)"
    common.print_report(
        f"top {document['num']} recommendations for {ids_label}",
        [
            (ids_label, ids),
            ("rows", format_count(document["rows"])),
            ("output", f"{document['output']} ({document['format']}, {document['layout']})"),
        ],
    )


def main(argv=None) -> None:
    sys.exit(common.run_job(build_parser(), run, argv))


if __name__ == "__main__":
    main()
