"""PrunedMF's per-cell SGD update on the CPU, compiled with Numba.

One call runs the ratings of one DSGD cell (a user block x item block that no other task touches
in this sub-epoch) in the given order, updating the factor rows in place. It is LIBMF's L2 update
with row-wise AdaGrad (the base trainer of the DP-MF authors' code) plus DP-MF's dynamic pruning:

* ``d* =`` the first dimension ``d`` with ``|P[u, d]| < threshold_p`` or ``|Q[i, d]| < threshold_q``
  (``k`` when there is none; thresholds of 0 prune nothing because the test is strict);
* ``e = r - sum_{d < d*} P[u, d] Q[i, d]``;
* for ``d < d*`` only, from the old values: ``gp = -e Q[i, d] + reg P[u, d]``,
  ``gq = -e P[u, d] + reg Q[i, d]``, ``P[u, d] -= eta_u gp``, ``Q[i, d] -= eta_q gq``;
* AdaGrad (LIBMF, "twin learners" off): ``eta_u = step / sqrt(G_u)`` with ``G_u`` read before
  the update, then ``G_u += sum_{d < d*} gp^2 / k`` (all of ``k`` in the divisor, as the authors'
  code does); likewise ``G_i``. Plain SGD uses ``eta = step`` and leaves ``G`` alone.

The pruning test of the update loop reads each dimension before it is updated, so it stops at the
same ``d*`` as the dot product; ``d*`` is found once, and the two loops over ``[0, d*)`` have no
branch, which lets LLVM vectorize them.

``regrowth`` (off in DP-MF): the update also covers dimension ``d*`` itself (when ``d* < k``),
with the same error and the same formulas, so an entry that fell below its threshold keeps
learning and can grow back above it; the next rating of that row then reads one dimension more.
Under DP-MF's rule an entry below the threshold is frozen for good, and so is everything after
it in that row: a row's dot products can only get shorter.

Executed multiply-adds are counted like the authors' ``n_ele_mul``: ``d*`` per rating for the dot
product (the update's work is proportional to the same ``d*``, or ``d* + 1`` with ``regrowth``),
against ``k`` per rating unpruned.

Arithmetic: scalars and accumulators are float64 and results are rounded once when stored, so on
float32 factors this is float32 storage with float64 arithmetic, and on float64 factors it is
exactly the float64 reference. Scalar float64 costs the CPU no more than float32 here.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from spark_gpu_mf.backends.numba_cache import ensure_cache_dir

ensure_cache_dir()

__all__ = ["ADAGRAD", "OPTIMIZERS", "SGD", "sgd_cell"]

SGD = 0
ADAGRAD = 1
OPTIMIZERS = {"adagrad": ADAGRAD, "sgd": SGD}


@njit(cache=True, nogil=True)
def sgd_cell(
    users: np.ndarray,
    items: np.ndarray,
    ratings: np.ndarray,
    P: np.ndarray,
    Q: np.ndarray,
    GP: np.ndarray,
    GQ: np.ndarray,
    step: float,
    reg: float,
    threshold_p: float,
    threshold_q: float,
    optimizer: int,
    regrowth: bool = False,
) -> tuple[float, int]:
    """Run the ratings of one cell in order; update ``P``, ``Q``, ``GP``, ``GQ`` in place.

    Parameters
    ----------
    users, items : int32 arrays (n,)
        Row of each rating in ``P`` / ``Q`` (block-local).
    ratings : float32 array (n,)
        Ratings in training scale.
    P, Q : float arrays (rows, k), C-contiguous
        Factor blocks of the cell's user and item blocks.
    GP, GQ : float arrays (rows,)
        Row-wise AdaGrad accumulators (start at 1); untouched by plain SGD.
    step, reg : float
        Learning rate and L2 weight (in training scale).
    threshold_p, threshold_q : float
        Pruning thresholds; 0 disables pruning.
    optimizer : int
        ``ADAGRAD`` or ``SGD``.
    regrowth : bool
        Also update the first insignificant dimension ``d*`` (see the module docstring).

    Returns
    -------
    (float, int)
        Sum of squared errors of the ratings' (pruned) predictions before their update, and the
        number of executed multiply-adds of the dot products.
    """
    k = P.shape[1]
    inv_k = 1.0 / k
    prune = threshold_p > 0.0 or threshold_q > 0.0
    adagrad = optimizer == ADAGRAD
    sse = 0.0
    macs = 0
    for n in range(ratings.shape[0]):
        u = users[n]
        i = items[n]
        p = P[u]
        q = Q[i]
        stop = k
        if prune:
            for d in range(k):
                if abs(p[d]) < threshold_p or abs(q[d]) < threshold_q:
                    stop = d
                    break
        dot = 0.0
        for d in range(stop):
            dot += float(p[d]) * float(q[d])
        error = float(ratings[n]) - dot
        sse += error * error
        macs += stop
        if adagrad:
            eta_p = step / math.sqrt(GP[u])
            eta_q = step / math.sqrt(GQ[i])
        else:
            eta_p = step
            eta_q = step
        updated = stop + 1 if regrowth and stop < k else stop
        gp_squares = 0.0
        gq_squares = 0.0
        for d in range(updated):
            old_p = float(p[d])
            old_q = float(q[d])
            gp = -error * old_q + reg * old_p
            gq = -error * old_p + reg * old_q
            gp_squares += gp * gp
            gq_squares += gq * gq
            p[d] = old_p - eta_p * gp
            q[d] = old_q - eta_q * gq
        if adagrad:
            GP[u] = GP[u] + gp_squares * inv_k
            GQ[i] = GQ[i] + gq_squares * inv_k
    return sse, macs
