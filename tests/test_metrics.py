"""Interpretability metrics against hand-computed values (specs/qpm.md §7)."""

import numpy as np
import pytest
import torch

from qpm_dist.metrics import interpretability as M


def test_diversity_by_hand_counts_only_classes_with_k_weights():
    # two channels with disjoint one-hot peaks; softmax over 2 positions of [10, 0] ~ [1, 0]
    maps = torch.tensor([[[[10.0, 0.0]], [[0.0, 10.0]]],
                         [[[10.0, 0.0]], [[10.0, 0.0]]]])
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    weights = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # class 1 has a single feature
    sums, counts = M.diversity_terms(maps, logits, weights, range(1, 3), sum_n_max=False)
    p = 1 / (1 + np.exp(-10))
    # k=1: image 0 -> its top feature's map summed max = 1; image 1 -> 1
    # k=2: only image 0 counts (class 1 has one weight): (max(p, 1-p) + max(1-p, p)) / 2 = p
    np.testing.assert_allclose(sums.numpy(), [2.0, p], rtol=1e-6)
    np.testing.assert_allclose(counts.numpy(), [2, 1])


def test_diversity_at_k_above_the_number_of_features_counts_no_image():
    # qpm.n_features=4 still reports diversity@1..@5 (ks = 1..max(5, k)): @5 must count nothing, not crash
    maps = torch.rand(3, 4, 2, 2)
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    weights = torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    sums, counts = M.diversity_terms(maps, logits, weights, range(1, 6), sum_n_max=True)
    np.testing.assert_allclose(counts.numpy(), [3, 3, 3, 1, 0])
    assert sums[4] == 0


def test_class_independence_by_hand():
    X = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 3.0]])
    y = np.array([0, 1, 1])
    class_sums = np.stack([X[y == c].sum(0) for c in range(2)])
    ci = M.class_independence(X.min(0), X.sum(0), class_sums, np.bincount(y).astype(float), 3.0)
    # feature 0 shifted: [0, 2, 4] -> class 1 owns 6/6; feature 1 shifted: [0, 0, 2] -> class 1 owns 2/2
    assert ci == pytest.approx(1 - 1.0)
    X2 = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    y2 = np.array([0, 1, 0])
    cs2 = np.stack([X2[y2 == c].sum(0) for c in range(2)])
    # feature 0: class 0 owns 4/4; feature 1: class 0 owns 2/4, class 1 owns 2/4 -> max 0.5
    assert M.class_independence(X2.min(0), X2.sum(0), cs2, np.bincount(y2).astype(float), 3.0) == pytest.approx(
        1 - (1.0 + 0.5) / 2)


def test_correlation_is_pearson_from_streamed_sums():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 4)) + 5.0  # a large mean: uncentred cosine would be ~1 everywhere
    X[:, 1] = 0.6 * X[:, 0] + rng.normal(scale=0.3, size=500)
    expected_matrix = np.corrcoef(X.T)
    np.fill_diagonal(expected_matrix, -np.inf)
    got = M.correlation(X.T @ X, X.sum(0), 500.0)
    assert got == pytest.approx(expected_matrix.max(axis=1).mean(), rel=1e-9)


def test_contrastiveness_separates_bimodal_from_unimodal():
    rng = np.random.default_rng(0)
    bimodal = np.concatenate([rng.normal(0, 0.1, 1000), rng.normal(5, 0.1, 1000)])
    unimodal = rng.normal(0, 1, 2000)
    assert M.contrastiveness(bimodal[:, None]) > 0.99
    assert M.contrastiveness(unimodal[:, None]) < 0.75  # a 2-GMM on one Gaussian still splits it in two
    assert M.contrastiveness(unimodal[:, None], seed=3) == M.contrastiveness(unimodal[:, None], seed=3)
    assert M.gaussian_overlap(0, 1, 0, 1) == pytest.approx(1.0, abs=1e-6)


def test_dependence_by_hand():
    features = torch.tensor([[1.0, 3.0], [2.0, 0.0]])
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    weights = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    s, c = M.dependence_terms(features, logits, weights)
    assert s.item() == pytest.approx(0.75 + 1.0) and c.item() == 2


def test_structural_grounding_uses_the_ground_truth_not_the_dataset_size():
    gt = M.cosine_matrix(np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=float))
    same = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=float)
    assert M.structural_grounding(same, gt, top=2) == pytest.approx(1.0)
    different = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=float)
    assert M.structural_grounding(different, gt, top=2) == pytest.approx(0.0)


def test_part_recovery_perfect_permuted_and_random():
    gt = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]])
    permuted = gt[:, [2, 0, 3, 1]]  # the same structure with features in another order
    r = M.part_recovery(permuted, gt)
    assert r["recovered"] == 1.0 and r["precision"] == 1.0
    assert r["matching"] == {0: 2, 1: 0, 2: 3, 3: 1}
    half = permuted.copy()
    half[0] = [0, 0, 1, 1]  # class 0 now uses the wrong features
    assert M.part_recovery(half, gt)["recovered"] < 1.0
    assert M.random_part_recovery(gt, 4, 2, draws=100) < 0.9


def test_sparsity_counts_only_used_features():
    w = np.array([[1, 0, 1, 0], [0, 0, 1, 0]])
    assert M.sparsity(w) == {"NFfeatures": 2, "PerClass": 1.5}


def test_a_signed_head_is_scored_by_its_positive_links_against_a_baseline_with_its_own_link_counts():
    """Q-SENN's ternary head says "has" with +a and "lacks" with −a: its links are the positive weights, all of
    them (top-k cut ties among +a arbitrarily), and chance is a random head with the same links per class."""
    gt = np.array([[1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 1, 1]])  # 3 classes x 4 parts
    w = gt.astype(float) * 0.7  # features = parts, in order
    w[0, 3] = w[1, 0] = w[2, 0] = -0.7  # each class rules out a part it lacks
    links = M.class_links(w, k=2)
    assert links.tolist() == (gt != 0).astype(float).tolist()  # all three links of class 0, not two of them
    recovery = M.part_recovery(links, gt)
    assert recovery["recovered"] == 1.0
    scores = M.link_scores(w, links, gt, recovery["matching"])
    assert scores["precision"] == 1.0 and scores["f1"] == 1.0
    assert scores["negative_links"] == 3 and scores["negative_on_absent"] == 1.0
    w[2, 3] = -0.7  # a negative weight on a part class 2 has
    assert M.link_scores(w, M.class_links(w, 2), gt, recovery["matching"])["negative_on_absent"] == 0.75
    # the baseline draws 3, 2 and 2 links for the classes, as this head has; k = 2 everywhere would be lower
    own = M.random_part_recovery(gt, 4, links.sum(axis=1), draws=300)
    assert own > M.random_part_recovery(gt, 4, 2, draws=300)
    assert M.random_part_recovery(gt, 4, [4, 4, 4], draws=5) == 1.0  # every feature linked: all links recovered


def test_a_dense_head_is_scored_by_its_top_k_positive_weights():
    w = np.array([[0.9, 0.5, -0.2, 0.1], [0.1, 0.2, 0.8, -0.9]])
    assert M.class_links(w, k=2).tolist() == [[1, 1, 0, 0], [0, 1, 1, 0]]


def test_structural_grounding_averages_ties_has_a_positive_variant_and_can_exceed_one():
    gt = np.array([[0, 1.0, 1.0, 0.5], [1.0, 0, 0.5, 0.5], [1.0, 0.5, 0, 0.5], [0.5, 0.5, 0.5, 0]])
    w = np.array([[1.0, 0], [0, 1.0], [1.0, 0], [1.0, 1.0]])
    q = M.cosine_matrix(w)
    # the 6 largest of the 12 off-diagonal entries: the 4 at G = 1.0 and 2 of the 8 tied at 0.5, averaged
    exact = (q[g := gt == 1.0].sum() + (2 / 8) * q[gt == 0.5].sum()) / (gt[g].sum() + (2 / 8) * gt[gt == 0.5].sum())
    assert M.structural_grounding(w, gt, top=6) == pytest.approx(exact)
    signed = np.array([[1.0, -1.0], [1.0, 1.0], [-1.0, 1.0], [1.0, 0.0]])
    assert M.structural_grounding(signed, gt, top=6, positive=True) == pytest.approx(
        M.structural_grounding(np.clip(signed, 0, None), gt, top=6))
    alike = np.ones((4, 2))  # every class looks the same: Q = 1 > G on every pair
    assert M.structural_grounding(alike, gt, top=6) > 1.0
