"""kernels/sgd_mascot.cu: compiled for sm_80/sm_90 without spills, and run on the CPU through the
host shim with the launch code of spark_gpu_mf.sgd.mascot_cuda, against the Numba kernel.

With one warp the kernel runs the cell's ratings in the given order, like
``mascot_numba.cell_sgd``; the two then differ only in the order of the float32 dot product
(butterfly shuffles against LLVM's vector lanes) and in fused multiply-adds, so FP32 rows agree to
~1e-6 and FP16 rows to one float16 rounding step where a value lands next to a rounding boundary.
With several warps on disjoint rows the result is again the in-order one; on shared rows the
warps are Hogwild (as MASCOT's kernel) and only the fit is compared. The g-switching sums are
compared with the Numba kernel's for the same worker streams (one per warp).

Not checked here (see reference/gpu-verification.md): the GPU memory model, warps running truly at
once (fibers switch only at shuffles), timing.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from spark_gpu_mf.backends.numba_intrinsics import from_half_bits, to_half_bits
from spark_gpu_mf.sgd import mascot_cuda
from spark_gpu_mf.sgd.mascot_numba import cell_sgd

_TESTS = Path(__file__).resolve().parent


def _load(name: str, path: Path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


shim = _load("gpumf_cuda_shim", _TESTS / "cuda_shim" / "shim.py")
compile_checks = _load("gpumf_kernels_compile", _TESTS / "test_kernels_compile.py")

SOURCE = mascot_cuda.KERNEL_FILE
ENTRY_POINTS = {f"mascot_sgd_d{d}" for d in mascot_cuda.DIMS_PER_LANE} | {"mascot_group_sums"}
needs_gxx = pytest.mark.skipif(shim.compiler() is None, reason="needs g++ for the host shim")


# --------------------------------------------------------------------------- compiles


# Compilation for sm_80/sm_90 without spills: tests/test_kernels_compile.py.


def test_launcher_picks_the_smallest_entry_point():
    names = [mascot_cuda.kernel_name(r) for r in (1, 32, 33, 64, 65, 128, 129, 256)]
    assert names == [f"mascot_sgd_d{d}" for d in (1, 1, 2, 2, 4, 4, 8, 8)]
    with pytest.raises(ValueError, match="rank <= 256"):
        mascot_cuda.kernel_name(257)


def test_sampled_positions_are_every_warps_tail():
    positions, offsets = mascot_cuda.sampled_positions(10, 3, 0.25)
    # warps run [0, 3), [3, 6), [6, 10); tails ceil(0.75) = 1, 1, ceil(1.0) = 1
    np.testing.assert_array_equal(positions, [2, 5, 9])
    np.testing.assert_array_equal(offsets, [0, 1, 2])
    positions, offsets = mascot_cuda.sampled_positions(5, 8, 1.0)  # more warps than ratings
    np.testing.assert_array_equal(positions, np.arange(5))
    assert offsets[-1] == 4


# --------------------------------------------------------------------------- shim runs


@pytest.fixture(scope="module")
def module():
    library = shim.build_library([shim.KERNEL_DIR / SOURCE], mode="fibers")
    return shim.ShimModule(library)


def make_side(rng, rows, rank, groups, fp32_groups, scale=0.3):
    """Storage of one block: rows of FP32 groups in ``single``, the others in ``half``."""
    values = rng.normal(0.0, scale, (rows, rank)).astype(np.float32)
    group = rng.integers(0, groups, rows).astype(np.int32)
    group_fp32 = np.zeros(groups, np.uint8)
    group_fp32[list(fp32_groups)] = 1
    is32 = group_fp32[group] == 1
    slot = np.zeros(rows, np.int32)
    slot[is32] = np.arange(is32.sum())
    slot[~is32] = np.arange((~is32).sum())
    return {
        "half": to_half_bits(values[~is32]).reshape(-1, rank),
        "single": values[is32].reshape(-1, rank).copy(),
        "slot": slot,
        "group": group,
        "group_fp32": group_fp32,
    }


def dense(side):
    is32 = side["group_fp32"][side["group"]] == 1
    out = np.empty((len(side["slot"]), side["half"].shape[1]), np.float32)
    out[is32] = side["single"][side["slot"][is32]]
    out[~is32] = from_half_bits(side["half"][side["slot"][~is32]])
    return out


def copy_side(side):
    return {k: v.copy() for k, v in side.items()}


def run_numba(users, items, ratings, user, item, *, lr, reg, collect, streams, ratio):
    rank = user["half"].shape[1]
    gu, gi = len(user["group_fp32"]), len(item["group_fp32"])
    stats = {
        "user_sums": np.zeros((gu, rank)), "user_squares": np.zeros(gu),
        "item_sums": np.zeros((gi, rank)), "item_squares": np.zeros(gi),
        "user_rounding": np.zeros((gu, 2)), "item_rounding": np.zeros((gi, 2)),
    }  # fmt: skip
    sse = cell_sgd(
        users, items, ratings,
        user["half"], user["single"], user["slot"], user["group"], user["group_fp32"],
        item["half"], item["single"], item["slot"], item["group"], item["group_fp32"],
        lr, reg, collect, streams, ratio,
        stats["user_sums"], stats["user_squares"], stats["item_sums"], stats["item_squares"],
        stats["user_rounding"], stats["item_rounding"],
    )  # fmt: skip
    return sse, stats


def run_shim(module, users, items, ratings, user, item, *, lr, reg, collect, warps, ratio):
    return mascot_cuda.launch_cell(
        module, np, users, items, ratings, user, item, lr=lr, reg=reg, warps=warps,
        collect=collect, sample_ratio=ratio, host_users=users, host_items=items,
        host_user_group=user["group"], host_item_group=item["group"],
    )  # fmt: skip


def assert_factors_close(got, expected, *, half_steps):
    """Equal, or where FP16 rows are involved: at most ``half_steps`` float16 steps of the
    largest value apart and equal to float32 precision in at least 90% of the entries.

    The kernels differ in the order of the float32 dot product; that rarely moves a value across a
    float16 rounding boundary, but when it does the one-step difference feeds every later update
    of the row and of the rows it meets, so it is bounded in the scale of the whole block."""
    if half_steps == 0:
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        return
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= half_steps * 2.0**-11 * scale + 1e-6
    assert np.mean(np.abs(got - expected) <= 1e-5 * scale) >= 0.9


def assert_statistics_close(got, expected):
    """Sums of update vectors agree to 0.2% of their largest entry (they inherit the factors'
    differences, and single entries may cancel)."""
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-3 * np.abs(expected).max() + 1e-12)


def _cell(rng, n, rows_u, rows_i):
    users = rng.integers(0, rows_u, n).astype(np.int32)
    items = rng.integers(0, rows_i, n).astype(np.int32)
    ratings = rng.uniform(1.0, 5.0, n).astype(np.float32)
    return users, items, ratings


@needs_gxx
@pytest.mark.parametrize("rank", [7, 32, 64, 100, 128, 256])
@pytest.mark.parametrize("storage", ["fp32", "fp16", "mixed"])
def test_one_warp_runs_the_numba_update_in_order(module, rank, storage):
    rng = np.random.default_rng(rank)
    groups = 4
    fp32 = {"fp32": range(groups), "fp16": (), "mixed": (1, 3)}[storage]
    user = make_side(rng, 30, rank, groups, fp32)
    item = make_side(rng, 20, rank, groups, fp32)
    users, items, ratings = _cell(rng, 300, 30, 20)
    args = {"lr": 0.05, "reg": 0.02, "collect": True, "ratio": 0.2}
    cpu_user, cpu_item = copy_side(user), copy_side(item)
    sse, stats = run_numba(users, items, ratings, cpu_user, cpu_item, streams=1, **args)
    gpu_user, gpu_item = copy_side(user), copy_side(item)
    sse_gpu, stats_gpu = run_shim(module, users, items, ratings, gpu_user, gpu_item, warps=1,
                                  **args)  # fmt: skip
    assert abs(sse_gpu - sse) <= 1e-4 * sse
    # rows stay in their storage; FP16 values are float16 values by construction
    assert gpu_user["half"].dtype == np.uint16 and gpu_user["half"].shape == user["half"].shape
    steps = 0 if storage == "fp32" else 2
    assert_factors_close(dense(gpu_user), dense(cpu_user), half_steps=steps)
    assert_factors_close(dense(gpu_item), dense(cpu_item), half_steps=steps)
    if storage == "fp32":
        assert all(np.all(stats_gpu[k] == 0) for k in stats_gpu)  # FP32 groups: not measured
    for name in ("user_sums", "item_sums", "user_squares", "item_squares"):
        assert_statistics_close(stats_gpu[name], stats[name])
    for name in ("user_rounding", "item_rounding"):  # float16 rounding of the sampled updates
        np.testing.assert_allclose(stats_gpu[name], stats[name], rtol=0.02, atol=1e-12)
    measured = 1 - user["group_fp32"]
    assert np.all(stats["user_squares"][measured == 0] == 0)
    if storage != "fp32":
        assert stats["user_squares"][measured == 1].sum() > 0


@needs_gxx
def test_warps_on_disjoint_rows_match_in_order_and_sample_their_own_tails(module):
    """8 warps, each on its own users and items: in-order results and per-warp samples."""
    rng = np.random.default_rng(1)
    rank, warps, per_warp = 64, 8, 40
    user = make_side(rng, warps * 5, rank, 3, (2,))
    item = make_side(rng, warps * 4, rank, 3, (0,))
    w = np.repeat(np.arange(warps), per_warp)
    users = (w * 5 + rng.integers(0, 5, w.size)).astype(np.int32)
    items = (w * 4 + rng.integers(0, 4, w.size)).astype(np.int32)
    ratings = rng.uniform(1.0, 5.0, w.size).astype(np.float32)
    args = {"lr": 0.05, "reg": 0.02, "collect": True, "ratio": 0.1}
    cpu_user, cpu_item = copy_side(user), copy_side(item)
    _, stats = run_numba(users, items, ratings, cpu_user, cpu_item, streams=warps, **args)
    gpu_user, gpu_item = copy_side(user), copy_side(item)
    _, stats_gpu = run_shim(module, users, items, ratings, gpu_user, gpu_item, warps=warps,
                            **args)  # fmt: skip
    assert_factors_close(dense(gpu_user), dense(cpu_user), half_steps=2)
    assert_factors_close(dense(gpu_item), dense(cpu_item), half_steps=2)
    for name in stats:
        assert_statistics_close(stats_gpu[name], stats[name])
    # one stream samples a different set than 8 streams: the statistic follows the slicing
    _, one_stream = run_numba(users, items, ratings, copy_side(user), copy_side(item),
                              streams=1, **args)  # fmt: skip
    assert not np.allclose(one_stream["user_squares"], stats["user_squares"])


def _train_rmse(run, user, item, cell, epochs):
    users, items, ratings = cell
    for epoch in range(epochs):
        run(users, items, ratings, user, item, 0.02 / (1 + 0.1 * epoch**1.5))
    prediction = np.einsum("nk,nk->n", dense(user)[users], dense(item)[items])
    return float(np.sqrt(np.mean((ratings - prediction) ** 2)))


@needs_gxx
def test_hogwild_warps_fit_like_the_in_order_run(module):
    rng = np.random.default_rng(2)
    rank = 32
    truth_u = rng.normal(0, 0.4, (400, rank)).astype(np.float32)
    truth_i = rng.normal(0, 0.4, (300, rank)).astype(np.float32)
    users = rng.integers(0, 400, 6000).astype(np.int32)
    items = rng.integers(0, 300, 6000).astype(np.int32)
    ratings = (np.einsum("nk,nk->n", truth_u[users], truth_i[items]) + 3.0).astype(np.float32)
    user = make_side(rng, 400, rank, 2, (), scale=0.1)
    item = make_side(rng, 300, rank, 2, (), scale=0.1)

    def in_order(u, i, r, us, it, lr):
        run_numba(u, i, r, us, it, lr=lr, reg=0.01, collect=False, streams=1, ratio=0.0)

    def hogwild(u, i, r, us, it, lr):
        run_shim(module, u, i, r, us, it, lr=lr, reg=0.01, collect=False, warps=16, ratio=0.0)

    cell = (users, items, ratings)
    start = _train_rmse(in_order, copy_side(user), copy_side(item), cell, 0)
    reference = _train_rmse(in_order, copy_side(user), copy_side(item), cell, 6)
    parallel = _train_rmse(hogwild, copy_side(user), copy_side(item), cell, 6)
    assert reference < 0.5 * start
    assert abs(parallel - reference) <= 0.05 * reference, (start, reference, parallel)
