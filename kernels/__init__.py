"""CUDA C sources of spark_gpu_mf, shipped as package data."""
