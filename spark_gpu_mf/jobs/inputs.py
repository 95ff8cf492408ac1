"""Where ratings come from: files (CSV, Parquet, MovieLens), Spark's sample, or the generator.

The train and evaluate jobs share these options and the held-out split, so that
``evaluate --test-fraction 0.2`` scores exactly the ratings ``train --test-fraction 0.2`` held
out of the same input (same ``--data-seed``), without writing the split anywhere.

The split is a function of each rating's ``(user, item)`` pair and the seed (a hash), not of
row order or partitioning: Spark's ``randomSplit`` gives different splits when its input is
recomputed, which would leak test ratings into training. Generated data are split in NumPy by
:func:`spark_gpu_mf.datasets.train_test_split` (exact sizes, same seed, same split).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from spark_gpu_mf.jobs.checks import check_ratings
from spark_gpu_mf.jobs.common import (
    JobError,
    Paths,
    describe_exception,
    fraction,
    is_local_path,
    local_path,
    positive_int,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

FORMATS = ("auto", "csv", "parquet", "movielens")
#: Default size of ``--generate`` when a train job is given no input at all (``make demo``).
DEFAULT_GENERATED_RATINGS = 200_000
ROLES = ("user", "item", "rating")
# Column names tried, in order, when no --*-col option is given: ours (Spark's ALS defaults),
# then MovieLens's ratings.csv header (userId,movieId,rating,timestamp).
_DEFAULT_NAMES = {"user": ("user", "userId"), "item": ("item", "movieId"), "rating": ("rating",)}
_SPLIT_BUCKETS = 1_000_000


@dataclass
class Ratings:
    """The ratings a job works on, with their column names and where they came from."""

    train: DataFrame
    test: DataFrame | None
    columns: dict[str, str]  # role ("user", "item", "rating") -> column name
    source: dict[str, object]  # for reports and the metrics JSON


def add_input_arguments(
    parser: argparse.ArgumentParser, *, job: str, default_test_fraction: float
) -> None:
    """The ``input ratings`` option group (source, format, columns, split)."""
    group = parser.add_argument_group(
        "input ratings",
        "One of --input, --sample or --generate"
        + (
            f" (default: --generate {DEFAULT_GENERATED_RATINGS})."
            if job == "train"
            else " is required."
        ),
    )
    source = group.add_mutually_exclusive_group()
    source.add_argument(
        "--input",
        metavar="PATH",
        help="ratings file or directory, on any file system Spark reads (local, hdfs://, s3a://)",
    )
    source.add_argument(
        "--sample",
        action="store_true",
        help="Spark's bundled data/mllib/als/sample_movielens_ratings.txt (1,501 ratings of "
        "30 users on 100 items), read from the installed pyspark",
    )
    source.add_argument(
        "--generate",
        metavar="N",
        type=positive_int,
        help="N generated ratings (1..5) with power-law user and item popularity from a planted "
        "rank-8 model plus noise 0.5: a good fit reaches a held-out RMSE near 0.5, the global "
        "mean about 0.98",
    )
    group.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help="auto: parquet for *.parquet or a directory of Parquet files, movielens for '::' "
        "(ML-1M/10M ratings.dat, Spark's sample) and tab-separated u.data files, else csv. "
        "movielens also reads ML-20M+ ratings.csv",
    )
    group.add_argument(
        "--delimiter",
        default=",",
        metavar="CHAR",
        help="CSV field delimiter; 'tab' or '\\t' for tabs",
    )
    group.add_argument(
        "--header",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="whether a CSV file's first line names its columns; with --no-header, columns "
        "are addressed by 0-based position and default to 0, 1, 2",
    )
    for role in ROLES:
        names = " or ".join(_DEFAULT_NAMES[role])
        group.add_argument(
            f"--{role}-col",
            metavar="NAME",
            help=f"column of the {role} {'ids' if role != 'rating' else 'values'} (default: "
            f"{names}{', or the model' + chr(39) + 's column' if job != 'train' else ''})",
        )
    group.add_argument(
        "--test-fraction",
        type=fraction,
        metavar="F",
        default=default_test_fraction,
        help=(
            "fraction of the ratings held out for evaluation, chosen by a hash of (user, item) "
            "and --data-seed; 0 trains on everything"
            if job == "train"
            else "score only the held-out part of the input that train's --test-fraction left "
            "out (same value and --data-seed); 0 scores the whole input"
        ),
    )
    group.add_argument(
        "--data-seed",
        type=int,
        metavar="SEED",
        default=0,
        help="seed of --generate and of the held-out split",
    )


def check_input_arguments(args: argparse.Namespace, paths: Paths) -> None:
    """Run before any data is read, so that mistakes cost no cluster time."""
    if args.input is not None:
        paths.require_existing(args.input, "input")


def delimiter(args: argparse.Namespace) -> str:
    text = args.delimiter
    return "\t" if text in ("tab", "\\t", "\t") else text


def load_ratings(
    spark: SparkSession,
    args: argparse.Namespace,
    *,
    default_columns: dict[str, str] | None = None,
    keep: str = "both",
) -> Ratings:
    """Read the ratings the arguments name and split them.

    Parameters
    ----------
    default_columns : dict, optional
        Column names to use when no ``--*-col`` option is given (evaluate passes the model's),
        before the built-in defaults.
    keep : {"both", "test"}
        ``"test"`` (evaluate): return the held-out part as ``test`` (all ratings when
        ``--test-fraction`` is 0) and no training part.
    """
    if args.generate is not None:
        return _generated(spark, args, args.generate, default_columns, keep)
    if args.sample:
        df, columns = _read_movielens(spark, None, args, default_columns)
        source = {"kind": "sample", "path": _sample_path()}
    elif args.input is not None:
        df, columns, fmt = _read_file(spark, args, default_columns)
        source = {"kind": "file", "path": args.input, "format": fmt}
    else:
        raise JobError("no input: pass --input PATH, --sample or --generate N")
    train, test = _split(df, columns, args.test_fraction, args.data_seed, keep)
    return Ratings(train, test, columns, source)


def describe_source(source: dict[str, object]) -> str:
    """One phrase for logs and reports: "200,000 generated ratings (2,237 users x 1,789 items)"."""
    if source["kind"] == "generated":
        return (
            f"{source['ratings']:,} generated ratings "
            f"({source['users']:,} users x {source['items']:,} items)"
        )
    if source["kind"] == "sample":
        return "Spark's sample ratings"
    return f"{source['path']} ({source['format']})"


# ------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------


def _output_names(default_columns: dict[str, str] | None, args) -> dict[str, str]:
    """Names for sources whose columns we name ourselves (generated, MovieLens, sample)."""
    names = {}
    for role in ROLES:
        option = getattr(args, f"{role}_col")
        names[role] = option or (default_columns or {}).get(role) or role
    return names


def _generated(spark, args, num_ratings: int, default_columns, keep: str) -> Ratings:
    from spark_gpu_mf import datasets

    try:
        data = datasets.generate_ratings(num_ratings, seed=args.data_seed)
    except ValueError as error:
        raise JobError(f"--generate {num_ratings}: {error}") from None
    columns = _output_names(default_columns, args)
    if args.test_fraction > 0:
        train, test = datasets.train_test_split(data, args.test_fraction, seed=args.data_seed)
    else:
        train, test = data, None
    if keep == "test":
        train, test = None, test if test is not None else data

    def frame(part):
        if part is None:
            return None
        return datasets.to_dataframe(
            spark,
            part,
            user_col=columns["user"],
            item_col=columns["item"],
            rating_col=columns["rating"],
        )

    planted = data.planted
    source = {
        "kind": "generated",
        "ratings": num_ratings,
        "users": len(planted.user_ids),
        "items": len(planted.item_ids),
        "plantedRank": planted.rank,
        "noise": planted.noise,
        "seed": args.data_seed,
    }
    return Ratings(frame(train), frame(test), columns, source)


def _sample_path() -> str:
    from spark_gpu_mf import datasets

    try:
        return datasets.spark_sample_ratings_path()
    except FileNotFoundError as error:
        raise JobError(str(error)) from None


def _read_movielens(spark, path: str | None, args, default_columns):
    from spark_gpu_mf import datasets

    columns = _output_names(default_columns, args)
    try:
        df = datasets.read_movielens(
            spark,
            path or _sample_path(),
            user_col=columns["user"],
            item_col=columns["item"],
            rating_col=columns["rating"],
        )
    except ValueError as error:
        raise JobError(str(error)) from None
    return df, columns


def detect_format(path: str) -> str:
    """The ``--format auto`` choice for ``path`` (see the option's help)."""
    name = os.path.basename(path.rstrip("/")).lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".dat", ".data")):
        return "movielens"
    if is_local_path(path) and os.path.isdir(local_path(path)):
        entries = os.listdir(local_path(path))
        if any(e.endswith(".parquet") for e in entries):
            return "parquet"
        return "csv"
    if is_local_path(path) and os.path.isfile(local_path(path)):
        with open(local_path(path), encoding="utf-8", errors="replace") as f:
            first = f.readline()
        if "::" in first:
            return "movielens"
    return "csv"


def _read_file(spark, args, default_columns) -> tuple[DataFrame, dict[str, str], str]:
    fmt = detect_format(args.input) if args.format == "auto" else args.format
    if fmt == "movielens":
        df, columns = _read_movielens(spark, args.input, args, default_columns)
        check_ratings(df, columns)
        return df, columns, fmt
    try:
        if fmt == "parquet":
            df = spark.read.parquet(args.input)
        else:
            df = spark.read.csv(args.input, sep=delimiter(args), header=args.header)
    except Exception as error:  # noqa: BLE001 - any reader failure means "not this format"
        raise JobError(f"cannot read {args.input} as {fmt}: {describe_exception(error)}") from None
    positional = fmt == "csv" and not args.header
    sources = resolve_columns(df.columns, args, default_columns, positional=positional)
    if positional:  # headerless CSV: _c0, _c1, ... get proper names
        columns = {role: (default_columns or {}).get(role) or role for role in ROLES}
    else:
        columns = dict(sources)
    # Before the casts below, which would fail a Spark task on the first malformed value.
    labels = {role: f"#{name[2:]}" for role, name in sources.items()} if positional else None
    check_ratings(df, sources, labels)
    return _select(df, sources, columns), columns, fmt


def _select(df: DataFrame, sources: dict[str, str], columns: dict[str, str]):
    """The three rating columns, renamed; strings (all of a CSV's) cast to long ids and float
    ratings, other types kept.

    ``check_ratings`` has found every value castable (a malformed one would fail a Spark task
    under Spark's default ANSI mode, with Spark's CAST_INVALID_INPUT message and its log).
    """
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    types = {"user": "long", "item": "long", "rating": "float"}
    selected = []
    for role in ROLES:
        column = F.col(f"`{sources[role]}`")
        cast = isinstance(df.schema[sources[role]].dataType, T.StringType)
        selected.append((column.cast(types[role]) if cast else column).alias(columns[role]))
    return df.select(*selected)


def resolve_columns(
    available: list[str],
    args: argparse.Namespace,
    default_columns: dict[str, str] | None = None,
    positional: bool = False,
) -> dict[str, str]:
    """Map each role to a column of the input, or explain in one line why that fails.

    An option names a column; without a header (``positional``) it may also be a 0-based
    position, and the defaults are positions 0, 1 and 2. Otherwise the defaults are the
    model's column names (if given), then ``user``/``userId``, ``item``/``movieId``, ``rating``.
    """
    columns = {}
    for position, role in enumerate(ROLES):
        option = getattr(args, f"{role}_col")
        if option is not None:
            candidates = [option]
            if positional and option.isdigit():
                candidates.append(f"_c{option}")
        elif positional:
            candidates = [f"_c{position}"]
        else:
            candidates = [(default_columns or {}).get(role), *_DEFAULT_NAMES[role]]
        found = next((c for c in candidates if c and c in available), None)
        if found is None:
            raise JobError(_unknown_column_message(role, option, candidates, available, positional))
        columns[role] = found
    return columns


def _unknown_column_message(role, option, candidates, available, positional) -> str:
    shown = ", ".join(available[:12]) + (", ..." if len(available) > 12 else "")
    if positional:
        what = f"position {option}" if option is not None else f"a column {candidates[0]}"
        return (
            f"the input has no {role} column at {what}: it has {len(available)} column(s) "
            f"({shown}); is --delimiter right?"
        )
    wanted = option if option is not None else " or ".join(c for c in candidates if c)
    hint = f"pass --{role}-col NAME"
    if len(available) == 1:
        hint = "the file has a single column: is --delimiter right?"
    elif all(_looks_like_number(name) for name in available):
        hint = "the first line holds data, not names: pass --no-header"
    return f"the input has no {role} column {wanted!r} (its columns: {shown}); {hint}"


def _looks_like_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------------
# Held-out split
# ------------------------------------------------------------------------------------------


def held_out(df: DataFrame, columns: dict[str, str], test_fraction: float, seed: int):
    """Boolean column: whether a rating is held out, from a hash of (user, item, seed)."""
    from pyspark.sql import functions as F

    bucket = F.pmod(
        # Cast so that the split does not depend on how a file typed its ids (int, long).
        F.xxhash64(
            F.col(columns["user"]).cast("long"), F.col(columns["item"]).cast("long"), F.lit(seed)
        ),
        F.lit(_SPLIT_BUCKETS),
    )
    return bucket < F.lit(round(test_fraction * _SPLIT_BUCKETS))


def _split(df, columns, test_fraction: float, seed: int, keep: str):
    if test_fraction <= 0:
        return (None, df) if keep == "test" else (df, None)
    is_test = held_out(df, columns, test_fraction, seed)
    test = df.where(is_test)
    train = None if keep == "test" else df.where(~is_test)
    return train, test
