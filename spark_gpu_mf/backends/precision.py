"""When FP16 storage of the normal equations is safe, decided before they are built.

FP16 keeps 11 significant bits. With the per-row power-of-two scale (largest entry in
[2^13, 2^14)) no entry overflows, but each entry may move by up to 2^-12 of the row's largest
entry, so the stored matrix can differ from ``A`` by up to ``rank * 2^-12 * max|A|`` in norm.
``A``'s smallest eigenvalue is at least the regularization ``lambda * n`` (``Y^T Y`` and the rating
terms are positive semidefinite). When that floor is not above the rounding bound (a large rating
scale, a tiny ``regParam``) the FP16 matrix may not even be positive definite and CG on it can
diverge; those rows are stored in FP32 instead. Both backends use this rule, so they agree.

``max|A|`` of a positive semidefinite matrix is its largest diagonal entry, which costs one sparse
product with the squared factors instead of the whole matrix.
"""

from __future__ import annotations

import warnings

import numpy as np

from spark_gpu_mf.backends import cpu_gather

FP16_ROUNDING = 2.0**-12

_warned = False


def row_regularization(
    indptr: np.ndarray, ratings: np.ndarray, reg_param: float, implicit: bool
) -> np.ndarray:
    """``lambda * n`` per row: ``n`` counts the ratings (implicit: the positive ratings)."""
    counted = (ratings > 0) if implicit else np.ones(len(ratings), bool)
    per_row = np.add.reduceat(counted.astype(np.float64), indptr[:-1]) if len(ratings) else None
    counts = np.diff(indptr)
    if per_row is None:
        return np.zeros(len(counts))
    return reg_param * np.where(counts > 0, per_row, 0.0)


def largest_diagonal(
    indptr, indices, ratings, src_factors, *, implicit: bool, alpha: float, yty, reg
) -> np.ndarray:
    """The largest diagonal entry of each row's ``A`` (its largest entry), in float64."""
    weights = alpha * np.abs(ratings.astype(np.float64)) if implicit else np.ones(len(ratings))
    sums = cpu_gather.diagonals(indptr, indices, weights, src_factors)
    if implicit:
        sums += np.diag(yty)[None, :]
    return sums.max(axis=1) + reg


def fp16_unsafe_rows(
    indptr, indices, ratings, src_factors, *, reg_param, implicit, alpha, yty=None
) -> np.ndarray:
    """Rows whose normal equations FP16 storage could make indefinite (see module docstring)."""
    reg = row_regularization(indptr, ratings, reg_param, implicit)
    peak = largest_diagonal(
        indptr, indices, ratings, src_factors, implicit=implicit, alpha=alpha, yty=yty, reg=reg
    )
    rank = src_factors.shape[1]
    return reg <= rank * FP16_ROUNDING * peak


def warn_fp32_fallback(count: int, total: int) -> None:
    """One warning per process that some rows were kept in FP32."""
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"precision='fp16' would round the normal equations of {count} of {total} rows too "
        "coarsely (ill-conditioned: large rating scale or small regParam); they are stored in "
        "fp32 instead. Consider precision='fp32' or a larger regParam.",
        RuntimeWarning,
        stacklevel=3,
    )
