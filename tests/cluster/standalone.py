"""A real standalone Spark cluster on 127.0.0.1, started from the pip-installed pyspark.

One master and N workers run as separate JVMs (``spark-class ...Master`` / ``...Worker``), so
executors are separate processes from the driver, as on a real cluster.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pyspark


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cluster_env() -> dict:
    env = dict(os.environ)
    env.update(
        SPARK_LOCAL_IP="127.0.0.1",
        SPARK_HOME=os.path.dirname(pyspark.__file__),
        PYSPARK_PYTHON=sys.executable,
        PYSPARK_DRIVER_PYTHON=sys.executable,
        SPARK_NO_DAEMONIZE="1",
    )
    return env


class StandaloneCluster:
    """Master plus workers; ``url`` is the ``spark://`` address to submit to."""

    def __init__(self, workers: int = 2, cores: int = 1, memory: str = "1g", log_dir: Path = None):
        self.workers = workers
        self.cores = cores
        self.memory = memory
        self.log_dir = Path(log_dir or ".")
        self.processes: list[subprocess.Popen] = []
        self.port = free_port()
        self.url = f"spark://127.0.0.1:{self.port}"

    def _spark_class(self, *args: str, log: str) -> subprocess.Popen:
        spark_class = os.path.join(os.path.dirname(pyspark.__file__), "bin", "spark-class")
        out = open(self.log_dir / log, "w")
        process = subprocess.Popen(
            [spark_class, *args], env=cluster_env(), stdout=out, stderr=subprocess.STDOUT
        )
        self.processes.append(process)
        return process

    def start(self) -> "StandaloneCluster":
        self._spark_class(
            "org.apache.spark.deploy.master.Master",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--webui-port",
            str(free_port()),
            log="master.log",
        )
        self._wait_for_port(self.port)
        for index in range(self.workers):
            self._spark_class(
                "org.apache.spark.deploy.worker.Worker",
                self.url,
                "--host",
                "127.0.0.1",
                "--cores",
                str(self.cores),
                "--memory",
                self.memory,
                "--webui-port",
                str(free_port()),
                log=f"worker-{index}.log",
            )
        self._wait_for_workers()
        return self

    def _wait_for_port(self, port: int, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            with closing(socket.socket()) as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.3)
        raise TimeoutError(f"the Spark master did not open port {port}: see master.log")

    def _wait_for_workers(self, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        log = self.log_dir / "master.log"
        while time.time() < deadline:
            if log.read_text().count("Registering worker") >= self.workers:
                return
            time.sleep(0.5)
        raise TimeoutError(f"{self.workers} workers did not register: see {log}")

    def submit_command(self, script: str, *args: str, conf: dict = None) -> list:
        submit = os.path.join(os.path.dirname(pyspark.__file__), "bin", "spark-submit")
        confs = {
            "spark.pyspark.python": sys.executable,
            "spark.ui.enabled": "false",
            "spark.executor.memory": "900m",
            "spark.executor.cores": str(self.cores),
            "spark.sql.shuffle.partitions": "4",
        }
        confs.update(conf or {})
        command = [submit, "--master", self.url]
        for key, value in confs.items():
            command += ["--conf", f"{key}={value}"]
        return command + [script, *args]

    def submit(self, script: str, *args: str, timeout: float = 600, conf: dict = None):
        """spark-submit ``script`` to the cluster and wait; returns the CompletedProcess."""
        return subprocess.run(
            self.submit_command(script, *args, conf=conf),
            env=cluster_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start_submit(self, script: str, *args: str, conf: dict = None) -> subprocess.Popen:
        """spark-submit ``script`` without waiting; its output is a text pipe, line by line.

        The output merges stdout and stderr: spark-submit's PythonRunner copies the Python
        driver's stderr (where the driver's logging goes) to the JVM's stdout.
        """
        return subprocess.Popen(
            self.submit_command(script, *args, conf=conf),
            env=cluster_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )

    def executor_pids(self) -> list[int]:
        """Executor JVMs the workers launched (children of the worker processes)."""
        workers = {p.pid for p in self.processes[1:]}
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = open(f"/proc/{entry}/stat").read()
                cmdline = open(f"/proc/{entry}/cmdline").read()
            except OSError:
                continue
            parent = int(stat[stat.rindex(")") + 2 :].split()[1])
            if parent in workers and "CoarseGrainedExecutorBackend" in cmdline:
                pids.append(int(entry))
        return pids

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
