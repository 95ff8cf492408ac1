"""The CuPy backend on a real GPU (``-m gpu``), and backend selection everywhere.

The ``gpu``-marked tests run cupy_backend against numpy_backend and the estimator with
backend='cupy' against backend='numpy'; they skip with the reason when this machine has no usable
GPU (the project's own machines have none: tests/test_kernels_host.py runs the same kernels and
launch code on the CPU). The selection tests run everywhere, with or without CuPy.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

from spark_gpu_mf import backends
from spark_gpu_mf.backends import numpy_backend
from spark_gpu_mf.backends.numpy_backend import SolveConfig
from spark_gpu_mf.errors import BackendUnavailableError
from tests.conftest import gpu_problem

needs_gpu = pytest.mark.skipif(gpu_problem() is not None, reason=str(gpu_problem()))


@pytest.fixture
def fresh_warning_state(monkeypatch):
    monkeypatch.setattr(backends, "_warned_fallback", False)


def _block(rng, rank, n_rows=60, n_src=800):
    counts = np.concatenate([rng.integers(1, 120, n_rows - 2), [1, 3000]])
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    indices = rng.integers(0, n_src, indptr[-1]).astype(np.int32)
    ratings = rng.normal(3.0, 1.5, indptr[-1]).astype(np.float32)
    src = rng.normal(0.0, 0.4, (n_src, rank)).astype(np.float32)
    return indptr, indices, ratings, src


# --------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("rank", [7, 10, 50, 64, 100, 128, 200])
@pytest.mark.parametrize("implicit", [False, True])
def test_normal_equations_on_gpu(rank, implicit):
    from spark_gpu_mf.backends import cupy_backend

    rng = np.random.default_rng(rank)
    indptr, indices, ratings, src = _block(rng, rank)
    yty = numpy_backend.gram(src) if implicit else None
    args = {"reg_param": 0.1, "implicit": implicit, "alpha": 2.0, "yty": yty}
    A, b = cupy_backend.normal_equations(indptr, indices, ratings, src, **args)
    A_ref, b_ref = numpy_backend.normal_equations(indptr, indices, ratings, src, **args)
    peak = np.abs(A_ref).max(axis=(1, 2), keepdims=True)
    assert np.all(np.abs(A - A_ref) <= 1e-6 * peak)
    np.testing.assert_allclose(b, b_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("rank", [10, 64, 100])
@pytest.mark.parametrize("solver,precision", [("cholesky", "fp32"), ("cg", "fp32"), ("cg", "fp16")])
def test_update_block_on_gpu(rank, solver, precision):
    from spark_gpu_mf.backends import cupy_backend

    rng = np.random.default_rng(rank + 1)
    indptr, indices, ratings, src = _block(rng, rank)
    previous = rng.normal(0.0, 0.3, (len(indptr) - 1, rank)).astype(np.float32)
    config = SolveConfig(
        rank=rank, reg_param=0.1, solver=solver, precision=precision, cg_iterations=30
    )
    args = (indptr, indices, ratings, src, previous, config, None)
    x = cupy_backend.update_block(*args)
    reference = numpy_backend.update_block(*args)
    tolerance = {"cholesky": 1e-5, "fp32": 1e-4, "fp16": 5e-3}
    error = np.linalg.norm(x - reference, axis=1) / np.linalg.norm(reference, axis=1)
    assert x.dtype == np.float32
    assert error.max() < tolerance["cholesky" if solver == "cholesky" else precision]


@pytest.mark.gpu
@needs_gpu
def test_gram_solvers_and_top_k_on_gpu():
    from spark_gpu_mf.backends import cupy_backend

    rng = np.random.default_rng(3)
    y = rng.normal(size=(500, 32)).astype(np.float32)
    np.testing.assert_allclose(cupy_backend.gram(y), numpy_backend.gram(y), rtol=1e-10)
    A = np.einsum("nik,nil->nkl", *(2 * [rng.normal(size=(20, 100, 32))])) + 5 * np.eye(32)
    b = rng.normal(size=(20, 32))
    np.testing.assert_allclose(
        cupy_backend.solve_cholesky(A, b), numpy_backend.solve_cholesky(A, b), rtol=1e-5
    )
    x0 = np.zeros((20, 32), np.float32)
    for precision in ("fp32", "fp16"):
        np.testing.assert_allclose(
            cupy_backend.solve_cg(A, b, x0, iterations=64, precision=precision),
            numpy_backend.solve_cg(A, b, x0, iterations=64, precision=precision),
            rtol=5e-3, atol=1e-4,
        )  # fmt: skip
    queries = rng.integers(-2, 3, (50, 8)).astype(np.float32)
    candidates = rng.integers(-2, 3, (300, 8)).astype(np.float32)
    ids = rng.permutation(300).astype(np.int32)
    for got, want in zip(
        cupy_backend.top_k(queries, candidates, ids, 10),
        numpy_backend.top_k(queries, candidates, ids, 10),
    ):
        np.testing.assert_array_equal(got, want)


@pytest.mark.gpu
@needs_gpu
def test_select_backend_uses_the_gpu(fresh_warning_state):
    from spark_gpu_mf.backends import cupy_backend

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.select_backend("cupy") is cupy_backend
        assert backends.select_backend("auto", local_mode=True) is cupy_backend


@pytest.mark.gpu
@needs_gpu
def test_estimator_with_cupy_matches_numpy(spark):
    from spark_gpu_mf import ALS

    rng = np.random.default_rng(0)
    rows = [
        (int(u), int(i), float(rng.integers(1, 6)))
        for u in range(60)
        for i in rng.choice(40, 12, replace=False)
    ]
    df = spark.createDataFrame(rows, ["user", "item", "rating"])
    fits = {}
    for backend in ("numpy", "cupy"):
        als = ALS(rank=8, maxIter=5, seed=1, backend=backend, numUserBlocks=2, numItemBlocks=2)
        model = als.fit(df)
        fits[backend] = model.transform(df).orderBy("user", "item").toPandas()["prediction"]
    np.testing.assert_allclose(fits["cupy"], fits["numpy"], rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------- selection


def test_numpy_is_always_available():
    assert backends.select_backend("numpy") is numpy_backend


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        backends.select_backend("gpu")


@pytest.mark.skipif(gpu_problem() is None, reason="this machine has a usable GPU")
def test_auto_falls_back_to_numpy_with_one_warning_from_the_driver(monkeypatch):
    """Local mode with CuPy but no GPU: the driver warns once; executors fall back quietly."""
    monkeypatch.setattr(backends, "_warned_local", False)
    monkeypatch.setattr(backends, "_nvidia_device_visible", lambda: False)
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: object())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backends.warn_local_fallback()
        backends.warn_local_fallback()
        chosen = [backends.select_backend("auto", local_mode=local) for local in (None, True)]
    assert chosen == [numpy_backend, numpy_backend]
    assert len(caught) == 1  # one warning per driver, however many tasks
    assert issubclass(caught[0].category, RuntimeWarning)
    assert "backend='auto' runs on NumPy" in str(caught[0].message)


@pytest.mark.skipif(gpu_problem() is None, reason="this machine has a usable GPU")
def test_cupy_without_a_gpu_raises_a_clear_error():
    with pytest.raises(BackendUnavailableError, match="backend='cupy' cannot run: .*(CuPy|GPU)"):
        backends.select_backend("cupy")


def test_auto_without_fallback_raises(monkeypatch):
    monkeypatch.setattr(backends, "_task_gpu_address", lambda: None)
    with pytest.raises(BackendUnavailableError, match="given no GPU"):
        backends.select_backend("auto", local_mode=False, cpu_fallback=False)


def test_a_task_gpu_without_cuda_falls_back(monkeypatch, fresh_warning_state):
    monkeypatch.setattr(backends, "_task_gpu_address", lambda: "0")
    monkeypatch.setattr(backends, "_cupy_problem", lambda: "CuPy finds no usable CUDA device")
    with pytest.warns(RuntimeWarning, match="no usable CUDA device"):
        assert backends.select_backend("auto") is numpy_backend


@pytest.mark.parametrize(
    "address,visible,ordinal",
    [("3", "", 3), ("3", "1,3", 1), ("5", "5", 0), ("2", "7", 0), (" 1 ", None, 1)],
)
def test_gpu_address_to_ordinal(monkeypatch, address, visible, ordinal):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert backends.gpu_address_to_ordinal(address, visible) == ordinal


def test_gpu_address_not_visible_is_an_error():
    with pytest.raises(BackendUnavailableError, match="does not include it"):
        backends.gpu_address_to_ordinal("2", "0,1")


class _FakeConf:
    def __init__(self, values):
        self.values = values

    def get(self, key, default=None):
        return self.values.get(key, default)


class _FakeSpark:
    def __init__(self, **values):
        self.conf = _FakeConf({k.replace("_", "."): v for k, v in values.items()})


def test_driver_check_on_a_cluster_needs_gpu_scheduling():
    spark = _FakeSpark(spark_master="spark://host:7077")
    with pytest.raises(BackendUnavailableError, match="spark.executor.resource.gpu.amount and"):
        backends.check_gpu_backend_available(spark)
    spark.conf.values["spark.executor.resource.gpu.amount"] = "1"
    with pytest.raises(BackendUnavailableError, match="spark.task.resource.gpu.amount is not"):
        backends.check_gpu_backend_available(spark)
    spark.conf.values["spark.task.resource.gpu.amount"] = "0.25"
    backends.check_gpu_backend_available(spark)


def test_driver_check_in_local_mode_needs_cupy_and_a_device(monkeypatch):
    spark = _FakeSpark(spark_master="local[2]")
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BackendUnavailableError, match="needs CuPy"):
        backends.check_gpu_backend_available(spark)
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(backends, "_nvidia_device_visible", lambda: False)
    with pytest.raises(BackendUnavailableError, match="needs an NVIDIA GPU"):
        backends.check_gpu_backend_available(spark)
    monkeypatch.setattr(backends, "_nvidia_device_visible", lambda: True)
    backends.check_gpu_backend_available(spark)


def test_the_driver_never_imports_cupy():
    code = (
        "import sys, spark_gpu_mf, spark_gpu_mf.backends, spark_gpu_mf.backends.cupy_backend\n"
        "from spark_gpu_mf.backends import check_gpu_backend_available\n"
        "assert 'cupy' not in sys.modules, 'CuPy imported on the driver'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_cupy_backend_has_numpy_backends_functions_and_signatures():
    """Executors call either module the same way; CuPy is not needed to check that."""
    import inspect

    from spark_gpu_mf.backends import cupy_backend

    assert sorted(cupy_backend.__all__) == sorted(numpy_backend.__all__)
    assert cupy_backend.SolveConfig is numpy_backend.SolveConfig
    for name in numpy_backend.__all__:
        if name == "SolveConfig":
            continue
        ours = inspect.signature(getattr(cupy_backend, name)).parameters.values()
        theirs = inspect.signature(getattr(numpy_backend, name)).parameters.values()
        assert [(p.name, p.kind, p.default) for p in ours] == [
            (p.name, p.kind, p.default) for p in theirs
        ], name


def test_auto_on_a_cpu_cluster_is_numpy_without_a_warning(monkeypatch, fresh_warning_state):
    """A cluster that schedules no GPUs is a CPU cluster: 'auto' is NumPy, silently."""
    monkeypatch.setattr(backends, "_task_gpu_address", lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.select_backend("auto", local_mode=False) is numpy_backend


def test_auto_in_local_mode_without_cupy_is_numpy_without_a_warning(
    monkeypatch, fresh_warning_state
):
    monkeypatch.setattr(backends, "_task_gpu_address", lambda: None)
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.select_backend("auto", local_mode=True) is numpy_backend


def test_local_auto_is_settled_on_the_driver_so_workers_need_not_import_cupy(spark, monkeypatch):
    from spark_gpu_mf.executor.runtime import BackendChoice

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monkeypatch.setattr(backends, "_nvidia_device_visible", lambda: False)
        assert BackendChoice.for_session(spark, "auto").requested == "numpy"
        assert BackendChoice.for_session(spark, "cupy").requested == "cupy"  # fails loudly later
        monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: object())
        monkeypatch.setattr(backends, "_nvidia_device_visible", lambda: True)
        assert BackendChoice.for_session(spark, "auto").requested == "auto"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("implicit", [False, True])
def test_fold_in_on_gpu_equals_a_float64_numpy_solve(implicit):
    import pyarrow as pa

    from spark_gpu_mf.executor.als_tasks import TaskSettings
    from spark_gpu_mf.executor.fold_in import exact, fold_in_part
    from spark_gpu_mf.executor.runtime import BackendChoice
    from tests.test_fold_in import _problem, reference_fold_in

    keys, others, ratings, fixed_ids, fixed = _problem(6, rank=64, n_keys=80, n_ratings=3000)
    config = exact(SolveConfig(rank=64, reg_param=0.1, implicit=implicit, alpha=2.0))
    yty = numpy_backend.gram(fixed) if implicit else None
    table = pa.table({"key": keys, "other": others, "rating": ratings})
    factor_rows = pa.table(
        {"id": fixed_ids, "features": pa.array(list(fixed), pa.list_(pa.float32()))}
    )
    settings = TaskSettings(config=config, backend=BackendChoice("cupy"), blas_threads=0)
    out = fold_in_part(table, factor_rows, settings, yty)
    systems = reference_fold_in(
        keys, others, ratings, fixed_ids, fixed, reg=0.1, implicit=implicit, alpha=2.0
    )
    x = np.asarray(out.column("features").to_pylist(), np.float64)
    for row, key in enumerate(out.column("id").to_numpy()):
        np.testing.assert_allclose(
            x[row], np.linalg.solve(*systems[int(key)]), rtol=1e-4, atol=1e-5
        )
