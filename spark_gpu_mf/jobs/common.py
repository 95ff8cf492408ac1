"""What the jobs share: the error contract, the Spark session, argument types and output files.

The error contract: a job that cannot do its work prints **one line** on stderr,
``<prog>: error: <what is wrong>``, and exits with a non-zero status (1 for problems found at
run time, 2 for bad command-line syntax, as argparse does). Exceptions from Spark are reduced
to their first meaningful line: a Java stack trace or a Python worker traceback is never the
only thing a user sees. ``--verbose`` prints the full traceback as well. (spark-submit passes
a PySpark driver's stderr on through its own stdout, so under spark-submit the line arrives
there.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

logger = logging.getLogger("spark_gpu_mf.jobs")

#: Set by ``spark-gpu-mf`` so that messages name the command the user typed
#: (``spark-gpu-mf train``) rather than the file spark-submit ran.
PROG_ENV = "SPARK_GPU_MF_PROG"

EXIT_FAILURE = 1
EXIT_USAGE = 2


class JobError(Exception):
    """A problem with the job's arguments or inputs, reported as one line without a traceback."""


def prog_name(job: str) -> str:
    """The name messages use: ``spark-gpu-mf <job>`` under the CLI, else the script's name."""
    return os.environ.get(PROG_ENV) or f"{job}.py"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``prog: error: ...``), not the whole usage."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def new_parser(job: str, description: str, epilog: str | None = None, prog=None):
    """An ``ArgumentParser`` with the layout every job uses (defaults shown, raw epilog)."""
    return ArgumentParser(
        prog=prog or prog_name(job),
        description=description,
        epilog=epilog,
        formatter_class=_HelpFormatter,
        allow_abbrev=False,
    )


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps prose but keeps multi-line text (the examples) as written; shows real defaults.

    A default is appended as "(default: X)" unless it is None or False (nothing to say) or
    the help already names it.
    """

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (
            default is None
            or default is False
            or default == []
            or default is argparse.SUPPRESS
            or "default" in text
            or action.option_strings == []
        ):
            return text
        return f"{text} (default: %(default)s)"


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, Spark's own (INFO) log output and full tracebacks on errors",
    )


def run_job(parser: argparse.ArgumentParser, body: Callable, argv=None) -> int:
    """Parse ``argv``, run ``body(args)`` and turn any failure into one line and an exit code.

    Returns the exit status (0 on success) instead of exiting, so that tests can call jobs in
    process; the modules' ``main`` passes it to ``sys.exit``.
    """
    from spark_gpu_mf.jobs.progress import job_logging

    args = parser.parse_args(argv)
    try:
        with job_logging(verbose=args.verbose):
            body(args)
        return 0
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the top level: every failure becomes one line
        if args.verbose:
            traceback.print_exc()
        print(f"{parser.prog}: error: {describe_exception(error)}", file=sys.stderr)
        return EXIT_FAILURE


# ------------------------------------------------------------------------------------------
# One line from any exception
# ------------------------------------------------------------------------------------------

# The last "SomeError: message" line of a Python traceback (what a worker raised).
_PYTHON_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Z]\w*(?:Error|Exception|Exit)): (.+)$")
# Spark's task-failure wrapper: "... most recent failure: Lost task 0.0 in stage 3.0 (TID 7)
# (host executor driver): org.apache.spark.SparkRuntimeException: <message>".
_TASK_FAILURE = re.compile(r"most recent failure: Lost task [^:]*\):\s*(?:[\w.$]+?\.)?(\w+): (.*)")
_JVM_CLASS_PREFIX = re.compile(r"^(?:[a-z_$][\w$]*\.)+([A-Z][\w$]*): ")
# Python exceptions whose message says everything; others are shown with their type.
_SELF_EXPLAINING = (JobError, ValueError, FileNotFoundError, KeyError, TypeError)


def describe_exception(error: BaseException) -> str:
    """The first meaningful line of ``error``: what a user needs, without stack traces."""
    text = _exception_text(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    # A Python traceback (from a worker, or wrapped by Spark): its last "XError: ..." line.
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        for line in reversed(lines):
            match = _PYTHON_ERROR_LINE.match(line)
            if match and not line.startswith("org.apache.spark.api.python.PythonException"):
                return _clip(f"{match.group(1)}: {match.group(2)}")
    for line in lines:
        match = _TASK_FAILURE.search(line)
        if match:
            return _clip(f"{_strip_jvm_class(match.group(2))}")
    first = _strip_jvm_class(lines[0])
    if isinstance(error, _SELF_EXPLAINING) or _is_spark_error(error):
        if isinstance(error, KeyError) and len(error.args) == 1:
            first = str(error.args[0])
        return _clip(first)
    return _clip(f"{type(error).__name__}: {first}")


def _exception_text(error: BaseException) -> str:
    java_exception = getattr(error, "java_exception", None)  # py4j.protocol.Py4JJavaError
    if java_exception is not None:
        # The gateway may be gone already; str() of the Python side is the fallback.
        with contextlib.suppress(Exception):
            return str(java_exception.toString())
    return str(error)


def _is_spark_error(error: BaseException) -> bool:
    module = type(error).__module__ or ""
    return module.startswith(("pyspark.", "py4j."))


def _strip_jvm_class(line: str) -> str:
    """``org.apache.spark.SparkException: msg`` -> ``msg``; ``java.io.X: msg`` -> ``X: msg``.

    Spark's own exception classes and error-class messages (``[PATH_NOT_FOUND] ...``) say
    everything in the message; other Java exceptions keep their simple class name.
    """
    match = _JVM_CLASS_PREFIX.match(line)
    if match is None:
        return line
    message = line[match.end() :]
    if message.startswith("[") or match.group(1).startswith("Spark"):
        return message
    return f"{match.group(1)}: {message}"


def _clip(line: str, limit: int = 600) -> str:
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------
# Spark session
# ------------------------------------------------------------------------------------------


class SparkJob:
    """The job's Spark session, created on entry and stopped on exit if this job created it.

    Under spark-submit the session is created here (spark-submit's ``--master`` and ``--conf``
    apply); when a job runs inside a Python process that already has an active session (a
    notebook, a workflow task, the tests), that session is used and left running.
    """

    def __init__(self, job: str):
        self.job = job
        self.spark: SparkSession | None = None
        self._owned = False
        self._previous_confs: dict[str, str | None] = {}

    def __enter__(self):
        from pyspark.sql import SparkSession

        active = SparkSession.getActiveSession()
        if active is not None:
            self.spark = active
        else:
            self.spark = SparkSession.builder.appName(f"spark-gpu-mf {self.job}").getOrCreate()
            self._owned = True
        url = self.spark.sparkContext.uiWebUrl
        if url:
            logger.info("Spark UI (job descriptions per iteration): %s", url)
        return self

    def phase(self, text: str) -> None:
        """Name the Spark jobs that follow (Spark UI, history server), e.g. "read ratings"."""
        self.spark.sparkContext.setJobDescription(f"spark-gpu-mf {self.job}: {text}")

    def set_conf(self, key: str, value: str) -> None:
        """Set a runtime conf for this job; a session the job did not create gets it back."""
        self._previous_confs.setdefault(key, self.spark.conf.get(key, None))
        self.spark.conf.set(key, value)

    def __exit__(self, *exc_info) -> None:
        if self.spark is None:
            return
        self.spark.sparkContext.setJobDescription(None)
        if self._owned:
            self.spark.stop()
            return
        for key, value in self._previous_confs.items():
            if value is None:
                self.spark.conf.unset(key)
            else:
                self.spark.conf.set(key, value)


# ------------------------------------------------------------------------------------------
# Arguments, paths and output files
# ------------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _number(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def fraction(text: str) -> float:
    """argparse type: a float in [0, 1)."""
    value = _number(text, float, "a number")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _number(text: str, kind, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def is_local_path(path: str) -> bool:
    """Whether ``path`` is on the local file system (no scheme, or ``file:``)."""
    scheme = urlparse(path).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def local_path(path: str) -> str:
    return urlparse(path).path if path.startswith("file:") else path


class Paths:
    """Answers "does this path exist?" for the checks that run before any work.

    With a Spark session it asks Hadoop's FileSystem, so that ``hdfs://``, ``s3a://`` and
    scheme-less paths (on the cluster's default file system) are checked where Spark will read
    them. Without one (``spark-gpu-mf``, before spark-submit starts) it checks local paths
    only, and scheme-less paths only when they are local, i.e. when the master is local.
    """

    def __init__(self, spark: SparkSession | None = None, scheme_less_is_local: bool = True):
        self.spark = spark
        self.scheme_less_is_local = scheme_less_is_local

    def exists(self, path: str) -> bool | None:
        """True or False, or None when it cannot tell."""
        if self.spark is not None:
            from spark_gpu_mf.spark.persistence import path_exists

            return path_exists(self.spark, path)
        scheme = urlparse(path).scheme
        if scheme == "file" or (scheme == "" and self.scheme_less_is_local):
            return os.path.exists(local_path(path))
        return None

    def require_existing(self, path: str, what: str) -> None:
        if self.exists(path) is False:
            raise JobError(f"{what} not found: {path}")

    def require_new(self, path: str, what: str, overwrite: bool) -> None:
        """An output Spark writes must not exist yet, unless it may be replaced."""
        if not overwrite and self.exists(path):
            raise JobError(f"{what} {path} already exists; pass --overwrite to replace it")


def require_local_output(path: str, what: str, overwrite: bool) -> None:
    """A file the driver writes (JSON, PNG) must be local, and new unless ``overwrite``."""
    if not is_local_path(path):
        raise JobError(f"{what} is written by the driver and must be a local path: {path}")
    if not overwrite and os.path.exists(local_path(path)):
        raise JobError(f"{what} {path} already exists; pass --overwrite to replace it")


def local_output(path: str, what: str) -> str:
    """The local file path for a driver-written output, with its directory created."""
    if not is_local_path(path):
        raise JobError(f"{what} is written by the driver and must be a local path: {path}")
    target = local_path(path)
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    return target


def write_json(path: str, document: Any) -> None:
    """Write a JSON document atomically (a temporary file renamed into place), locally only."""
    target = local_output(path, "a JSON output")
    temporary = f"{target}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=2, default=_json_default)
        f.write("\n")
    os.replace(temporary, target)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # NumPy scalars
        return value.item()
    return str(value)


def read_json(path: str, what: str) -> Any:
    """A local JSON file the driver reads (the train job's metrics)."""
    if not os.path.isfile(local_path(path)):
        raise JobError(f"{what} not found: {path}")
    try:
        with open(local_path(path), encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise JobError(f"{what} {path} is not valid JSON: {error}") from None


def format_count(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def print_report(title: str, rows: Sequence[tuple], stream=None) -> None:
    """Print an aligned block of ``(label, value)`` rows on stdout: the job's result."""
    stream = stream or sys.stdout
    width = max((len(label) for label, _ in rows), default=0)
    print(title, file=stream)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}", file=stream)
    stream.flush()
