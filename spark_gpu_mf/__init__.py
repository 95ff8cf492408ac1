"""spark_gpu_mf: a drop-in, faster ALS for Apache Spark ML, with NumPy and CUDA executors.

``from spark_gpu_mf import ALS`` replaces ``from pyspark.ml.recommendation import ALS``.
Importing this package never imports CuPy; GPU code loads on executors only.
"""

from spark_gpu_mf.als import ALS
from spark_gpu_mf.mascot import MascotMF
from spark_gpu_mf.model import ALSModel
from spark_gpu_mf.pruned import PrunedMF

__all__ = ["ALS", "ALSModel", "MascotMF", "PrunedMF"]
__version__ = "0.1.0"
