"""Spark's nonnegative least-squares solver (``mllib.optimization.NNLS``), compiled with Numba.

A modified projected-gradient method with conjugate-gradient directions (Polyak); it matches
Spark's iteration, step and stopping rules so that ``nonnegative=True`` behaves as in Spark.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from spark_gpu_mf.backends.numba_cache import ensure_cache_dir

ensure_cache_dir()


@njit(cache=True)
def _steplen(ata, direction, res, scratch):
    n = len(res)
    top = 0.0
    for i in range(n):
        top += direction[i] * res[i]
    bottom = 0.0
    for i in range(n):
        s = 0.0
        for j in range(n):
            s += ata[i, j] * direction[j]
        scratch[i] = s
        bottom += s * direction[i]
    return top / (bottom + 1e-20)


@njit(cache=True)
def _stop(step, ndir, nx):
    return np.isnan(step) or step < 1e-7 or step > 1e40 or ndir < 1e-12 * nx or ndir < 1e-32


@njit(cache=True)
def nnls_solve(ata, atb):
    """Minimize ``x^T ata x / 2 - x^T atb`` subject to ``x >= 0`` (float64)."""
    n = len(atb)
    scratch = np.zeros(n)
    grad = np.zeros(n)
    x = np.zeros(n)
    direction = np.zeros(n)
    last_dir = np.zeros(n)
    res = np.zeros(n)
    iter_max = max(400, 20 * n)
    last_norm = 0.0
    iterno = 0
    last_wall = 0
    while iterno < iter_max:
        for i in range(n):
            s = 0.0
            for j in range(n):
                s += ata[i, j] * x[j]
            res[i] = s - atb[i]
            grad[i] = res[i]
        for i in range(n):
            if grad[i] > 0.0 and x[i] == 0.0:
                grad[i] = 0.0
        ngrad = 0.0
        for i in range(n):
            ngrad += grad[i] * grad[i]
        for i in range(n):
            direction[i] = grad[i]
        step = _steplen(ata, grad, res, scratch)
        ndir = 0.0
        nx = 0.0
        for i in range(n):
            nx += x[i] * x[i]
        if iterno > last_wall + 1:
            alpha = ngrad / last_norm
            for i in range(n):
                direction[i] += alpha * last_dir[i]
            dstep = _steplen(ata, direction, res, scratch)
            ndir = 0.0
            for i in range(n):
                ndir += direction[i] * direction[i]
            if _stop(dstep, ndir, nx):
                for i in range(n):
                    direction[i] = grad[i]
                ndir = 0.0
                for i in range(n):
                    ndir += direction[i] * direction[i]
            else:
                step = dstep
        else:
            for i in range(n):
                ndir += direction[i] * direction[i]
        if _stop(step, ndir, nx):
            return x
        for i in range(n):
            if step * direction[i] > x[i]:
                step = x[i] / direction[i]
        for i in range(n):
            if step * direction[i] > x[i] * (1 - 1e-14):
                x[i] = 0.0
                last_wall = iterno
            else:
                x[i] -= step * direction[i]
        iterno += 1
        for i in range(n):
            last_dir[i] = direction[i]
        last_norm = ngrad
    return x


@njit(cache=True)
def nnls_batch(A, b):
    """``nnls_solve`` for each row of a batch: ``A`` (n, k, k), ``b`` (n, k), float64."""
    out = np.empty(b.shape)
    for row in range(len(b)):
        out[row] = nnls_solve(A[row], b[row])
    return out
