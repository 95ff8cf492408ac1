"""PrunedMF's compiled per-cell update (spark_gpu_mf.sgd.pruned_numba) against a float64 NumPy
reference written from the algorithm's description, plus hand-checkable counter cases."""

from __future__ import annotations

import numpy as np
import pytest

from spark_gpu_mf.sgd import pruned_math
from spark_gpu_mf.sgd.pruned_numba import ADAGRAD, SGD, sgd_cell


def reference_cell(
    users, items, ratings, P, Q, GP, GQ, step, reg, t_p, t_q, optimizer, regrowth=False
):
    """DP-MF on one cell, rating by rating, in float64 NumPy (returns new arrays). With
    ``regrowth`` the update also covers the first insignificant dimension."""
    P, Q = P.astype(np.float64), Q.astype(np.float64)
    GP, GQ = GP.astype(np.float64), GQ.astype(np.float64)
    k = P.shape[1]
    sse, macs = 0.0, 0
    for u, i, r in zip(users, items, ratings.astype(np.float64)):
        small = (np.abs(P[u]) < t_p) | (np.abs(Q[i]) < t_q)
        stop = int(np.argmax(small)) if small.any() else k
        error = r - P[u, :stop] @ Q[i, :stop]
        sse += error**2
        macs += stop
        updated = min(stop + 1, k) if regrowth else stop
        p, q = P[u, :updated].copy(), Q[i, :updated].copy()
        eta_p = step / np.sqrt(GP[u]) if optimizer == ADAGRAD else step
        eta_q = step / np.sqrt(GQ[i]) if optimizer == ADAGRAD else step
        gp, gq = -error * q + reg * p, -error * p + reg * q
        P[u, :updated] = p - eta_p * gp
        Q[i, :updated] = q - eta_q * gq
        if optimizer == ADAGRAD:
            GP[u] += gp @ gp / k
            GQ[i] += gq @ gq / k
    return P, Q, GP, GQ, sse, macs


def random_cell(rng, n_users=12, n_items=9, rank=6, n=200, std=0.3):
    users = rng.integers(0, n_users, n).astype(np.int32)
    items = rng.integers(0, n_items, n).astype(np.int32)
    ratings = rng.normal(0.0, 1.0, n).astype(np.float32)
    P = rng.normal(0.0, std, (n_users, rank))
    Q = rng.normal(0.0, std, (n_items, rank))
    return users, items, ratings, P, Q, np.ones(n_users), np.ones(n_items)


@pytest.mark.parametrize("regrowth", [False, True], ids=["dpmf", "regrowth"])
@pytest.mark.parametrize("optimizer", [ADAGRAD, SGD], ids=["adagrad", "sgd"])
@pytest.mark.parametrize("thresholds", [(0.0, 0.0), (0.12, 0.2), (0.3, 0.05)])
def test_matches_float64_reference(optimizer, thresholds, regrowth):
    rng = np.random.default_rng(10)
    users, items, ratings, P, Q, GP, GQ = random_cell(rng)
    args = (0.1, 0.05, *thresholds, optimizer, regrowth)
    P_ref, Q_ref, GP_ref, GQ_ref, sse_ref, macs_ref = reference_cell(
        users, items, ratings, P, Q, GP, GQ, *args
    )
    sse, macs = sgd_cell(users, items, ratings, P, Q, GP, GQ, *args)  # float64: in place
    assert macs == macs_ref
    if thresholds == (0.0, 0.0):
        assert macs == len(ratings) * P.shape[1]
    else:
        assert 0 < macs < len(ratings) * P.shape[1]
    assert sse == pytest.approx(sse_ref, rel=1e-12)
    for got, ref in ((P, P_ref), (Q, Q_ref), (GP, GP_ref), (GQ, GQ_ref)):
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)


def test_float32_storage_stays_close_to_float64():
    rng = np.random.default_rng(11)
    users, items, ratings, P, Q, GP, GQ = random_cell(rng)
    args = (0.1, 0.05, 0.12, 0.2, ADAGRAD)
    P_ref, Q_ref, _, _, _, macs_ref = reference_cell(users, items, ratings, P, Q, GP, GQ, *args)
    P32, Q32 = P.astype(np.float32), Q.astype(np.float32)
    G1, G2 = GP.astype(np.float32), GQ.astype(np.float32)
    _, macs = sgd_cell(users, items, ratings, P32, Q32, G1, G2, *args)
    assert macs == macs_ref  # no comparison with a threshold flipped
    np.testing.assert_allclose(P32, P_ref, atol=1e-6)
    np.testing.assert_allclose(Q32, Q_ref, atol=1e-6)


def test_break_and_counter_on_a_hand_checkable_cell():
    """Three ratings on disjoint rows, t = 0.1: they stop at d* = 2, 0 and 4 (6 multiply-adds);
    entries at and after d* are not touched, and d* = 0 leaves the accumulators alone."""
    P = np.array([[1.0, 1.0, 0.01, 1.0], [1.0, 1.0, 1.0, 1.0], [0.5, -0.5, 0.5, -0.5]])
    Q = np.array([[1.0, 1.0, 1.0, 1.0], [0.05, 1.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    ratings = np.array([3.0, 2.0, 1.0], np.float32)
    rows = np.arange(3, dtype=np.int32)
    GP, GQ = np.ones(3), np.ones(3)
    before_P, before_Q = P.copy(), Q.copy()
    sse, macs = sgd_cell(rows, rows, ratings, P, Q, GP, GQ, 0.1, 0.0, 0.1, 0.1, ADAGRAD)
    assert macs == 2 + 0 + 4
    # Errors from the pruned dot products: 3 - 2, 2 - 0, 1 - 0.
    assert sse == pytest.approx(1.0 + 4.0 + 1.0)
    np.testing.assert_array_equal(P[0, 2:], before_P[0, 2:])
    np.testing.assert_array_equal(P[1], before_P[1])
    np.testing.assert_array_equal(Q[1], before_Q[1])
    assert GP[1] == 1.0 and GQ[1] == 1.0
    # Rating 0: e = 1, gp = -q = -1 on dims 0..1, eta = 0.1: p -> 1.1; G += 2 / 4.
    np.testing.assert_allclose(P[0, :2], [1.1, 1.1])
    assert GP[0] == pytest.approx(1.5)
    assert np.all(P[2] != before_P[2])


def test_regrowth_updates_the_first_insignificant_entry_only():
    """The hand-checkable cell with regrowth: rating 0 stops its dot product at d* = 2 but also
    updates P[0, 2] and Q[0, 2] (and nothing after); rating 1 (d* = 0) updates dimension 0 alone;
    rating 2 (no insignificant entry) is unchanged by the option."""
    P = np.array([[1.0, 1.0, 0.01, 1.0], [1.0, 1.0, 1.0, 1.0], [0.5, -0.5, 0.5, -0.5]])
    Q = np.array([[1.0, 1.0, 1.0, 1.0], [0.05, 1.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    ratings = np.array([3.0, 2.0, 1.0], np.float32)
    rows = np.arange(3, dtype=np.int32)
    before_P, before_Q = P.copy(), Q.copy()
    frozen_P, frozen_Q = P.copy(), Q.copy()
    G = [np.ones(3) for _ in range(4)]
    args = (0.1, 0.0, 0.1, 0.1, SGD)
    regrown = sgd_cell(rows, rows, ratings, P, Q, G[0], G[1], *args, True)
    frozen = sgd_cell(rows, rows, ratings, frozen_P, frozen_Q, G[2], G[3], *args, False)
    assert regrown == frozen  # same dot products: same errors and the same counter
    # Rating 0: e = 1, so q[2] = 1 pulls p[2] from 0.01 to 0.11 (above the threshold again).
    np.testing.assert_allclose(P[0, :3], [1.1, 1.1, 0.11])
    np.testing.assert_allclose(Q[0, 2], 1.0 + 0.1 * 0.01)
    assert P[0, 3] == before_P[0, 3] and Q[0, 3] == before_Q[0, 3]
    # Rating 1: e = 2, d* = 0: only dimension 0 moves.
    np.testing.assert_allclose(Q[1, 0], 0.05 + 0.1 * 2.0 * 1.0)
    np.testing.assert_array_equal(Q[1, 1:], before_Q[1, 1:])
    np.testing.assert_array_equal(P[2], frozen_P[2])


def test_pruning_rate_zero_is_plain_sgd_up_to_the_column_permutation():
    """With thresholds 0 a run on column-permuted factors is the same run, permuted."""
    rng = np.random.default_rng(12)
    users, items, ratings, P, Q, GP, GQ = random_cell(rng, rank=8)
    order = rng.permutation(8)
    P_perm = pruned_math.permute_columns(P, order)
    Q_perm = pruned_math.permute_columns(Q, order)
    G = [GP.copy(), GQ.copy(), GP.copy(), GQ.copy()]
    for _ in range(3):
        sgd_cell(users, items, ratings, P, Q, G[0], G[1], 0.1, 0.05, 0.0, 0.0, ADAGRAD)
        sgd_cell(users, items, ratings, P_perm, Q_perm, G[2], G[3], 0.1, 0.05, 0.0, 0.0, ADAGRAD)
    np.testing.assert_allclose(P_perm, P[:, order], rtol=1e-10)
    np.testing.assert_allclose(P_perm @ Q_perm.T, P @ Q.T, rtol=1e-10)
    np.testing.assert_allclose(G[2], G[0], rtol=1e-10)


def test_same_inputs_give_bit_identical_outputs():
    rng = np.random.default_rng(13)
    cell = random_cell(rng)
    runs = []
    for _ in range(2):
        users, items, ratings, P, Q, GP, GQ = (a.copy() for a in cell)
        P, Q = P.astype(np.float32), Q.astype(np.float32)
        GP, GQ = GP.astype(np.float32), GQ.astype(np.float32)
        result = sgd_cell(users, items, ratings, P, Q, GP, GQ, 0.1, 0.05, 0.1, 0.1, ADAGRAD)
        runs.append((result, P, Q, GP, GQ))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1:], runs[1][1:]):
        assert np.array_equal(a, b)


def test_empty_cell():
    P, Q = np.ones((2, 3), np.float32), np.ones((2, 3), np.float32)
    none = np.zeros(0, np.int32)
    G = np.ones(2, np.float32)
    result = sgd_cell(
        none, none, np.zeros(0, np.float32), P, Q, G, G.copy(), 0.1, 0.1, 0.1, 0.1, ADAGRAD
    )
    assert result == (0.0, 0)
