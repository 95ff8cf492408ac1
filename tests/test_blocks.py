"""Block building: the compiled sorts against NumPy's, and the blocks they build."""

from __future__ import annotations

import numpy as np
import pytest

from spark_gpu_mf.executor.blocks import build_block, build_blocks
from spark_gpu_mf.executor.sorting import (
    csr_by_row,
    group_by_block,
    stable_argsort,
    unique_inverse,
)


@pytest.mark.parametrize(
    "bits,dtype",
    [(b, np.int32) for b in (1, 4, 17, 18, 19, 31)] + [(b, np.int64) for b in (1, 19, 47, 62)],
)
def test_stable_argsort_matches_numpys_stable_argsort(bits, dtype):
    rng = np.random.default_rng(bits)
    key_range = 1 << bits
    # Few distinct keys as well as many, so that ties (and their order) are exercised.
    keys = rng.integers(0, key_range, 5000).astype(dtype)
    keys[::3] = keys[0]
    order, ordered = stable_argsort(keys, key_range)
    expected = np.argsort(keys, kind="stable")
    np.testing.assert_array_equal(order, expected)
    np.testing.assert_array_equal(ordered, keys[expected])


def test_stable_argsort_of_nothing():
    order, ordered = stable_argsort(np.zeros(0, np.int64), 10)
    assert order.shape == ordered.shape == (0,)


@pytest.mark.parametrize("span", [3, 5000, 2**31 - 1])
def test_unique_inverse_matches_numpy_for_dense_and_sparse_ids(span):
    rng = np.random.default_rng(span)
    keys = rng.integers(-span, span, 4000).astype(np.int32)
    unique, inverse = unique_inverse(keys)
    expected, expected_inverse = np.unique(keys, return_inverse=True)
    np.testing.assert_array_equal(unique, expected)
    np.testing.assert_array_equal(inverse, expected_inverse)


@pytest.mark.parametrize("num_rows,num_columns", [(1, 1), (7, 3000), (2000, 5)])
def test_csr_by_row_orders_entries_as_a_stable_lexsort(num_rows, num_columns):
    """Each row's entries by column, duplicates of one (row, column) in their input order: the
    order ``np.lexsort`` (stable) gives, which the solves' sums follow bit for bit."""
    rng = np.random.default_rng(num_rows)
    rows = rng.integers(0, num_rows, 6000)
    columns = rng.integers(0, num_columns, 6000)
    values = rng.normal(size=6000).astype(np.float32)
    indptr, indices, ordered = csr_by_row(rows, columns, values, num_rows, num_columns)
    order = np.lexsort((columns, rows))
    np.testing.assert_array_equal(
        indptr, np.r_[0, np.cumsum(np.bincount(rows, minlength=num_rows))]
    )
    np.testing.assert_array_equal(indices, columns[order])
    np.testing.assert_array_equal(ordered, values[order])
    assert indptr.dtype == np.int64 and indices.dtype == np.int32 and ordered.dtype == np.float32


def test_group_by_block_keeps_input_order_within_a_block_and_negative_ids_where_spark_does():
    rng = np.random.default_rng(0)
    keys = rng.integers(-50, 50, 3000).astype(np.int32)
    others = rng.integers(0, 1000, 3000).astype(np.int32)
    ratings = rng.normal(size=3000).astype(np.float32)
    bounds, k, o, r = group_by_block(keys, others, ratings, 7)
    for b in range(7):
        mask = np.mod(keys, 7) == b  # Spark's nonNegativeMod
        np.testing.assert_array_equal(k[bounds[b] : bounds[b + 1]], keys[mask])
        np.testing.assert_array_equal(o[bounds[b] : bounds[b + 1]], others[mask])
        np.testing.assert_array_equal(r[bounds[b] : bounds[b + 1]], ratings[mask])


def test_build_blocks_is_build_block_of_each_blocks_ratings():
    rng = np.random.default_rng(1)
    users = rng.integers(-20, 400, 6000).astype(np.int32)
    items = rng.integers(0, 2**31 - 1, 6000).astype(np.int32)  # sparse ids: the radix path
    ratings = rng.normal(size=6000).astype(np.float32)
    rows = build_blocks(users, items, ratings, 4, 3)
    assert [row["block"] for row in rows] == [0, 1, 2, 3]
    for row in rows:
        mask = np.mod(users, 4) == row["block"]
        assert row == build_block(row["block"], users[mask], items[mask], ratings[mask], 3)
    # The CSR lists each row's ratings by (row, needed id position), as a lexsort would.
    block = rows[0]
    mask = np.mod(users, 4) == 0
    ids = np.frombuffer(block["ids"], np.int32)
    needed = np.frombuffer(block["needed_ids"], np.int32)
    indices = np.frombuffer(block["indices"], np.int32)
    indptr = np.frombuffer(block["indptr"], np.int64)
    np.testing.assert_array_equal(ids, np.unique(users[mask]))
    keys = np.repeat(np.arange(len(ids)), np.diff(indptr)) * len(needed) + indices
    assert np.all(np.diff(keys) >= 0)
    triples = sorted(zip(users[mask], items[mask], ratings[mask]))
    values = np.frombuffer(block["ratings"], np.float32)
    got = sorted(zip(np.repeat(ids, np.diff(indptr)), needed[indices], values))
    assert got == triples
