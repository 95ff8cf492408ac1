"""What the driver asks of a Spark session, answered on classic Spark and on Spark Connect alike.

A Spark Connect session (``SparkSession.builder.remote(...)``) has no SparkContext, RDDs, py4j or
broadcast variables: everything goes through the DataFrame API and ``spark.conf``. Driver code
asks this module instead of ``spark.sparkContext``, so it runs on both kinds of session; where a
classic session offers a faster or more exact road (the JVM's own answer), it is taken here and
nowhere else.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from typing import Iterator, Optional

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from spark_gpu_mf import conf

_LOCAL_MASTER = re.compile(r"^local(?:-cluster)?(?:\[(\*|\d+)(?:,\s*\d+)?\])?$")

# Spark Connect sessions have no SparkContext to cache answers on; keyed by session id.
_PARALLELISM: dict = {}


def is_connect(spark: SparkSession) -> bool:
    """Whether ``spark`` is a Spark Connect session (no JVM on this side)."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def master(spark: SparkSession) -> str:
    """The master URL (``local[2]``, ``spark://host:7077``, ``yarn``, ...)."""
    if not is_connect(spark):
        return spark.sparkContext.master or ""
    return spark.conf.get("spark.master", "") or ""


def is_local(spark: SparkSession) -> bool:
    """Whether every task runs on the driver's machine (a ``local`` master)."""
    return master(spark).startswith("local")


def default_parallelism(spark: SparkSession) -> int:
    """``SparkContext.defaultParallelism``: task slots of the application.

    On Connect it is ``spark.default.parallelism`` when set, else the partitions Spark gives a
    ``range`` by default (which is the same number), asked once per session.
    """
    if not is_connect(spark):
        return max(1, spark.sparkContext.defaultParallelism)
    configured = spark.conf.get("spark.default.parallelism", None)
    if configured:
        return max(1, int(configured))
    key = spark.session_id
    if key not in _PARALLELISM:
        _PARALLELISM[key] = range_partitions(spark)
    return _PARALLELISM[key]


def cached_row_count(df: DataFrame) -> Optional[int]:
    """The rows of ``df`` as its cache counted them while it was built, without a job; None
    when unknown (not a projection of a fully cached DataFrame, or Spark Connect).

    An upper bound rather than an exact count: a cached partition that was evicted and computed
    again is counted again.
    """
    jdf = getattr(df, "_jdf", None)
    if jdf is None:
        return None
    try:
        plan = jdf.queryExecution().optimizedPlan()
        while plan.nodeName() == "Project":
            plan = plan.child()
        if plan.nodeName() != "InMemoryRelation":
            return None
        rows = plan.stats().rowCount()
        return int(str(rows.get())) if rows.isDefined() else None
    except Exception:  # noqa: BLE001 - py4j errors of an unexpected plan: count instead
        return None


def range_partitions(spark: SparkSession) -> int:
    """Partitions of ``spark.range`` by default (one job): the application's task slots."""
    # Projected first: an aggregate may not take a nondeterministic argument directly.
    partitions = spark.range(0, 1 << 16).select(F.spark_partition_id().alias("partition"))
    return int(partitions.agg(F.max("partition").alias("last")).first()["last"]) + 1


def local_cores(spark: SparkSession) -> Optional[int]:
    """Cores of a ``local[N]`` master (``local[*]``: this machine's), None off local mode."""
    match = _LOCAL_MASTER.match(master(spark))
    if match is None:
        return None
    cores = match.group(1)
    if cores is None:
        return 1
    return (os.cpu_count() or 1) if cores == "*" else int(cores)


def conf_value(spark: SparkSession, key: str, default: Optional[str] = None) -> Optional[str]:
    """A Spark conf value, static (``spark.task.cpus``) or runtime, on both kinds of session."""
    if not is_connect(spark):
        # The context's own conf: getConf() would copy every entry through py4j first.
        value = spark.sparkContext._conf.get(key, None)
        if value is not None:
            return value
    try:
        return spark.conf.get(key, default)
    except Exception:  # noqa: BLE001 - Connect refuses some static keys it does not know
        return default


@contextmanager
def runtime_confs(spark: SparkSession, confs: dict) -> Iterator[None]:
    """Set the runtime confs ``{key: value}`` for the block, then put back what was there (unset
    what was unset), on both kinds of session."""
    previous = {key: spark.conf.get(key, None) for key in confs}
    for key, value in confs.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)


def set_job_description(spark: SparkSession, text: Optional[str]) -> None:
    """Label the next Spark jobs in the UI; Connect has no per-thread job description."""
    if not is_connect(spark):
        spark.sparkContext.setJobDescription(text)


def checkpoint_dir(spark: SparkSession) -> Optional[str]:
    """The checkpoint directory (``SparkContext.setCheckpointDir`` or ``spark.checkpoint.dir``)."""
    if not is_connect(spark):
        jdir = spark.sparkContext._jsc.sc().getCheckpointDir()
        if jdir.isDefined():
            return jdir.get()
    return conf_value(spark, "spark.checkpoint.dir")


def _filesystem(spark: SparkSession, path: str):
    jvm = spark.sparkContext._jvm
    hpath = jvm.org.apache.hadoop.fs.Path(path)
    return hpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()), hpath


def _written_files(spark: SparkSession, path: str) -> list:
    """The files a Spark writer left in the directory ``path`` (not ``_SUCCESS`` or hidden
    ones), in name order; none when it is not a directory."""
    fs, hpath = _filesystem(spark, path)
    if not fs.exists(hpath) or not fs.getFileStatus(hpath).isDirectory():
        return []
    files = [s.getPath() for s in fs.listStatus(hpath) if s.isFile()]
    return sorted(
        (f for f in files if not f.getName().startswith(("_", "."))), key=lambda f: f.getName()
    )


def first_line(spark: SparkSession, path: str) -> Optional[str]:
    """The first line of the text files a Spark writer left in the directory ``path``, read
    on the driver: what ``spark.read.text(path).first()`` reads, without its job. None on
    Connect, or when there is no line."""
    if is_connect(spark):
        return None
    jvm, conf = spark.sparkContext._jvm, spark.sparkContext._jsc.hadoopConfiguration()
    codecs = jvm.org.apache.hadoop.io.compress.CompressionCodecFactory(conf)
    for file in _written_files(spark, path):
        stream = file.getFileSystem(conf).open(file)
        codec = codecs.getCodec(file)
        if codec is not None:
            stream = codec.createInputStream(stream)
        reader = jvm.java.io.BufferedReader(jvm.java.io.InputStreamReader(stream, "UTF-8"))
        try:
            line = reader.readLine()
        finally:
            reader.close()
        if line is not None:
            return line
    return None


def stored_parquet_schema(spark: SparkSession, path: str) -> Optional[StructType]:
    """The Spark schema a Spark writer kept in the footer of the first Parquet file in the
    directory ``path``: what ``spark.read.parquet(path)`` infers, read on the driver without
    the job schema inference runs. None on Connect, or when that file has none."""
    if is_connect(spark):
        return None
    files = [f for f in _written_files(spark, path) if f.getName().endswith(".parquet")]
    if not files:
        return None
    jvm, conf = spark.sparkContext._jvm, spark.sparkContext._jsc.hadoopConfiguration()
    parquet = jvm.org.apache.parquet.hadoop
    reader = parquet.ParquetFileReader.open(parquet.util.HadoopInputFile.fromPath(files[0], conf))
    try:
        stored = reader.getFooter().getFileMetaData().getKeyValueMetaData().get(_SPARK_SCHEMA_KEY)
    finally:
        reader.close()
    return None if stored is None else StructType.fromJson(json.loads(stored))


# Where Spark's Parquet writer keeps a file's Spark schema (``ParquetReadSupport``).
_SPARK_SCHEMA_KEY = "org.apache.spark.sql.parquet.row.metadata"


def path_exists(spark: SparkSession, path: str) -> bool:
    """Whether ``path`` exists, in the file system Spark reads it from.

    Connect: asked through the DataFrame reader (a missing path fails with PATH_NOT_FOUND).
    """
    if not is_connect(spark):
        fs, hpath = _filesystem(spark, path)
        return bool(fs.exists(hpath))
    try:
        spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(path).schema
    except Exception as e:  # noqa: BLE001 - Connect raises AnalysisException subclasses
        if "PATH_NOT_FOUND" in str(e) or "does not exist" in str(e):
            return False
        raise
    return True


def _connect_ml_helper(spark: SparkSession, method: str, *args) -> None:
    """Call ``method`` of the Connect server's ML helper (Spark's ``ConnectHelper``).

    This is the command pyspark's own ``RemoteMLWriter`` sends to clear a path before an
    overwrite; it is sent on ``spark``'s client directly, so it does not depend on the process's
    ``is_remote()`` state.
    """
    import pyspark.sql.connect.proto as pb2
    from pyspark.ml.connect.serialize import serialize
    from pyspark.ml.util import ML_CONNECT_HELPER_ID

    command = pb2.Command()
    command.ml_command.fetch.CopyFrom(
        pb2.Fetch(
            obj_ref=pb2.ObjectRef(id=ML_CONNECT_HELPER_ID),
            methods=[pb2.Fetch.Method(method=method, args=serialize(spark.client, *args))],
        )
    )
    spark.client.execute_command(command)


def delete_path(spark: SparkSession, path: str) -> bool:
    """Delete ``path`` recursively; whether it existed.

    Connect: through the server's ML helper (``handleOverwrite``), as pyspark's ML writers do.
    """
    if is_connect(spark):
        if not path_exists(spark, path):
            return False
        _connect_ml_helper(spark, "handleOverwrite", path, True)
        return True
    fs, hpath = _filesystem(spark, path)
    return bool(fs.delete(hpath, True))


def can_rename(spark: SparkSession) -> bool:
    """Whether :func:`rename_path` works here: a JVM with Hadoop's file system (not Connect)."""
    return not is_connect(spark)


def rename_path(spark: SparkSession, source: str, target: str) -> bool:
    """Move ``source`` to ``target`` (atomic on HDFS and local disks); False on Connect."""
    if is_connect(spark):
        return False
    fs, src = _filesystem(spark, source)
    _, dst = _filesystem(spark, target)
    return bool(fs.rename(src, dst))


def application_id(spark: SparkSession) -> str:
    """The Spark application id (``spark.app.id``): what outlives a session's broadcasts."""
    if not is_connect(spark):
        return spark.sparkContext.applicationId
    return conf.APP_ID.get(spark) or spark.session_id


def broadcast(spark: SparkSession, value):
    """``value`` as a broadcast variable, or None on Connect, which has none (callers then take
    a DataFrame road that gives the same result)."""
    if is_connect(spark):
        return None
    return spark.sparkContext.broadcast(value)
