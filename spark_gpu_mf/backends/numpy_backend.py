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

import time

import numpy as np

from spark_gpu_mf.backends import cpu_gather, cpu_matrix_free, cpu_solvers
from spark_gpu_mf.backends.precision import fp16_unsafe_rows, warn_fp32_fallback
from spark_gpu_mf.backends.solve_config import SolveConfig
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

# Seconds this process spent building normal equations ("hermitian") and solving them, summed
# over update_block calls until take_phase_seconds() reads and resets them (benchmark phases).
_PHASE_SECONDS = {"hermitian": 0.0, "solve": 0.0}


def take_phase_seconds() -> dict:
    """``{"hermitian": s, "solve": s}`` spent in ``update_block`` since the last call."""
    taken = dict(_PHASE_SECONDS)
    for name in _PHASE_SECONDS:
        _PHASE_SECONDS[name] = 0.0
    return taken


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
    """The padded length of a row with ``counts`` ratings.

    Up to 128 ratings: the next step of ``_LENGTH_LADDER`` (at most 25% padding above 16).
    Longer rows: the next multiple of an eighth of the power of two below ``counts`` (at least
    16), so at most 12.5% padding with eight lengths per octave; rounding up to a multiple of
    128 instead padded 18% of the ratings of a 10M-rating user side, and finer steps split
    long rows into batches too small to amortize the per-batch work.
    """
    counts = np.asarray(counts, np.int64)
    short = _LENGTH_LADDER[
        np.minimum(np.searchsorted(_LENGTH_LADDER, counts), len(_LENGTH_LADDER) - 1)
    ]
    octave = np.floor(np.log2(np.maximum(counts, 1))).astype(np.int64)
    step = np.maximum(16, np.left_shift(1, np.maximum(octave - 3, 0)))
    long = -(-counts // step) * step
    return np.where(counts <= _FLOAT32_CHUNK, short, long)


def _bucket_rows(counts: np.ndarray, rank: int, budget_bytes: int, itemsize: int):
    """Batches of rows with the same padded length that fit the memory budget.

    Yields ``(rows, padded_length)``, ``rows`` being positions in ``counts``; each batch is one
    stacked GEMM per chunk of ratings.
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
        # The batch's matrices (float32 or float64, plus a float64 running sum for long rows),
        # the gathered factors of one chunk and the index arrays.
        per_row = (8 + itemsize) * rank * rank + itemsize * (chunk + 1) * rank + 32 * length
        # A batch's gathered factors and matrices stay within the cache (the GEMMs then read
        # what the gather just wrote) unless rows are so long that one row exceeds it.
        cached_rows = _CACHE_BYTES // (itemsize * rank * (chunk + rank))
        max_rows = max(1, min(budget_bytes // per_row, max(cached_rows, _MIN_BATCH_ROWS)))
        for start in range(0, len(group), max_rows):
            yield group[start : start + max_rows], length


# Bytes of gathered factors plus matrices per batch: measured at rank 64 on 10M ratings, 2048-row
# batches (64 MB gathered) spent 2.6x longer in the gather than in the GEMMs, cache-sized ones
# 0.5x. Batches never get smaller than _MIN_BATCH_ROWS, so per-batch Python work stays small.
_CACHE_BYTES = 4 * _MIB
_MIN_BATCH_ROWS = 32


class _Gatherer:
    """What building any batch of one block's rows needs, prepared once per block."""

    def __init__(self, indptr, indices, ratings, src_factors, *, implicit, alpha, dtype):
        self.indptr = np.ascontiguousarray(indptr, np.int64)
        self.indices = np.ascontiguousarray(indices)
        self.src = np.ascontiguousarray(src_factors, np.float32)
        self.dtype = dtype
        a_weight, self.b_weight, self.reg_count = _row_weights(ratings, implicit, alpha)
        # c1 >= 0, so A's sum is the Gram matrix of sqrt(c1)-scaled rows.
        self.a_sqrt = None if a_weight is None else np.sqrt(a_weight)
        self._scratch: dict = {}

    def _buffer(self, name: str, shape: tuple, dtype) -> np.ndarray:
        """A reused array: fresh multi-MB arrays per batch cost more in page faults than the
        gather that fills them."""
        size = int(np.prod(shape))
        flat = self._scratch.get(name)
        if flat is None or flat.size < size or flat.dtype != dtype:
            flat = self._scratch[name] = np.empty(max(size, 1), dtype)
        return flat[:size].reshape(shape)

    def build(self, rows: np.ndarray, length: int, reg_param: float, yty):
        """Normal equations of ``rows`` (all padded to ``length``): ``(A, b)``.

        ``A`` is ``self.dtype`` with the regularization (and ``yty``) added, ``b`` float64.
        float32 GEMMs sum at most ``_FLOAT32_CHUNK`` ratings; longer rows add the partial
        sums in float64 before rounding ``A`` to float32 once. ``A`` may live in a scratch
        buffer: it is valid until the next call.
        """
        dtype = self.dtype
        rank = self.src.shape[1]
        n = len(rows)
        rows = np.ascontiguousarray(rows, np.int64)
        chunk = min(length, _FLOAT32_CHUNK) if dtype is np.float32 else length
        A = self._buffer("A", (n, rank, rank), dtype)
        total = None
        if chunk != length:
            total = self._buffer("total", (n, rank, rank), np.float64)
            total[...] = 0.0
        b = np.zeros((n, rank))
        n_reg = np.zeros(n)
        for lo in range(0, length, chunk):
            width = min(chunk, length - lo)  # the last chunk of a long row may be shorter
            gathered = self._buffer("gathered", (n, width, rank), dtype)
            cpu_gather.gather_chunk(
                rows, lo, self.indptr, self.indices, self.a_sqrt, self.b_weight,
                self.reg_count, self.src, gathered, b, n_reg,
            )  # fmt: skip
            np.matmul(gathered.transpose(0, 2, 1), gathered, out=A)
            if total is not None:
                total += A
        if total is not None:
            A = total
        if yty is not None:
            A += yty.astype(A.dtype)[None, :, :]
        diag = np.arange(rank)
        A[:, diag, diag] += (reg_param * n_reg)[:, None].astype(A.dtype)
        return A.astype(dtype, copy=False), b


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

    Notes
    -----
    Rows are built in batches of equal padded length (``padded_lengths``), one stacked GEMM
    (``G^T G`` of the gathered, padded factors ``G``) per batch and chunk, so each row costs
    BLAS-3 work and a row's result does not depend on its batch. ``update_block`` solves each
    batch right after building it instead of materializing every row's matrix.
    """
    rank = src_factors.shape[1]
    if rows is None:
        rows = np.arange(len(indptr) - 1)
    if implicit and yty is None:
        raise ValueError("implicit normal equations need the Gram matrix yty")
    dtype = {"float64": np.float64, "float32": np.float32}[accumulate]
    rows = np.asarray(rows, np.int64)
    gatherer = _Gatherer(
        indptr, indices, ratings, src_factors, implicit=implicit, alpha=alpha, dtype=dtype
    )
    counts = indptr[rows + 1] - indptr[rows]
    A = np.empty((len(rows), rank, rank), dtype)
    b = np.empty((len(rows), rank))
    itemsize = np.dtype(dtype).itemsize
    for batch, length in _bucket_rows(counts, rank, memory_budget_bytes, itemsize):
        A[batch], b[batch] = gatherer.build(
            rows[batch], length, reg_param, yty if implicit else None
        )
    return A, b


def gram(factors: np.ndarray) -> np.ndarray:
    """``Y^T Y`` of float32 factors, accumulated in float64 (the implicit-feedback term)."""
    y = factors.astype(np.float64)
    return y.T @ y


def solve_cholesky(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact batched solve of symmetric positive definite systems, in float64.

    One compiled Cholesky factorization and two triangular solves per row
    (``cpu_solvers.cholesky_solve``): about 10x cheaper than a stacked ``np.linalg`` call, whose
    per-row LAPACK call overhead dominates at ranks up to ~100.

    Raises
    ------
    SingularMatrixError
        With Spark's message when a system is not positive definite (possible only when
        ``regParam`` is 0).
    """
    if len(b) == 0:
        return np.zeros(b.shape, np.float32)
    A = np.ascontiguousarray(A, np.float64)
    x = np.empty(b.shape)
    info = np.zeros(len(b), np.int64)
    cpu_solvers.cholesky_solve(A, np.ascontiguousarray(b, np.float64), x, info)
    failed = np.flatnonzero(info)
    if len(failed):
        raise SingularMatrixError.from_leading_minor(int(info[failed[0]]))
    return x.astype(np.float32)


def _fp16_scaled(A: np.ndarray):
    """Store ``A`` as float16 with a power-of-two scale per row so that no entry overflows.

    Returns ``(A16, scale)`` with ``A ~= A16 * scale[:, None, None]``; the largest entry lands in
    [2^13, 2^14): far from float16's 65504, keeping 11 significant bits.
    """
    return cpu_solvers.to_fp16(np.ascontiguousarray(A))


def _cg(stored, scale, A, b, x0, iterations, tolerance):
    """Jacobi-preconditioned CG on ``stored * scale`` (float32 or float16), float32 arithmetic."""
    diag = np.ascontiguousarray(np.einsum("bii->bi", A), np.float32)
    x = np.array(x0, np.float32, order="C", copy=True)
    cpu_solvers.cg(
        np.ascontiguousarray(stored), np.ascontiguousarray(scale, np.float32), diag,
        np.ascontiguousarray(b, np.float32), x, int(iterations), float(tolerance),
    )  # fmt: skip
    return x


def fp16_failures(A: np.ndarray, b: np.ndarray, x0: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Rows where FP16 storage broke CG: non-finite results, or worse than the starting point.

    FP16 keeps 11 significant bits; a matrix with a condition number near 1e3 or more (large
    rating scales, tiny regularization) can round to an indefinite one, and CG then diverges.
    """
    finite = np.isfinite(x).all(axis=1)
    worse = np.zeros(len(x), bool)
    A = np.ascontiguousarray(A)
    start = cpu_solvers.energy(A[finite], b[finite], x0[finite])
    worse[finite] = cpu_solvers.energy(A[finite], b[finite], x[finite]) > start + 1e-7 * np.abs(
        start
    )
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
    (so no entry overflows); vectors and arithmetic are float32 (also in ``A p``, as in the CUDA
    kernel). A row stops early once its residual falls below ``tolerance * ||b||``; every row
    does at most ``iterations`` steps. Rows that FP16 storage still breaks (``fp16_failures``)
    are solved again with FP32 storage, with a warning, so FP16 never yields inf/NaN or a worse
    solution than the starting point; ``update_block`` keeps rows that FP16 would round too
    coarsely in FP32 from the start (``precision.fp16_unsafe_rows``).
    """
    if len(b) == 0:
        return np.zeros(b.shape, np.float32)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}")
    if precision == "fp32":
        A32 = np.ascontiguousarray(A, np.float32)
        return _cg(A32, np.ones(len(A), np.float32), A, b, x0, iterations, tolerance)
    stored, scale = _fp16_scaled(A)
    x = _cg(stored, scale, A, b, x0, iterations, tolerance)
    failed = fp16_failures(A, b, x0, x)
    if failed.any():
        warn_fp32_fallback(int(failed.sum()), len(failed))
        A32 = np.ascontiguousarray(A[failed], np.float32)
        x[failed] = _cg(
            A32,
            np.ones(int(failed.sum()), np.float32),
            A[failed],
            b[failed],
            x0[failed],
            iterations,
            tolerance,
        )
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
    """New float32 factors of every row of one block.

    CG with FP32 (the default) runs matrix-free (``cpu_matrix_free``): each step multiplies by
    the row's normal equations through its ratings, never forming them. Cholesky, NNLS and FP16
    storage build the normal equations in batches under the memory budget and solve each batch.

    ``previous`` (float32, same shape as the result) warm-starts the CG solver; rows without a
    previous value start from zero. With ``precision="fp16"``, rows whose normal equations FP16
    would round too coarsely are solved with FP32 storage (``precision.fp16_unsafe_rows``).
    """
    n_rows = len(indptr) - 1
    rank = config.rank
    iterative = config.solver == "cg" and not config.nonnegative
    if iterative and config.precision == "fp32":
        return _update_matrix_free(indptr, indices, ratings, src_factors, previous, config, yty)
    if not iterative and not config.nonnegative and rank <= _ROW_BY_ROW_MAX_RANK:
        return _update_exact_row_by_row(indptr, indices, ratings, src_factors, config, yty)
    out = np.zeros((n_rows, rank), np.float32)
    precisions = np.full(n_rows, config.precision if iterative else "fp32", dtype=object)
    if iterative and config.precision == "fp16":
        unsafe = fp16_unsafe_rows(
            indptr, indices, ratings, src_factors, reg_param=config.reg_param,
            implicit=config.implicit, alpha=config.alpha, yty=yty,
        )  # fmt: skip
        if unsafe.any():
            warn_fp32_fallback(int(unsafe.sum()), n_rows)
            precisions[unsafe] = "fp32"
    dtype = np.float32 if iterative else np.float64
    gatherer = _Gatherer(
        indptr, indices, ratings, src_factors, implicit=config.implicit, alpha=config.alpha,
        dtype=dtype,
    )  # fmt: skip
    counts = np.diff(indptr)
    for precision in ("fp32", "fp16"):
        selected = np.flatnonzero(precisions == precision)
        batches = _bucket_rows(
            counts[selected], rank, config.memory_budget_bytes, np.dtype(dtype).itemsize
        )
        for batch, length in batches:
            rows = selected[batch]
            # Built and solved batch by batch: the matrices never exist for the whole block.
            started = time.perf_counter()
            A, b = gatherer.build(rows, length, config.reg_param, yty if config.implicit else None)
            built = time.perf_counter()
            out[rows] = _solve_batch(A, b, rows, previous, config, precision)
            _PHASE_SECONDS["hermitian"] += built - started
            _PHASE_SECONDS["solve"] += time.perf_counter() - built
    return out


# Up to this rank the exact solve builds each row's normal equations rating by rating
# (``cpu_solvers.exact_rows``): as fast as the padded, batched GEMMs on large blocks and several
# times faster on small ones, whose many short batches cost Python work each.
_ROW_BY_ROW_MAX_RANK = 32


def _update_exact_row_by_row(indptr, indices, ratings, src_factors, config, yty):
    """``update_block`` for the exact solve at small ranks (see ``_ROW_BY_ROW_MAX_RANK``)."""
    if config.implicit and yty is None:
        raise ValueError("implicit normal equations need the Gram matrix yty")
    started = time.perf_counter()
    n_rows = len(indptr) - 1
    x = np.empty((n_rows, config.rank), np.float32)
    info = np.zeros(n_rows, np.int64)
    cpu_solvers.exact_rows(
        np.ascontiguousarray(indptr, np.int64), np.ascontiguousarray(indices),
        np.ascontiguousarray(ratings, np.float32), np.ascontiguousarray(src_factors, np.float32),
        float(config.reg_param), bool(config.implicit), float(config.alpha),
        np.zeros((config.rank, config.rank)) if yty is None else np.asarray(yty, np.float64),
        x, info,
    )  # fmt: skip
    _PHASE_SECONDS["solve"] += time.perf_counter() - started
    failed = np.flatnonzero(info)
    if len(failed):
        raise SingularMatrixError.from_leading_minor(int(info[failed[0]]))
    return x


def _update_matrix_free(indptr, indices, ratings, src_factors, previous, config, yty):
    """``update_block`` for FP32 CG: steps on the normal equations without forming them."""
    started = time.perf_counter()
    n_rows = len(indptr) - 1
    if previous is None:
        x = np.zeros((n_rows, config.rank), np.float32)
    else:
        x = np.array(previous, np.float32, order="C", copy=True)
    # The kernel derives each rating's weights itself rather than reading three float64 arrays
    # per block per half-iteration (docs/benchmarks.md).
    cpu_matrix_free.solve_block(
        indptr, indices, ratings, src_factors, config.reg_param, config.alpha,
        yty if config.implicit else None, x, config.cg_iterations, config.cg_tolerance,
    )  # fmt: skip
    _PHASE_SECONDS["solve"] += time.perf_counter() - started
    return x


def _solve_batch(A, b, rows, previous, config: SolveConfig, precision: str) -> np.ndarray:
    if config.nonnegative:
        return solve_nnls(A, b)
    if config.solver != "cg":
        return solve_cholesky(A, b)
    start = (
        previous[rows] if previous is not None else np.zeros((len(rows), config.rank), np.float32)
    )
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
        m = scores.shape[1]  # the kk largest, without a negated copy of the scores
        cand = np.argpartition(scores, m - kk, axis=1)[:, m - kk :]
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
