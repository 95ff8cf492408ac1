"""NumPy backend: the reference implementation of every executor computation and the CPU path.

Every function takes and returns plain NumPy arrays, so it can be tested without Spark and
compared one to one with the CuPy backend (``cupy_backend``), which has the same functions.

Notation for one block of rows (users when solving users, items when solving items):

* ``indptr``, ``indices``, ``ratings``: the block's ratings in CSR form; row ``u`` rated the source
  rows ``indices[indptr[u]:indptr[u+1]]`` of ``src_factors``.
* ``src_factors``: float32 ``(n_src, rank)``, the fixed side of this half-iteration.

Normal equations (Spark's ALS, ALS-WR regularization):

* explicit: ``A_u = sum_i q_i q_i^T + lambda * n_u * I``,  ``b_u = sum_i r_ui q_i``
* implicit (Hu, Koren, Volinsky with Spark's ``|r|`` rule): ``c1 = alpha * |r|``,
  ``A_u = Y^T Y + sum_i c1 q_i q_i^T + lambda * n+_u * I``, ``b_u = sum_{r > 0} (1 + c1) q_i``,
  where ``n+_u`` counts the ratings ``r > 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spark_gpu_mf.backends.precision import fp16_unsafe_rows, warn_fp32_fallback
from spark_gpu_mf.errors import SingularMatrixError

__all__ = [
    "SolveConfig",
    "normal_equations",
    "gram",
    "solve_cholesky",
    "solve_cg",
    "solve_nnls",
    "update_block",
    "top_k",
]

_MIB = 1 << 20
PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class SolveConfig:
    """How one block's rows are solved; built on the driver from the estimator's params.

    Attributes
    ----------
    rank : int
    reg_param : float
        lambda; scaled per row by its number of (positive, if implicit) ratings.
    implicit : bool
    alpha : float
    nonnegative : bool
        Solve each row with Spark's NNLS instead of an unconstrained solve.
    solver : {"cholesky", "cg"}
    cg_iterations : int
        Conjugate-gradient steps per half-iteration, warm-started from the previous factors.
    precision : {"fp32", "fp16"}
        Storage of the matrices the CG solver reads; arithmetic is always float32.
    memory_budget_bytes : int
        Upper bound on the normal equations (and gathered factors) held at once.
    """

    rank: int
    reg_param: float
    implicit: bool = False
    alpha: float = 1.0
    nonnegative: bool = False
    solver: str = "cholesky"
    cg_iterations: int = 5
    precision: str = "fp32"
    cg_tolerance: float = 1e-6
    memory_budget_bytes: int = 256 * _MIB


def _row_weights(ratings: np.ndarray, implicit: bool, alpha: float):
    """Per-rating weights of the A and b sums, and the per-rating regularization count."""
    r = ratings.astype(np.float64)
    if not implicit:
        return None, r, np.ones_like(r)
    c1 = alpha * np.abs(r)
    positive = r > 0
    return c1, np.where(positive, 1.0 + c1, 0.0), positive.astype(np.float64)


# Each row is padded to a length that depends only on its own rating count, so a row's sums are
# the same whatever other rows share its batch or however small the memory budget is. Short rows
# pad to at least 16: below that a stacked GEMM costs more per row than the padding (measured:
# 6.5 us per row at 4 ratings, 3.4 us at 16, rank 64).
_LENGTH_LADDER = np.array([16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128])
# Float32 GEMMs sum at most this many ratings before the partial sums are added in float64
# ("compensated float32"): relative error of a partial sum stays near 1e-6.
_FLOAT32_CHUNK = 128


def padded_lengths(counts: np.ndarray) -> np.ndarray:
    """The padded length of a row with ``counts`` ratings (at most 25% padding above 16)."""
    counts = np.asarray(counts, np.int64)
    short = _LENGTH_LADDER[np.minimum(np.searchsorted(_LENGTH_LADDER, counts), len(_LENGTH_LADDER) - 1)]
    long = -(-counts // _FLOAT32_CHUNK) * _FLOAT32_CHUNK
    return np.where(counts <= _FLOAT32_CHUNK, short, long)


def _bucket_rows(counts: np.ndarray, rank: int, budget_bytes: int, itemsize: int):
    """Batches of rows with the same padded length that fit the memory budget.

    Yields ``(rows, padded_length)``; each batch is one stacked GEMM per chunk of ratings.
    """
    lengths = padded_lengths(counts)
    order = np.argsort(lengths, kind="stable")
    sorted_lengths = lengths[order]
    bounds = np.flatnonzero(np.diff(sorted_lengths)) + 1
    for group in np.split(order, bounds):
        if len(group) == 0:
            continue
        length = int(lengths[group[0]])
        chunk = min(length, _FLOAT32_CHUNK) if itemsize == 4 else length
        per_row = 8 * rank * rank + itemsize * (chunk + 1) * rank + 32 * length
        max_rows = max(1, budget_bytes // per_row)
        for start in range(0, len(group), max_rows):
            yield group[start : start + max_rows], length


def normal_equations(
    indptr: np.ndarray,
    indices: np.ndarray,
    ratings: np.ndarray,
    src_factors: np.ndarray,
    *,
    reg_param: float,
    implicit: bool = False,
    alpha: float = 1.0,
    yty: np.ndarray | None = None,
    rows: np.ndarray | None = None,
    memory_budget_bytes: int = 256 * _MIB,
    accumulate: str = "float64",
):
    """Build the normal equations of ``rows`` (default: all rows of the block).

    Parameters
    ----------
    indptr, indices, ratings : CSR of the block.
    src_factors : float32 (n_src, rank)
    reg_param, implicit, alpha : see module docstring.
    yty : float64 (rank, rank), required when ``implicit``
        Gram matrix of all source factors (``gram``).
    rows : int array, optional
        Subset of rows to build, in the order wanted.
    accumulate : {"float64", "float32"}
        ``"float64"``: products and sums in float64 (what the exact solvers use; matches Spark's
        double accumulation). ``"float32"``: float32 GEMMs over chunks of at most 128 ratings
        whose partial sums are added in float64, about twice as fast; for the iterative solver.

    Returns
    -------
    A : (n_rows, rank, rank), symmetric, regularization included; float64 or float32 as
        ``accumulate`` says
    b : float64 (n_rows, rank)
    """
    rank = src_factors.shape[1]
    if rows is None:
        rows = np.arange(len(indptr) - 1)
    if implicit and yty is None:
        raise ValueError("implicit normal equations need the Gram matrix yty")
    dtype = {"float64": np.float64, "float32": np.float32}[accumulate]
    counts = (indptr[rows + 1] - indptr[rows]).astype(np.int64)
    a_weight, b_weight, reg_count = _row_weights(ratings, implicit, alpha)
    # One zero row at the end of the source factors: padded slots gather it and add nothing.
    padded_src = np.zeros((len(src_factors) + 1, rank), dtype)
    padded_src[:-1] = src_factors
    pad_index = len(src_factors)

    A = np.zeros((len(rows), rank, rank))
    b = np.zeros((len(rows), rank))
    n_reg = np.zeros(len(rows))
    itemsize = np.dtype(dtype).itemsize
    for batch, length in _bucket_rows(counts, rank, memory_budget_bytes, itemsize):
        starts = indptr[rows[batch]]
        lens = counts[batch]
        slots = np.arange(length)
        valid = slots[None, :] < lens[:, None]
        pos = np.where(valid, starts[:, None] + slots[None, :], 0)
        src = np.where(valid, indices[pos], pad_index)
        weights_b = np.where(valid, b_weight[pos], 0.0)
        a_scale = None if a_weight is None else np.sqrt(np.where(valid, a_weight[pos], 0.0))
        n_reg[batch] = np.where(valid, reg_count[pos], 0.0).sum(axis=1)
        chunk = min(length, _FLOAT32_CHUNK) if dtype is np.float32 else length
        for lo in range(0, length, chunk):
            gathered = padded_src[src[:, lo : lo + chunk]]  # (B, L, k)
            b[batch] += np.matmul(
                weights_b[:, None, lo : lo + chunk].astype(dtype), gathered
            )[:, 0, :]
            if a_scale is not None:
                # c1 >= 0, so A's sum is a Gram matrix of sqrt(c1)-scaled rows.
                gathered = gathered * a_scale[:, lo : lo + chunk, None].astype(dtype)
            A[batch] += np.matmul(gathered.transpose(0, 2, 1), gathered)
    if implicit:
        A += yty[None, :, :]
    diag = np.arange(rank)
    A[:, diag, diag] += (reg_param * n_reg)[:, None]
    return (A if dtype is np.float64 else A.astype(np.float32)), b


def gram(factors: np.ndarray) -> np.ndarray:
    """``Y^T Y`` of float32 factors, accumulated in float64 (the implicit-feedback term)."""
    y = factors.astype(np.float64)
    return y.T @ y


def _singular_error(A: np.ndarray) -> SingularMatrixError:
    """Spark's message for the first row whose Cholesky factorization fails."""
    for row in A:
        try:
            np.linalg.cholesky(row)
        except np.linalg.LinAlgError:
            return SingularMatrixError.from_leading_minor(_failing_minor(row))
    return SingularMatrixError.from_leading_minor(1)


def _failing_minor(a: np.ndarray) -> int:
    """1-based order of the first leading minor that is not positive definite (LAPACK's info)."""
    for order in range(1, a.shape[0] + 1):
        try:
            np.linalg.cholesky(a[:order, :order])
        except np.linalg.LinAlgError:
            return order
    return a.shape[0]


def _cholesky_solve(L: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve ``L L^T x = b`` for a batch, vectorized over the batch (O(rank^2) per row)."""
    n, k = b.shape
    z = np.empty_like(b)
    for j in range(k):
        z[:, j] = (b[:, j] - np.einsum("ij,ij->i", L[:, j, :j], z[:, :j])) / L[:, j, j]
    x = np.empty_like(b)
    for j in range(k - 1, -1, -1):
        x[:, j] = (z[:, j] - np.einsum("ij,ij->i", L[:, j + 1 :, j], x[:, j + 1 :])) / L[:, j, j]
    return x


def solve_cholesky(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact batched solve of symmetric positive definite systems, in float64.

    Raises
    ------
    SingularMatrixError
        With Spark's message when a system is not positive definite (possible only when
        ``regParam`` is 0).
    """
    if len(b) == 0:
        return np.zeros(b.shape, np.float32)
    try:
        L = np.linalg.cholesky(A)
    except np.linalg.LinAlgError:
        raise _singular_error(A) from None
    return _cholesky_solve(L, b).astype(np.float32)


def _fp16_scaled(A: np.ndarray):
    """Store ``A`` as float16 with a power-of-two scale per row so that no entry overflows.

    Returns ``(A16, scale)`` with ``A ~= A16 * scale[:, None, None]``.
    """
    peak = np.abs(A).reshape(len(A), -1).max(axis=1)
    peak = np.where(peak > 0, peak, 1.0)
    # Largest entry lands in [2^13, 2^14): far from float16's 65504, keeps 11 significant bits.
    scale = np.exp2(np.floor(np.log2(peak)) - 13.0)
    A16 = (A / scale[:, None, None]).astype(np.float16)
    return A16, scale.astype(np.float32)


def _cg(stored, scale, A, b, x0, iterations, tolerance):
    """Jacobi-preconditioned CG on ``stored * scale`` (float32 or float16), float32 arithmetic."""
    diag = np.einsum("bii->bi", A).astype(np.float32)
    # An all-zero row (no ratings, no regularization) keeps its start value instead of NaN.
    inv_diag = np.divide(1.0, diag, out=np.zeros_like(diag), where=diag != 0)

    def matvec(v):
        # The stored matrix may be float16; the vector and the products stay float32.
        return np.matmul(stored, v[:, :, None], dtype=np.float32)[:, :, 0] * scale[:, None]

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


def _energy(A: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``x^T A x / 2 - b^T x`` per row in float64: what CG decreases at every step."""
    x64 = x.astype(np.float64)
    ax = np.matmul(A, x64[:, :, None], dtype=np.float64)[:, :, 0]
    return 0.5 * np.einsum("bi,bi->b", x64, ax) - np.einsum("bi,bi->b", b, x64)


def fp16_failures(A: np.ndarray, b: np.ndarray, x0: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Rows where FP16 storage broke CG: non-finite results, or worse than the starting point.

    FP16 keeps 11 significant bits; a matrix with a condition number near 1e3 or more (large
    rating scales, tiny regularization) can round to an indefinite one, and CG then diverges.
    """
    finite = np.isfinite(x).all(axis=1)
    worse = np.zeros(len(x), bool)
    worse[finite] = _energy(A[finite], b[finite], x[finite]) > _energy(
        A[finite], b[finite], x0[finite]
    ) + 1e-7 * np.abs(_energy(A[finite], b[finite], x0[finite]))
    return ~finite | worse


def solve_cg(
    A: np.ndarray,
    b: np.ndarray,
    x0: np.ndarray,
    *,
    iterations: int,
    precision: str = "fp32",
    tolerance: float = 1e-6,
) -> np.ndarray:
    """Batched Jacobi-preconditioned conjugate gradient, warm-started from ``x0``.

    ``A`` is stored in float32 or (``precision="fp16"``) float16 with a per-row power-of-two scale
    (so no entry overflows); vectors and arithmetic are float32. A row stops early once its
    residual falls below ``tolerance * ||b||``; every row does at most ``iterations`` steps.
    Rows that FP16 storage still breaks (``fp16_failures``) are solved again with FP32 storage,
    with a warning, so FP16 never yields inf/NaN or a worse solution than the starting point;
    ``update_block`` keeps rows that FP16 would round too coarsely in FP32 from the start
    (``precision.fp16_unsafe_rows``).
    """
    if len(b) == 0:
        return np.zeros(b.shape, np.float32)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}")
    A32 = A.astype(np.float32)
    if precision == "fp32":
        return _cg(A32, np.ones(len(A), np.float32), A, b, x0, iterations, tolerance)
    stored, scale = _fp16_scaled(A)
    x = _cg(stored, scale, A, b, x0, iterations, tolerance)
    failed = fp16_failures(A, b, x0, x)
    if failed.any():
        warn_fp32_fallback(int(failed.sum()), len(failed))
        x[failed] = _cg(A32[failed], np.ones(int(failed.sum()), np.float32), A[failed], b[failed],
                        x0[failed], iterations, tolerance)
    return x


def solve_nnls(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Nonnegative least squares per row: ``min x^T A x / 2 - b^T x`` subject to ``x >= 0``.

    Spark's ``NNLS.solve`` (projected gradient with conjugate directions), run per row.
    """
    from spark_gpu_mf.backends.nnls import nnls_batch

    return nnls_batch(A, b).astype(np.float32)


def update_block(
    indptr: np.ndarray,
    indices: np.ndarray,
    ratings: np.ndarray,
    src_factors: np.ndarray,
    previous: np.ndarray | None,
    config: SolveConfig,
    yty: np.ndarray | None = None,
) -> np.ndarray:
    """New float32 factors of every row of one block: build and solve under the memory budget.

    ``previous`` (float32, same shape as the result) warm-starts the CG solver; rows without a
    previous value start from zero. With ``precision="fp16"``, rows whose normal equations FP16
    would round too coarsely are solved with FP32 storage (``precision.fp16_unsafe_rows``).
    """
    n_rows = len(indptr) - 1
    rank = config.rank
    out = np.zeros((n_rows, rank), np.float32)
    iterative = config.solver == "cg" and not config.nonnegative
    precisions = np.full(n_rows, config.precision if iterative else "fp32", dtype=object)
    if iterative and config.precision == "fp16":
        unsafe = fp16_unsafe_rows(
            indptr, indices, ratings, src_factors, reg_param=config.reg_param,
            implicit=config.implicit, alpha=config.alpha, yty=yty,
        )  # fmt: skip
        if unsafe.any():
            warn_fp32_fallback(int(unsafe.sum()), n_rows)
            precisions[unsafe] = "fp32"
    per_row = 8 * rank * rank * 3
    chunk = max(1, config.memory_budget_bytes // per_row)
    for precision in ("fp32", "fp16"):
        selected = np.flatnonzero(precisions == precision)
        for start in range(0, len(selected), chunk):
            rows = selected[start : start + chunk]
            out[rows] = _solve_rows(
                indptr, indices, ratings, src_factors, previous, config, yty, rows, precision
            )
    return out


def _solve_rows(indptr, indices, ratings, src_factors, previous, config, yty, rows, precision):
    iterative = config.solver == "cg" and not config.nonnegative
    A, b = normal_equations(
        indptr,
        indices,
        ratings,
        src_factors,
        reg_param=config.reg_param,
        implicit=config.implicit,
        alpha=config.alpha,
        yty=yty,
        rows=rows,
        memory_budget_bytes=config.memory_budget_bytes,
        accumulate="float32" if iterative else "float64",
    )
    if config.nonnegative:
        return solve_nnls(A, b)
    if not iterative:
        return solve_cholesky(A, b)
    start = previous[rows] if previous is not None else np.zeros((len(rows), config.rank), np.float32)
    return solve_cg(
        A, b, start, iterations=config.cg_iterations, precision=precision,
        tolerance=config.cg_tolerance,
    )  # fmt: skip


def top_k(queries: np.ndarray, candidates: np.ndarray, candidate_ids: np.ndarray, k: int):
    """Top ``k`` candidates per query by dot product, ordered like Spark's ``recommendFor*``.

    Spark orders by ``(score, id)`` descending, so equal scores put the larger id first.

    Returns
    -------
    ids : int32 (n_queries, min(k, n_candidates))
    scores : float32 (n_queries, min(k, n_candidates))
    """
    n_q = len(queries)
    kk = min(k, len(candidates))
    if n_q == 0 or kk == 0:
        return np.zeros((n_q, kk), np.int32), np.zeros((n_q, kk), np.float32)
    scores = queries.astype(np.float32) @ candidates.astype(np.float32).T
    ids64 = candidate_ids.astype(np.int64)
    if kk < scores.shape[1]:
        cand = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    else:
        cand = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    cand_scores = np.take_along_axis(scores, cand, axis=1)
    order = np.lexsort((-ids64[cand], -cand_scores), axis=1)
    ids = np.take_along_axis(ids64[cand], order, axis=1).astype(np.int32)
    out = np.take_along_axis(cand_scores, order, axis=1)
    if kk < scores.shape[1]:
        # Ties at the k-th score are decided by the larger id, as in Spark; argpartition may have
        # picked any of the tied entries, so redo those (rare) rows over every tied candidate.
        kth = out[:, -1]
        tied = np.nonzero((scores >= kth[:, None]).sum(axis=1) > kk)[0]
        for i in tied:
            c = np.nonzero(scores[i] >= kth[i])[0]
            o = np.lexsort((-ids64[c], -scores[i, c]))[:kk]
            ids[i] = ids64[c[o]]
            out[i] = scores[i, c[o]]
    return ids, out
