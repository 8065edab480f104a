import numpy as np
import pytest

from solver_service import Problem
from solver_service.preprocess import clipped_upper, greedy_clique, prepare
from solver_service.synthetic import random_problem, realistic_problem


def test_clipped_upper_drops_diagonal_lower_triangle_and_negatives():
    R = np.array([[1.0, -0.5, 0.3], [-0.5, 1.0, 0.8], [0.3, 0.8, 1.0]])
    np.testing.assert_array_equal(clipped_upper(R), [[0, 0, 0.3], [0, 0, 0.8], [0, 0, 0]])


def test_greedy_clique_finds_planted_clique():
    rng = np.random.default_rng(0)
    adj = rng.random((60, 60)) < 0.2
    adj = adj | adj.T
    planted = rng.choice(60, 12, replace=False)
    adj[np.ix_(planted, planted)] = True
    np.fill_diagonal(adj, False)
    clique = greedy_clique(adj, 12)
    assert clique is not None and len(set(clique.tolist())) == 12
    sub = adj[np.ix_(clique, clique)]
    assert sub[~np.eye(12, dtype=bool)].all()
    assert greedy_clique(np.zeros((5, 5), dtype=bool), 2) is None


@pytest.mark.parametrize("n", [10, 60])
def test_clique_target_is_n_not_50(n):
    """Bug 11: the penalty-free start has exactly n features, for n below and above 50."""
    p = realistic_problem(160, 30, n, 3, seed=2)
    prep = prepare(p)
    assert prep.clique is not None and prep.clique.size == n
    assert np.array_equal(prep.clique, np.unique(prep.clique))
    inside = np.isin(prep.pair_i, prep.clique) & np.isin(prep.pair_j, prep.clique)
    assert not inside.any(), "the start must contain no penalised pair"


def test_tau_is_the_lowest_threshold_the_clique_search_accepts():
    p = realistic_problem(120, 20, 12, 3, seed=3)
    prep = prepare(p)
    Rp = clipped_upper(p.R)
    values = np.unique(Rp[Rp > 0])
    lower = values[values < prep.tau].max()  # the next lower candidate threshold
    S = Rp + Rp.T
    adj = S < lower
    np.fill_diagonal(adj, False)
    assert greedy_clique(adj, 12) is None
    assert prep.pair_w.size > 0


def test_pairs_and_weights_follow_tau_and_minmax_scaling():
    p = random_problem(20, 6, 5, 2, seed=4)
    Rp = clipped_upper(p.R)
    pos = Rp[Rp > 0]
    m, M = pos.min(), pos.max()
    prep = prepare(p.with_options(tau=0.3))
    expected = np.argwhere((Rp >= 0.3) & (Rp > m))
    np.testing.assert_array_equal(np.column_stack([prep.pair_i, prep.pair_j]), expected)
    np.testing.assert_allclose(prep.pair_w, (Rp[prep.pair_i, prep.pair_j] - m) / (M - m))
    assert prep.pair_w.max() == pytest.approx(1.0) and prep.pair_w.min() > 0
    everything = prepare(p.with_options(penalty="all"))
    assert everything.pair_w.size == np.count_nonzero(Rp > m)
    assert everything.clique is None and everything.penalty_mode == "all"


def test_no_positive_similarity_means_no_penalty():
    A = np.eye(6)[:, :3] * 0.5
    R = -np.ones((6, 6)) + 2 * np.eye(6)
    prep = prepare(Problem.create(A, R, np.zeros(6), 3, 1))
    assert prep.pair_w.size == 0 and prep.clique.size == 3
