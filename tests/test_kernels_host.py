"""The unchanged kernels/*.cu, run on the CPU through the host shim, against numpy_backend.

The shim (tests/cuda_shim) compiles the CUDA sources with g++ and runs each CUDA thread as a
fiber; the CuPy backend's own launch code drives it through a ``cupy_backend.Device`` whose array
module is NumPy. So these tests check the kernels' arithmetic and indexing *and* the Python side's
launch shapes, argument order and dtypes. They cannot check timing, the GPU memory model or
blocks running concurrently (see docs/performance.md).

Tolerances: the kernels accumulate A and b in compensated float32 (NumPy: float64), so A agrees
to ~1e-7 of its largest entry; float16 storage adds 2^-11 relative per entry. The CG kernel keeps
the vector of A p in float32 where numpy_backend rounds it to float16, so in fp16 the two agree to
~1e-3 and the kernel is compared tightly with a NumPy model of its own arithmetic instead.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from spark_gpu_mf.backends import cuda_kernels, cupy_backend, numpy_backend
from spark_gpu_mf.backends.numpy_backend import SolveConfig

_SHIM_DIR = Path(__file__).resolve().parent / "cuda_shim"
_spec = importlib.util.spec_from_file_location("gpumf_cuda_shim", _SHIM_DIR / "shim.py")
shim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shim)

pytestmark = pytest.mark.skipif(shim.compiler() is None, reason="needs g++ for the CUDA host shim")

RANKS = (7, 13, 50, 64, 100)


def als_sources(kernel_dir: Path = shim.KERNEL_DIR) -> list[Path]:
    """The ALS kernels (cuda_kernels.KERNEL_FILES); other kernels/*.cu have their own tests."""
    return [kernel_dir / name for name in cuda_kernels.KERNEL_FILES]


@pytest.fixture(scope="module")
def module():
    return shim.ShimModule(shim.build_library(als_sources(), mode="fibers"))


@pytest.fixture(scope="module")
def device(module):
    return cupy_backend.Device(module)


def make_block(rng, counts, n_src, rank, *, negative_share=0.2):
    """CSR block with the given ratings per row; some ratings negative or zero (implicit)."""
    counts = np.asarray(counts)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    indices = rng.integers(0, n_src, indptr[-1]).astype(np.int32)
    ratings = rng.normal(3.0, 1.5, indptr[-1]).astype(np.float32)
    flip = rng.random(indptr[-1]) < negative_share
    ratings[flip] = -np.abs(ratings[flip])
    ratings[rng.random(indptr[-1]) < 0.05] = 0.0
    src = rng.normal(0.0, 0.4, (n_src, rank)).astype(np.float32)
    return indptr, indices, ratings, src


def row_peak(A):
    return np.abs(A).reshape(len(A), -1).max(axis=1)[:, None, None]


def rel_norm(x, ref, reduce=np.max):
    scale = np.maximum(np.linalg.norm(ref, axis=1), 1e-6)  # rows whose solution is 0
    return float(reduce(np.linalg.norm(x - ref, axis=1) / scale))


def assert_cg_close(x, reference, exact, *, typical, slack):
    """A few CG steps in float32 are chaotic on some systems (a row with one rating is rank one
    plus lambda * I): rounding-level differences grow 100x per step there. So: the typical row
    agrees with ``reference``, and no row is further from the exact solution than the
    reference's row (plus ``slack``)."""
    assert rel_norm(x, reference, reduce=np.median) < typical
    ours = np.linalg.norm(x - exact, axis=1)
    theirs = np.linalg.norm(reference - exact, axis=1)
    scale = np.maximum(np.linalg.norm(exact, axis=1), 1e-6)
    assert np.all(ours <= 1.25 * theirs + slack * scale)


def cg_model(A, b, x0, iterations, precision, tolerance=1e-6):
    """numpy_backend.solve_cg with the kernel's one difference: the vector of A p stays float32."""
    if precision == "fp16":
        stored, scale = numpy_backend._fp16_scaled(A)
    else:
        stored, scale = A.astype(np.float32), np.ones(len(A), np.float32)
    matrix = stored.astype(np.float32)
    inv_diag = np.float32(1.0) / np.einsum("bii->bi", A).astype(np.float32)

    def matvec(v):
        return np.matmul(matrix, v[:, :, None])[:, :, 0] * scale[:, None]

    b32 = b.astype(np.float32)
    x = x0.astype(np.float32).copy()
    r = b32 - matvec(x)
    z = inv_diag * r
    p = z.copy()
    rz = np.einsum("bi,bi->b", r, z)
    limit = (np.float32(tolerance) ** 2) * np.einsum("bi,bi->b", b32, b32)
    for _ in range(iterations):
        active = np.einsum("bi,bi->b", r, r) > limit
        if not active.any():
            break
        ap = matvec(p)
        pap = np.einsum("bi,bi->b", p, ap)
        step = np.where(active & (pap > 0), rz / np.where(pap > 0, pap, 1), 0).astype(np.float32)
        x += step[:, None] * p
        r -= step[:, None] * ap
        z = inv_diag * r
        rz_new = np.einsum("bi,bi->b", r, z)
        beta = np.where(rz > 0, rz_new / np.where(rz > 0, rz, 1), 0).astype(np.float32)
        p = z + beta[:, None] * p
        rz = rz_new
    return x


def spd_systems(rng, n, rank, ratings_per_row=300, reg=0.1):
    Y = rng.normal(0.0, 0.3, (n, ratings_per_row, rank))
    A = np.einsum("nik,nil->nkl", Y, Y) + reg * ratings_per_row * np.eye(rank)
    b = rng.normal(0.0, 5.0, (n, rank))
    x0 = rng.normal(0.0, 0.3, (n, rank)).astype(np.float32)
    return A, b, x0


# --------------------------------------------------------------------------- hermitian


@pytest.mark.parametrize("rank", (*RANKS, 200))  # 200: more tiles than threads, two tile passes
@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
@pytest.mark.parametrize("storage", [np.float32, np.float64, np.float16], ids=lambda t: t.__name__)
def test_hermitian_matches_numpy(device, rank, implicit, storage):
    rng = np.random.default_rng(rank * 10 + implicit)
    counts = [0, 1, 3, 37, 2100, 64]  # empty, single, several windows, thousands
    indptr, indices, ratings, src = make_block(rng, counts, 3000, rank)
    yty = numpy_backend.gram(src)
    args = {"reg_param": 0.07, "implicit": implicit, "alpha": 2.5, "yty": yty if implicit else None}
    A_ref, b_ref = numpy_backend.normal_equations(indptr, indices, ratings, src, **args)
    block = cupy_backend._upload(device, indptr, indices, ratings, src, args["yty"])
    rows = np.arange(len(counts), dtype=np.int64)[::-1].copy()  # any order of rows
    A, scale, diag, b = cupy_backend._build(
        device, block, rows, storage, reg_param=0.07, implicit=implicit, alpha=2.5
    )
    A_ref, b_ref = A_ref[rows], b_ref[rows]

    assert A.dtype == storage and np.array_equal(A, A.transpose(0, 2, 1))  # mirrored exactly
    peak = row_peak(A_ref) + 1e-30
    if storage == np.float16:
        assert np.all(np.isfinite(A))
        assert np.all(np.log2(scale) == np.round(np.log2(scale)))  # powers of two
        top = np.abs(A.astype(np.float32)).reshape(len(A), -1).max(axis=1)
        assert np.all((top >= 2.0**13) | (row_peak(A_ref)[:, 0, 0] == 0)) and np.all(top <= 2.0**14)
        dequantized = A.astype(np.float64) * scale[:, None, None]
        bound = 2.0**-11 * np.abs(A_ref) + 1e-6 * peak
        assert np.all(np.abs(dequantized - A_ref) <= bound)
    else:
        assert np.all(scale == 1.0)
        assert np.all(np.abs(A - A_ref) <= 1e-6 * peak)
    np.testing.assert_allclose(diag, np.einsum("bii->bi", A_ref), rtol=1e-6, atol=1e-30)
    b_peak = np.abs(b_ref).max(axis=1, keepdims=True) + 1e-30
    assert np.all(np.abs(b - b_ref) <= 1e-6 * b_peak)


def test_hermitian_accumulation_is_compensated(device):
    """30 000 ratings of one row: plain float32 sums drift by ~1e-4; the kernel stays at ~1e-7."""
    rng = np.random.default_rng(5)
    rank, n = 16, 30_000
    indptr = np.array([0, n], np.int64)
    indices = np.arange(n, dtype=np.int32)
    ratings = rng.uniform(1.0, 5.0, n).astype(np.float32)
    src = rng.uniform(0.5, 1.5, (n, rank)).astype(np.float32)
    A_ref, b_ref = numpy_backend.normal_equations(indptr, indices, ratings, src, reg_param=0.0)
    A, b = cupy_backend._normal_equations(device, indptr, indices, ratings, src, reg_param=0.0)
    kernel_error = np.abs(A - A_ref).max() / np.abs(A_ref).max()
    naive = np.cumsum(src[:, :, None] * src[:, None, :], axis=0, dtype=np.float32)[-1]
    naive_error = np.abs(naive - A_ref[0]).max() / np.abs(A_ref).max()
    assert kernel_error < 2e-7
    assert naive_error > 20 * kernel_error
    assert np.abs(b - b_ref).max() / np.abs(b_ref).max() < 2e-7


def test_normal_equations_api_with_row_subset_and_budget(device):
    rng = np.random.default_rng(11)
    indptr, indices, ratings, src = make_block(rng, rng.integers(0, 50, 40), 500, 10)
    rows = np.array([5, 0, 39, 17, 5])
    kwargs = {"reg_param": 0.3, "rows": rows, "memory_budget_bytes": 2000}  # several batches
    A, b = cupy_backend._normal_equations(device, indptr, indices, ratings, src, **kwargs)
    A_ref, b_ref = numpy_backend.normal_equations(indptr, indices, ratings, src, **kwargs)
    assert A.dtype == np.float64 and A.shape == A_ref.shape
    np.testing.assert_allclose(A, A_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(b, b_ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="yty"):
        cupy_backend._normal_equations(
            device, indptr, indices, ratings, src, reg_param=0.1, implicit=True
        )


# --------------------------------------------------------------------------- CG


@pytest.mark.parametrize("rank", (*RANKS, 300))  # 300: two components per thread, A in global
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("iterations", [3, 40])
def test_cg_matches_model_numpy_and_exact(device, rank, precision, iterations):
    rng = np.random.default_rng(rank + iterations)
    A, b, x0 = spd_systems(rng, 6, rank)
    x = cupy_backend._solve_cg(device, A, b, x0, iterations=iterations, precision=precision)
    assert x.dtype == np.float32 and x.shape == b.shape
    assert rel_norm(x, cg_model(A, b, x0, iterations, precision)) < 1e-5
    reference = numpy_backend.solve_cg(A, b, x0, iterations=iterations, precision=precision)
    assert rel_norm(x, reference) < (1e-5 if precision == "fp32" else 5e-3)
    if iterations >= 40:  # converged: only the storage precision is left
        exact = np.linalg.solve(A, b[:, :, None])[:, :, 0]
        assert rel_norm(x, exact) < (1e-5 if precision == "fp32" else 1e-3)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cg_streams_a_from_global_memory_when_it_does_not_fit(module, precision):
    rng = np.random.default_rng(3)
    A, b, x0 = spd_systems(rng, 4, 50)
    small = cupy_backend.Device(module, smem_limit=2048)
    assert not cuda_kernels.cg_plan(50, precision, 2048).a_in_smem
    assert cuda_kernels.cg_plan(50, precision).a_in_smem
    x_global = cupy_backend._solve_cg(small, A, b, x0, iterations=5, precision=precision)
    x_smem = cupy_backend._solve_cg(
        cupy_backend.Device(module), A, b, x0, iterations=5, precision=precision
    )
    np.testing.assert_array_equal(x_global, x_smem)


def test_cg_stops_at_the_tolerance_and_leaves_empty_rows_alone(device):
    rng = np.random.default_rng(4)
    A, b, _ = spd_systems(rng, 3, 20)
    exact = np.linalg.solve(A, b[:, :, None])[:, :, 0].astype(np.float32)
    x = cupy_backend._solve_cg(device, A, b, exact, iterations=10, tolerance=1e-2)
    np.testing.assert_array_equal(x, exact)  # already within tolerance: no step taken
    # An explicit row without ratings: A = 0, b = 0 -> no step, x stays x0 (NumPy: NaN).
    zero_A, zero_b = np.zeros((1, 20, 20)), np.zeros((1, 20))
    x0 = rng.normal(size=(1, 20)).astype(np.float32)
    x = cupy_backend._solve_cg(device, zero_A, zero_b, x0, iterations=3)
    np.testing.assert_array_equal(x, x0)


# --------------------------------------------------------------------------- update_block


SOLVERS = [("cholesky", "fp32"), ("cg", "fp32"), ("cg", "fp16")]


@pytest.mark.parametrize("rank", [13, 64, 100])
@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
@pytest.mark.parametrize("solver,precision", SOLVERS)
def test_update_block_matches_numpy(device, rank, implicit, solver, precision):
    rng = np.random.default_rng(rank + 7 * implicit)
    counts = np.concatenate([rng.integers(1, 200, 30), [1, 1500]])
    if implicit:
        counts[3] = 0  # implicit rows without ratings still have A = YtY
    indptr, indices, ratings, src = make_block(rng, counts, 2000, rank)
    yty = numpy_backend.gram(src) if implicit else None
    previous = rng.normal(0.0, 0.3, (len(counts), rank)).astype(np.float32)
    config = SolveConfig(
        rank=rank, reg_param=0.1, implicit=implicit, alpha=3.0, solver=solver,
        precision=precision, cg_iterations=4, memory_budget_bytes=400_000,  # several batches
    )  # fmt: skip
    args = (indptr, indices, ratings, src, previous, config, yty)
    x = cupy_backend._update_block(device, *args)
    reference = numpy_backend.update_block(*args)
    assert x.dtype == np.float32 and x.shape == reference.shape
    if solver == "cholesky":
        assert rel_norm(x, reference) < 2e-5
        return
    A, b = numpy_backend.normal_equations(
        indptr, indices, ratings, src, reg_param=0.1, implicit=implicit, alpha=3.0, yty=yty
    )
    exact = np.linalg.solve(A, b[:, :, None])[:, :, 0]
    if precision == "fp32":
        assert_cg_close(x, reference, exact, typical=1e-4, slack=1e-3)
    else:
        # The reference rounds the CG vector to float16; the kernel's own model does not.
        assert_cg_close(x, cg_model(A, b, previous, 4, "fp16"), exact, typical=3e-3, slack=1e-2)
        assert_cg_close(x, reference, exact, typical=3e-2, slack=1e-2)


def test_update_block_without_previous_and_nonnegative(device):
    rng = np.random.default_rng(8)
    indptr, indices, ratings, src = make_block(rng, rng.integers(1, 80, 25), 400, 12)
    for config in (
        SolveConfig(rank=12, reg_param=0.1, solver="cg", cg_iterations=30),
        SolveConfig(rank=12, reg_param=0.1, nonnegative=True),
    ):
        args = (indptr, indices, ratings, src, None, config, None)
        x = cupy_backend._update_block(device, *args)
        reference = numpy_backend.update_block(*args)
        np.testing.assert_allclose(x, reference, rtol=1e-3, atol=1e-4)
        if config.nonnegative:
            assert np.all(x >= 0)


@pytest.mark.parametrize("implicit", [False, True])
def test_fold_in_on_the_cupy_backend_equals_a_float64_numpy_solve(device, implicit):
    """Fold-in's GPU road: the rows laid out by ``fold_in_inputs`` (unknown others left out)
    and solved by the CuPy backend's exact solver, through the host shim."""
    from functools import partial

    import pyarrow as pa

    from spark_gpu_mf.executor.als_tasks import TaskSettings
    from spark_gpu_mf.executor.fold_in import exact, fold_in_part
    from tests.test_fold_in import _problem, reference_fold_in

    keys, others, ratings, fixed_ids, fixed = _problem(5, rank=13)
    config = exact(SolveConfig(rank=13, reg_param=0.2, implicit=implicit, alpha=1.5))
    yty = numpy_backend.gram(fixed) if implicit else None
    table = pa.table({"key": keys, "other": others, "rating": ratings})
    factor_rows = pa.table(
        {"id": fixed_ids, "features": pa.array(list(fixed), pa.list_(pa.float32()))}
    )
    settings = TaskSettings(config=config, backend=None, blas_threads=0)
    out = fold_in_part(
        table, factor_rows, settings, yty, update=partial(cupy_backend._update_block, device)
    )
    systems = reference_fold_in(
        keys, others, ratings, fixed_ids, fixed, reg=0.2, implicit=implicit, alpha=1.5
    )
    ids = out.column("id").to_numpy()
    x = np.asarray(out.column("features").to_pylist(), np.float64)
    assert sorted(systems) == ids.tolist()
    for row, key in enumerate(ids):
        expected = np.linalg.solve(*systems[int(key)])
        np.testing.assert_allclose(x[row], expected, rtol=1e-4, atol=1e-5)


class _FailingModule:
    """Raises MemoryError (the host Device's out-of-memory) for launches of more than ``limit``
    blocks, like a GPU that cannot hold large batches."""

    def __init__(self, module, limit):
        self.module, self.limit, self.calls = module, limit, 0

    def get_function(self, name):
        kernel = self.module.get_function(name)

        def launch(grid, block, args, shared_mem=0):
            self.calls += 1
            if grid[0] > self.limit:
                raise MemoryError("out of memory (test)")
            kernel(grid, block, args, shared_mem=shared_mem)

        return launch


def test_out_of_memory_halves_the_batch_then_falls_back_to_numpy(module, monkeypatch):
    monkeypatch.setattr(cupy_backend, "_MIN_BUDGET", 1 << 16)
    rng = np.random.default_rng(9)
    indptr, indices, ratings, src = make_block(rng, rng.integers(1, 30, 120), 300, 32)
    # A batch row of rank 32 takes 4752 bytes: 600 kB holds 126 rows, 150 kB holds 31; the
    # failing module accepts CG launches of at most 40 rows (one block per row).
    config = SolveConfig(rank=32, reg_param=0.1, solver="cg", memory_budget_bytes=600_000)
    args = (indptr, indices, ratings, src, None, config, None)
    reference = numpy_backend.update_block(*args)
    unlimited = cupy_backend._update_block(cupy_backend.Device(module), *args)

    shrinking_module = _FailingModule(module, limit=40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shrinking alone must not warn
        x = cupy_backend._update_block(cupy_backend.Device(shrinking_module), *args)
    np.testing.assert_array_equal(x, unlimited)  # rows are independent of the batching
    assert shrinking_module.calls > 4  # failed launches, then batches of two kernels each

    hopeless = cupy_backend.Device(_FailingModule(module, limit=0))
    with pytest.warns(RuntimeWarning, match="NumPy backend"):
        x = cupy_backend._update_block(hopeless, *args)
    np.testing.assert_array_equal(x, reference)


# --------------------------------------------------------------------------- gram, top_k


def test_gram_and_solve_cholesky_on_the_host_device(device):
    rng = np.random.default_rng(10)
    y = rng.normal(size=(50, 9)).astype(np.float32)
    np.testing.assert_allclose(cupy_backend._gram(device, y), numpy_backend.gram(y), rtol=1e-12)
    A, b, _ = spd_systems(rng, 3, 9)
    np.testing.assert_array_equal(
        cupy_backend._solve_cholesky(device, A, b), numpy_backend.solve_cholesky(A, b)
    )


@pytest.mark.parametrize("k", [1, 5, 40, 100])
def test_top_k_matches_numpy_with_ties_and_negative_ids(device, k):
    rng = np.random.default_rng(k)
    queries = rng.integers(-2, 3, (30, 4)).astype(np.float32)  # small integers: many ties
    candidates = rng.integers(-2, 3, (60, 4)).astype(np.float32)
    ids = rng.permutation(np.arange(-30, 30)).astype(np.int32)
    got_ids, got_scores = cupy_backend._top_k(device, queries, candidates, ids, k, budget=4096)
    ref_ids, ref_scores = numpy_backend.top_k(queries, candidates, ids, k)
    np.testing.assert_array_equal(got_ids, ref_ids)
    np.testing.assert_array_equal(got_scores, ref_scores)


# --------------------------------------------------------------------------- ThreadSanitizer


def _run_under_tsan(library: Path) -> subprocess.CompletedProcess:
    env = shim.tsan_environment()
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, str(_SHIM_DIR / "tsan_run.py"), str(library)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip


def _tsan_works() -> bool:
    probe = subprocess.run(
        [shim.compiler(), "-print-file-name=libtsan.so"], capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    return os.path.isabs(probe.stdout.strip())


needs_tsan = pytest.mark.skipif(not _tsan_works(), reason="g++ has no ThreadSanitizer runtime")


@needs_tsan
def test_threadsanitizer_finds_no_race():
    result = _run_under_tsan(shim.build_library(als_sources(), mode="tsan"))
    assert "ThreadSanitizer" not in result.stderr, result.stderr[-4000:]
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]


@needs_tsan
@pytest.mark.parametrize(
    "source,barrier",
    [
        ("hermitian.cu", "__syncthreads();  // the window is staged"),
        ("cg_solver.cu", "__syncthreads();  // p staged"),
    ],
)
def test_a_deleted_barrier_is_caught(tmp_path, source, barrier):
    """The checks have teeth: without one __syncthreads, TSan reports a race."""
    for path in shim.KERNEL_DIR.iterdir():
        if path.suffix in (".cu", ".cuh"):
            text = path.read_text()
            if path.name == source:
                assert text.count(barrier) == 1
                text = text.replace(barrier, "/* barrier deleted by the test */")
            (tmp_path / path.name).write_text(text)
    library = shim.build_library(als_sources(tmp_path), mode="tsan", kernel_dir=tmp_path)
    result = _run_under_tsan(library)
    assert "WARNING: ThreadSanitizer: data race" in result.stderr
    assert result.returncode != 0


def test_fp16_keeps_ill_conditioned_rows_in_fp32_like_numpy(device, monkeypatch):
    """Ratings on a 1..10,000 scale: both backends store the rows FP16 would break in FP32."""
    from spark_gpu_mf.backends import precision

    monkeypatch.setattr(precision, "_warned", False)
    rng = np.random.default_rng(31)
    indptr, indices, ratings, src = make_block(rng, rng.integers(1, 60, 40), 300, 16)
    ratings = rng.uniform(1, 10_000, len(ratings)).astype(np.float32)
    src = src * 30
    config = SolveConfig(rank=16, reg_param=0.1, solver="cg", precision="fp16",
                         cg_iterations=40, cg_tolerance=0.0)
    args = (indptr, indices, ratings, src, None, config, None)
    with pytest.warns(RuntimeWarning, match="stored in fp32 instead"):
        x = cupy_backend._update_block(device, *args)
    reference = numpy_backend.update_block(*args)
    assert np.isfinite(x).all()
    assert precision.fp16_unsafe_rows(indptr, indices, ratings, src, reg_param=0.1,
                                      implicit=False, alpha=1.0).all()
    fp32 = replace(config, precision="fp32")
    assert_cg_close(x, cupy_backend._update_block(device, *args[:5], fp32, None), reference,
                    typical=1e-6, slack=1e-6)  # exactly the FP32 path
    A, b = numpy_backend.normal_equations(indptr, indices, ratings, src, reg_param=0.1)
    exact = np.linalg.solve(A, b[:, :, None])[:, :, 0]
    assert_cg_close(x, reference, exact, typical=1e-4, slack=1e-3)
