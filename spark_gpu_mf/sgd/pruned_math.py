"""DP-MF's pruning decisions as pure functions over factor matrices (arXiv 2404.04265).

After ``pruneStartEpoch`` epochs, PrunedMF decides once, for the rest of the fit:

1. a threshold per factor matrix: fit a normal ``N(mu, sigma)`` to all entries of the matrix and
   take the ``t >= 0`` whose band ``[-t, t]`` holds ``pruningRate`` of the fitted mass,
   ``Phi((t - mu) / sigma) - Phi((-t - mu) / sigma) = pruningRate``;
2. an order of the latent dimensions: the sparsity of column ``j`` is the fraction of its entries
   with ``|x| < t``, the joint sparsity is ``sp_j * sq_j``, and the columns of P and Q are permuted
   together by ascending joint sparsity, so the densest dimensions come first. Dot products are
   unchanged by a common permutation; what changes is where the per-rating loop, which stops at
   the first dimension where either factor is below its threshold, stops: with the dense
   dimensions leading it skips only the tail that is mostly insignificant anyway (the authors'
   ``mf_sort`` picks ``min_element`` first).

The direction follows the authors' code (shared/reference/papers.md, B.3); SPEC.md section 6's
"densest dims last" contradicts it and would make almost every rating stop at dimension 0.

The statistics are sums that can be computed block by block on executors and added on the driver
(``moment_sums``, ``below_threshold_counts``), or over whole matrices (``plan_pruning``). Only rows
that have ratings exist in the factor blocks, which is the authors' "rated rows" rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "PruningPlan",
    "band_mass",
    "below_threshold_counts",
    "fit_normal",
    "joint_sparsity_order",
    "moment_sums",
    "permute_columns",
    "plan_pruning",
    "threshold_for_rate",
    "truncate_rows",
]

_SQRT2 = math.sqrt(2.0)


def moment_sums(matrix: np.ndarray) -> np.ndarray:
    """``[count, sum, sum of squares]`` of all entries, float64, to be added across blocks."""
    values = np.asarray(matrix, dtype=np.float64).reshape(-1)
    return np.array([values.size, values.sum(), np.dot(values, values)], dtype=np.float64)


def fit_normal(sums: np.ndarray) -> tuple[float, float]:
    """Maximum-likelihood ``(mu, sigma)`` of the entries summarized by ``moment_sums``."""
    count, total, squares = (float(v) for v in sums)
    if count <= 0:
        raise ValueError("cannot fit a normal distribution to an empty factor matrix")
    mu = total / count
    variance = max(squares / count - mu * mu, 0.0)  # rounding can make it a hair negative
    return mu, math.sqrt(variance)


def band_mass(t: float, mu: float, sigma: float) -> float:
    """Mass of ``N(mu, sigma)`` inside ``[-t, t]``: ``Phi((t-mu)/sigma) - Phi((-t-mu)/sigma)``.

    Written as ``(erf((t-mu)/(sigma sqrt2)) + erf((t+mu)/(sigma sqrt2))) / 2``, which does not lose
    precision to cancellation when both CDF values are close to 1. ``sigma == 0`` is the point mass
    at ``mu``: the open band ``|x| < t`` holds it iff ``|mu| < t``.
    """
    if t <= 0.0:
        return 0.0
    if sigma == 0.0:
        return 1.0 if abs(mu) < t else 0.0
    scale = sigma * _SQRT2
    return 0.5 * (math.erf((t - mu) / scale) + math.erf((t + mu) / scale))


def threshold_for_rate(rate: float, mu: float, sigma: float) -> float:
    """The ``t >= 0`` with ``band_mass(t, mu, sigma) == rate``, by bisection.

    ``rate == 0`` gives ``t == 0``, and since the pruning test is ``|x| < t`` nothing is ever
    pruned.
    The mass grows monotonically from 0 at ``t = 0`` to 1, so bisection on ``[0, |mu| + 40 sigma]``
    converges; it runs until the interval stops shrinking in float64 (about 60 halvings).
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"pruning rate must be in [0, 1), got {rate}")
    if rate == 0.0:
        return 0.0
    if sigma == 0.0:  # every entry is mu: the smallest t whose open band contains it
        return float(np.nextafter(abs(mu), np.inf))
    lo, hi = 0.0, abs(mu) + 40.0 * sigma
    while True:
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            return hi
        if band_mass(mid, mu, sigma) < rate:
            lo = mid
        else:
            hi = mid


def below_threshold_counts(matrix: np.ndarray, threshold: float) -> np.ndarray:
    """Per column, how many entries have ``|x| < threshold`` (int64, to be added across blocks)."""
    return np.count_nonzero(np.abs(np.asarray(matrix)) < threshold, axis=0).astype(np.int64)


def joint_sparsity_order(
    p_counts: np.ndarray, p_rows: int, q_counts: np.ndarray, q_rows: int
) -> np.ndarray:
    """Column order by ascending joint sparsity ``sp_j * sq_j`` (densest first), ties by index.

    ``p_counts[j]`` of ``p_rows`` rows of P are below P's threshold in column ``j``; likewise Q. A
    stable sort keeps the identity order when nothing is pruned (all joint sparsities 0), which is
    why ``pruningRate = 0`` leaves the factors untouched.
    """
    sp = np.asarray(p_counts, np.float64) / max(int(p_rows), 1)
    sq = np.asarray(q_counts, np.float64) / max(int(q_rows), 1)
    return np.argsort(sp * sq, kind="stable").astype(np.int64)


def permute_columns(matrix: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``matrix[:, order]`` as a new C-contiguous array of the same dtype.

    Applied to P, Q and to every per-dimension optimizer state with the same ``order``. The
    row-wise AdaGrad of LIBMF keeps one accumulator per row, which a column permutation leaves
    alone.
    """
    return np.ascontiguousarray(np.asarray(matrix)[:, np.asarray(order)])


def truncate_rows(matrix: np.ndarray, threshold: float) -> tuple[np.ndarray, int]:
    """Zero every row from its first entry with ``|x| < threshold`` on; returns the new matrix
    and how many entries were zeroed.

    A rating's pruned dot product stops at ``d* = min(f_u, f_i)``, where ``f_u`` and ``f_i`` are
    the first insignificant dimensions of the user's and the item's rows on their own. So after
    truncating P and Q this way, the plain dot product of any user and item equals the pruned
    prediction that training fitted (the authors' optional ``calc_z1``), whereas the entries past
    ``f_u`` hold values that no rating has updated since the row's first entry became small.
    A threshold of 0 changes nothing.
    """
    matrix = np.array(matrix, copy=True)
    if threshold <= 0.0 or matrix.size == 0:
        return matrix, 0
    small = np.abs(matrix) < threshold
    first = np.where(small.any(axis=1), small.argmax(axis=1), matrix.shape[1])
    tail = np.arange(matrix.shape[1])[None, :] >= first[:, None]
    matrix[tail] = 0
    return matrix, int(tail.sum())


@dataclass(frozen=True)
class PruningPlan:
    """Everything decided once when pruning starts.

    Attributes
    ----------
    threshold_p, threshold_q : float
        Entries with ``|x| <`` these are insignificant in P (users) and Q (items).
    order : ndarray of int64
        New column ``j`` is old column ``order[j]`` (densest first).
    mu_p, sigma_p, mu_q, sigma_q : float
        The fitted normals.
    sparsity_p, sparsity_q : ndarray of float64
        Per old column, the fraction of entries below the threshold.
    """

    threshold_p: float
    threshold_q: float
    order: np.ndarray
    mu_p: float
    sigma_p: float
    mu_q: float
    sigma_q: float
    sparsity_p: np.ndarray
    sparsity_q: np.ndarray

    def details(self) -> dict:
        """JSON-friendly summary for ``TrainingSummary.details``."""
        return {
            "thresholdUser": self.threshold_p,
            "thresholdItem": self.threshold_q,
            "normalUser": [self.mu_p, self.sigma_p],
            "normalItem": [self.mu_q, self.sigma_q],
            "columnOrder": [int(j) for j in self.order],
            "sparsityUser": [float(s) for s in self.sparsity_p],
            "sparsityItem": [float(s) for s in self.sparsity_q],
        }


def plan_pruning(
    user_blocks: Iterable[np.ndarray] | np.ndarray,
    item_blocks: Iterable[np.ndarray] | np.ndarray,
    rate: float,
) -> PruningPlan:
    """Thresholds and column order from the user (P) and item (Q) factors, given as one matrix
    or as a sequence of row blocks."""
    p = _blocks(user_blocks)
    q = _blocks(item_blocks)
    mu_p, sigma_p = fit_normal(sum(moment_sums(b) for b in p))
    mu_q, sigma_q = fit_normal(sum(moment_sums(b) for b in q))
    t_p = threshold_for_rate(rate, mu_p, sigma_p)
    t_q = threshold_for_rate(rate, mu_q, sigma_q)
    p_counts = sum(below_threshold_counts(b, t_p) for b in p)
    q_counts = sum(below_threshold_counts(b, t_q) for b in q)
    p_rows = sum(len(b) for b in p)
    q_rows = sum(len(b) for b in q)
    return PruningPlan(
        threshold_p=t_p,
        threshold_q=t_q,
        order=joint_sparsity_order(p_counts, p_rows, q_counts, q_rows),
        mu_p=mu_p,
        sigma_p=sigma_p,
        mu_q=mu_q,
        sigma_q=sigma_q,
        sparsity_p=np.asarray(p_counts, np.float64) / max(p_rows, 1),
        sparsity_q=np.asarray(q_counts, np.float64) / max(q_rows, 1),
    )


def _blocks(blocks: Iterable[np.ndarray] | np.ndarray) -> Sequence[np.ndarray]:
    if isinstance(blocks, np.ndarray):
        return [blocks]
    return [np.asarray(b) for b in blocks]
