"""Test fixtures: one local Spark session for the whole run, small and quiet.

The session uses the interpreter running pytest for its Python workers (``PYSPARK_PYTHON``), so
executors see the same installed packages as the tests.
"""

from __future__ import annotations

import os
import socket
import sys
from contextlib import contextmanager

import pytest

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


CONNECT_PORT = _free_port()

# Which BLAS/LAPACK the session's Spark (dev.ludovic.netlib) calls: unset, whatever it finds here,
# as for a user; "java" forces its Java code; a directory with libblas.so.3 and liblapack.so.3
# (scripts/native_blas.sh) loads those natively. The parity tests must pass with each.
TEST_BLAS = os.environ.get("SPARK_GPU_MF_TEST_BLAS", "")


def _blas_java_options() -> str:
    if not TEST_BLAS:
        return ""
    directory = "/nonexistent" if TEST_BLAS == "java" else os.path.abspath(TEST_BLAS)
    if directory != "/nonexistent":
        # The JVM starts after this: its dynamic loader finds libgfortran beside the BLAS.
        paths = [directory, *filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(":"))]
        os.environ["LD_LIBRARY_PATH"] = ":".join(paths)
    return (
        f"-Ddev.ludovic.netlib.blas.nativeLibPath={directory}/libblas.so.3 "
        f"-Ddev.ludovic.netlib.lapack.nativeLibPath={directory}/liblapack.so.3"
    )


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    """The run's classic session; its JVM also serves the Connect session (``connect_spark``),
    so one Spark application answers both kinds of test."""
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .appName("spark_gpu_mf-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.default.parallelism", "2")
        .config("spark.driver.memory", "2g")
        .config("spark.driver.extraJavaOptions", _blas_java_options())
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.python.worker.reuse", "true")
        .config("spark.sql.warehouse.dir", str(tmp_path_factory.mktemp("warehouse")))
        # A Spark Connect server in the same application, on loopback only.
        .config("spark.plugins", "org.apache.spark.sql.connect.SparkConnectPlugin")
        .config("spark.connect.grpc.binding.address", "127.0.0.1")
        .config("spark.connect.grpc.binding.port", str(CONNECT_PORT))
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


# pyspark picks classic or Connect code (``pyspark.sql.functions``, its ML classes) by one
# process-wide variable, which creating a Connect session sets (``pyspark.sql.utils.is_remote``).
# A user's process holds one kind of session; this one holds both, so the variable is set only
# while a test works with the Connect session.
_CONNECT_MODE = "SPARK_CONNECT_MODE_ENABLED"


@contextmanager
def functions_for(kind: str):
    """Make pyspark build columns and run ML code for ``kind`` ("classic" or "connect")."""
    before = os.environ.pop(_CONNECT_MODE, None)
    if kind == "connect":
        os.environ[_CONNECT_MODE] = "1"
    try:
        yield
    finally:
        os.environ.pop(_CONNECT_MODE, None)
        if before is not None:
            os.environ[_CONNECT_MODE] = before


@pytest.fixture(scope="session")
def connect_session(spark):
    """The run's Spark Connect client session (pyspark[connect]), to the classic session's
    application; use it inside ``functions_for("connect")``."""
    from pyspark.sql import SparkSession

    with functions_for("classic"):
        session = SparkSession.builder.remote(f"sc://127.0.0.1:{CONNECT_PORT}").create()
    yield session
    session.stop()


@pytest.fixture
def connect_spark(connect_session):
    """The Connect session, with pyspark in Connect mode for the duration of the test."""
    with functions_for("connect"):
        yield connect_session


@pytest.fixture(params=["classic", "connect"])
def any_spark(request):
    """Parametrize a test over both kinds of session (API surface tests only: each Connect
    variant costs a round trip per call)."""
    if request.param == "classic":
        yield request.getfixturevalue("spark")
    else:
        yield request.getfixturevalue("connect_spark")


@pytest.fixture
def temp_path(tmp_path):
    return str(tmp_path)


# The three ALS dataflows, chosen by size thresholds; tests force each one with these confs.
DATAFLOW_CONFS = {
    "single task": {
        "spark.gpumf.singleTaskMaxRatings": "auto",
        "spark.gpumf.broadcastThreshold": "256m",
    },
    "broadcast": {
        "spark.gpumf.singleTaskMaxRatings": "0",
        "spark.gpumf.broadcastThreshold": "256m",
    },
    "messages": {"spark.gpumf.singleTaskMaxRatings": "0", "spark.gpumf.broadcastThreshold": "0"},
}


@contextmanager
def dataflow_confs(spark, name: str):
    """Make ALS fits in this block use the dataflow ``name``."""
    for key, value in DATAFLOW_CONFS[name].items():
        spark.conf.set(key, value)
    try:
        yield name
    finally:
        for key in DATAFLOW_CONFS[name]:
            spark.conf.unset(key)


@pytest.fixture
def dataflow(spark, request):
    """Indirect parametrization: ``@pytest.mark.parametrize("dataflow", [...], indirect=True)``."""
    with dataflow_confs(spark, request.param) as name:
        yield name


def gpu_problem() -> str | None:
    """Why the GPU tests cannot run here, or None when CuPy sees a usable CUDA device."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install -e '.[gpu]')"
    if not cupy.cuda.is_available():
        return "no usable CUDA GPU (CuPy is installed, but there is no device or driver)"
    return None


@pytest.fixture(scope="module")
def sample(spark):
    """Spark's bundled sample ratings as a cached DataFrame and as NumPy arrays."""
    from spark_gpu_mf import datasets

    frame = datasets.read_spark_sample(spark).cache()
    table = frame.toArrow()
    arrays = tuple(table.column(c).to_numpy() for c in ("user", "item", "rating"))
    return frame, arrays
