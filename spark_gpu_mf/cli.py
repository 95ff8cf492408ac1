"""``spark-gpu-mf``: run the jobs through spark-submit with the project's Spark configs.

::

    spark-gpu-mf train [--master URL] [--conf KEY=VALUE ...] [--gpu] [job options]
    spark-gpu-mf evaluate ...
    spark-gpu-mf recommend ...

The command finds ``spark-submit`` in the pip-installed pyspark (or ``$SPARK_HOME``), the job
module inside this package and the Spark configs in ``spark_gpu_mf/spark_conf`` (the
repository's ``conf/``), so a user needs neither a source tree nor a Spark installation:

* local runs (no ``--master``, or ``local[...]``) use ``conf/spark-defaults.conf`` and bind to
  127.0.0.1;
* ``--gpu`` uses the GPU-cluster template ``conf/spark-gpu.conf`` with the installed
  discovery script;
* other masters use the cluster's own defaults;
* the driver logs through ``conf/log4j2.properties`` (warnings only) unless ``--verbose``;
* the driver and the executors run this Python (``sys.executable``), which has pyarrow and
  spark_gpu_mf, unless ``--conf spark.pyspark.python=...`` says otherwise.

Arguments are validated with the job's own parser before Spark starts, and handed to
spark-submit as an argument list (never through a shell).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.resources
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from spark_gpu_mf.jobs import JOB_NAMES
from spark_gpu_mf.jobs.common import (
    EXIT_FAILURE,
    EXIT_USAGE,
    PROG_ENV,
    ArgumentParser,
    JobError,
    Paths,
    describe_exception,
    run_job,
)
from spark_gpu_mf.jobs.progress import PROGRESS_BAR_ENV

PROG = "spark-gpu-mf"
LOCAL_CONF = "spark-defaults.conf"
GPU_CONF = "spark-gpu.conf"
LOG_CONF = "log4j2.properties"
GPU_DISCOVERY_SCRIPT = "getGpusResources.sh"
DISCOVERY_KEY = "spark.executor.resource.gpu.discoveryScript"

OVERVIEW = f"""\
usage: {PROG} {{train,evaluate,recommend}} [spark options] [job options]

Run spark_gpu_mf's jobs through spark-submit, with the project's Spark configs.

jobs:
  train       fit ALS / MascotMF / PrunedMF on ratings; held-out RMSE; save the model
  evaluate    RMSE, MAE, precision/recall/NDCG at k and MAP of a saved model; training plot
  recommend   top-N items per user (or users per item, or for a list of ids) as Parquet/CSV

spark options (any job):
  --master URL        local[*] by default; spark://host:7077, yarn, k8s://... for a cluster
  --conf KEY=VALUE    any Spark or spark.gpumf.* setting (repeatable)
  --gpu               use the GPU-cluster template conf/spark-gpu.conf
  --dry-run           print the spark-submit command instead of running it

`{PROG} train` with no options fits ALS on generated data and prints the held-out RMSE.
`{PROG} <job> --help` lists a job's options.
"""


@dataclass
class SubmitOptions:
    master: str | None
    confs: list[tuple[str, str]]
    gpu: bool
    dry_run: bool

    @property
    def is_local(self) -> bool:
        return self.master is None or self.master.startswith("local")


def add_submit_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(f"spark options (added by {PROG})")
    group.add_argument(
        "--master",
        metavar="URL",
        help="Spark master: local[*] by default (conf/spark-defaults.conf); spark://host:7077, "
        "yarn or k8s://... to run on a cluster",
    )
    group.add_argument(
        "--conf",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Spark setting, e.g. --conf spark.executor.memory=8g or "
        "--conf spark.gpumf.memoryBudget=512m (repeatable; overrides the conf files)",
    )
    group.add_argument(
        "--gpu",
        action="store_true",
        help="schedule GPUs with the template conf/spark-gpu.conf and the installed discovery "
        "script (for a GPU cluster: give --master too)",
    )
    group.add_argument(
        "--dry-run", action="store_true", help="print the spark-submit command and exit"
    )


def parse_submit_options(job: str, argv: Sequence[str]) -> tuple[SubmitOptions, list[str]]:
    """Take the spark options out of ``argv``, wherever they are; the rest is the job's."""
    parser = ArgumentParser(prog=f"{PROG} {job}", add_help=False, allow_abbrev=False)
    add_submit_arguments(parser)
    known, rest = parser.parse_known_args(argv)
    confs = []
    for assignment in known.conf:
        key, sep, value = assignment.partition("=")
        if not sep or not key.strip():
            parser.error(f"argument --conf: expected KEY=VALUE, got {assignment!r}")
        confs.append((key.strip(), value))
    return SubmitOptions(known.master, confs, known.gpu, known.dry_run), rest


def conf_dir() -> Path:
    """The installed copy of the repository's ``conf/`` (package ``spark_gpu_mf.spark_conf``)."""
    return Path(str(importlib.resources.files("spark_gpu_mf.spark_conf")))


def spark_submit_path() -> str:
    """``spark-submit`` of ``$SPARK_HOME`` if set, else of the pip-installed pyspark."""
    candidates = []
    if os.environ.get("SPARK_HOME"):
        candidates.append(Path(os.environ["SPARK_HOME"]) / "bin" / "spark-submit")
    import pyspark

    candidates.append(Path(pyspark.__file__).parent / "bin" / "spark-submit")
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    raise JobError(
        "spark-submit not found in "
        + " or ".join(str(c) for c in candidates)
        + "; reinstall pyspark (pip install 'pyspark>=4') or fix SPARK_HOME"
    )


def job_file(job: str) -> str:
    module = importlib.import_module(f"spark_gpu_mf.jobs.{job}")
    return str(Path(module.__file__).resolve())


def build_command(
    job: str, job_argv: Sequence[str], options: SubmitOptions, verbose: bool = False
) -> tuple[list[str], dict[str, str]]:
    """The spark-submit argument list and environment that run ``job`` with ``job_argv``.

    Returns
    -------
    (command, env)
        ``command`` is for ``subprocess.run`` without a shell; ``env`` is the full environment.
    """
    confs_dir = conf_dir()
    user_keys = {key for key, _ in options.confs}
    command = [spark_submit_path()]
    if options.master:
        command += ["--master", options.master]
    properties = None
    if options.gpu:
        properties = confs_dir / GPU_CONF
        if not properties.is_file():
            raise JobError(
                f"--gpu: the GPU template {properties} is missing from this installation"
            )
    elif options.is_local:
        properties = confs_dir / LOCAL_CONF
    if properties is not None:
        # --load-spark-defaults keeps $SPARK_CONF_DIR/spark-defaults.conf (if any) underneath.
        command += ["--properties-file", str(properties), "--load-spark-defaults"]
    defaults = {
        # The driver is this machine: run it on this Python, which has spark_gpu_mf.
        "spark.pyspark.driver.python": sys.executable,
        # Executors: the same Python (right for local mode and for clusters whose nodes share
        # this environment's path; otherwise pass --conf spark.pyspark.python=...).
        "spark.pyspark.python": sys.executable,
    }
    script = confs_dir / GPU_DISCOVERY_SCRIPT
    if options.gpu and script.is_file():
        defaults[DISCOVERY_KEY] = str(script)
    for key, value in defaults.items():
        if key not in user_keys:
            command += ["--conf", f"{key}={value}"]
    for key, value in options.confs:
        command += ["--conf", f"{key}={value}"]
    command += [job_file(job), *job_argv]

    env = dict(os.environ)
    env[PROG_ENV] = f"{PROG} {job}"
    # The same choice for Spark versions or code paths that read the environment instead.
    env["PYSPARK_PYTHON"] = dict(options.confs).get("spark.pyspark.python", sys.executable)
    env["PYSPARK_DRIVER_PYTHON"] = sys.executable
    if sys.stdout.isatty():
        # spark-submit passes the job's output on through pipes (stderr merged into stdout),
        # so the job cannot see the terminal itself.
        env.setdefault(PROGRESS_BAR_ENV, "1")
    if options.is_local:
        # Spark's web UI and block manager bind to SPARK_LOCAL_IP (else to every interface).
        env.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    if not verbose:
        log_conf = (confs_dir / LOG_CONF).as_uri()
        java_options = env.get("SPARK_SUBMIT_OPTS", "")
        if "log4j2.configurationFile" not in java_options:
            env["SPARK_SUBMIT_OPTS"] = (
                f"{java_options} -Dlog4j2.configurationFile={log_conf}".strip()
            )
    return command, env


def _job_parser(job: str):
    """The job module and its parser, with the spark options added (for --help and checks)."""
    module = importlib.import_module(f"spark_gpu_mf.jobs.{job}")
    parser = module.build_parser(prog=f"{PROG} {job}")
    add_submit_arguments(parser)
    return module, parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spark-gpu-mf`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(OVERVIEW, end="")
        return 0
    if argv[0] == "--version":
        import spark_gpu_mf

        print(f"{PROG} {spark_gpu_mf.__version__}")
        return 0
    job, rest = argv[0], argv[1:]
    if job not in JOB_NAMES:
        print(
            f"{PROG}: error: unknown job {job!r}; choose from {', '.join(JOB_NAMES)} "
            f"(see {PROG} --help)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    module, parser = _job_parser(job)
    # The job's own parser and checks: --help, bad options, a missing input or an unknown
    # param fail here, in a second, before a JVM starts.
    try:
        options, job_argv = parse_submit_options(job, rest)
        args = parser.parse_args(job_argv)
    except SystemExit as stop:  # --help, or a usage error argparse has printed
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    if not module.needs_spark(args):
        return run_job(module.build_parser(prog=f"{PROG} {job}"), module.run, job_argv)
    try:
        # Scheme-less paths are local files only for a local master (on YARN they are HDFS).
        paths = Paths(scheme_less_is_local=options.is_local)
        module.check_arguments(argparse.Namespace(**vars(args)), paths)
        command, env = build_command(job, job_argv, options, verbose=args.verbose)
    except JobError as error:
        print(f"{PROG} {job}: error: {describe_exception(error)}", file=sys.stderr)
        return EXIT_FAILURE
    if options.dry_run:
        print(shlex.join(command))
        return 0
    try:
        return subprocess.run(command, env=env, check=False).returncode
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
