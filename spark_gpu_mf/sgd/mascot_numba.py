"""MASCOT's per-cell SGD on the CPU, compiled with Numba: FP16 or FP32 rows, FP32 arithmetic.

One call runs the ratings of one DSGD cell in the given order and updates the two blocks' rows
in place. Per rating ``(u, i, r)``, with ``p`` and ``q`` the stored rows widened to float32:

    e  = r - p . q
    gp = e * q - reg * p          gq = e * p - reg * q        (both from the old p and q)
    p <- store(p + lr * gp)       q <- store(q + lr * gq)

``store`` rounds to the row's storage: float16 (round to nearest even) for rows of FP16 groups,
float32 for rows of FP32 groups. This is MASCOT-N1 arithmetic (FP16 storage, FP32 compute) for
every mode; ``docs/mascot.md`` explains why ``storage="mascot"`` uses it too.

Row storage (one block): ``half`` (uint16 float16 bits, rows x k) holds the rows of FP16 groups,
``single`` (float32, rows x k) the rows of FP32 groups; ``slot[row]`` is the row's position in
the array of its group's precision, ``group[row]`` its group and ``group_fp32[group]`` the
group's precision.

Statistics for g-switching (``collect``): the cell is cut into ``streams`` contiguous worker
streams (one, the whole cell, on the CPU; one per warp on the GPU) and the last
``ceil(sample_ratio * len)`` ratings of every stream are sampled. For a sampled rating whose user
group is FP16, ``user_sums[group] += gp`` and ``user_squares[group] += |gp|^2`` (float64);
likewise for items. The same sampled updates also give the float16 rounding statistic of the
``rounding`` switch rule (``mascot_groups``): ``user_rounding[group] += (|store(x) - x|^2,
|lr gp|^2)`` with ``x = p + lr gp`` the float32 result that storage rounds.

Speed: compiled with ``fastmath={"reassoc", "contract"}`` so that LLVM vectorizes the dot product
(a float32 sum in a machine-dependent but fixed order: the same machine gives the same bits) and
fuses multiply-adds; no ``nnan``/``ninf``, so overflow still shows as inf. The rows of the rating
``PREFETCH_AHEAD`` places ahead are prefetched, because rows are visited in random order.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from spark_gpu_mf.backends.numba_cache import ensure_cache_dir
from spark_gpu_mf.backends.numba_intrinsics import float_to_half, half_to_float, prefetch

ensure_cache_dir()

__all__ = ["PREFETCH_AHEAD", "cell_sgd", "cell_squared_error"]

PREFETCH_AHEAD = 8
_FASTMATH = {"reassoc", "contract"}


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def cell_sgd(
    users,
    items,
    ratings,
    user_half,
    user_single,
    user_slot,
    user_group,
    user_group_fp32,
    item_half,
    item_single,
    item_slot,
    item_group,
    item_group_fp32,
    lr,
    reg,
    collect,
    streams,
    sample_ratio,
    user_sums,
    user_squares,
    item_sums,
    item_squares,
    user_rounding,
    item_rounding,
):
    """Run one cell's ratings in order, updating both blocks in place; returns the float64 sum of
    squared errors ``e^2`` (each error taken before its update).

    Parameters
    ----------
    users, items : int32 arrays
        Block-local rows of each rating; ``ratings`` float32.
    user_half, user_single, user_slot, user_group, user_group_fp32
        The user block's storage (see the module docstring); ``*_group_fp32`` is uint8 per group.
    lr, reg : float
        This epoch's learning rate and the L2 regularization.
    collect : bool
        Accumulate the g-switching statistics (check epochs only).
    streams : int
        Worker streams the cell is cut into for sampling: stream ``w`` is the ratings
        ``[n w // streams, n (w + 1) // streams)`` (1 on the CPU; the GPU kernel's warps).
    sample_ratio : float
        Fraction of every stream, at its end, that is sampled.
    user_sums, user_squares, item_sums, item_squares : float64 arrays
        (groups, k) and (groups,) accumulators, added to.
    user_rounding, item_rounding : float64 arrays
        (groups, 2) accumulators, added to: per sampled update of a FP16 row,
        ``|store(x) - x|^2`` (what float16 rounding changes of the new value ``x = p + lr g``)
        and ``|lr g|^2`` (the update float32 arithmetic asked for).
    """
    k = user_half.shape[1]
    n = len(ratings)
    p = np.empty(k, np.float32)
    q = np.empty(k, np.float32)
    gp_buffer = np.empty(k, np.float32)
    gq_buffer = np.empty(k, np.float32)
    lr32 = np.float32(lr)
    reg32 = np.float32(reg)
    sse = 0.0
    streams = max(1, streams)
    stream = 0
    stream_end = 0
    sampled_from = 0
    for t in range(n):
        while t >= stream_end:
            stream_begin = n * stream // streams
            stream_end = n * (stream + 1) // streams
            sampled_from = stream_end
            if collect:
                sampled_from -= math.ceil(sample_ratio * (stream_end - stream_begin))
            stream += 1
        # Helper functions taking arrays would cost Numba reference counting per call, so the
        # loop body is written out in full.
        if t + PREFETCH_AHEAD < n:
            ahead = users[t + PREFETCH_AHEAD]
            slot = user_slot[ahead]
            if user_group_fp32[user_group[ahead]] != 0:
                for column in range(0, k, 16):
                    prefetch(user_single, slot, column)
            else:
                for column in range(0, k, 32):
                    prefetch(user_half, slot, column)
            ahead = items[t + PREFETCH_AHEAD]
            slot = item_slot[ahead]
            if item_group_fp32[item_group[ahead]] != 0:
                for column in range(0, k, 16):
                    prefetch(item_single, slot, column)
            else:
                for column in range(0, k, 32):
                    prefetch(item_half, slot, column)
        u = users[t]
        i = items[t]
        ug = user_group[u]
        ig = item_group[i]
        u_fp32 = user_group_fp32[ug] != 0
        i_fp32 = item_group_fp32[ig] != 0
        us = user_slot[u]
        its = item_slot[i]
        if u_fp32:
            for d in range(k):
                p[d] = user_single[us, d]
        else:
            for d in range(k):
                p[d] = half_to_float(user_half[us, d])
        if i_fp32:
            for d in range(k):
                q[d] = item_single[its, d]
        else:
            for d in range(k):
                q[d] = half_to_float(item_half[its, d])
        dot = np.float32(0.0)
        for d in range(k):
            dot += p[d] * q[d]
        e = np.float32(ratings[t]) - dot
        sse += np.float64(e) * np.float64(e)

        sampled = t >= sampled_from
        user_sampled = sampled and not u_fp32
        item_sampled = sampled and not i_fp32
        if user_sampled or item_sampled:
            for d in range(k):
                gp_buffer[d] = e * q[d] - reg32 * p[d]
                gq_buffer[d] = e * p[d] - reg32 * q[d]
                p[d] = p[d] + lr32 * gp_buffer[d]
                q[d] = q[d] + lr32 * gq_buffer[d]
            if user_sampled:
                norm = 0.0
                rounded = 0.0
                step = 0.0
                for d in range(k):
                    g = np.float64(gp_buffer[d])
                    user_sums[ug, d] += g
                    norm += g * g
                    lost = np.float64(half_to_float(float_to_half(p[d]))) - np.float64(p[d])
                    rounded += lost * lost
                    moved = np.float64(lr32 * gp_buffer[d])
                    step += moved * moved
                user_squares[ug] += norm
                user_rounding[ug, 0] += rounded
                user_rounding[ug, 1] += step
            if item_sampled:
                norm = 0.0
                rounded = 0.0
                step = 0.0
                for d in range(k):
                    g = np.float64(gq_buffer[d])
                    item_sums[ig, d] += g
                    norm += g * g
                    lost = np.float64(half_to_float(float_to_half(q[d]))) - np.float64(q[d])
                    rounded += lost * lost
                    moved = np.float64(lr32 * gq_buffer[d])
                    step += moved * moved
                item_squares[ig] += norm
                item_rounding[ig, 0] += rounded
                item_rounding[ig, 1] += step
        else:
            for d in range(k):
                gp = e * q[d] - reg32 * p[d]
                gq = e * p[d] - reg32 * q[d]
                p[d] = p[d] + lr32 * gp
                q[d] = q[d] + lr32 * gq
        if u_fp32:
            for d in range(k):
                user_single[us, d] = p[d]
        else:
            for d in range(k):
                user_half[us, d] = float_to_half(p[d])
        if i_fp32:
            for d in range(k):
                item_single[its, d] = q[d]
        else:
            for d in range(k):
                item_half[its, d] = float_to_half(q[d])
    return sse


@njit(cache=True, nogil=True)
def cell_squared_error(
    users,
    items,
    ratings,
    user_half,
    user_single,
    user_slot,
    user_group,
    user_group_fp32,
    item_half,
    item_single,
    item_slot,
    item_group,
    item_group_fp32,
):
    """Sum of squared errors of float32 predictions ``p . q`` (as ``ALSModel.transform``)."""
    k = user_half.shape[1]
    p = np.empty(k, np.float32)
    q = np.empty(k, np.float32)
    sse = 0.0
    for t in range(len(ratings)):
        u = users[t]
        i = items[t]
        if user_group_fp32[user_group[u]] != 0:
            for d in range(k):
                p[d] = user_single[user_slot[u], d]
        else:
            for d in range(k):
                p[d] = half_to_float(user_half[user_slot[u], d])
        if item_group_fp32[item_group[i]] != 0:
            for d in range(k):
                q[d] = item_single[item_slot[i], d]
        else:
            for d in range(k):
                q[d] = half_to_float(item_half[item_slot[i], d])
        dot = np.float32(0.0)
        for d in range(k):
            dot += p[d] * q[d]
        e = np.float64(ratings[t]) - np.float64(dot)
        sse += e * e
    return sse
