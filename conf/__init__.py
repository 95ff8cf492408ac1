"""Spark configuration files of spark_gpu_mf, shipped in the wheel as ``spark_gpu_mf.spark_conf``.

The ``spark-gpu-mf`` command finds them there (``importlib.resources``), so that a pip install
needs no source tree.
"""
