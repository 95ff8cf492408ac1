"""The NumPy backend and block layout against independent float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize

from spark_gpu_mf.backends import numpy_backend as nb
from spark_gpu_mf.backends import precision as precision_module
from spark_gpu_mf.errors import SingularMatrixError
from spark_gpu_mf.executor.blocks import Block, build_block


def _random_csr(rng, n_rows, n_src, max_count, include_empty=False):
    counts = rng.integers(0 if include_empty else 1, max_count + 1, n_rows)
    counts[rng.integers(0, n_rows)] = max_count * 20  # one heavy row spanning several chunks
    indptr = np.zeros(n_rows + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    indices = rng.integers(0, n_src, indptr[-1]).astype(np.int32)
    ratings = rng.normal(3.0, 1.5, indptr[-1]).astype(np.float32)
    return indptr, indices, ratings


def _reference(indptr, indices, ratings, Y, reg, implicit=False, alpha=1.0):
    """Spark's normal equations written out row by row in float64."""
    Y = Y.astype(np.float64)
    k = Y.shape[1]
    yty = Y.T @ Y
    A, b = [], []
    for u in range(len(indptr) - 1):
        a, v, n = np.zeros((k, k)), np.zeros(k), 0
        if implicit:
            a += yty
        for j in range(indptr[u], indptr[u + 1]):
            y, r = Y[indices[j]], float(ratings[j])
            if implicit:
                c1 = alpha * abs(r)
                a += c1 * np.outer(y, y)
                if r > 0:
                    v += (1 + c1) * y
                    n += 1
            else:
                a += np.outer(y, y)
                v += r * y
                n += 1
        a += reg * n * np.eye(k)
        A.append(a)
        b.append(v)
    return np.array(A), np.array(b)


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("accumulate", ["float64", "float32"])
@pytest.mark.parametrize("rank", [1, 7, 33])
def test_normal_equations_match_the_row_by_row_formula(implicit, accumulate, rank):
    rng = np.random.default_rng(rank)
    indptr, indices, ratings = _random_csr(rng, 40, 25, 12)
    Y = rng.normal(size=(25, rank)).astype(np.float32)
    yty = nb.gram(Y) if implicit else None
    A, b = nb.normal_equations(
        indptr,
        indices,
        ratings,
        Y,
        reg_param=0.3,
        implicit=implicit,
        alpha=1.7,
        yty=yty,
        accumulate=accumulate,
        memory_budget_bytes=64 * 1024,
    )
    A_ref, b_ref = _reference(indptr, indices, ratings, Y, 0.3, implicit, 1.7)
    tolerance = 1e-12 if accumulate == "float64" else 2e-6
    assert A.dtype == (np.float64 if accumulate == "float64" else np.float32)
    np.testing.assert_allclose(A, A_ref, rtol=tolerance, atol=tolerance * np.abs(A_ref).max())
    np.testing.assert_allclose(b, b_ref, rtol=tolerance, atol=tolerance * np.abs(b_ref).max())


def test_a_tiny_memory_budget_gives_identical_factors():
    rng = np.random.default_rng(3)
    indptr, indices, ratings = _random_csr(rng, 300, 80, 30)
    Y = rng.normal(size=(80, 16)).astype(np.float32)
    for solver in ("cholesky", "cg"):
        results = [
            nb.update_block(
                indptr,
                indices,
                ratings,
                Y,
                None,
                nb.SolveConfig(rank=16, reg_param=0.1, solver=solver, memory_budget_bytes=budget),
            )
            for budget in (1, 64 * 1024, 1 << 30)
        ]
        for other in results[1:]:
            np.testing.assert_array_equal(results[0], other)


def test_cholesky_solution_equals_a_float64_solve():
    rng = np.random.default_rng(4)
    indptr, indices, ratings = _random_csr(rng, 60, 30, 20)
    Y = rng.normal(size=(30, 12)).astype(np.float32)
    A_ref, b_ref = _reference(indptr, indices, ratings, Y, 0.05)
    x = nb.update_block(
        indptr,
        indices,
        ratings,
        Y,
        None,
        nb.SolveConfig(rank=12, reg_param=0.05, solver="cholesky"),
    )
    expected = np.linalg.solve(A_ref, b_ref[:, :, None])[:, :, 0]
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-6)


def test_singular_systems_raise_sparks_message():
    A = np.array([[[1.0, 2.0], [2.0, 4.0]], [[2.0, 0.0], [0.0, 1.0]]])
    with pytest.raises(
        SingularMatrixError,
        match=r"^LAPACK.dppsv returned 2 because A is not "
        r"positive definite. Is A derived from a "
        r"singular matrix \(e.g. collinear column "
        r"values\)\?$",
    ):
        nb.solve_cholesky(A, np.ones((2, 2)))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cg_converges_to_the_cholesky_solution_as_iterations_grow(precision):
    rng = np.random.default_rng(5)
    indptr, indices, ratings = _random_csr(rng, 200, 60, 40)
    Y = rng.normal(size=(60, 24)).astype(np.float32)
    A, b = nb.normal_equations(indptr, indices, ratings, Y, reg_param=0.05)
    exact = nb.solve_cholesky(A, b)
    errors = []
    for iterations in (1, 3, 6, 12, 24):
        x = nb.solve_cg(
            A, b, np.zeros_like(exact), iterations=iterations, precision=precision, tolerance=0.0
        )
        errors.append(np.linalg.norm(x - exact) / np.linalg.norm(exact))
    assert all(later <= earlier * 1.0001 for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < errors[0] / 100, errors
    assert errors[-1] < (1e-3 if precision == "fp32" else 1e-2), errors


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("rank", [1, 7, 33])
@pytest.mark.parametrize("iterations", [1, 5])
def test_matrix_free_cg_takes_the_steps_of_cg_on_the_built_matrices(implicit, rank, iterations):
    """The default FP32 CG never forms A; it must follow CG on the float64-built A step by step
    (empty rows, a row spanning several float32 chunks, a warm start)."""
    rng = np.random.default_rng(11)
    indptr, indices, ratings = _random_csr(rng, 120, 50, 25, include_empty=True)
    Y = rng.normal(size=(50, rank)).astype(np.float32)
    yty = nb.gram(Y) if implicit else None
    previous = rng.normal(scale=0.3, size=(120, rank)).astype(np.float32)
    config = nb.SolveConfig(
        rank=rank, reg_param=0.5, implicit=implicit, alpha=2.0, solver="cg",
        cg_iterations=iterations,
    )  # fmt: skip
    x = nb.update_block(indptr, indices, ratings, Y, previous, config, yty)
    A, b = _reference(indptr, indices, ratings, Y, 0.5, implicit=implicit, alpha=2.0)
    built = nb.solve_cg(A, b, previous, iterations=iterations)
    if iterations == 1:
        np.testing.assert_allclose(x, built, rtol=1e-4, atol=1e-5 * np.abs(built).max())
    # Later float32 steps amplify rounding differences on rows that have all but converged (the
    # same happens between float32 and float64 CG), so there it must be as accurate.
    rated = np.diff(indptr) > 0
    exact = np.linalg.solve(A[rated], b[rated][:, :, None])[:, :, 0]
    error = np.linalg.norm(x[rated] - exact)
    built_error = np.linalg.norm(built[rated] - exact)
    assert error <= 1.05 * built_error + 1e-6 * np.linalg.norm(exact), (error, built_error)


def test_matrix_free_cg_converges_to_the_float64_solution():
    rng = np.random.default_rng(12)
    indptr, indices, ratings = _random_csr(rng, 200, 60, 40)
    Y = rng.normal(size=(60, 24)).astype(np.float32)
    A, b = _reference(indptr, indices, ratings, Y, 0.05)
    exact = np.linalg.solve(A, b[:, :, None])[:, :, 0]
    errors = []
    for iterations in (1, 3, 6, 12, 24):
        config = nb.SolveConfig(
            rank=24, reg_param=0.05, solver="cg", cg_iterations=iterations, cg_tolerance=0.0
        )
        x = nb.update_block(indptr, indices, ratings, Y, None, config)
        errors.append(np.linalg.norm(x - exact) / np.linalg.norm(exact))
    assert all(later <= earlier * 1.0001 for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < errors[0] / 100 and errors[-1] < 1e-3, errors


def test_cg_with_a_warm_start_at_the_solution_stays_there():
    rng = np.random.default_rng(6)
    indptr, indices, ratings = _random_csr(rng, 50, 30, 10)
    Y = rng.normal(size=(30, 8)).astype(np.float32)
    A, b = nb.normal_equations(indptr, indices, ratings, Y, reg_param=0.1)
    exact = nb.solve_cholesky(A, b)
    x = nb.solve_cg(A, b, exact, iterations=3)
    np.testing.assert_allclose(x, exact, rtol=1e-4, atol=1e-5)


def test_fp16_on_a_large_rating_scale_keeps_ill_conditioned_rows_in_fp32(monkeypatch):
    """Ratings on a 1..10,000 scale make A's entries far beyond float16's 65504 and A so
    ill-conditioned that FP16 rounding would break CG: those rows are stored in FP32 (with a
    warning) and every factor is finite and as good as an all-FP32 solve."""
    monkeypatch.setattr(precision_module, "_warned", False)
    rng = np.random.default_rng(7)
    indptr, indices, ratings = _random_csr(rng, 100, 40, 30)
    ratings = rng.uniform(1, 10_000, len(ratings)).astype(np.float32)
    Y = (rng.normal(size=(40, 16)) * 30).astype(np.float32)
    A, b = nb.normal_equations(indptr, indices, ratings, Y, reg_param=0.1)
    assert np.abs(A).max() > 65504
    exact = nb.solve_cholesky(A, b)
    configs = {
        p: nb.SolveConfig(
            rank=16, reg_param=0.1, solver="cg", cg_iterations=40, precision=p, cg_tolerance=0.0
        )
        for p in ("fp16", "fp32")
    }
    with pytest.warns(RuntimeWarning, match="stored in fp32 instead"):
        x16 = nb.update_block(indptr, indices, ratings, Y, None, configs["fp16"])
    x32 = nb.update_block(indptr, indices, ratings, Y, None, configs["fp32"])
    assert np.isfinite(x16).all()
    np.testing.assert_allclose(x16, x32, rtol=1e-3, atol=1e-3 * np.abs(exact).max())


def test_fp16_is_used_where_it_is_safe():
    """Normal-scale data keeps FP16 storage for every row and lands near the exact solution."""
    rng = np.random.default_rng(17)
    indptr, indices, ratings = _random_csr(rng, 100, 40, 30)
    Y = rng.normal(size=(40, 16)).astype(np.float32) / 4
    assert not precision_module.fp16_unsafe_rows(
        indptr, indices, ratings, Y, reg_param=0.1, implicit=False, alpha=1.0
    ).any()
    config = nb.SolveConfig(
        rank=16, reg_param=0.1, solver="cg", cg_iterations=30, precision="fp16", cg_tolerance=0.0
    )
    A, b = nb.normal_equations(indptr, indices, ratings, Y, reg_param=0.1)
    exact = nb.solve_cholesky(A, b)
    x = nb.update_block(indptr, indices, ratings, Y, None, config)
    assert np.linalg.norm(x - exact) / np.linalg.norm(exact) < 5e-3


def test_the_fp16_safety_bound_uses_the_true_largest_entry():
    rng = np.random.default_rng(18)
    indptr, indices, ratings = _random_csr(rng, 30, 20, 8)
    Y = rng.normal(size=(20, 5)).astype(np.float32)
    yty = nb.gram(Y)
    for implicit in (False, True):
        A, _ = nb.normal_equations(
            indptr, indices, ratings, Y, reg_param=0.2, implicit=implicit, alpha=0.7, yty=yty
        )
        reg = precision_module.row_regularization(indptr, ratings, 0.2, implicit)
        peak = precision_module.largest_diagonal(
            indptr, indices, ratings, Y, implicit=implicit, alpha=0.7, yty=yty, reg=reg
        )
        np.testing.assert_allclose(peak, np.abs(A).reshape(len(A), -1).max(axis=1), rtol=1e-9)


def test_nnls_matches_scipy_on_the_same_quadratic():
    rng = np.random.default_rng(8)
    for _ in range(20):
        M = rng.normal(size=(30, 6))
        A = M.T @ M + 0.1 * np.eye(6)
        b = rng.normal(size=6) * 5
        x = nb.solve_nnls(A[None], b[None])[0]
        L = np.linalg.cholesky(A)
        # 1/2 x'Ax - b'x = 1/2 ||L'x - L^{-1} b||^2 + constant
        expected, _ = scipy.optimize.nnls(L.T, scipy.linalg.solve_triangular(L, b, lower=True))
        assert (x >= 0).all()
        np.testing.assert_allclose(x, expected, atol=1e-4)


def test_top_k_orders_by_score_then_larger_id():
    queries = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    candidates = np.array([[1, 0], [2, 0], [1, 0], [0, 3], [0, 3]], np.float32)
    ids = np.array([10, 11, 12, 13, 14], np.int32)
    top_ids, top_scores = nb.top_k(queries, candidates, ids, 2)
    assert top_ids.tolist() == [[11, 12], [14, 13]]
    assert top_scores.tolist() == [[2.0, 1.0], [3.0, 3.0]]
    assert nb.top_k(queries, candidates, ids, 10)[0].shape == (2, 5)


def test_block_layout_agrees_between_the_two_sides():
    """Users' out-blocks list, for each item block, exactly the users its in-block needs."""
    rng = np.random.default_rng(9)
    users = rng.integers(-1000, 1000, 3000).astype(np.int32)
    items = rng.integers(-500, 500, 3000).astype(np.int32)
    ratings = rng.normal(size=3000).astype(np.float32)
    num_user_blocks, num_item_blocks = 3, 4
    user_blocks = {
        b: Block.from_row(build_block(b, users[m], items[m], ratings[m], num_item_blocks))
        for b in range(num_user_blocks)
        for m in [np.mod(users, num_user_blocks) == b]
    }
    item_blocks = {
        b: Block.from_row(build_block(b, items[m], users[m], ratings[m], num_user_blocks))
        for b in range(num_item_blocks)
        for m in [np.mod(items, num_item_blocks) == b]
    }
    for i, item_block in item_blocks.items():
        start = 0
        for u in range(num_user_blocks):
            count = item_block.needed_counts[u]
            sent = user_blocks[u].ids[user_blocks[u].rows_needed_by(i)]
            np.testing.assert_array_equal(sent, item_block.needed_ids[start : start + count])
            start += count
    # Every rating is in both layouts exactly once, with its value.
    for blocks, keys, others in ((user_blocks, users, items), (item_blocks, items, users)):
        triples = set()
        for block in blocks.values():
            rows = np.repeat(block.ids, np.diff(block.indptr))
            for key, other, value in zip(rows, block.needed_ids[block.indices], block.ratings):
                triples.add((int(key), int(other), float(value)))
        assert triples == {(int(k), int(o), float(r)) for k, o, r in zip(keys, others, ratings)}
