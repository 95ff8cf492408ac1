"""Training residuals: the sum of squared errors of a block's ratings under given factors.

One pass over the ratings, a rank-long dot product each, compiled and free of ``nnz x rank``
temporaries (at 10M ratings and rank 64 those would be 2.5 GB), so the training RMSE costs
about one CG step of a half-iteration.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from spark_gpu_mf.backends.numba_cache import ensure_cache_dir

ensure_cache_dir()

__all__ = ["squared_error"]


# Reassociating the rank-long float64 dot lets LLVM vectorize it instead of waiting on each add
# (docs/benchmarks.md); the sum stays float64 and only its last bits can move.
@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _squared_error(indptr, indices, ratings, own, source):
    total = 0.0
    k = own.shape[1]
    for row in range(indptr.shape[0] - 1):
        for j in range(indptr[row], indptr[row + 1]):
            col = indices[j]
            dot = 0.0
            for c in range(k):
                dot += np.float64(own[row, c]) * np.float64(source[col, c])
            err = np.float64(ratings[j]) - dot
            total += err * err
    return total


def squared_error(indptr, indices, ratings, own, source) -> float:
    """``sum_j (ratings[j] - own[row(j)] . source[indices[j]])^2`` in float64, where ``row(j)``
    is the CSR row of rating ``j``."""
    if len(ratings) == 0:
        return 0.0
    return float(
        _squared_error(
            np.asarray(indptr, np.int64),
            np.asarray(indices, np.int32),
            np.asarray(ratings, np.float32),
            np.ascontiguousarray(own, np.float32),
            np.ascontiguousarray(source, np.float32),
        )
    )
