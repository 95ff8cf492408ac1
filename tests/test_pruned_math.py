"""PrunedMF's pruning decisions (spark_gpu_mf.sgd.pruned_math) against independent references:
scipy's normal distribution for the threshold, hand-built matrices for the column order."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from spark_gpu_mf.sgd import pruned_math


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.3, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("mu, sigma", [(0.0, 0.1), (0.03, 0.2), (-0.4, 0.05), (5.0, 1.0)])
def test_threshold_band_holds_the_pruning_rate_under_the_fitted_normal(rate, mu, sigma):
    t = pruned_math.threshold_for_rate(rate, mu, sigma)
    fitted = stats.norm(loc=mu, scale=sigma)
    assert t > 0
    assert fitted.cdf(t) - fitted.cdf(-t) == pytest.approx(rate, abs=1e-12)


def test_threshold_for_symmetric_normal_is_the_two_sided_quantile():
    # N(0, s): mass in [-t, t] = p  <=>  t = s * Phi^-1((1 + p) / 2).
    for rate in (0.1, 0.3, 0.5):
        expected = 0.2 * stats.norm.ppf((1 + rate) / 2)
        assert pruned_math.threshold_for_rate(rate, 0.0, 0.2) == pytest.approx(expected, rel=1e-12)


def test_rate_zero_prunes_nothing():
    assert pruned_math.threshold_for_rate(0.0, 0.3, 0.1) == 0.0
    matrix = np.array([[0.0, -0.0, 1e-30]])
    assert pruned_math.below_threshold_counts(matrix, 0.0).tolist() == [0, 0, 0]


def test_threshold_grows_with_the_rate():
    thresholds = [pruned_math.threshold_for_rate(r, 0.05, 0.1) for r in (0.1, 0.3, 0.5, 0.7)]
    assert thresholds == sorted(thresholds) and len(set(thresholds)) == 4


def test_degenerate_and_invalid_inputs():
    # All entries equal mu: any positive rate needs the smallest t with |mu| < t.
    t = pruned_math.threshold_for_rate(0.3, -0.25, 0.0)
    assert t > 0.25 and np.nextafter(t, 0) == 0.25
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        pruned_math.threshold_for_rate(1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="empty"):
        pruned_math.fit_normal(pruned_math.moment_sums(np.zeros((0, 3))))


def test_normal_fit_from_block_sums_equals_numpy():
    rng = np.random.default_rng(1)
    blocks = [rng.normal(0.1, 0.3, (n, 6)).astype(np.float32) for n in (5, 17, 1)]
    mu, sigma = pruned_math.fit_normal(sum(pruned_math.moment_sums(b) for b in blocks))
    everything = np.concatenate(blocks).astype(np.float64)
    assert mu == pytest.approx(everything.mean(), rel=1e-12)
    assert sigma == pytest.approx(everything.std(), rel=1e-10)  # ddof=0: maximum likelihood


def test_joint_sparsity_puts_the_densest_dimensions_first():
    t = 0.5
    # Column sparsities of P: [1.0, 0.0, 0.5, 0.25]; of Q: [1.0, 0.5, 0.5, 1.0].
    P = np.array(
        [[0.1, 2.0, 0.1, 0.1], [0.1, 2.0, 0.1, 2.0], [0.1, 2.0, 2.0, 2.0], [0.1, 2.0, 2.0, 2.0]]
    )
    Q = np.array([[0.0, 0.0, 0.0, 0.0], [0.2, 3.0, 3.0, 0.3]])
    p_counts = pruned_math.below_threshold_counts(P, t)
    q_counts = pruned_math.below_threshold_counts(Q, t)
    assert p_counts.tolist() == [4, 0, 2, 1] and q_counts.tolist() == [2, 1, 1, 2]
    # Joint sparsity [1.0, 0.0, 0.25, 0.25]: ascending, ties by index.
    order = pruned_math.joint_sparsity_order(p_counts, 4, q_counts, 2)
    assert order.tolist() == [1, 2, 3, 0]


def test_permutation_leaves_every_prediction_unchanged():
    rng = np.random.default_rng(2)
    P, Q = rng.normal(size=(7, 5)), rng.normal(size=(4, 5))
    order = rng.permutation(5)
    P2, Q2 = pruned_math.permute_columns(P, order), pruned_math.permute_columns(Q, order)
    assert P2.flags.c_contiguous and P2.dtype == P.dtype
    np.testing.assert_array_equal(P2[:, 0], P[:, order[0]])
    np.testing.assert_allclose(P2 @ Q2.T, P @ Q.T, rtol=1e-12)


def test_plan_over_blocks_equals_plan_over_whole_matrices():
    rng = np.random.default_rng(3)
    P = rng.normal(0.0, 0.2, (40, 8)) * rng.uniform(0.2, 2.0, 8)  # columns of different spread
    Q = rng.normal(0.0, 0.3, (30, 8)) * rng.uniform(0.2, 2.0, 8)
    whole = pruned_math.plan_pruning(P, Q, 0.3)
    split = pruned_math.plan_pruning([P[:13], P[13:]], [Q[:1], Q[1:20], Q[20:]], 0.3)
    assert whole.threshold_p == pytest.approx(split.threshold_p, rel=1e-12)
    assert whole.order.tolist() == split.order.tolist()
    # Cross-check the order with a direct computation.
    sp = (np.abs(P) < whole.threshold_p).mean(axis=0)
    sq = (np.abs(Q) < whole.threshold_q).mean(axis=0)
    assert whole.order.tolist() == np.argsort(sp * sq, kind="stable").tolist()
    assert whole.details()["columnOrder"] == whole.order.tolist()


def test_truncated_rows_turn_plain_dot_products_into_pruned_predictions():
    rng = np.random.default_rng(4)
    P, Q = rng.normal(0.0, 0.3, (25, 9)), rng.normal(0.0, 0.3, (20, 9))
    before = P.copy()
    t_p, t_q = 0.1, 0.15
    P2, zeroed_p = pruned_math.truncate_rows(P, t_p)
    Q2, _ = pruned_math.truncate_rows(Q, t_q)
    assert 0 < zeroed_p < P.size and np.array_equal(P, before)  # a new matrix
    for u in range(len(P)):
        for i in range(len(Q)):
            small = (np.abs(P[u]) < t_p) | (np.abs(Q[i]) < t_q)
            stop = int(np.argmax(small)) if small.any() else 9
            assert P2[u] @ Q2[i] == pytest.approx(P[u, :stop] @ Q[i, :stop], abs=1e-15)
    unchanged, zeroed = pruned_math.truncate_rows(P, 0.0)
    assert zeroed == 0 and np.array_equal(unchanged, P)
