"""kernels/sgd_pruned.cu: compiled for sm_80/sm_90 without spills, and run on the CPU through the
host shim with the launch code of spark_gpu_mf.sgd.pruned_cuda, against the Numba kernel.

How the comparison can be exact enough: with one warp (grid 1, block 32) the kernel runs the
cell's ratings in the given order, like ``pruned_numba.sgd_cell``. The two then differ only in
arithmetic (float32 with butterfly sums on the GPU, float64 accumulators in Numba), so factors
agree to ~1e-6 and the multiply-add counts, which depend on every threshold comparison, agree
exactly. With several warps each warp runs a contiguous slice in order: when the slices touch
disjoint rows the result is again the in-order result (checked exactly); when they share rows the
warps are Hogwild, as cuMF_SGD and MASCOT are, and the fit is compared statistically (training
RMSE after a few epochs within 3% of the in-order run, executed multiply-adds within 10%).

Not checked here (see reference/gpu-verification.md): the GPU memory model, warps running truly
at once (fibers switch only at shuffles), timing.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from spark_gpu_mf.sgd import pruned_cuda
from spark_gpu_mf.sgd.pruned_numba import ADAGRAD, SGD, sgd_cell
from tests.conftest import gpu_problem

_TESTS = Path(__file__).resolve().parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


shim = _load("gpumf_cuda_shim", _TESTS / "cuda_shim" / "shim.py")
compile_checks = _load("gpumf_kernels_compile", _TESTS / "test_kernels_compile.py")

SOURCE = pruned_cuda.KERNEL_FILE
ENTRY_POINTS = {f"sgd_pruned_d{d}" for d in pruned_cuda.DIMS_PER_LANE}
needs_gxx = pytest.mark.skipif(shim.compiler() is None, reason="needs g++ for the host shim")


# --------------------------------------------------------------------------- compiles


# Compilation for sm_80/sm_90 without spills: tests/test_kernels_compile.py.


def test_launcher_picks_the_smallest_entry_point():
    assert [pruned_cuda.kernel_name(r) for r in (1, 32, 33, 64, 65, 128, 129, 256)] == [
        "sgd_pruned_d1",
        "sgd_pruned_d1",
        "sgd_pruned_d2",
        "sgd_pruned_d2",
        "sgd_pruned_d4",
        "sgd_pruned_d4",
        "sgd_pruned_d8",
        "sgd_pruned_d8",
    ]
    with pytest.raises(ValueError, match="rank <= 256"):
        pruned_cuda.kernel_name(257)
    assert pruned_cuda.production_warps(1) == 1 and pruned_cuda.production_warps(129) == 2


# --------------------------------------------------------------------------- runs on the shim


@pytest.fixture(scope="module")
def module():
    if shim.compiler() is None:
        pytest.skip("needs g++ for the host shim")
    return shim.ShimModule(shim.build_library([shim.KERNEL_DIR / SOURCE], mode="fibers"))


def make_cell(rng, rank, n, n_users=20, n_items=15, std=0.3):
    users = rng.integers(0, n_users, n).astype(np.int32)
    items = rng.integers(0, n_items, n).astype(np.int32)
    ratings = rng.normal(0.0, 1.0, n).astype(np.float32)
    P = rng.normal(0.0, std, (n_users, rank)).astype(np.float32)
    Q = rng.normal(0.0, std, (n_items, rank)).astype(np.float32)
    return users, items, ratings, P, Q, np.ones(n_users, np.float32), np.ones(n_items, np.float32)


def run_both(module, cell, *, step, reg, t_p, t_q, optimizer, warps, epochs=1, regrowth=False):
    """The same epochs through Numba (in order) and the shim; returns both final states."""
    users, items, ratings, *state = cell
    cpu = [a.copy() for a in state]
    gpu = [a.copy() for a in state]
    cpu_results, gpu_results = [], []
    for _ in range(epochs):
        cpu_results.append(
            sgd_cell(users, items, ratings, *cpu, step, reg, t_p, t_q, optimizer, regrowth)
        )
        gpu_results.append(
            pruned_cuda.launch_cell(
                module,
                np,
                users,
                items,
                ratings,
                *gpu,
                step=step,
                reg=reg,
                threshold_p=t_p,
                threshold_q=t_q,
                optimizer=optimizer,
                warps=warps,
                regrowth=regrowth,
            )
        )
    return cpu, gpu, cpu_results, gpu_results


@pytest.mark.parametrize("rank", [5, 32, 50, 100, 200])  # all four entry points, ragged chunks
@pytest.mark.parametrize("optimizer", [ADAGRAD, SGD], ids=["adagrad", "sgd"])
@pytest.mark.parametrize("regrowth", [False, True], ids=["dpmf", "regrowth"])
def test_one_warp_matches_numba_rating_by_rating(module, rank, optimizer, regrowth):
    rng = np.random.default_rng(rank)
    cell = make_cell(rng, rank, n=120)
    # The thresholds make d* spread over all chunks: P(keep a dimension) ~ 0.98^2 at 0.3 std.
    cpu, gpu, cpu_results, gpu_results = run_both(
        module,
        cell,
        step=0.05,
        reg=0.05,
        t_p=0.008,
        t_q=0.006,
        optimizer=optimizer,
        warps=1,
        epochs=2,
        regrowth=regrowth,
    )
    for (sse_c, macs_c), (sse_g, macs_g) in zip(cpu_results, gpu_results):
        assert macs_g == macs_c
        assert sse_g == pytest.approx(sse_c, rel=1e-5)
    assert 0 < cpu_results[-1][1] < len(cell[2]) * rank
    for c, g in zip(cpu, gpu):
        np.testing.assert_allclose(g, c, atol=2e-6, rtol=1e-5)


def test_thresholds_zero_run_every_dimension(module):
    rng = np.random.default_rng(7)
    cell = make_cell(rng, 40, n=60)
    cpu, gpu, cpu_results, gpu_results = run_both(
        module, cell, step=0.05, reg=0.05, t_p=0.0, t_q=0.0, optimizer=ADAGRAD, warps=1
    )
    assert gpu_results[0][1] == cpu_results[0][1] == 60 * 40
    for c, g in zip(cpu, gpu):
        np.testing.assert_allclose(g, c, atol=2e-6, rtol=1e-5)


def test_warps_on_disjoint_rows_equal_the_in_order_run(module):
    """8 warps x 24 ratings, warp w touching only users/items of its own range: no Hogwild
    conflicts, so the slicing and indexing must reproduce the in-order run."""
    rng = np.random.default_rng(8)
    warps, per_warp, rank = 8, 24, 48
    users = np.concatenate([rng.integers(3 * w, 3 * w + 3, per_warp) for w in range(warps)])
    items = np.concatenate([rng.integers(2 * w, 2 * w + 2, per_warp) for w in range(warps)])
    ratings = rng.normal(0.0, 1.0, warps * per_warp).astype(np.float32)
    P = rng.normal(0.0, 0.3, (3 * warps, rank)).astype(np.float32)
    Q = rng.normal(0.0, 0.3, (2 * warps, rank)).astype(np.float32)
    cell = (
        users.astype(np.int32),
        items.astype(np.int32),
        ratings,
        P,
        Q,
        np.ones(3 * warps, np.float32),
        np.ones(2 * warps, np.float32),
    )
    cpu, gpu, cpu_results, gpu_results = run_both(
        module, cell, step=0.05, reg=0.05, t_p=0.01, t_q=0.01, optimizer=ADAGRAD, warps=warps
    )
    assert gpu_results[0][1] == cpu_results[0][1]
    assert gpu_results[0][0] == pytest.approx(cpu_results[0][0], rel=1e-5)
    for c, g in zip(cpu, gpu):
        np.testing.assert_allclose(g, c, atol=2e-6, rtol=1e-5)


def test_hogwild_warps_fit_as_well_as_the_in_order_run(module):
    """16 warps over shared rows interleave differently from the in-order run, so compare the
    fit, not the factors. Rows are plentiful (200 users, 150 items), as in real cells, so that
    concurrent warps rarely collide; on a few dozen rows lost updates cost ~15% RMSE here."""
    rng = np.random.default_rng(9)
    rank, n_users, n_items, n = 16, 200, 150, 1200
    truth_p = rng.normal(0.0, 0.6, (n_users, 3))
    truth_q = rng.normal(0.0, 0.6, (n_items, 3))
    users = rng.integers(0, n_users, n).astype(np.int32)
    items = rng.integers(0, n_items, n).astype(np.int32)
    ratings = np.einsum("nk,nk->n", truth_p[users], truth_q[items]).astype(np.float32)
    P = rng.normal(0.0, 0.1, (n_users, rank)).astype(np.float32)
    Q = rng.normal(0.0, 0.1, (n_items, rank)).astype(np.float32)
    cell = (users, items, ratings, P, Q, np.ones(n_users, np.float32), np.ones(n_items, np.float32))
    _, _, cpu_results, gpu_results = run_both(
        module,
        cell,
        step=0.2,
        reg=0.01,
        t_p=0.005,
        t_q=0.005,
        optimizer=ADAGRAD,
        warps=16,
        epochs=4,
    )
    rmse_cpu = [np.sqrt(sse / n) for sse, _ in cpu_results]
    rmse_gpu = [np.sqrt(sse / n) for sse, _ in gpu_results]
    assert rmse_gpu[-1] < 0.95 * rmse_gpu[0]  # it learns
    assert rmse_gpu[-1] == pytest.approx(rmse_cpu[-1], rel=0.03)
    assert gpu_results[-1][1] == pytest.approx(cpu_results[-1][1], rel=0.1)


def test_empty_cell_launches_nothing(module):
    P = np.ones((2, 8), np.float32)
    none = np.zeros(0, np.int32)
    G = np.ones(2, np.float32)
    result = pruned_cuda.launch_cell(
        module,
        np,
        none,
        none,
        np.zeros(0, np.float32),
        P,
        P.copy(),
        G,
        G.copy(),
        step=0.1,
        reg=0.1,
        threshold_p=0.0,
        threshold_q=0.0,
        optimizer=ADAGRAD,
        warps=4,
    )
    assert result == (0.0, 0)


# --------------------------------------------------------------------------- on a real GPU


@pytest.mark.gpu
@pytest.mark.skipif(gpu_problem() is not None, reason=str(gpu_problem()))
@pytest.mark.parametrize("rank", [30, 100])
def test_cupy_one_warp_matches_numba_on_a_gpu(rank):
    """The same comparison as on the shim, through RawModule on the device."""
    import cupy

    rng = np.random.default_rng(rank)
    users, items, ratings, *state = make_cell(rng, rank, n=500)
    cpu = [a.copy() for a in state]
    cpu_result = sgd_cell(users, items, ratings, *cpu, 0.05, 0.05, 0.008, 0.006, ADAGRAD)
    device = [cupy.asarray(a) for a in (users, items, ratings, *state)]
    gpu_result = pruned_cuda.launch_cell(
        pruned_cuda.get_module(), cupy, *device, step=0.05, reg=0.05, threshold_p=0.008,
        threshold_q=0.006, optimizer=ADAGRAD, warps=1,
    )  # fmt: skip
    assert gpu_result[1] == cpu_result[1]
    for c, g in zip(cpu, device[3:]):
        np.testing.assert_allclose(cupy.asnumpy(g), c, atol=5e-6, rtol=1e-5)
