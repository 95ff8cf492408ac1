"""spark_gpu_mf: a drop-in, faster ALS for Apache Spark ML, with NumPy and CUDA executors.

``from spark_gpu_mf import ALS`` replaces ``from pyspark.ml.recommendation import ALS``.
Importing this package never imports CuPy; GPU code loads on executors only. The estimators are
imported on first use: executors import only ``spark_gpu_mf.executor`` and the backends, and a
fresh Python worker that also imported the driver code (``pyspark.ml`` and its dependencies)
started its first task about 0.3 s later.
"""

import importlib

__all__ = ["ALS", "ALSModel", "MascotMF", "PrunedMF"]
__version__ = "0.1.0"

_HOMES = {
    "ALS": "spark_gpu_mf.als",
    "ALSModel": "spark_gpu_mf.model",
    "MascotMF": "spark_gpu_mf.mascot",
    "PrunedMF": "spark_gpu_mf.pruned",
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'spark_gpu_mf' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_HOMES))
