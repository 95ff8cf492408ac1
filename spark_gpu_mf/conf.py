"""Every Spark configuration key spark_gpu_mf reads, with its default, in one place.

Keys are read on the driver (``spark.conf``) and passed to executor functions as plain values.
Set them like any Spark conf: ``--conf spark.gpumf.memoryBudget=512m`` or
``SparkSession.builder.config(...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Generic, TypeVar

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

T = TypeVar("T")

_UNITS = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(value: str | int) -> int:
    """Parse Spark-style sizes such as ``"256m"``, ``"1g"`` or ``"1048576"`` into bytes."""
    if isinstance(value, int):
        return value
    text = str(value).strip().lower().rstrip("b") or "0"
    unit = _UNITS.get(text[-1]) if text[-1].isalpha() else 1
    number = text[:-1] if text[-1].isalpha() else text
    if unit is None or not number.replace(".", "", 1).isdigit():
        raise ValueError(f"cannot parse a size from {value!r}; use e.g. 256m or 1g")
    return int(float(number) * unit)


def parse_bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false"):
        raise ValueError(f"expected true or false, got {value!r}")
    return text == "true"


@dataclass(frozen=True)
class ConfKey(Generic[T]):
    """A Spark conf key with its default and parser."""

    key: str
    default: str
    parse: Callable[[str], T]
    doc: str

    def get(self, spark: "SparkSession") -> T:
        raw = spark.conf.get(self.key, None)
        value = self.default if raw is None else raw
        try:
            return self.parse(value)
        except ValueError as e:
            raise ValueError(f"invalid value for {self.key}: {e}") from None


MEMORY_BUDGET = ConfKey(
    "spark.gpumf.memoryBudget",
    "256m",
    parse_bytes,
    "Largest amount of normal equations (and gathered factors) one task holds at once.",
)
BROADCAST_THRESHOLD = ConfKey(
    "spark.gpumf.broadcastThreshold",
    "256m",
    parse_bytes,
    "ALS sends the whole fixed-side factor matrix to every task when it is at most this size "
    "(one stage per half-iteration); above it, each factor goes only to the blocks that need it.",
)
BLAS_THREADS = ConfKey(
    "spark.gpumf.blasThreads",
    "0",
    int,
    "BLAS threads per task; 0 means spark.task.cpus, so that tasks x threads = cores.",
)
TRAINING_RMSE = ConfKey(
    "spark.gpumf.trainingRmse",
    "false",
    parse_bool,
    "Compute the training RMSE after every ALS iteration (one extra pass over the ratings).",
)
CPU_FALLBACK = ConfKey(
    "spark.gpumf.cpu.fallback.enabled",
    "true",
    parse_bool,
    "With backend='auto', run on NumPy (with one warning) when a task has no usable GPU.",
)
# Spark's own resource-scheduling keys, read by the driver-side GPU check
# (spark_gpu_mf.backends.check_gpu_backend_available); conf/spark-gpu.conf sets them.
EXECUTOR_GPU_AMOUNT = ConfKey(
    "spark.executor.resource.gpu.amount",
    "0",
    float,
    "GPUs per executor (Spark resource scheduling); backend='cupy' on a cluster needs it > 0.",
)
TASK_GPU_AMOUNT = ConfKey(
    "spark.task.resource.gpu.amount",
    "0",
    float,
    "GPUs per task (a fraction shares a GPU between tasks); backend='cupy' on a cluster needs "
    "it > 0.",
)
# Spark's own key for adaptive query execution, which ALS's distributed dataflow turns off for
# its own queries while it fits unless ALS_ADAPTIVE_EXECUTION says otherwise.
SQL_ADAPTIVE_ENABLED = "spark.sql.adaptive.enabled"
# Spark's own keys for the rows of an Arrow batch, which the block build's read of the ratings
# sets for itself (``spark.arrow_input``), and for the size under which ``createDataFrame`` of
# Arrow data makes a local relation; ``datasets`` sets both for the frames it makes.
ARROW_MAX_RECORDS_PER_BATCH = "spark.sql.execution.arrow.maxRecordsPerBatch"
ARROW_LOCAL_RELATION_THRESHOLD = "spark.sql.execution.arrow.localRelationThreshold"
ALS_ADAPTIVE_EXECUTION = ConfKey(
    "spark.gpumf.als.adaptiveExecution",
    "false",
    parse_bool,
    "Whether ALS's distributed dataflows (broadcast, messages) run their queries with Spark's "
    "adaptive query execution. false (default): the fit sets spark.sql.adaptive.enabled=false on "
    "its session while it runs and restores it after, because AQE plans every shuffle of an "
    "iteration as a job of its own and re-plans between them, with nothing to adapt: the "
    "partitioning is ALS's own. Queries other threads run on the same session during the fit "
    "see the change too.",
)
# Spark sets it; on Spark Connect it names the application that outlives a session's calls.
APP_ID = ConfKey("spark.app.id", "", str, "The Spark application id (set by Spark, read only).")
FAIL_FIRST_ATTEMPT = ConfKey(
    "spark.gpumf.test.failFirstAttempt",
    "false",
    parse_bool,
    "Test only: the first attempt of every ALS solve task in partition 0 fails, so tests can check "
    "that Spark's retry gives the same model.",
)


def _parse_optional_count(value: str):
    text = str(value).strip().lower()
    if text == "auto":
        return None
    number = int(text)
    if number < 0:
        raise ValueError(f"expected 'auto' or a count >= 0, got {value!r}")
    return number


SINGLE_TASK_MAX_RATINGS = ConfKey(
    "spark.gpumf.singleTaskMaxRatings",
    "auto",
    _parse_optional_count,
    "Largest number of ratings ALS trains inside one Spark task (one job per fit instead of one "
    "per half-iteration, the blocks solved by parallel threads). 'auto': 20,000,000 with a local "
    "master (every task shares the one machine anyway), 2,000,000 on a cluster; 0 turns it off.",
)
SINGLE_TASK_IN_DRIVER_MAX_RATINGS = ConfKey(
    "spark.gpumf.singleTaskInDriverMaxRatings",
    "auto",
    _parse_optional_count,
    "Largest single-task ALS fit that runs in the driver's own Python process instead of a "
    "Spark task: local master, classic session, NumPy backend only (in local mode the task's "
    "Python worker is another process on the same machine; the driver skips starting it and "
    "shipping the ratings to it). 'auto': 1,000,000 with a local master, else 0; 0 turns it off.",
)
SGD_IN_DRIVER_MAX_RATINGS = ConfKey(
    "spark.gpumf.sgd.inDriverMaxRatings",
    "auto",
    _parse_optional_count,
    "Largest MascotMF or PrunedMF fit (training plus validation ratings) that runs in the "
    "driver's own Python process: the ratings are collected once and every epoch runs the same "
    "cells, blocks and order as on Spark, without a Spark job per sub-epoch (PrunedMF: with "
    "numBlocks 0 or 1, as one block). Local master, classic session, NumPy backend only. 'auto': "
    "1,000,000 with a local master, else 0; 0 turns it off.",
)
SGD_JVM_SHORTCUT = ConfKey(
    "spark.gpumf.sgd.jvmShortcut",
    "true",
    parse_bool,
    "MascotMF/PrunedMF on a classic session: run each sub-epoch as one RDD job over the cached "
    "cells with the blocks broadcast (faster, same factors; see docs/benchmarks.md). false: the "
    "DataFrame dataflow that Spark Connect sessions always use.",
)
