"""Compiled (Numba) per-row solvers of the NumPy backend: batched Cholesky and batched CG.

Why compiled loops and not NumPy: a batch of rank-64 systems solved with NumPy's stacked
``np.linalg`` calls or ``matmul`` costs one LAPACK/BLAS call per row and per step (about 28 us
for one ``np.linalg.solve``, 1-2 us per stacked matrix-vector product), while the arithmetic of
one 64x64 Cholesky is ~90 kFLOP and of one CG step ~8 kFLOP: call overhead dominated. Here each
row is one pass of plain loops over a matrix that stays in the L1/L2 cache, and every inner loop
is a contiguous ``axpy`` or dot product that LLVM vectorizes.

* ``exact_rows``: Spark's per-row exact solve from the ratings themselves (normal equations
  built row by row in float64, then the same Cholesky): the CPU path of small ranks.
* ``cholesky_solve``: float64 Cholesky ``A = U^T U`` (right-looking, row-major upper factor, so
  the trailing update is a contiguous ``axpy`` per row) and the two triangular solves. Returns
  LAPACK's ``info`` per row (0, or the order of the first leading minor that is not positive
  definite), so callers can raise Spark's message.
* ``cg``: Jacobi-preconditioned conjugate gradient, warm-started, at most ``iterations`` steps and
  a per-row stop at ``||r|| <= tol ||b||``, float32 vectors and arithmetic, the matrix read as
  float32 or as float16 bits (``uint16``) times a per-row scale; the same steps as the CUDA kernel
  (``kernels/cg_solver.cu``), including a float32 vector in ``A p``.
* ``to_fp16``: per-row power-of-two scale and float16 bits of a batch of matrices in one pass
  (NumPy's ``astype(float16)`` is a slow scalar loop).
* ``energy``: ``x^T A x / 2 - b^T x`` per row in float64, to check that FP16 storage did not make
  CG worse than its start.

The matrix-vector product ``A p`` is computed as ``sum_j p_j A[j, :]`` (``A`` is symmetric):
row-wise ``axpy``s that vectorize without reassociating sums, so results do not depend on how
LLVM vectorizes.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.extending import overload

from spark_gpu_mf.backends.numba_cache import ensure_cache_dir
from spark_gpu_mf.backends.numba_intrinsics import float_to_half, half_to_float

ensure_cache_dir()

__all__ = ["cg", "cholesky_solve", "energy", "exact_rows", "to_fp16"]


@njit(cache=True, nogil=True)
def _factor_and_solve(U, rhs, z, x):
    """Factor ``U`` (its upper triangle holds A) in place as ``A = U^T U`` and solve ``A x = rhs``.

    Returns LAPACK's ``info``: 0, or the order of the first leading minor that is not positive
    definite (then ``x = 0``).
    """
    k = rhs.shape[0]
    for j in range(k):
        pivot = U[j, j]
        if not pivot > 0.0:
            x[:] = 0.0
            return j + 1
        d = math.sqrt(pivot)
        inv = 1.0 / d
        U[j, j] = d
        for c in range(j + 1, k):
            U[j, c] *= inv
        for i in range(j + 1, k):
            f = U[j, i]
            for c in range(i, k):
                U[i, c] -= f * U[j, c]
    # U^T z = rhs, column by column of U^T (rows of U).
    for i in range(k):
        z[i] = rhs[i]
    for p in range(k):
        z[p] /= U[p, p]
        zp = z[p]
        for i in range(p + 1, k):
            z[i] -= zp * U[p, i]
    # U x = z, from the last row up.
    for i in range(k - 1, -1, -1):
        s = z[i]
        for c in range(i + 1, k):
            s -= U[i, c] * x[c]
        x[i] = s / U[i, i]
    return 0


@njit(cache=True, nogil=True)
def cholesky_solve(A, b, x, info):
    """Solve ``A[n] x[n] = b[n]`` (float64, symmetric positive definite) for every ``n``.

    ``A`` is read only (a (k, k) scratch copy is factored); ``x`` (float64) receives the
    solutions, ``info`` (int64) LAPACK's status per row; a row that fails keeps ``x = 0``.
    """
    n, k = b.shape
    U = np.empty((k, k))
    z = np.empty(k)
    for row in range(n):
        U[:, :] = A[row]
        info[row] = _factor_and_solve(U, b[row], z, x[row])


@njit(cache=True, nogil=True)
def exact_rows(indptr, indices, ratings, src, reg_param, implicit, alpha, yty, x, info):
    """Spark's exact solve of every CSR row, normal equations built and factored row by row.

    Per row, as Spark's ``NormalEquation.add`` and ``CholeskySolver``: float64 sums, rating by
    rating, of ``c q q^T`` into the upper triangle and of ``b q`` (explicit: ``c = 1``,
    ``b = r``; implicit: ``c = alpha |r|``, ``b = 1 + c`` for ``r > 0`` else 0, plus ``yty``),
    ``reg_param`` times the row's (positive) rating count on the diagonal, then a Cholesky
    solve. No padding, batching or gathered copies: at small ranks those cost more than the
    ``k^2 / 2`` multiply-adds per rating. ``x`` (float32) and ``info`` as ``cholesky_solve``.
    """
    n = indptr.shape[0] - 1
    k = src.shape[1]
    U = np.empty((k, k))
    q = np.empty(k)
    rhs = np.empty(k)
    z = np.empty(k)
    solution = np.empty(k)
    for row in range(n):
        if implicit:
            U[:, :] = yty
        else:
            U[:, :] = 0.0
        rhs[:] = 0.0
        count = 0.0
        for j in range(indptr[row], indptr[row + 1]):
            r = np.float64(ratings[j])
            if implicit:
                a_weight = alpha * abs(r)
                b_weight = 1.0 + a_weight if r > 0.0 else 0.0
                if r > 0.0:
                    count += 1.0
            else:
                a_weight = 1.0
                b_weight = r
                count += 1.0
            source = indices[j]
            for c in range(k):
                q[c] = np.float64(src[source, c])
            # The whole square, not the triangle: fixed-length rows vectorize, twice as fast.
            for p in range(k):
                f = a_weight * q[p]
                for c in range(k):
                    U[p, c] += f * q[c]
                rhs[p] += b_weight * q[p]
        reg = reg_param * count
        for p in range(k):
            U[p, p] += reg
        info[row] = _factor_and_solve(U, rhs, z, solution)
        for c in range(k):
            x[row, c] = np.float32(solution[c])


def _entry(A, row, j, i):
    """``A[row, j, i]`` as float32; float16 bits (uint16) are converted (compiled only)."""


@overload(_entry, inline="always")
def _entry_impl(A, row, j, i):
    if A.dtype == types.uint16:
        return lambda A, row, j, i: half_to_float(A[row, j, i])
    return lambda A, row, j, i: A[row, j, i]


@njit(cache=True, nogil=True)
def _matvec(A, row, scale, v, out):
    k = v.shape[0]
    out[:] = 0.0
    for j in range(k):
        f = v[j]
        for i in range(k):
            out[i] += f * _entry(A, row, j, i)
    if scale != 1.0:
        for i in range(k):
            out[i] *= scale


@njit(cache=True, nogil=True)
def _cg(A, scale, diag, b, x, iterations, tolerance):
    """CG on every row of ``A`` (float32, or float16 bits as uint16) in place on ``x``."""
    n, k = b.shape
    r = np.empty(k, np.float32)
    z = np.empty(k, np.float32)
    p = np.empty(k, np.float32)
    ap = np.empty(k, np.float32)
    inv = np.empty(k, np.float32)
    tol2 = np.float32(tolerance) * np.float32(tolerance)
    for row in range(n):
        s = scale[row]
        for i in range(k):
            d = diag[row, i]
            inv[i] = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        _matvec(A, row, s, x[row], ap)
        rz = np.float32(0.0)
        bb = np.float32(0.0)
        for i in range(k):
            r[i] = b[row, i] - ap[i]
            z[i] = inv[i] * r[i]
            p[i] = z[i]
            rz += r[i] * z[i]
            bb += b[row, i] * b[row, i]
        limit = tol2 * bb
        for _ in range(iterations):
            rr = np.float32(0.0)
            for i in range(k):
                rr += r[i] * r[i]
            if not rr > limit:
                break
            _matvec(A, row, s, p, ap)
            pap = np.float32(0.0)
            for i in range(k):
                pap += p[i] * ap[i]
            if not pap > 0:
                break
            step = rz / pap
            rz_new = np.float32(0.0)
            for i in range(k):
                x[row, i] += step * p[i]
                r[i] -= step * ap[i]
                z[i] = inv[i] * r[i]
                rz_new += r[i] * z[i]
            beta = rz_new / rz if rz > 0 else np.float32(0.0)
            for i in range(k):
                p[i] = z[i] + beta * p[i]
            rz = rz_new


def cg(stored, scale, diag, b, x, iterations: int, tolerance: float) -> None:
    """Batched CG in place on float32 ``x`` (see module docstring).

    ``stored``: float32 or float16 ``(n, k, k)``; ``scale``: float32 ``(n,)`` (the matrix is
    ``stored * scale``); ``diag``: float32 ``(n, k)``, the diagonal of the true matrix (the
    Jacobi preconditioner); ``b``: float32 ``(n, k)``.
    """
    if len(b) == 0:
        return
    matrix = stored.view(np.uint16) if stored.dtype == np.float16 else stored
    _cg(matrix, scale, diag, b, x, iterations, tolerance)


@njit(cache=True, nogil=True)
def _to_fp16(A, bits, scale):
    n, k, _ = A.shape
    for row in range(n):
        peak = 0.0
        for i in range(k):
            for j in range(k):
                peak = max(peak, abs(A[row, i, j]))
        if not peak > 0:
            peak = 1.0
        # Largest entry lands in [2^13, 2^14): far from float16's 65504, keeps 11 bits.
        s = 2.0 ** (math.floor(math.log2(peak)) - 13.0)
        scale[row] = s
        inv = 1.0 / s
        for i in range(k):
            for j in range(k):
                bits[row, i, j] = float_to_half(np.float32(A[row, i, j] * inv))


def to_fp16(A: np.ndarray):
    """``(A16, scale)``: float16 matrices and float32 power-of-two scales, ``A ~= A16 * scale``."""
    bits = np.empty(A.shape, np.uint16)
    scale = np.empty(len(A), np.float64)
    if len(A):
        _to_fp16(A, bits, scale)
    return bits.view(np.float16), scale.astype(np.float32)


@njit(cache=True, nogil=True)
def _energy(A, b, x, out):
    n, k = b.shape
    ax = np.empty(k)
    for row in range(n):
        ax[:] = 0.0
        for j in range(k):
            f = np.float64(x[row, j])
            for i in range(k):
                ax[i] += f * A[row, j, i]
        e = 0.0
        for i in range(k):
            xi = np.float64(x[row, i])
            e += 0.5 * xi * ax[i] - b[row, i] * xi
        out[row] = e


def energy(A: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``x^T A x / 2 - b^T x`` per row, in float64 (what CG decreases at every step)."""
    out = np.empty(len(b))
    if len(b):
        _energy(A, np.ascontiguousarray(b, np.float64), np.ascontiguousarray(x), out)
    return out
