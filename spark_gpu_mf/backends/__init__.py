"""Compute backends (``numpy_backend``, ``cupy_backend``) and how a task picks one.

``select_backend`` runs on executors, inside a Spark task; ``check_gpu_backend_available`` runs
on the driver before any job when ``backend="cupy"``. Neither imports CuPy on the driver:
``import spark_gpu_mf`` must work where CuPy is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import threading
import warnings
from types import ModuleType

from spark_gpu_mf.errors import BackendUnavailableError

__all__ = [
    "check_gpu_backend_available",
    "gpu_address_to_ordinal",
    "local_gpu_possible",
    "select_backend",
    "warn_local_fallback",
]

_warned_fallback = False
_warn_lock = threading.Lock()
_CONF_HINT = (
    "set spark.executor.resource.gpu.amount, spark.task.resource.gpu.amount and "
    "spark.executor.resource.gpu.discoveryScript (see conf/spark-gpu.conf)"
)


def _cupy_problem() -> str | None:
    """Why CuPy cannot run here, or None when it can (imports CuPy: executors only)."""
    try:
        import cupy
    except ImportError as error:
        return f"CuPy is not installed ({error}); install spark-gpu-mf[gpu] on the executors"
    if not cupy.cuda.is_available():
        return "CuPy finds no usable CUDA device (no GPU, or no NVIDIA driver)"
    try:  # gram, top_k and the Cholesky solver go through cuBLAS and cuSOLVER
        from cupy.cuda import cublas, cusolver  # noqa: F401
    except ImportError as error:
        return (
            f"CUDA libraries are missing ({error}); install cuda-toolkit[cublas,cusolver] "
            "matching CuPy's CUDA version"
        )
    return None


def gpu_address_to_ordinal(address: str, visible: str | None = None) -> int:
    """CUDA device ordinal of the GPU Spark assigned by ``address`` (nvidia-smi's index).

    When ``CUDA_VISIBLE_DEVICES`` is set (YARN, Kubernetes or a user restrict what the process
    sees), ordinals count within that list: the address's position in it, or 0 when exactly one
    GPU is visible (an isolated container whose only GPU is the assigned one).
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    address = address.strip()
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if address in ids:
            return ids.index(address)
        if len(ids) == 1:
            return 0
        raise BackendUnavailableError(
            f"Spark assigned GPU {address} to this task but CUDA_VISIBLE_DEVICES={visible} "
            "does not include it"
        )
    try:
        return int(address)
    except ValueError:
        raise BackendUnavailableError(
            f"cannot map the GPU address {address!r} from Spark to a CUDA device; the discovery "
            "script must print device indexes"
        ) from None


def _task_gpu_address() -> str | None:
    """First GPU address Spark's resource scheduling gave the current task, if any."""
    from pyspark import TaskContext

    context = TaskContext.get()
    if context is None:
        return None
    gpu = context.resources().get("gpu")
    if gpu is None or not gpu.addresses:
        return None
    return gpu.addresses[0]


def _local_ordinal(device_count: int) -> int:
    """Local mode shares the machine's GPUs among tasks: partition id modulo device count."""
    from pyspark import TaskContext

    context = TaskContext.get()
    partition = context.partitionId() if context is not None else 0
    return partition % max(device_count, 1)


def _numpy() -> ModuleType:
    from spark_gpu_mf.backends import numpy_backend

    return numpy_backend


def _fallback(reason: str) -> ModuleType:
    global _warned_fallback
    with _warn_lock:
        if not _warned_fallback:
            _warned_fallback = True
            warnings.warn(
                f"backend='auto' runs on NumPy (CPU): {reason}", RuntimeWarning, stacklevel=3
            )
    return _numpy()


def select_backend(
    requested: str, *, local_mode: bool | None = None, cpu_fallback: bool = True
) -> ModuleType:
    """The backend module for this Spark task, with its CUDA device selected.

    Parameters
    ----------
    requested : {"auto", "cupy", "numpy"}
        ``"numpy"``: NumPy. ``"cupy"``: CuPy or ``BackendUnavailableError`` with the reason.
        ``"auto"``: CuPy when the task was given a GPU and CuPy can use it, else NumPy with one
        warning per process.
    local_mode : bool, optional
        The job runs on a ``local[...]`` master (pass it from the driver). Local tasks get no GPU
        from Spark's scheduler and share the machine's GPUs by partition id. ``None`` means: only
        a GPU that Spark assigned counts for ``"auto"``, and ``"cupy"`` uses the local rule when
        the task has none (the driver check has already required GPU scheduling on clusters).
    cpu_fallback : bool
        ``spark.gpumf.cpu.fallback.enabled``: when False, ``"auto"`` without a usable GPU raises
        like ``"cupy"`` instead of running on NumPy.
    """
    if requested == "numpy":
        return _numpy()
    if requested not in ("auto", "cupy"):
        raise ValueError(f"unknown backend {requested!r}; expected 'auto', 'cupy' or 'numpy'")
    strict = requested == "cupy" or not cpu_fallback
    address = _task_gpu_address()
    use_local_rule = address is None and (local_mode or (local_mode is None and strict))
    if address is None and not use_local_rule:
        if strict:
            reason = f"this Spark task was given no GPU ({_CONF_HINT})"
            raise BackendUnavailableError(f"backend={requested!r} cannot run: {reason}")
        # A cluster that schedules no GPUs is a CPU cluster: NumPy is the expected backend.
        return _numpy()
    if address is None and not strict and importlib.util.find_spec("cupy") is None:
        return _numpy()  # local mode without the gpu extra: a CPU setup, nothing to warn about
    problem = _cupy_problem()
    if problem is not None:
        if strict:
            raise BackendUnavailableError(f"backend={requested!r} cannot run: {problem}")
        if local_mode:
            return _numpy()  # the driver already said so (warn_local_fallback), once
        return _fallback(problem)
    import cupy

    count = cupy.cuda.runtime.getDeviceCount()
    ordinal = _local_ordinal(count) if address is None else gpu_address_to_ordinal(address)
    if ordinal >= count:
        raise BackendUnavailableError(
            f"this task's GPU is CUDA device {ordinal} but only {count} are visible"
        )
    cupy.cuda.Device(ordinal).use()
    from spark_gpu_mf.backends import cupy_backend

    return cupy_backend


def _nvidia_device_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU, without importing CuPy or touching CUDA."""
    try:
        if os.listdir("/proc/driver/nvidia/gpus"):
            return True
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        result = subprocess.run(
            [smi, "-L"], check=False, capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0 and "GPU" in result.stdout


def local_gpu_possible() -> bool:
    """Whether a local-mode task could run on CuPy here (CuPy installed, an NVIDIA GPU
    visible), found without importing CuPy."""
    return importlib.util.find_spec("cupy") is not None and _nvidia_device_visible()


_warned_local = False


def warn_local_fallback() -> None:
    """Driver side, local mode, ``backend="auto"``: warn once if CuPy is installed but no NVIDIA
    GPU is visible, so the fit runs on NumPy (executors then fall back quietly).

    Without CuPy this is a CPU setup and nothing is said; CuPy is never imported here.
    """
    global _warned_local
    with _warn_lock:
        if _warned_local or importlib.util.find_spec("cupy") is None:
            return
        if _nvidia_device_visible():
            return
        _warned_local = True
    warnings.warn(
        "backend='auto' runs on NumPy (CPU): CuPy is installed but no NVIDIA GPU is visible",
        RuntimeWarning,
        stacklevel=4,
    )


def check_gpu_backend_available(spark) -> None:
    """Driver-side check for ``backend="cupy"``, before any Spark job; never imports CuPy.

    Local mode: CuPy must be installed and an NVIDIA GPU visible. Cluster: Spark's resource
    scheduling must give every executor and task a GPU.

    Raises
    ------
    BackendUnavailableError
        With what is missing and how to fix it.
    """
    from spark_gpu_mf import conf

    master = spark.conf.get("spark.master", "") or ""
    if master.startswith("local"):
        if importlib.util.find_spec("cupy") is None:
            raise BackendUnavailableError(
                "backend='cupy' needs CuPy: pip install 'spark-gpu-mf[gpu]' (CUDA 13 GPUs)"
            )
        if not _nvidia_device_visible():
            raise BackendUnavailableError(
                "backend='cupy' needs an NVIDIA GPU, but this machine shows none "
                "(no /proc/driver/nvidia/gpus, no working nvidia-smi); use backend='auto' or "
                "'numpy'"
            )
        return
    missing = [
        key.key for key in (conf.EXECUTOR_GPU_AMOUNT, conf.TASK_GPU_AMOUNT) if key.get(spark) <= 0
    ]
    if missing:
        raise BackendUnavailableError(
            f"backend='cupy' on {master or 'a cluster'} needs GPU scheduling, but "
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: "
            f"{_CONF_HINT}"
        )
