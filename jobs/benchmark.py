"""Side-by-side benchmark: pyspark's ALS against spark_gpu_mf's, same data, same Spark session.

    python jobs/benchmark.py                       # the full run behind docs/benchmarks.md
    python jobs/benchmark.py --datasets sample,20000 --modes explicit --max-iter 3 --out-dir /tmp/b

For every data set and mode (explicit ratings, implicit counts) it fits Spark's
``pyspark.ml.recommendation.ALS`` and ours with the same params on the same cached training
DataFrame, then reports: fit seconds (median and spread over ``--repeats``), held-out RMSE
(explicit) or held-out sampled AUC (implicit), the speedup, ``recommendForAllUsers(10)`` seconds
of both on the *same* factors (Spark's) and whether the top-10 lists agree, our time by phase
(block build, hermitian, solve, exchange) and the FLOP floor: the fit's arithmetic at the float32
GEMM speed measured in this run on this machine. Implicit mode also runs the ``implicit``
library's CPU ALS (if installed) on the same confidences ``1 + alpha * r``.

Spark "at its best": Spark's ALS calls BLAS/LAPACK through dev.ludovic.netlib, which uses a native
``libblas.so.3`` / ``liblapack.so.3`` when it finds one and Java code otherwise. ``--spark-blas
native`` (the default ``auto`` does this when the file exists) points the JVM at Debian's
OpenBLAS (``apt-get install libopenblas0-pthread``, or the copy ``scripts/native_blas.sh`` fetches
into ``.venv/native-blas``) explicitly, so the benchmark gets native BLAS
even where the system default ``libblas.so.3`` link is absent. The BLAS Spark used is reported.

Dataflows: ``--dataflow all`` fits ours once per dataflow (single task, broadcast, messages),
interleaved with Spark's fits on the same cached data, one table row each;
``--training-rmse-cost`` adds a fit with ``spark.gpumf.trainingRmse=true`` beside each of ours.
``--cluster standalone`` runs the session against a master and two one-core workers started on
127.0.0.1 and reports each worker's peak executor memory per fit. ``--connect`` fits both
estimators through a Spark Connect session served by the benchmark's own Spark application; a fit
of ours that fails there is reported as its one-line error in the table.

First fits: ``--first-fit`` starts a fresh Python process (a new Spark application) for every fit,
alternating Spark's ALS and ours (and with ``--first-fit-in-task`` ours with the single task in a
Spark task instead of the driver), ``--repeats`` rounds, on generated data of MovieLens 100K's
size by default (``100k``: 100,000 ratings of 943 users on 1,682 items), both estimators with
Spark's default params and ``--seed``. Each process creates its session and caches the data
first; then it times the estimator's import, its first fit and a second fit. The report gives
the median and range of each.

Outputs: ``benchmark.json`` (everything), ``benchmark.md`` (the tables) and ``benchmark.png``
(fit time and speedups) under ``--out-dir``. Timings are wall-clock seconds on a machine that may
be shared; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np

from spark_gpu_mf.conf import SINGLE_TASK_IN_DRIVER_MAX_RATINGS, TRAINING_RMSE
from spark_gpu_mf.jobs.benchmarking import DATAFLOW_CONFS
from spark_gpu_mf.spark.session import runtime_confs

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

OPENBLAS_DIR = "/usr/lib/x86_64-linux-gnu/openblas-pthread"
SIZES = {"1m": 1_000_000, "10m": 10_000_000}
# Named sizes with a fixed shape: (ratings, users, items). "100k" is MovieLens 100K's.
SHAPES = {"100k": (100_000, 943, 1_682)}
# --first-fit: who fits in each fresh process, and the confs of that process's session.
FIRST_FIT_RUNS = {
    "spark": {},
    "ours": {},
    "ours (in a task)": {SINGLE_TASK_IN_DRIVER_MAX_RATINGS.key: "0"},
}
FIRST_FIT_MARK = "first-fit result: "
FIRST_FIT_LAUNCHED = "GPUMF_FIRST_FIT_LAUNCHED"

ALL_DATAFLOWS = ("single", "broadcast", "messages")
TRAINING_RMSE_CONFS = {TRAINING_RMSE.key: "true"}

# --cluster standalone on this 2-core machine: one core per worker, so two executors.
STANDALONE_WORKERS = 2
STANDALONE_CORES_PER_WORKER = 1

# The Spark Connect server as a plugin of the benchmark's own Spark application.
CONNECT_PLUGIN = "org.apache.spark.sql.connect.SparkConnectPlugin"


# ------------------------------------------------------------------------------------ arguments


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmark.py",
        description="Spark's ALS vs spark_gpu_mf's ALS on the same data in one Spark session.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--datasets",
        default=None,
        help="comma-separated: 'sample' (Spark's bundled file), 'ml-100k' "
        "(MovieLens 100K, fetched once from the recbole 1.2.1 wheel), "
        "'100k' (generated with MovieLens 100K's size and shape), '1m', "
        "'10m' or a number of generated ratings (default: sample,1m,10m; "
        "with --first-fit: 100k)",
    )
    parser.add_argument("--modes", default="explicit,implicit", help="explicit and/or implicit")
    parser.add_argument("--rank", type=int, default=64, help="rank of both estimators")
    parser.add_argument("--max-iter", type=int, default=10, help="ALS iterations (maxIter)")
    parser.add_argument("--reg-param", type=float, default=0.05, help="regParam")
    parser.add_argument("--alpha", type=float, default=1.0, help="implicit confidence scale")
    parser.add_argument(
        "--num-blocks",
        type=int,
        default=10,
        help="numUserBlocks = numItemBlocks (Spark's default is 10)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="fits per estimator, Spark's and ours interleaved"
    )
    parser.add_argument(
        "--large-repeats",
        type=int,
        default=1,
        help="fits per estimator on data sets above --small-max-ratings",
    )
    parser.add_argument(
        "--variants",
        default="default,cholesky,cg3,cg5-fp16",
        help="our configurations: 'default' and/or solver settings such as "
        "'cholesky', 'cg3', 'cg5', 'cg3-fp16'",
    )
    parser.add_argument(
        "--small-max-ratings",
        type=int,
        default=2_000_000,
        help="larger data sets run only the default variant, --large-repeats "
        "times, and skip recommendForAllUsers",
    )
    parser.add_argument(
        "--recommend", type=int, default=10, help="k of recommendForAllUsers (0 skips it)"
    )
    parser.add_argument(
        "--no-spark", action="store_true", help="skip Spark's ALS (ours only: quick profiling)"
    )
    parser.add_argument(
        "--no-implicit-lib", action="store_true", help="skip the implicit library in implicit mode"
    )
    parser.add_argument(
        "--spark-blas",
        choices=("auto", "native", "java"),
        default="auto",
        help="native: Debian's OpenBLAS under " + OPENBLAS_DIR,
    )
    parser.add_argument(
        "--dataflow",
        choices=(*DATAFLOW_CONFS, "all"),
        default="auto",
        help="how our ALS moves factors: 'auto' lets the size thresholds choose; "
        "'single', 'broadcast' or 'messages' forces one; 'all' fits each "
        "of the three, one table row per dataflow",
    )
    parser.add_argument(
        "--training-rmse-cost",
        action="store_true",
        help="also fit ours with spark.gpumf.trainingRmse=true, interleaved, "
        "and report what the per-iteration training RMSE costs",
    )
    parser.add_argument(
        "--cluster",
        choices=("none", "standalone"),
        default="none",
        help=f"standalone: start a master and {STANDALONE_WORKERS} workers of "
        f"{STANDALONE_CORES_PER_WORKER} core on 127.0.0.1, run against "
        "them (overrides --master) and record each worker's peak executor "
        "memory during every fit; the cluster stops when the run ends",
    )
    parser.add_argument(
        "--executor-memory",
        default="4g",
        help="with --cluster standalone: heap of each worker's executor",
    )
    parser.add_argument(
        "--connect",
        action="store_true",
        help="fit both estimators through a Spark Connect session (a Connect "
        "server plugin in this run's Spark application, on 127.0.0.1)",
    )
    parser.add_argument(
        "--master",
        default="local[2]",
        help="Spark master of the session (ignored with --cluster standalone)",
    )
    parser.add_argument("--driver-memory", default="6g", help="spark.driver.memory")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the data, the split and both estimators"
    )
    parser.add_argument(
        "--out-dir",
        default="docs/benchmark",
        help="where benchmark.json, benchmark.md and benchmark.png go",
    )
    parser.add_argument(
        "--first-fit",
        action="store_true",
        help="time first fits: a fresh process per fit, Spark's ALS and ours "
        "alternating, --repeats rounds, Spark's default params",
    )
    parser.add_argument(
        "--first-fit-in-task",
        action="store_true",
        help="with --first-fit: also fit ours with the single task in a Spark "
        "task (spark.gpumf.singleTaskInDriverMaxRatings=0), as before the "
        "driver road",
    )
    parser.add_argument(
        "--first-fit-child", choices=tuple(FIRST_FIT_RUNS), help=argparse.SUPPRESS
    )  # one fresh process of --first-fit
    parser.add_argument("--quiet", action="store_true", help="print only the final tables")
    parser.add_argument(
        "--conf",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Spark or spark.gpumf.* setting of the session (repeatable), e.g. "
        "spark.gpumf.als.adaptiveExecution=true to time a fit with AQE on",
    )
    args = parser.parse_args(argv)
    settings = [setting.partition("=") for setting in args.conf]
    if any(not sep or not key.strip() for key, sep, _ in settings):
        parser.error(f"--conf needs KEY=VALUE, got {args.conf}")
    args.conf = [(key.strip(), value.strip()) for key, _, value in settings]
    if args.datasets is None:
        args.datasets = "100k" if args.first_fit or args.first_fit_child else "sample,1m,10m"
    args.dataflows = list(ALL_DATAFLOWS) if args.dataflow == "all" else [args.dataflow]
    return args


# ------------------------------------------------------------------------------------ session


def native_blas_dir() -> str | None:
    """Debian's OpenBLAS: installed system-wide, or fetched by scripts/native_blas.sh."""
    fetched = os.path.join(os.path.dirname(__file__), "..", ".venv", "native-blas")
    for directory in (OPENBLAS_DIR, os.path.abspath(fetched)):
        if os.path.exists(os.path.join(directory, "libblas.so.3")):
            return directory
    return None


def native_blas_options(mode: str) -> str:
    """JVM options that make dev.ludovic.netlib load Debian's OpenBLAS (or none)."""
    directory = native_blas_dir()
    if mode == "java" or (mode == "auto" and directory is None):
        # A path that does not exist: netlib falls back to its Java implementations.
        return (
            "-Ddev.ludovic.netlib.blas.nativeLibPath=/nonexistent/libblas.so.3 "
            "-Ddev.ludovic.netlib.lapack.nativeLibPath=/nonexistent/liblapack.so.3"
        )
    if directory is None:
        raise SystemExit(
            f"benchmark.py: error: --spark-blas native needs {OPENBLAS_DIR} "
            "(apt-get install libopenblas0-pthread) or scripts/native_blas.sh"
        )
    if directory != OPENBLAS_DIR:  # the fetched copy keeps its libgfortran beside it
        os.environ["LD_LIBRARY_PATH"] = ":".join(
            filter(None, [directory, os.environ.get("LD_LIBRARY_PATH")])
        )
    return (
        f"-Ddev.ludovic.netlib.blas.nativeLibPath={directory}/libblas.so.3 "
        f"-Ddev.ludovic.netlib.lapack.nativeLibPath={directory}/liblapack.so.3"
    )


@dataclass
class Bench:
    """Where the fits run: ``spark`` (classic or Connect) and the classic session behind it.

    ``classic`` is the JVM-side session (BLAS report, Connect server); ``memory`` samples the
    executors' memory on a standalone cluster (None otherwise).
    """

    spark: object
    classic: object
    memory: object = None
    cluster: dict | None = None


def make_session(args, master: str, cores: int | None = None):
    """``(session the fits run on, classic session)``: the same one, or a Connect session.

    With ``--connect`` the application also runs a Spark Connect server on 127.0.0.1 (a port
    the OS picked); an already running session (the test suite's) must have its own server,
    whose port is then read back from its conf.
    """
    from pyspark.sql import SparkSession

    from spark_gpu_mf.jobs.standalone import free_port

    blas = native_blas_options(args.spark_blas)
    builder = (
        SparkSession.builder.master(master)
        .appName("spark_gpu_mf benchmark")
        .config("spark.driver.memory", args.driver_memory)
        .config("spark.driver.extraJavaOptions", blas)
        # Spark's ALS runs its BLAS in the executors: off local mode they need the choice too.
        .config("spark.executor.extraJavaOptions", blas)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.python.worker.reuse", "true")
        .config("spark.sql.shuffle.partitions", "4")
    )
    for key, value in args.conf:
        builder = builder.config(key, value)
    if args.cluster == "standalone":
        builder = (
            builder.config("spark.executor.memory", args.executor_memory)
            .config("spark.executor.cores", str(STANDALONE_CORES_PER_WORKER))
            .config("spark.pyspark.python", sys.executable)
        )
    if args.connect:
        builder = (
            builder.config("spark.plugins", CONNECT_PLUGIN)
            .config("spark.connect.grpc.binding.address", "127.0.0.1")
            .config("spark.connect.grpc.binding.port", str(free_port()))
        )
        if cores:
            # A Connect client asks the conf for the parallelism (it has no SparkContext).
            builder = builder.config("spark.default.parallelism", str(cores))
    classic = builder.getOrCreate()
    classic.sparkContext.setLogLevel("ERROR")
    if classic.sparkContext.master != master:
        raise SystemExit(
            f"benchmark.py: error: this process already runs a Spark session on "
            f"{classic.sparkContext.master}, not {master}"
        )
    if not args.connect:
        return classic, classic
    conf = classic.sparkContext.getConf()
    if CONNECT_PLUGIN not in (conf.get("spark.plugins", "") or ""):
        raise SystemExit(
            "benchmark.py: error: --connect: the running Spark session has no Spark Connect server"
        )
    port = conf.get("spark.connect.grpc.binding.port")
    return SparkSession.builder.remote(f"sc://127.0.0.1:{port}").create(), classic


def spark_blas(spark) -> dict:
    """Which BLAS and LAPACK implementation Spark's ALS calls (dev.ludovic.netlib's choice)."""
    jvm = spark.sparkContext._jvm
    return {
        "blas": jvm.dev.ludovic.netlib.blas.BLAS.getInstance().getClass().getSimpleName(),
        "lapack": jvm.dev.ludovic.netlib.lapack.LAPACK.getInstance().getClass().getSimpleName(),
        "javaOptions": spark.sparkContext.getConf().get("spark.driver.extraJavaOptions", ""),
    }


# ------------------------------------------------------------------------------------ data


@dataclass
class Dataset:
    name: str
    implicit: bool
    train: tuple  # (user, item, rating) int32, int32, float32
    test: tuple


def load_dataset(spark, name: str, implicit: bool, seed: int) -> Dataset:
    """Spark's sample file and MovieLens 100K through ``jobs.benchmarking``, else generated
    ratings of the size ``name`` stands for; 20% held out."""
    from spark_gpu_mf import datasets
    from spark_gpu_mf.jobs import benchmarking

    if name in ("sample", "ml-100k"):
        data = benchmarking.load_ratings(spark, name, test_fraction=0.2, seed=seed)
        return Dataset(name, implicit, data.train, data.test)
    data = generated(name, implicit, seed)
    train, test = datasets.train_test_split(data, 0.2, seed=seed)
    return Dataset(name, implicit, train.as_tuple(), test.as_tuple())


def generated(name: str, implicit: bool, seed: int):
    """The generated ratings a data set name stands for ('100k', '1m', '10m' or a number)."""
    from spark_gpu_mf import datasets

    generate = datasets.generate_interactions if implicit else datasets.generate_ratings
    if name.lower() in SHAPES:
        size, users, items = SHAPES[name.lower()]
        return generate(size, num_users=users, num_items=items, seed=seed)
    return generate(SIZES.get(name.lower()) or int(float(name)), seed=seed)


def training_frame(spark, data: Dataset):
    from spark_gpu_mf import datasets

    # "auto": Arrow batches from the driver up to 20M ratings, a Parquet file above (tasks that
    # carry Arrow batches would exceed spark.rpc.message.maxSize on a cluster).
    df = datasets.to_dataframe(spark, data.train, via="auto").cache()
    df.count()
    return df


# ------------------------------------------------------------------------------------ metrics


def factors_of(model):
    from spark_gpu_mf.jobs.benchmarking import model_factors

    return model_factors(model)


def _lookup(ids: np.ndarray, query: np.ndarray):
    pos = np.searchsorted(ids, query)
    pos = np.minimum(pos, max(len(ids) - 1, 0))
    found = (ids[pos] == query) if len(ids) else np.zeros(len(query), bool)
    return pos, found


def heldout_rmse(users, items, test) -> float:
    """RMSE on test pairs whose user and item both have factors (coldStartStrategy='drop')."""
    from spark_gpu_mf.jobs.benchmarking import held_out_rmse

    return held_out_rmse(users, items, test)[0]


def heldout_auc(users, items, test, seed: int = 0) -> float:
    """Share of held-out interactions scored above a random item for the same user (sampled AUC)."""
    (uid, uf), (iid, itf) = users, items
    u, i, _ = test
    pu, fu = _lookup(uid, u)
    pi, fi = _lookup(iid, i)
    keep = fu & fi
    rng = np.random.default_rng(seed)
    negatives = rng.integers(0, len(iid), int(keep.sum()))
    pos = np.einsum("ij,ij->i", uf[pu[keep]], itf[pi[keep]])
    neg = np.einsum("ij,ij->i", uf[pu[keep]], itf[negatives])
    return float(np.mean(pos > neg) + 0.5 * np.mean(pos == neg))


def measure_gemm_gflops(repeats: int = 10, n: int = 2048) -> dict:
    """float32 GEMM speed of this machine now, with every core (NumPy's OpenBLAS)."""
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = np.random.default_rng(1).random((n, n), dtype=np.float32)
    a @ b
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        rates.append(2 * n**3 / (time.perf_counter() - started) / 1e9)
    return {"median": statistics.median(rates), "max": max(rates), "min": min(rates), "n": n}


def fit_flops(
    num_ratings: int, num_users: int, num_items: int, rank: int, iterations: int, implicit: bool
) -> float:
    """Arithmetic of an ALS fit with full k x k products (what the floor charges).

    Per half-iteration: each rating adds ``q q^T`` (2k^2) and ``r q`` (2k) to its row; each row
    is solved by Cholesky (k^3/3 + 2k^2); implicit adds ``Y^T Y`` of the fixed side (2k^2 per
    source row).
    """
    k = rank
    per_half_ratings = num_ratings * (2 * k * k + 2 * k)
    solves = (num_users + num_items) * (k**3 / 3 + 2 * k * k)
    gram = (num_users + num_items) * 2 * k * k if implicit else 0
    return iterations * (2 * per_half_ratings + solves + gram)


# ------------------------------------------------------------------------------------ runs


def _timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def _spread(values):
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "all": values,
    }


def variant_params(variant: str) -> dict:
    """Our extra params for a variant name: 'default', 'cholesky', 'cg3', 'cg5-fp16', ..."""
    if variant == "default":
        return {}
    if variant == "cholesky":
        return {"solver": "cholesky"}
    if variant.startswith("cg"):
        head, _, precision = variant.partition("-")
        params = {"solver": "cg", "cgIterations": int(head[2:] or 3)}
        if precision:
            params["precision"] = precision
        return params
    raise SystemExit(f"benchmark.py: error: unknown variant {variant!r}")


def fit_spark(df, args, implicit: bool, seed: int):
    from pyspark.ml.recommendation import ALS as SparkALS

    est = SparkALS(
        rank=args.rank,
        maxIter=args.max_iter,
        regParam=args.reg_param,
        implicitPrefs=implicit,
        alpha=args.alpha,
        numUserBlocks=args.num_blocks,
        numItemBlocks=args.num_blocks,
        seed=seed,
    )
    return _timed(lambda: est.fit(df))


def fit_ours(
    df,
    args,
    implicit: bool,
    seed: int,
    variant: str,
    dataflow: str = "auto",
    training_rmse: bool = False,
):
    """Our fit with the ``variant``'s params under the ``dataflow``'s confs, timed."""
    from spark_gpu_mf import ALS

    est = ALS(
        rank=args.rank,
        maxIter=args.max_iter,
        regParam=args.reg_param,
        implicitPrefs=implicit,
        alpha=args.alpha,
        numUserBlocks=args.num_blocks,
        numItemBlocks=args.num_blocks,
        seed=seed,
        **variant_params(variant),
    )
    confs = {**DATAFLOW_CONFS[dataflow], **(TRAINING_RMSE_CONFS if training_rmse else {})}
    with runtime_confs(df.sparkSession, confs):
        return _timed(lambda: est.fit(df))


def with_peak_memory(bench: Bench, fit):
    """``(model, seconds, peak executor MiB per worker)`` of ``fit()``; None off a cluster."""
    if bench.memory is None:
        return (*fit(), None)
    with bench.memory.measure() as memory:
        model, seconds = fit()
    return model, seconds, {k: [round(b / 2**20) for b in v] for k, v in memory.items()}


def memory_over_fits(samples: list) -> dict:
    """Per worker, the largest peak over several fits and the smallest footprint at a start."""
    samples = [s for s in samples if s]
    if not samples:
        return {}
    return {
        "peakExecutorMiB": [max(c) for c in zip(*(s["peak"] for s in samples))],
        "executorMiBAtStart": [min(c) for c in zip(*(s["start"] for s in samples))],
    }


@dataclass(frozen=True)
class OurRun:
    """One configuration of ours within a case: a solver variant under a dataflow."""

    variant: str
    dataflow: str

    @property
    def label(self) -> str:
        return self.variant if self.dataflow == "auto" else f"{self.variant}, {self.dataflow}"


def fit_implicit_lib(data: Dataset, args) -> dict | None:
    """The ``implicit`` library's CPU ALS on confidences ``1 + alpha * r`` (its own objective:
    plain lambda, not Spark's lambda * n_u), all cores, conjugate gradient as it defaults to."""
    try:
        import scipy.sparse as sp
        from implicit.cpu.als import AlternatingLeastSquares
    except ImportError:
        return None
    u, i, r = data.train
    uid, urow = np.unique(u, return_inverse=True)
    iid, irow = np.unique(i, return_inverse=True)
    matrix = sp.csr_matrix((r.astype(np.float32), (urow, irow)), shape=(len(uid), len(iid)))
    cores = os.cpu_count() or 1
    model = AlternatingLeastSquares(
        factors=args.rank,
        regularization=args.reg_param,
        alpha=args.alpha,
        iterations=args.max_iter,
        calculate_training_loss=False,
        random_state=args.seed,
        num_threads=cores,
    )
    from threadpoolctl import threadpool_limits

    # implicit runs its own threads and asks for single-threaded BLAS underneath.
    with threadpool_limits(1, "blas"):
        _, seconds = _timed(lambda: model.fit(matrix, show_progress=False))
    users = (uid.astype(np.int32), np.asarray(model.user_factors, np.float32))
    items = (iid.astype(np.int32), np.asarray(model.item_factors, np.float32))
    return {
        "fitSeconds": seconds,
        "auc": heldout_auc(users, items, data.test, args.seed),
        "threads": cores,
        "version": __import__("implicit").__version__,
    }


def _noop_write(df) -> None:
    df.write.format("noop").mode("overwrite").save()


def compare_top_k(theirs, mine, tolerance: float = 1e-6) -> dict:
    """How many users get the same top-k list; differences only among (near-)tied scores aside."""
    spark_lists = {row[0]: row[1] for row in theirs.collect()}
    our_lists = {row[0]: row[1] for row in mine.collect()}
    identical = ties = different = 0
    for key, recs in spark_lists.items():
        ours = our_lists.get(key)
        if ours is not None and [e[0] for e in ours] == [e[0] for e in recs]:
            identical += 1
            continue
        if ours is not None and len(ours) == len(recs):
            a = np.array([e[1] for e in recs])
            b = np.array([e[1] for e in ours])
            scale = max(1e-12, float(np.max(np.abs(a))))
            # Same scores at every position: only the order of tied items differs.
            if np.all(np.abs(a - b) <= tolerance * scale):
                ties += 1
                continue
        different += 1
    return {
        "users": len(spark_lists),
        "identical": identical,
        "tiesOnly": ties,
        "different": different,
        "missing": len(set(spark_lists) - set(our_lists)),
    }


def recommend_benchmark(spark_model, k: int, repeats: int) -> dict:
    """recommendForAllUsers(k) of Spark's model and of ours holding Spark's factors."""
    from spark_gpu_mf import ALSModel

    ours = ALSModel._create(spark_model.rank, spark_model.userFactors, spark_model.itemFactors)
    spark_times, our_times = [], []
    for _ in range(repeats):
        spark_times.append(_timed(lambda: _noop_write(spark_model.recommendForAllUsers(k)))[1])
        our_times.append(_timed(lambda: _noop_write(ours.recommendForAllUsers(k)))[1])
    agreement = compare_top_k(spark_model.recommendForAllUsers(k), ours.recommendForAllUsers(k))
    return {
        "k": k,
        "sparkSeconds": _spread(spark_times),
        "oursSeconds": _spread(our_times),
        "speedup": statistics.median(spark_times) / statistics.median(our_times),
        "agreement": agreement,
    }


def phase_split(summary, fit_seconds: float, parallelism: int) -> dict:
    """Our fit time by phase, from the training summary.

    ``blockBuild``: setup before the first iteration (blocks, caching). ``hermitian`` and
    ``solve``: executor seconds summed over tasks, divided by the parallelism (the wall time
    they take when tasks fill every core). ``exchange``: the rest of the iterations (jobs,
    Arrow, broadcasts, driver); ``other``: after the iterations (materializing the factors).
    """
    iterations = sum(e["seconds"] for e in summary.iterations)
    phases = summary.details.get("phaseSeconds", {})
    hermitian = phases.get("hermitian", 0.0) / parallelism
    solve = phases.get("solve", 0.0) / parallelism
    return {
        "blockBuild": summary.setup_seconds,
        "hermitian": hermitian,
        "solve": solve,
        "exchange": max(0.0, iterations - hermitian - solve),
        "other": max(0.0, fit_seconds - summary.setup_seconds - iterations),
    }


def run_case(bench: Bench, args, name: str, implicit: bool, gemm: dict, log) -> dict:
    """Spark's ALS and each of our runs (variant x dataflow) on one data set, interleaved."""
    from spark_gpu_mf.spark.session import default_parallelism

    data = load_dataset(bench.spark, name, implicit, args.seed)
    df = training_frame(bench.spark, data)
    u, i, _ = data.train
    case = {
        "dataset": name,
        "mode": "implicit" if implicit else "explicit",
        "trainRatings": len(u),
        "testRatings": len(data.test[0]),
        "users": len(np.unique(u)),
        "items": len(np.unique(i)),
    }
    metric = heldout_auc if implicit else heldout_rmse
    metric_name = "auc" if implicit else "rmse"
    flops = fit_flops(len(u), case["users"], case["items"], args.rank, args.max_iter, implicit)
    # The best rate seen: the floor is what the hardware allows, not what a busy moment did.
    case["floorSeconds"] = flops / (gemm["max"] * 1e9)
    case["fitGflop"] = flops / 1e9
    log(
        f"{name} {case['mode']}: {len(u):,} training ratings, {case['users']:,} users, "
        f"{case['items']:,} items; floor {case['floorSeconds']:.2f}s"
    )
    small = len(u) <= args.small_max_ratings
    repeats = args.repeats if small else args.large_repeats
    variants = [v for v in args.variants.split(",") if v and (small or v == "default")]
    runs = [OurRun(v, d) for v in variants for d in args.dataflows]
    spark_model, spark_times, spark_memory = None, [], []
    models, rmse_models, errors = {}, {}, {}
    times, memory, rmse_times = ({r.label: [] for r in runs} for _ in range(3))
    # Interleaved (Spark, ours, Spark, ours...) so that load changes on a shared machine hit
    # both estimators alike.
    for _ in range(repeats):
        if not args.no_spark:
            spark_model, seconds, peaks = with_peak_memory(
                bench, lambda: fit_spark(df, args, implicit, args.seed)
            )
            spark_times.append(seconds)
            spark_memory.append(peaks)
            log(f"  Spark ALS fit {seconds:.2f}s" + _memory_note(peaks))
        for run in runs:
            if run.label in errors:
                continue
            try:
                models[run.label], seconds, peaks = with_peak_memory(
                    bench,
                    lambda: fit_ours(df, args, implicit, args.seed, run.variant, run.dataflow),
                )
                times[run.label].append(seconds)
                memory[run.label].append(peaks)
                log(f"  ours ({run.label}) fit {seconds:.2f}s" + _memory_note(peaks))
                if args.training_rmse_cost:
                    rmse_models[run.label], seconds = fit_ours(
                        df, args, implicit, args.seed, run.variant, run.dataflow, training_rmse=True
                    )
                    rmse_times[run.label].append(seconds)
                    log(f"  ours ({run.label}) with trainingRmse fit {seconds:.2f}s")
            except Exception as error:  # noqa: BLE001 - one failing run must not end the others
                errors[run.label] = one_line_error(error)
                log(f"  ours ({run.label}) failed: {errors[run.label]}")
    if spark_model is not None:
        users, items = factors_of(spark_model)
        case["spark"] = {
            "fitSeconds": _spread(spark_times),
            metric_name: metric(users, items, data.test),
        }
        case["spark"].update(memory_over_fits(spark_memory))
    parallelism = default_parallelism(bench.spark)
    case["ours"] = {}
    for run in runs:
        entry = {
            "variant": run.variant,
            "dataflow": run.dataflow,
            "params": variant_params(run.variant),
            "confs": DATAFLOW_CONFS[run.dataflow],
        }
        case["ours"][run.label] = entry
        if run.label in errors:
            entry["error"] = errors[run.label]
            continue
        model = models[run.label]
        users, items = factors_of(model)
        entry.update(
            {
                "dataflowRun": model.summary.details.get("dataflow"),
                "fitSeconds": _spread(times[run.label]),
                metric_name: metric(users, items, data.test),
                "phases": phase_split(model.summary, times[run.label][-1], parallelism),
            }
        )
        entry["floorRatio"] = entry["fitSeconds"]["median"] / case["floorSeconds"]
        entry.update(memory_over_fits(memory[run.label]))
        if rmse_times[run.label]:
            with_rmse = statistics.median(rmse_times[run.label])
            without = entry["fitSeconds"]["median"]
            # Not always the same dataflow: the single task does not compute a training RMSE.
            ran = rmse_models[run.label].summary.details.get("dataflow")
            entry["trainingRmse"] = {
                "fitSeconds": _spread(rmse_times[run.label]),
                "costSeconds": with_rmse - without,
                "costRelative": with_rmse / without - 1,
                "dataflowRun": ran,
            }
        if "spark" in case:
            entry["speedup"] = case["spark"]["fitSeconds"]["median"] / entry["fitSeconds"]["median"]
            if not implicit:
                entry["rmseRelativeToSpark"] = entry["rmse"] / case["spark"]["rmse"] - 1
    if implicit and not args.no_implicit_lib:
        lib = fit_implicit_lib(data, args)
        if lib is not None:
            case["implicitLib"] = lib
            log(f"  implicit library fit {lib['fitSeconds']:.2f}s")
    if spark_model is not None and args.recommend and not implicit and small:
        try:
            case["recommend"] = recommend_benchmark(spark_model, args.recommend, repeats)
            log(
                f"  recommendForAllUsers({args.recommend}): Spark "
                f"{case['recommend']['sparkSeconds']['median']:.2f}s, ours "
                f"{case['recommend']['oursSeconds']['median']:.2f}s"
            )
        except Exception as error:  # noqa: BLE001 - e.g. ours on Spark Connect, not there yet
            case["recommend"] = {"k": args.recommend, "error": one_line_error(error)}
            log(f"  recommendForAllUsers({args.recommend}) failed: {case['recommend']['error']}")
    df.unpersist()
    return case


def one_line_error(error: BaseException) -> str:
    """What failed, in one line, and the innermost line of our package it came through."""
    import traceback

    from spark_gpu_mf.jobs.common import describe_exception

    package = f"{os.sep}spark_gpu_mf{os.sep}"
    ours = [f for f in traceback.extract_tb(error.__traceback__) if package in f.filename]
    if not ours:
        return describe_exception(error)
    frame = ours[-1]
    relative = frame.filename[frame.filename.rindex(package) + 1 :]
    return f"{describe_exception(error)} (at {relative}:{frame.lineno})"


def _memory_note(memory) -> str:
    if not memory:
        return ""
    return ", executor memory per worker " + " / ".join(
        f"{peak} MiB (at start {start})" for peak, start in zip(memory["peak"], memory["start"])
    )


def warm_up(bench: Bench, args) -> dict:
    """One small fit of each estimator (ours: under each dataflow) before anything is timed.

    The first fit in a session pays one-time costs the later ones do not: JVM JIT for Spark's,
    Python worker start-up, imports and loading compiled kernels for ours.
    """
    from spark_gpu_mf import datasets

    df = datasets.to_dataframe(bench.spark, datasets.generate_ratings(5000, seed=1), via="arrow")
    df = df.cache()
    df.count()
    small = argparse.Namespace(**{**vars(args), "max_iter": 2})
    out = {}
    for dataflow in args.dataflows:
        key = "oursSeconds" if dataflow == "auto" else f"oursSeconds ({dataflow})"
        try:
            out[key] = fit_ours(df, small, False, 0, "default", dataflow)[1]
            if args.training_rmse_cost:
                fit_ours(df, small, False, 0, "default", dataflow, training_rmse=True)
        except Exception as error:  # noqa: BLE001 - reported again by the timed fits
            out[key] = one_line_error(error)
    if not args.no_spark:
        out["sparkSeconds"] = fit_spark(df, small, False, 0)[1]
    df.unpersist()
    return out


# ------------------------------------------------------------------------------------ report


def _session_note(env: dict) -> str:
    """Where the fits ran, for the table's heading."""
    where = env["master"]
    cluster = env.get("cluster")
    if cluster:
        where = (
            f"standalone cluster {env['master']} ({cluster['workers']} workers x "
            f"{cluster['coresPerWorker']} core, executor heap {cluster['executorMemory']}, "
            f"driver {cluster['driverMemory']})"
        )
    if env.get("connect"):
        where += ", through a Spark Connect session"
    return where


def _cell(text: str, limit: int = 200) -> str:
    """``text`` fit for a table cell: no column separators, at most ``limit`` characters."""
    text = str(text).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def markdown(report: dict) -> str:
    env = report["environment"]
    cases = report["cases"]
    ours_entries = [e for c in cases for e in c["ours"].values()]
    with_cost = any("trainingRmse" in e for e in ours_entries)
    with_memory = any("peakExecutorMiB" in e for e in ours_entries)
    extra_heads = (["trainingRmse=true costs"] if with_cost else []) + (
        ["peak executor MiB per worker (at fit start)"] if with_memory else []
    )
    lines = [
        (
            f"Rank {report['params']['rank']}, {report['params']['maxIter']} iterations, "
            f"regParam {report['params']['regParam']}, {report['params']['numBlocks']} user and "
            "item blocks, "
            f"{_session_note(env)}, {env['cores']} cores; Spark {env['spark']} ALS with "
            f"{env['sparkBlas']['blas']} / {env['sparkBlas']['lapack']}; float32 GEMM (2048^2, "
            f"all cores) {env['gemmGflops']['min']:.0f}-"
            f"{env.get('floorGflops', env['gemmGflops']['max']):.0f} GFLOP/s over the run, the "
            f"floor uses the best. Seconds are medians of the fits (range in brackets), "
            f"Spark's and ours interleaved. 1-minute load average "
            f"{env['loadAverage'][0]:.1f} at the start"
            + (
                f", {env['loadAverageAfter'][0]:.1f} at the end."
                if "loadAverageAfter" in env
                else "."
            )
        ),
        "",
        "| "
        + " | ".join(
            [
                "data",
                "mode",
                "ratings (train)",
                "estimator",
                "dataflow",
                "fit s",
                "held-out",
                "speedup",
                "x floor",
                *extra_heads,
                "phases: build / hermitian / solve / exchange s",
            ]
        )
        + " |",
        "|"
        + "|".join(
            [
                "---",
                "---",
                "---:",
                "---",
                "---",
                "---:",
                "---:",
                "---:",
                "---:",
                *["---:"] * len(extra_heads),
                "---",
            ]
        )
        + "|",
    ]

    def seconds(entry):
        s = entry["fitSeconds"]
        if len(s["all"]) > 1:
            return f"{s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}]"
        return f"{s['median']:.2f}"

    def extras(entry):
        cells = []
        if with_cost:
            cost = entry.get("trainingRmse")
            text = ""
            if cost:
                text = f"{cost['costSeconds']:+.2f} s ({cost['costRelative'] * 100:+.0f}%)"
                if cost.get("dataflowRun") != entry.get("dataflowRun"):
                    text += f", ran {cost.get('dataflowRun')}"
            cells.append(text)
        if with_memory:
            peaks = entry.get("peakExecutorMiB")
            starts = entry.get("executorMiBAtStart")
            cells.append(" / ".join(f"{p} ({s})" for p, s in zip(peaks, starts)) if peaks else "")
        return cells

    def row(head, *cells):
        lines.append("| " + " | ".join([*head, *map(str, cells)]) + " |")

    for case in cases:
        key = "auc" if case["mode"] == "implicit" else "rmse"
        head = [case["dataset"], case["mode"], f"{case['trainRatings']:,}"]
        if "spark" in case:
            spark = case["spark"]
            row(
                head,
                "Spark ALS",
                "",
                seconds(spark),
                f"{key} {spark[key]:.4f}",
                "1.0",
                f"{spark['fitSeconds']['median'] / case['floorSeconds']:.1f}",
                *extras(spark),
                "",
            )
        for label, entry in case["ours"].items():
            if "error" in entry:
                row(
                    head,
                    f"ours ({label})",
                    entry["dataflow"],
                    "-",
                    f"failed: {_cell(entry['error'])}",
                    "-",
                    "-",
                    *[""] * len(extra_heads),
                    "",
                )
                continue
            p = entry["phases"]
            speed = f"{entry['speedup']:.1f}" if "speedup" in entry else "-"
            rel = (
                f" ({entry['rmseRelativeToSpark'] * 100:+.2f}%)"
                if "rmseRelativeToSpark" in entry
                else ""
            )
            dataflow = entry.get("dataflowRun") or ""
            if entry["dataflow"] != "auto" and entry["dataflow"] not in dataflow:
                dataflow += f" (asked: {entry['dataflow']})"
            row(
                head,
                f"ours ({label})",
                dataflow,
                seconds(entry),
                f"{key} {entry[key]:.4f}{rel}",
                speed,
                f"{entry['floorRatio']:.1f}",
                *extras(entry),
                f"{p['blockBuild']:.2f} / {p['hermitian']:.2f} / {p['solve']:.2f} / "
                f"{p['exchange']:.2f}",
            )
        if "implicitLib" in case:
            lib = case["implicitLib"]
            speed = (
                f"{case['spark']['fitSeconds']['median'] / lib['fitSeconds']:.1f}"
                if "spark" in case
                else "-"
            )
            row(
                head,
                f"implicit {lib['version']} ({lib['threads']} threads)",
                "",
                f"{lib['fitSeconds']:.2f}",
                f"auc {lib['auc']:.4f}",
                speed,
                f"{lib['fitSeconds'] / case['floorSeconds']:.1f}",
                *[""] * len(extra_heads),
                "",
            )
        row(
            ["", "", ""],
            f"FLOP floor ({case['fitGflop']:.0f} GFLOP)",
            "",
            f"{case['floorSeconds']:.2f}",
            "",
            "",
            "1.0",
            *[""] * len(extra_heads),
            "",
        )
    recs = [c for c in cases if "recommend" in c]
    if recs:
        lines += [
            "",
            (
                "| data | recommendForAllUsers(k) | Spark s | ours s | speedup | "
                "identical lists | ties only | different |"
            ),
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for case in recs:
            r = case["recommend"]
            if "error" in r:
                lines.append(
                    f"| {case['dataset']} | {r['k']} | | | | failed: {_cell(r['error'])} | | |"
                )
                continue
            a = r["agreement"]
            lines.append(
                f"| {case['dataset']} | {r['k']} | {r['sparkSeconds']['median']:.2f} | "
                f"{r['oursSeconds']['median']:.2f} | {r['speedup']:.1f} | "
                f"{a['identical']:,} / {a['users']:,} | {a['tiesOnly']} | "
                f"{a['different']} |"
            )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in report["cases"] if "spark" in c]
    labels = sorted(
        {label for c in cases for label, e in c["ours"].items() if "speedup" in e},
        key=lambda label: [k for c in cases for k in c["ours"]].index(label),
    )
    if not cases or not labels:
        return
    x = np.arange(len(cases))
    width = 0.8 / (len(labels) + 2)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))

    def fit_seconds(case, label):
        entry = case["ours"].get(label, {})
        return entry["fitSeconds"]["median"] if "fitSeconds" in entry else np.nan

    bars = [("Spark ALS", [c["spark"]["fitSeconds"]["median"] for c in cases])]
    bars += [(f"ours ({label})", [fit_seconds(c, label) for c in cases]) for label in labels]
    bars += [("FLOP floor", [c["floorSeconds"] for c in cases])]
    for index, (name, values) in enumerate(bars):
        left.bar(x + (index - (len(bars) - 1) / 2) * width, values, width, label=name)
    case_names = [f"{c['dataset']}\n{c['mode']}" for c in cases]
    left.set_yscale("log")
    left.set_xticks(x, case_names)
    left.set_ylabel("fit seconds (log)")
    params = report["params"]
    left.set_title(f"Fit, rank {params['rank']}, {params['maxIter']} iterations")
    left.legend(fontsize=7)
    for index, label in enumerate(labels):
        speedups = [c["ours"].get(label, {}).get("speedup", np.nan) for c in cases]
        offset = (index - (len(labels) - 1) / 2) * width
        right.bar(x + offset, speedups, width, label=f"ours ({label})")
        for xi, value in zip(x, speedups):
            if np.isfinite(value):
                right.text(
                    xi + offset, value, f"{value:.1f}x", ha="center", va="bottom", fontsize=8
                )
    right.set_xticks(x, case_names)
    right.set_ylabel("speedup over Spark ALS")
    right.set_title("Fit speedup (same data, same session)")
    right.legend(fontsize=7)
    fig.suptitle(
        f"{_session_note(report['environment'])}; {report['environment']['cores']} "
        f"cores, Spark ALS with {report['environment']['sparkBlas']['blas']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------ main


def main(argv=None) -> dict:
    args = parse_args(argv)

    def log(message: str) -> None:
        if not args.quiet:
            print(message, flush=True)

    if args.first_fit_child:
        return first_fit_child(args)
    os.makedirs(args.out_dir, exist_ok=True)
    if args.first_fit:
        return run_first_fits(args, argv, log)
    with ExitStack() as cleanup:
        bench = start_bench(args, cleanup, log)
        return run(bench, args, argv, log)


def start_bench(args, cleanup: ExitStack, log) -> Bench:
    """The sessions (and with ``--cluster standalone`` the cluster) of this run.

    ``cleanup`` stops what was started, in reverse order, however the run ends.
    """
    if args.cluster == "none":
        cores = _local_cores(args.master)
        spark, classic = make_session(args, args.master, cores)
        if args.connect:
            cleanup.callback(spark.stop)
        return Bench(spark, classic)

    from spark_gpu_mf.jobs.standalone import ExecutorMemorySampler, StandaloneCluster

    # SIGTERM (a killed run) unwinds like an exception, so the cluster's JVMs stop too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    log_dir = tempfile.mkdtemp(prefix="gpumf-benchmark-cluster-")
    cluster = StandaloneCluster(
        workers=STANDALONE_WORKERS,
        cores=STANDALONE_CORES_PER_WORKER,
        memory=args.executor_memory,
        log_dir=log_dir,
    )
    cleanup.enter_context(cluster)
    log(
        f"standalone cluster {cluster.url}: {STANDALONE_WORKERS} workers x "
        f"{STANDALONE_CORES_PER_WORKER} core, executor heap {args.executor_memory}; logs in "
        f"{log_dir}"
    )
    spark, classic = make_session(
        args, cluster.url, STANDALONE_WORKERS * STANDALONE_CORES_PER_WORKER
    )
    cleanup.callback(classic.stop)  # before the cluster goes (callbacks run last-in first-out)
    if args.connect:
        cleanup.callback(spark.stop)
    memory = ExecutorMemorySampler(cluster).start()
    cleanup.callback(memory.stop)
    return Bench(
        spark,
        classic,
        memory,
        {
            "workers": STANDALONE_WORKERS,
            "coresPerWorker": STANDALONE_CORES_PER_WORKER,
            "executorMemory": args.executor_memory,
            "driverMemory": args.driver_memory,
            "logDir": log_dir,
            "memoryMeasure": "peak PSS of each worker's executor JVM and its Python workers, "
            "sampled from /proc every 0.2 s during each fit",
        },
    )


def _local_cores(master: str) -> int | None:
    """Task slots of a ``local[N]`` master (None for other masters)."""
    if master == "local":
        return 1
    if master.startswith("local["):
        inside = master[len("local[") :].split(",")[0].rstrip("]")
        return os.cpu_count() if inside == "*" else int(inside)
    return None


def run(bench: Bench, args, argv, log) -> dict:
    """Every data set and mode on ``bench``'s session; writes the outputs after each case."""
    import pyspark

    gemm = measure_gemm_gflops()
    report = {
        "command": " ".join(["python jobs/benchmark.py", *(argv or sys.argv[1:])]),
        "params": {
            "rank": args.rank,
            "maxIter": args.max_iter,
            "regParam": args.reg_param,
            "alpha": args.alpha,
            "numBlocks": args.num_blocks,
            "repeats": args.repeats,
            "seed": args.seed,
            "dataflows": args.dataflows,
            "dataflowConfs": {d: DATAFLOW_CONFS[d] for d in args.dataflows},
            "trainingRmseCost": args.training_rmse_cost,
        },
        "environment": {
            "spark": pyspark.__version__,
            "numpy": np.__version__,
            "master": bench.classic.sparkContext.master,
            "connect": args.connect,
            "cores": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "sparkBlas": spark_blas(bench.classic),
            "gemmGflops": gemm,
            "loadAverage": os.getloadavg(),
        },
        "cases": [],
    }
    if bench.cluster:
        report["environment"]["cluster"] = bench.cluster
    log(
        f"Spark BLAS: {report['environment']['sparkBlas']['blas']}; float32 GEMM "
        f"{gemm['median']:.0f} GFLOP/s (best {gemm['max']:.0f})"
    )
    report["environment"]["coldStart"] = warm_up(bench, args)
    log(f"warm-up (first fits in this session): {report['environment']['coldStart']}")
    try:
        for name in [d for d in args.datasets.split(",") if d]:
            for mode in [m for m in args.modes.split(",") if m]:
                case = run_case(bench, args, name, mode == "implicit", gemm, log)
                report["cases"].append(case)
                _write(report, args)
    finally:
        report["environment"]["loadAverageAfter"] = os.getloadavg()
        report["environment"]["gemmGflopsAfter"] = after = measure_gemm_gflops()
        rescale_floors(report, max(gemm["max"], after["max"]))
        _write(report, args)
    log(markdown(report))
    return report


# ------------------------------------------------------------------------------------ first fits


def first_fit_child(args) -> dict:
    """One fresh process of ``--first-fit``: session, cached data, then the timed import, first
    and second fit of one estimator; prints its result as one JSON line."""
    launched = float(os.environ.get(FIRST_FIT_LAUNCHED) or time.time())
    who = args.first_fit_child
    result = {"who": who}
    started = time.perf_counter()
    spark, _ = make_session(args, args.master)
    for key, value in FIRST_FIT_RUNS[who].items():
        spark.conf.set(key, value)
    result["sessionSeconds"] = time.perf_counter() - started
    from spark_gpu_mf import datasets

    name = args.datasets.split(",")[0]
    data = generated(name, False, args.seed)
    df = datasets.to_dataframe(spark, data, via="arrow").cache()
    result["ratings"] = df.count()
    result["dataSeconds"] = time.perf_counter() - started - result["sessionSeconds"]
    ALS, result["importSeconds"] = _timed(lambda: _estimator_class(who))
    estimator = ALS(seed=args.seed)
    model, result["fitSeconds"] = _timed(lambda: estimator.fit(df))
    result["untilFirstFitSeconds"] = time.time() - launched
    _, result["secondFitSeconds"] = _timed(lambda: ALS(seed=args.seed).fit(df))
    if who != "spark":
        result["dataflow"] = model.summary.details.get("dataflow")
        result["singleTaskIn"] = model.summary.details.get("singleTaskIn")
    result["params"] = {
        p.name: v
        for p, v in estimator.extractParamMap().items()
        if p.name in ("rank", "maxIter", "regParam", "numUserBlocks")
    }
    spark.stop()
    print(FIRST_FIT_MARK + json.dumps(result), flush=True)
    return result


def _estimator_class(who: str):
    if who == "spark":
        from pyspark.ml.recommendation import ALS
    else:
        from spark_gpu_mf import ALS
    return ALS


def _fresh_process_fit(args, who: str) -> dict:
    import subprocess

    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--first-fit-child",
        who,
        "--datasets",
        args.datasets,
        "--seed",
        str(args.seed),
        "--master",
        args.master,
        "--driver-memory",
        args.driver_memory,
        "--spark-blas",
        args.spark_blas,
    ]
    env = {**os.environ, FIRST_FIT_LAUNCHED: repr(time.time())}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith(FIRST_FIT_MARK)]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(
            f"benchmark.py: error: the {who} first-fit process failed "
            f"(exit {done.returncode}): {tail[0]}"
        )
    return json.loads(lines[-1][len(FIRST_FIT_MARK) :])


FIRST_FIT_TIMES = (
    "fitSeconds",
    "importSeconds",
    "secondFitSeconds",
    "untilFirstFitSeconds",
    "sessionSeconds",
)


def run_first_fits(args, argv, log) -> dict:
    """``--repeats`` rounds of one fresh process per estimator, alternating (the order flips
    every round, so that a load change on a shared machine hits both alike)."""
    import pyspark

    who = ["spark", "ours"] + (["ours (in a task)"] if args.first_fit_in_task else [])
    runs = {w: [] for w in who}
    report = {
        "command": " ".join(["python jobs/benchmark.py", *(argv or sys.argv[1:])]),
        "mode": "first fit",
        "params": {
            "dataset": args.datasets.split(",")[0],
            "seed": args.seed,
            "repeats": args.repeats,
            "estimatorParams": "Spark's defaults",
            "confs": {w: FIRST_FIT_RUNS[w] for w in who},
        },
        "environment": {
            "spark": pyspark.__version__,
            "master": args.master,
            "cores": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "loadAverage": os.getloadavg(),
        },
        "runs": runs,
    }
    for round_ in range(args.repeats):
        for name in who if round_ % 2 == 0 else who[::-1]:
            result = _fresh_process_fit(args, name)
            runs[name].append(result)
            log(
                f"round {round_ + 1}: {name}: first fit {result['fitSeconds']:.2f}s, second "
                f"{result['secondFitSeconds']:.2f}s, import {result['importSeconds']:.2f}s"
            )
    report["environment"]["loadAverageAfter"] = os.getloadavg()
    report["firstFit"] = summary = {
        name: {key: _spread([r[key] for r in results]) for key in FIRST_FIT_TIMES}
        for name, results in runs.items()
    }
    spark_median = summary["spark"]["fitSeconds"]["median"]
    for name in who[1:]:
        summary[name]["speedup"] = spark_median / summary[name]["fitSeconds"]["median"]
        summary[name]["speedupWithImport"] = (
            spark_median + summary["spark"]["importSeconds"]["median"]
        ) / (summary[name]["fitSeconds"]["median"] + summary[name]["importSeconds"]["median"])
    with open(os.path.join(args.out_dir, "benchmark.json"), "w") as f:
        json.dump(report, f, indent=2, default=float)
    with open(os.path.join(args.out_dir, "benchmark.md"), "w") as f:
        f.write(first_fit_markdown(report))
    log(first_fit_markdown(report))
    return report


def first_fit_markdown(report: dict) -> str:
    env, params = report["environment"], report["params"]
    runs = report["runs"]
    ratings = next(iter(runs.values()))[0]["ratings"]
    lines = [
        (
            f"First fits in fresh processes: {ratings:,} generated ratings ({params['dataset']}), "
            f"Spark's default ALS params, seed {params['seed']}, {env['master']}, {env['cores']} "
            f"cores, Spark {env['spark']}; {params['repeats']} rounds, one process per fit, the "
            f"estimators alternating. Seconds: median [range]. 1-minute load average "
            f"{env['loadAverage'][0]:.1f} at the start, {env['loadAverageAfter'][0]:.1f} at the "
            "end."
        ),
        "",
        "| estimator | single task in | first fit s | speedup | import s | first fit + import: "
        "speedup | second fit s | process start to end of first fit s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(entry):
        if len(entry["all"]) > 1:
            return f"{entry['median']:.2f} [{entry['min']:.2f}-{entry['max']:.2f}]"
        return f"{entry['median']:.2f}"

    for name, entry in report["firstFit"].items():
        label = "Spark ALS" if name == "spark" else name
        where = runs[name][0].get("singleTaskIn") or ""
        speed = f"{entry['speedup']:.1f}" if "speedup" in entry else "1.0"
        both = f"{entry['speedupWithImport']:.1f}" if "speedupWithImport" in entry else "1.0"
        lines.append(
            f"| {label} | {where} | {cell(entry['fitSeconds'])} | {speed} | "
            f"{cell(entry['importSeconds'])} | {both} | "
            f"{cell(entry['secondFitSeconds'])} | {cell(entry['untilFirstFitSeconds'])} |"
        )
    return "\n".join(lines) + "\n"


def rescale_floors(report: dict, gflops: float) -> None:
    """Floors at the best GEMM rate seen in the whole run (start or end)."""
    report["environment"]["floorGflops"] = gflops
    for case in report["cases"]:
        case["floorSeconds"] = case["fitGflop"] / gflops
        for entry in case["ours"].values():
            if "fitSeconds" in entry:
                entry["floorRatio"] = entry["fitSeconds"]["median"] / case["floorSeconds"]


def _write(report: dict, args) -> None:
    with open(os.path.join(args.out_dir, "benchmark.json"), "w") as f:
        json.dump(report, f, indent=2, default=float)
    with open(os.path.join(args.out_dir, "benchmark.md"), "w") as f:
        f.write(markdown(report))
    plot(report, os.path.join(args.out_dir, "benchmark.png"))


if __name__ == "__main__":
    main()
