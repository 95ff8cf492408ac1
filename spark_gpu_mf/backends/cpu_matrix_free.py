"""Matrix-free conjugate gradient: the NumPy backend's default CPU solve (``cg``, FP32).

Why not build ``A_u`` first: forming the normal equations costs ``n_u k^2`` multiply-adds per
row (a 64 x n_u x 64 GEMM), and CG then reads ``A_u`` a handful of times. CG only needs products
``A_u v``, and

    A_u v = sum_i c_i (q_i . v) q_i + lambda n_u v  (+ Y^T Y v, implicit)

costs ``2 n_u k`` multiply-adds (a dot product and an ``axpy`` per rating). With the default five
warm-started steps that is six products, ``12 n_u k``: about 5x fewer operations than building
``A_u`` at rank 64, and everything a row touches (its gathered factors, ``n_u x k`` floats) stays
in the L1/L2 cache across the steps. This is how single-machine CPU libraries (``implicit``'s
conjugate-gradient ALS) avoid the ``k^2`` term; the GPU backend keeps the cuMF design (build
``A_u`` with the ``hermitian`` kernel, solve in FP16 storage), where the arithmetic is cheap and
the batched, regular work is what counts.

The steps are those of ``cpu_solvers.cg`` on the built matrix (Jacobi preconditioner, warm
start, per-row stop at ``||r|| <= tol ||b||``, float32 vectors), so the two agree to float32
rounding. ``b``, the diagonal and ``A_u v`` sum each chunk of 128 ratings in float32 and the
chunks in float64, the "compensated float32" of the built matrices (float64 per rating made the
gather 20% slower). Each row is computed on its own, so its result does not depend on which rows
share a call.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from spark_gpu_mf.backends.numba_cache import ensure_cache_dir
from spark_gpu_mf.backends.numba_intrinsics import prefetch

ensure_cache_dir()

__all__ = ["CHUNK", "solve_block"]

CHUNK = 128
# Ratings ahead whose source row is prefetched: 18 MB of source factors (10M ratings) made the
# gather cost as much as five CG steps without it.
_AHEAD = 32


@njit(cache=True, nogil=True, fastmath={"contract", "reassoc"})
def _dot(Y, i, v):
    s = np.float32(0.0)
    for c in range(v.shape[0]):
        s += Y[i, c] * v[c]
    return s


@njit(cache=True, nogil=True, fastmath={"contract"})
def _product(Y, w, n, v, reg, yty, implicit, part, out):
    """``out = sum_i w_i (Y_i . v) Y_i + reg v (+ yty v)`` over the row's ``n`` ratings."""
    k = v.shape[0]
    for c in range(k):
        out[c] = reg * v[c]
    if implicit:
        for j in range(k):
            vj = v[j]
            for c in range(k):
                out[c] += np.float32(yty[j, c]) * vj
    for lo in range(0, n, CHUNK):
        part[:] = 0.0
        hi = min(lo + CHUNK, n)
        i = lo
        # Four ratings at a time: four independent dot products in flight, and one pass over
        # ``part`` per four ratings.
        while i + 4 <= hi:
            t0 = w[i] * _dot(Y, i, v)
            t1 = w[i + 1] * _dot(Y, i + 1, v)
            t2 = w[i + 2] * _dot(Y, i + 2, v)
            t3 = w[i + 3] * _dot(Y, i + 3, v)
            for c in range(k):
                part[c] += (t0 * Y[i, c] + t1 * Y[i + 1, c]) + (t2 * Y[i + 2, c] + t3 * Y[i + 3, c])
            i += 4
        while i < hi:
            t = w[i] * _dot(Y, i, v)
            for c in range(k):
                part[c] += t * Y[i, c]
            i += 1
        for c in range(k):
            out[c] += part[c]


@njit(cache=True, nogil=True, fastmath={"contract"})
def _solve_block(
    indptr, indices, ratings, src, reg_param, alpha, yty, implicit, x, iterations, tolerance
):
    n_rows = len(indptr) - 1
    nnz = len(indices)
    k = src.shape[1]
    longest = 0
    for row in range(n_rows):
        longest = max(longest, indptr[row + 1] - indptr[row])
    Y = np.empty((max(longest, 1), k), np.float32)
    w = np.empty(max(longest, 1), np.float32)
    b64 = np.empty(k)
    d64 = np.empty(k)
    b = np.empty(k, np.float32)
    inv = np.empty(k, np.float32)
    r = np.empty(k, np.float32)
    z = np.empty(k, np.float32)
    p = np.empty(k, np.float32)
    ap = np.empty(k, np.float32)
    part = np.empty(k, np.float32)
    bpart = np.empty(k, np.float32)
    dpart = np.empty(k, np.float32)
    tol2 = np.float32(tolerance) * np.float32(tolerance)
    for row in range(n_rows):
        start = indptr[row]
        n = indptr[row + 1] - start
        b64[:] = 0.0
        d64[:] = 0.0
        n_reg = 0.0
        for lo in range(0, n, CHUNK):
            hi = min(lo + CHUNK, n)
            bpart[:] = 0.0
            dpart[:] = 0.0
            for i in range(lo, hi):
                pos = start + i
                if pos + _AHEAD < nnz:  # source rows are random reads from a matrix beyond L2
                    ahead = indices[pos + _AHEAD]
                    for c in range(0, k, 16):
                        prefetch(src, ahead, c)
                y = src[indices[pos]]
                # Spark's weights: explicit (1, r, 1); implicit (c1, 1 + c1 or 0, 1 or 0) with
                # c1 = alpha |r|, for r > 0 or not. float64, as Spark, then rounded once.
                rating = np.float64(ratings[pos])
                if implicit:
                    c1 = alpha * abs(rating)
                    wa = np.float32(c1)
                    wb = np.float32(1.0 + c1) if rating > 0 else np.float32(0.0)
                    n_reg += 1.0 if rating > 0 else 0.0
                else:
                    wa = np.float32(1.0)
                    wb = np.float32(rating)
                    n_reg += 1.0
                w[i] = wa
                for c in range(k):
                    yc = y[c]
                    Y[i, c] = yc
                    bpart[c] += wb * yc
                    dpart[c] += wa * yc * yc
            for c in range(k):
                b64[c] += bpart[c]
                d64[c] += dpart[c]
        reg = reg_param * n_reg
        bb = np.float32(0.0)
        for c in range(k):
            d = d64[c] + reg + (yty[c, c] if implicit else 0.0)
            inv[c] = np.float32(1.0 / d) if d != 0.0 else np.float32(0.0)
            b[c] = np.float32(b64[c])
            bb += b[c] * b[c]
        reg32 = np.float32(reg)
        xr = x[row]
        _product(Y, w, n, xr, reg32, yty, implicit, part, ap)
        rz = np.float32(0.0)
        for c in range(k):
            r[c] = b[c] - ap[c]
            z[c] = inv[c] * r[c]
            p[c] = z[c]
            rz += r[c] * z[c]
        limit = tol2 * bb
        for _ in range(iterations):
            rr = np.float32(0.0)
            for c in range(k):
                rr += r[c] * r[c]
            if not rr > limit:
                break
            _product(Y, w, n, p, reg32, yty, implicit, part, ap)
            pap = np.float32(0.0)
            for c in range(k):
                pap += p[c] * ap[c]
            if not pap > 0:
                break
            step = rz / pap
            rz_new = np.float32(0.0)
            for c in range(k):
                xr[c] += step * p[c]
                r[c] -= step * ap[c]
                z[c] = inv[c] * r[c]
                rz_new += r[c] * z[c]
            beta = rz_new / rz if rz > 0 else np.float32(0.0)
            for c in range(k):
                p[c] = z[c] + beta * p[c]
            rz = rz_new


def solve_block(
    indptr, indices, ratings, src, reg_param, alpha, yty, x, iterations, tolerance
) -> None:
    """CG steps on every row's normal equations without forming them, in place on ``x``.

    Parameters
    ----------
    indptr, indices, ratings : the block's CSR; ``indices`` are rows of ``src``.
    src : float32 (n_src, k), C-contiguous
    alpha : float
        Implicit mode's confidence scale (``c1 = alpha |r|``).
    yty : float64 (k, k) or None
        Added to every ``A``; given means implicit mode.
    x : float32 (n_rows, k), C-contiguous
        The warm start on entry, the solution on exit.
    """
    if len(indptr) <= 1:
        return
    implicit = yty is not None
    _solve_block(
        np.ascontiguousarray(indptr, np.int64), np.ascontiguousarray(indices),
        np.ascontiguousarray(ratings, np.float32), np.ascontiguousarray(src, np.float32),
        float(reg_param), float(alpha),
        np.ascontiguousarray(yty, np.float64) if implicit else np.zeros((1, 1)), implicit,
        x, int(iterations), float(tolerance),
    )  # fmt: skip
