"""A real standalone Spark cluster on 127.0.0.1, started from the pip-installed pyspark.

One master and N workers run as separate JVMs (``spark-class ...Master`` / ``...Worker``), so
executors are separate processes from the driver, as on a real cluster. The cluster tests and
``jobs/benchmark.py --cluster standalone`` use it. Every process it starts is stopped by
:meth:`StandaloneCluster.stop`, which also runs when a start fails, when a ``with`` block ends
and when the Python process exits.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import closing, contextmanager
from pathlib import Path

import pyspark

SPARK_HOME = os.path.dirname(pyspark.__file__)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS's choice)."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cluster_env() -> dict:
    """The environment of the cluster's JVMs: loopback only, this interpreter for Python."""
    env = dict(os.environ)
    env.update(
        SPARK_LOCAL_IP="127.0.0.1",
        SPARK_HOME=SPARK_HOME,
        PYSPARK_PYTHON=sys.executable,
        PYSPARK_DRIVER_PYTHON=sys.executable,
        SPARK_NO_DAEMONIZE="1",
    )
    return env


class StandaloneCluster:
    """Master plus workers; ``url`` is the ``spark://`` address to submit to.

    Parameters
    ----------
    workers, cores, memory : int, int, str
        Number of workers, and the cores and memory each one offers to executors.
    log_dir : path, optional
        Where ``master.log`` and ``worker-<i>.log`` go (default: the working directory).
    """

    def __init__(self, workers: int = 2, cores: int = 1, memory: str = "1g", log_dir: Path = None):
        self.workers = workers
        self.cores = cores
        self.memory = memory
        self.log_dir = Path(log_dir or ".")
        self.processes: list[subprocess.Popen] = []
        self.port = free_port()
        self.url = f"spark://127.0.0.1:{self.port}"

    def __enter__(self) -> "StandaloneCluster":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _spark_class(self, *args: str, log: str) -> subprocess.Popen:
        spark_class = os.path.join(SPARK_HOME, "bin", "spark-class")
        with open(self.log_dir / log, "w") as out:  # the child keeps its own descriptor
            process = subprocess.Popen(
                [spark_class, *args], env=cluster_env(), stdout=out, stderr=subprocess.STDOUT
            )
        self.processes.append(process)
        return process

    def start(self) -> "StandaloneCluster":
        """Start the master, then the workers; return once every worker has registered."""
        atexit.register(self.stop)
        try:
            self._spark_class(
                "org.apache.spark.deploy.master.Master",
                "--host", "127.0.0.1",
                "--port", str(self.port),
                "--webui-port", str(free_port()),
                log="master.log",
            )
            self._wait_for_port(self.port)
            for index in range(self.workers):
                self._spark_class(
                    "org.apache.spark.deploy.worker.Worker",
                    self.url,
                    "--host", "127.0.0.1",
                    "--cores", str(self.cores),
                    "--memory", self.memory,
                    "--webui-port", str(free_port()),
                    log=f"worker-{index}.log",
                )
            self._wait_for_workers()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for_port(self, port: int, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            with closing(socket.socket()) as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return
            if self.processes[0].poll() is not None:
                break
            time.sleep(0.3)
        raise TimeoutError(f"the Spark master did not open port {port}: see "
                           f"{self.log_dir / 'master.log'}")

    def _wait_for_workers(self, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        log = self.log_dir / "master.log"
        while time.time() < deadline:
            if log.read_text().count("Registering worker") >= self.workers:
                return
            time.sleep(0.5)
        raise TimeoutError(f"{self.workers} workers did not register: see {log}")

    def submit_command(self, script: str, *args: str, conf: dict = None) -> list:
        """The ``spark-submit`` argument list for ``script`` on this cluster."""
        submit = os.path.join(SPARK_HOME, "bin", "spark-submit")
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

    def worker_pids(self) -> list[int]:
        """The worker JVMs, in start order."""
        return [p.pid for p in self.processes[1:]]

    def executor_pids(self) -> list[int]:
        """Executor JVMs the workers launched (children of the worker processes)."""
        workers = set(self.worker_pids())
        return [pid for pid, parent in _parents().items()
                if parent in workers and "CoarseGrainedExecutorBackend" in _cmdline(pid)]

    def stop(self) -> None:
        """Stop the workers and the master, and any executor a worker left behind.

        Idempotent: the ``with`` block, an error in :meth:`start` and ``atexit`` may all call it.
        """
        if not self.processes:
            return
        executors = self.executor_pids()
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pid in executors:  # a worker kills its executors on SIGTERM; this is the fallback
            if "CoarseGrainedExecutorBackend" in _cmdline(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.processes = []
        atexit.unregister(self.stop)


# ------------------------------------------------------------------------------------ memory


def _parents() -> dict[int, int]:
    """``{pid: parent pid}`` of every process visible in /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name in parentheses may hold spaces: fields start after the last ')'.
        parents[int(entry)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    return parents


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read()
    except OSError:
        return ""


def descendants(root: int, parents: dict[int, int]) -> list[int]:
    """Every process below ``root`` in the process tree (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    found, stack = [], list(children.get(root, ()))
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, ()))
    return found


def memory_bytes(pid: int) -> int:
    """Proportional set size of ``pid`` (RSS where smaps_rollup is unreadable), 0 if gone.

    PSS splits pages shared between processes (the Python workers PySpark forks from one
    daemon share most of theirs), so a sum over processes does not count them twice.
    """
    for path, field in ((f"/proc/{pid}/smaps_rollup", "Pss:"), (f"/proc/{pid}/status", "VmRSS:")):
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(field):
                        return int(line.split()[1]) * 1024
        except OSError:
            continue
    return 0


class ExecutorMemorySampler:
    """Peak memory of each worker's executors (executor JVM plus its Python workers).

    A daemon thread samples /proc every ``interval`` seconds while it runs; :meth:`peaks`
    gives the peak since the last :meth:`reset`, one number (bytes) per worker in start order.
    The worker JVMs themselves are left out: they only launch executors.
    """

    def __init__(self, cluster: StandaloneCluster, interval: float = 0.2):
        self.workers = cluster.worker_pids()
        self.interval = interval
        self._peaks = [0] * len(self.workers)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="executor-memory", daemon=True)

    def start(self) -> "ExecutorMemorySampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def sample(self) -> list[int]:
        """Memory now under each worker (bytes), and fold it into the peaks."""
        parents = _parents()
        now = [sum(memory_bytes(pid) for pid in descendants(worker, parents))
               for worker in self.workers]
        with self._lock:
            self._peaks = [max(a, b) for a, b in zip(self._peaks, now)]
        return now

    def reset(self) -> None:
        with self._lock:
            self._peaks = [0] * len(self.workers)

    def peaks(self) -> list[int]:
        self.sample()
        with self._lock:
            return list(self._peaks)

    @contextmanager
    def measure(self):
        """``with sampler.measure() as memory:``: ``memory["start"]`` (bytes per worker) when the
        block starts, ``memory["peak"]`` at its end.

        The start matters: executor JVMs keep the heap earlier work grew, so a peak alone
        includes what previous fits left behind.
        """
        self.reset()
        memory = {"start": self.sample(), "peak": []}
        try:
            yield memory
        finally:
            memory["peak"] = self.peaks()

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            self.sample()
