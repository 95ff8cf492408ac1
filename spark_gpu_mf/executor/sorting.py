"""Compiled integer sorts for block building: counting and LSD radix sorts in linear time.

Every sort behind a block (ids to rows, ratings to CSR order, needed ids by block) sorts small
non-negative integer keys. NumPy's comparison sorts cost 50-70 ns per int64 value on this
project's CPUs (x86-simd-sort is not used on them), 2.2 s of the 2.8 s it took to build one
side's blocks of 8M ratings. A counting pass costs a few ns per value and needs no comparison;
keys wider than 16 bits take one stable pass per 16-bit digit. The functions release the GIL, so
blocks built in a thread pool run in parallel.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from numba import njit

from spark_gpu_mf.backends.numba_cache import ensure_cache_dir

ensure_cache_dir()

__all__ = ["csr_by_row", "group_by_block", "stable_argsort", "unique_inverse"]

# Digits of at most 16 bits keep the counts (512 KB) in L2. A key range up to 2^18 is still
# cheaper in one pass than in two.
_DIGIT_BITS = 16
_ONE_PASS_BITS = 18


@njit(cache=True, nogil=True)
def _radix_argsort(keys, key_bits, digit_bits):
    n = len(keys)
    order = np.arange(n)
    ordered = keys.astype(np.int64)
    next_order = np.empty(n, np.int64)
    next_keys = np.empty(n, np.int64)
    mask = (np.int64(1) << digit_bits) - 1
    counts = np.empty(int(mask) + 2, np.int64)
    shift = 0
    while shift < key_bits:
        counts[:] = 0
        for i in range(n):
            counts[((ordered[i] >> shift) & mask) + 1] += 1
        for d in range(1, len(counts)):
            counts[d] += counts[d - 1]
        for i in range(n):
            digit = (ordered[i] >> shift) & mask
            j = counts[digit]
            counts[digit] = j + 1
            next_keys[j] = ordered[i]
            next_order[j] = order[i]
        order, next_order = next_order, order
        ordered, next_keys = next_keys, ordered
        shift += digit_bits
    return order, ordered


def stable_argsort(keys: np.ndarray, key_range: int):
    """``(order, keys[order])`` for integer ``0 <= keys < key_range``; equal keys keep their order.

    The same result as ``np.argsort(keys, kind="stable")`` (as int64), in
    ``ceil(log2(key_range) / 16)`` counting passes.
    """
    keys = np.ascontiguousarray(keys)
    if len(keys) == 0:
        return np.zeros(0, np.int64), keys.astype(np.int64)
    bits = max(1, int(key_range - 1).bit_length())
    passes = 1 if bits <= _ONE_PASS_BITS else -(-bits // _DIGIT_BITS)
    return _radix_argsort(keys, bits, -(-bits // passes))


@njit(cache=True, nogil=True)
def _dense_unique_inverse(keys, low, size):
    rank = np.full(size, -1, np.int64)
    for key in keys:
        rank[key - low] = 0
    count = 0
    for j in range(size):
        if rank[j] == 0:
            rank[j] = count
            count += 1
    unique = np.empty(count, np.int64)
    for j in range(size):
        if rank[j] >= 0:
            unique[rank[j]] = j + low
    inverse = np.empty(len(keys), np.int64)
    for i in range(len(keys)):
        inverse[i] = rank[keys[i] - low]
    return unique, inverse


def unique_inverse(keys: np.ndarray):
    """``np.unique(keys, return_inverse=True)`` of integer ``keys``, as int64 arrays.

    Ids are dense in practice (a few times more ratings than distinct ids), so a table over
    ``min..max`` gives the answer in two passes; sparse ids take a radix sort instead.
    """
    keys = np.ascontiguousarray(keys, np.int64)
    if len(keys) == 0:
        return keys.copy(), np.zeros(0, np.int64)
    low, high = int(keys.min()), int(keys.max())
    size = high - low + 1
    if size <= 4 * len(keys) + (1 << 16):
        return _dense_unique_inverse(keys, low, size)
    order, ordered = stable_argsort(keys - low, size)
    first = np.ones(len(keys), bool)
    first[1:] = ordered[1:] != ordered[:-1]
    inverse = np.empty(len(keys), np.int64)
    inverse[order] = np.cumsum(first) - 1
    return ordered[first] + low, inverse


@njit(cache=True, nogil=True)
def _group_by_block(keys, others, ratings, num_blocks, num_groups):
    bounds = np.zeros(num_groups + 1, np.int64)
    for key in keys:
        bounds[key % num_blocks % num_groups + 1] += 1
    for g in range(num_groups):
        bounds[g + 1] += bounds[g]
    next_slot = bounds[:-1].copy()
    grouped_keys = np.empty_like(keys)
    grouped_others = np.empty_like(others)
    grouped_ratings = np.empty_like(ratings)
    for i in range(len(keys)):
        g = keys[i] % num_blocks % num_groups
        j = next_slot[g]
        next_slot[g] = j + 1
        grouped_keys[j] = keys[i]
        grouped_others[j] = others[i]
        grouped_ratings[j] = ratings[i]
    return bounds, grouped_keys, grouped_others, grouped_ratings


def group_by_block(
    keys: np.ndarray,
    others: np.ndarray,
    ratings: np.ndarray,
    num_blocks: int,
    num_groups: Optional[int] = None,
):
    """``(bounds, keys, others, ratings)`` regrouped so that group ``g``'s ratings are
    ``bounds[g]:bounds[g + 1]``, in their input order.

    A rating's block is ``key mod num_blocks`` (non-negative, as Spark's partitioner) and its
    group ``block mod num_groups``: by default each block is a group; with fewer groups, a
    group is the blocks one partition holds. One counting pass and one scatter, instead of an
    argsort and three gathers.
    """
    return _group_by_block(
        np.ascontiguousarray(keys), np.ascontiguousarray(others), np.ascontiguousarray(ratings),
        int(num_blocks), int(num_blocks if num_groups is None else num_groups),
    )  # fmt: skip


@njit(cache=True, nogil=True)
def _csr_by_row(rows, columns, values, num_rows, num_columns):
    n = len(rows)
    starts = np.zeros(num_columns + 1, np.int64)
    for i in range(n):
        starts[columns[i] + 1] += 1
    for c in range(num_columns):
        starts[c + 1] += starts[c]
    by_column_rows = np.empty(n, np.int64)
    by_column_columns = np.empty(n, np.int32)
    by_column_values = np.empty(n, np.float32)
    for i in range(n):
        j = starts[columns[i]]
        starts[columns[i]] = j + 1
        by_column_rows[j] = rows[i]
        by_column_columns[j] = columns[i]
        by_column_values[j] = values[i]
    indptr = np.zeros(num_rows + 1, np.int64)
    for i in range(n):
        indptr[rows[i] + 1] += 1
    for r in range(num_rows):
        indptr[r + 1] += indptr[r]
    next_slot = indptr[:-1].copy()
    indices = np.empty(n, np.int32)
    ordered = np.empty(n, np.float32)
    for j in range(n):
        r = by_column_rows[j]
        k = next_slot[r]
        next_slot[r] = k + 1
        indices[k] = by_column_columns[j]
        ordered[k] = by_column_values[j]
    return indptr, indices, ordered


def csr_by_row(
    rows: np.ndarray, columns: np.ndarray, values: np.ndarray, num_rows: int, num_columns: int
):
    """``(indptr int64, indices int32, values float32)``: the CSR matrix of the entries
    ``(rows[i], columns[i], values[i])``, each row's entries by column, entries of equal
    ``(row, column)`` in their input order (as ``np.lexsort((columns, rows))`` orders them).

    Two stable counting sorts (by column, then by row) that move the entries themselves, not
    an int64 key and permutation to gather from afterwards.
    """
    return _csr_by_row(
        np.ascontiguousarray(rows, np.int64), np.ascontiguousarray(columns, np.int64),
        np.ascontiguousarray(values, np.float32), int(num_rows), int(num_columns),
    )  # fmt: skip
