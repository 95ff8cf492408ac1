"""Interleaved MascotMF / PrunedMF fits on the roads of a stratified epoch, in one process.

Variants, each fitted ``--repeats`` times in turn on the same cached data: ``old`` (a copy of the
package from before the Spark Connect rework, when ``--old`` is given), ``classic rdd shortcut``
(the default on classic sessions), ``classic dataframe`` (``spark.gpumf.sgd.jvmShortcut=false``)
and ``connect`` (a Spark Connect session to the same application). Prints one line per fit and a
JSON summary (seconds, and whether each variant's item factors equal the first variant's).

Make the old copy with, e.g.::

    mkdir -p /tmp/sgmf_old && git archive 8a33abf spark_gpu_mf | tar -x -C /tmp/sgmf_old
    (cd /tmp/sgmf_old && mv spark_gpu_mf spark_gpu_mf_old &&
     grep -rl spark_gpu_mf spark_gpu_mf_old | xargs sed -i 's/\\bspark_gpu_mf\\b/&_old/g')
    python scripts/sgd_roads_benchmark.py --old /tmp/sgmf_old
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from contextlib import contextmanager

_CONNECT_MODE = "SPARK_CONNECT_MODE_ENABLED"


@contextmanager
def functions_for(kind: str):
    """pyspark picks classic or Connect functions by one process-wide variable; this process
    holds both kinds of session."""
    os.environ.pop(_CONNECT_MODE, None)
    if kind == "connect":
        os.environ[_CONNECT_MODE] = "1"
    try:
        yield
    finally:
        os.environ.pop(_CONNECT_MODE, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="", help="folder holding the spark_gpu_mf_old copy")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ratings", type=int, default=200_000)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--max-iter", type=int, default=10)
    args = parser.parse_args()

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    if args.old:  # executors import the old copy too
        sys.path.insert(0, args.old)
        os.environ["PYTHONPATH"] = args.old + os.pathsep + os.environ.get("PYTHONPATH", "")
    import numpy as np
    from pyspark.sql import SparkSession

    import spark_gpu_mf
    from spark_gpu_mf import datasets
    from spark_gpu_mf.spark.factors import collect_factors

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spark = (
        SparkSession.builder.master("local[2]")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.memory", "2g")
        .config("spark.python.worker.reuse", "true")
        .config("spark.plugins", "org.apache.spark.sql.connect.SparkConnectPlugin")
        .config("spark.connect.grpc.binding.address", "127.0.0.1")
        .config("spark.connect.grpc.binding.port", str(port))
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    connect = SparkSession.builder.remote(f"sc://127.0.0.1:{port}").create()

    packages = {"new": spark_gpu_mf}
    if args.old:
        import spark_gpu_mf_old

        packages["old"] = spark_gpu_mf_old
    data = datasets.generate_ratings(args.ratings, seed=0)
    with functions_for("classic"):
        frame = datasets.to_dataframe(spark, data).cache()
        frame.count()
        table = frame.toArrow()
    with functions_for("connect"):
        remote_frame = connect.createDataFrame(table).cache()
        remote_frame.count()

    common = {"rank": args.rank, "maxIter": args.max_iter, "backend": "numpy", "seed": 1}
    params = {"MascotMF": {**common, "stepSize": 0.02}, "PrunedMF": common}
    variants = (["old"] if args.old else []) + [
        "classic rdd shortcut", "classic dataframe", "connect",
    ]  # fmt: skip
    seconds = {(e, v): [] for e in params for v in variants}
    factors = {}
    for repeat in range(args.repeats):
        for estimator, values in params.items():
            for variant in variants:
                kind = "connect" if variant == "connect" else "classic"
                package = packages["old" if variant == "old" else "new"]
                shortcut = variant != "classic dataframe"
                spark.conf.set("spark.gpumf.sgd.jvmShortcut", str(shortcut).lower())
                with functions_for(kind):
                    started = time.perf_counter()
                    model = getattr(package, estimator)(**values).fit(
                        remote_frame if kind == "connect" else frame
                    )
                    seconds[(estimator, variant)].append(time.perf_counter() - started)
                    factors.setdefault((estimator, variant), collect_factors(model.itemFactors)[1])
                print(
                    f"{estimator} / {variant} #{repeat}: "
                    f"{seconds[(estimator, variant)][-1]:.2f} s, load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    summary = {
        f"{estimator} / {variant}": {
            "seconds": times,
            "min": min(times),
            "median": statistics.median(times),
            f"same factors as {variants[0]}": bool(
                np.array_equal(factors[(estimator, variant)], factors[(estimator, variants[0])])
            ),
        }
        for (estimator, variant), times in seconds.items()
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
