"""MASCOT's g-switching decisions (driver side, plain NumPy): groups, check epochs, switches.

Ko et al., "MASCOT: A Quantization Framework for Efficient Matrix Factorization in Recommender
Systems" (ICDM 2021), as released by the authors (``preprocess_utils.h``, ``mf_methods.cu``,
``precision_switching.h``):

* **Groups.** Users (items) are sorted by rating count and cut into at most ``g`` groups of about
  ``ceil(n / g)`` rows; rows with the same count never straddle two groups, so there may be fewer
  than ``g`` groups. Every group starts in FP16.
* **Check epochs** (0-based): ``e >= first``, ``e % interval == first % interval`` and
  ``e != max_iter - 1``.
* **Statistic.** In a check epoch each worker sums, over its last ``sampleRatio`` fraction of
  updates, the update vectors ``g = e * q - reg * p`` (users; ``e * p - reg * q`` for items) of
  every FP16 group: ``S_G = sum g`` and ``N_G = sum |g|^2``, summed over all workers before
  ``raw_G = |S_G|^2 / N_G`` (a ratio of sums, not a sum of ratios). ``raw_G`` grows when FP16
  rounding swallows the group's updates, so they stop cancelling out.
* **Switch.** A group's first measurement is its baseline (``err = 1``); later, a group with
  ``raw_G / baseline > threshold`` is widened to FP32 for good. Groups never go back to FP16 and
  FP32 groups are no longer measured.

Ours, optional (``roundingThreshold`` > 0; docs/mascot.md section 5 has why and measurements):

* **Rounding rule.** The same sampled updates also give, per FP16 group,
  ``rounding_G = sum |store(x) - x|^2 / sum |lr g|^2`` over its sampled updates, with
  ``x = p + lr g`` the float32 value float16 storage rounds: the share of the update that float16
  rounding changes (about 1 once ``lr |g|`` is below half a float16 step: the update is lost). It
  is an absolute measure, a ratio of sums over the whole group, so it needs no baseline and is
  not a ratio of two noisy small numbers; a group with ``rounding_G > rounding_threshold`` is
  widened to FP32 for good, at any check epoch (the first one too), besides the paper's rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["GroupPrecision", "count_groups", "is_check_epoch"]


def count_groups(counts: np.ndarray, num_groups: int) -> np.ndarray:
    """Group of every row (int32, 0-based, ascending rating count) for at most ``num_groups``.

    Walks the distinct counts in ascending order, adding all rows of one count at a time, and
    closes a group once it holds at least ``ceil(n / num_groups)`` rows.
    """
    counts = np.asarray(counts, dtype=np.int64)
    n = len(counts)
    groups = np.zeros(n, np.int32)
    if n == 0:
        return groups
    target = math.ceil(n / max(1, num_groups))
    values, sizes = np.unique(counts, return_counts=True)
    group_of_value = np.zeros(len(values), np.int32)
    group, filled = 0, 0
    for position, size in enumerate(sizes):
        group_of_value[position] = group
        filled += int(size)
        if filled >= target:
            group, filled = group + 1, 0
    groups[:] = group_of_value[np.searchsorted(values, counts)]
    return groups


def is_check_epoch(epoch: int, first: int, interval: int, max_iter: int) -> bool:
    """Whether g-switching measures (and may switch) after 0-based ``epoch``."""
    return epoch >= first and epoch % interval == first % interval and epoch != max_iter - 1


@dataclass
class GroupPrecision:
    """Precision of one side's groups and the history of its g-switching.

    Attributes
    ----------
    fp32 : numpy.ndarray
        bool per group: True once the group has switched to FP32 (or everything is FP32).
    baseline : numpy.ndarray
        float64 per group: ``raw_G`` of the group's first measurement (NaN until then).
    switched_at : numpy.ndarray
        int32 per group: 0-based epoch after which the group switched, -1 if it has not.
    errors : dict
        0-based check epoch -> float64 per group ``raw_G / baseline`` (NaN where not measured).
    rounding : dict
        0-based check epoch -> float64 per group ``rounding_G`` (NaN where not measured), when
        the rounding statistic was given.
    """

    fp32: np.ndarray
    baseline: np.ndarray
    switched_at: np.ndarray
    errors: dict[int, np.ndarray] = field(default_factory=dict)
    rounding: dict[int, np.ndarray] = field(default_factory=dict)

    @classmethod
    def create(cls, num_groups: int, start_fp32: bool) -> GroupPrecision:
        return cls(
            fp32=np.full(num_groups, bool(start_fp32)),
            baseline=np.full(num_groups, np.nan),
            switched_at=np.full(num_groups, -1, np.int32),
        )

    @property
    def num_groups(self) -> int:
        return len(self.fp32)

    def check(
        self,
        epoch: int,
        sums: np.ndarray,
        squares: np.ndarray,
        threshold: float,
        rounding: np.ndarray | None = None,
        rounding_threshold: float = 0.0,
    ):
        """Apply the statistics of check epoch ``epoch``; return the groups that switch now.

        ``sums`` (groups x rank) and ``squares`` (groups) are ``S_G`` and ``N_G`` summed over
        every cell of the epoch; ``rounding`` (groups x 2), if given, the summed
        ``(|store(x) - x|^2, |lr g|^2)``. Groups without a sampled update are not measured. With
        ``rounding_threshold > 0`` a group also switches when ``rounding_G`` exceeds it.
        """
        sums = np.asarray(sums, dtype=np.float64)
        squares = np.asarray(squares, dtype=np.float64)
        measured = ~self.fp32 & (squares > 0)
        raw = np.full(self.num_groups, np.nan)
        raw[measured] = np.einsum("gk,gk->g", sums[measured], sums[measured]) / squares[measured]
        first = measured & np.isnan(self.baseline)
        self.baseline[first] = raw[first]
        compared = measured & ~first & (self.baseline > 0)
        error = np.full(self.num_groups, np.nan)
        error[first] = 1.0
        error[compared] = raw[compared] / self.baseline[compared]
        self.errors[epoch] = error
        switching = compared & (error > threshold)
        if rounding is not None:
            rounding = np.asarray(rounding, dtype=np.float64)
            steps = rounding[:, 1]
            rounded = ~self.fp32 & (steps > 0)
            share = np.full(self.num_groups, np.nan)
            share[rounded] = rounding[rounded, 0] / steps[rounded]
            self.rounding[epoch] = share
            if rounding_threshold > 0:
                switching |= rounded & (share > rounding_threshold)
        switch = np.flatnonzero(switching)
        self.fp32[switch] = True
        self.switched_at[switch] = epoch
        return switch
