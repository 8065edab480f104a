"""SLDD point choice and pruning, Q-SENN quantisation and bias rule on hand-computed examples
(specs/qsenn_sldd.md §6, §7.2, §7.3 and bugs 1, 2, 4, 5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qpm_dist.glm.rules import choose_sldd_point, fill_empty_rows, prune_sldd, qsenn_bias, quantize_qsenn


def reference_quantize(weight: np.ndarray, per_class: int) -> np.ndarray:
    """The reference's bucketing (torch.bucketize, right=False, boundaries −M, −t, t, M), for contrast."""
    w = torch.tensor(weight)
    v = w.abs()[w != 0].sort(descending=True).values
    T = per_class * w.shape[0]
    t = (v[T - 1] + v[T]) / 2 if T < len(v) else v[-1]
    M = v[0]
    bucket = torch.bucketize(w, torch.stack([-M, -t, t, M]), right=False)
    keep = (bucket == 1) | (bucket == 3)
    a = w.abs()[keep].mean()
    values = torch.tensor([a, -a, 0.0, a, a])  # index −1 of the reference's table is +a
    return values[bucket].numpy() * (w != 0).numpy()


# ------------------------------------------------------------------------------------------------ Q-SENN


def test_quantisation_keeps_the_sign_of_the_largest_weight():
    W = np.array([[-3.0, 1.0, 0.5], [2.0, -0.2, 0.0]])
    # per_class 1 -> T = 2; magnitudes 3, 2, 1, 0.5, 0.2 -> t = (2 + 1) / 2 = 1.5; kept: -3 and 2; a = 2.5
    Wq, a = quantize_qsenn(W, per_class=1)
    assert a == pytest.approx(2.5)
    np.testing.assert_allclose(Wq, [[-2.5, 0, 0], [2.5, 0, 0]])
    # the reference maps w = -max|w| to +a (and leaves it out of the mean: a = 2): spec bug 1
    np.testing.assert_allclose(reference_quantize(W, 1), [[2.0, 0, 0], [2.0, 0, 0]])


def test_quantisation_ties_at_the_threshold_are_symmetric():
    W = np.array([[1.0, -1.0, 0.1], [-0.5, 0.5, 2.0]])
    # T = 2; magnitudes 2, 1, 1, 0.5, 0.5, 0.1 -> t = (1 + 1) / 2 = 1: both +1 and -1 sit on t and are dropped
    Wq, a = quantize_qsenn(W, per_class=1)
    np.testing.assert_allclose(Wq, [[0, 0, 0], [0, 0, 2.0]])
    assert a == pytest.approx(2.0)
    # the reference keeps -t (bucket -M < w <= -t) and drops +t
    ref = reference_quantize(W, 1)
    assert ref[0, 1] < 0 and ref[0, 0] == 0
    # with min_per_class = 1 the emptied class keeps its largest entry (first of the tie: +1): a = (2 + 1) / 2
    Wq, a = quantize_qsenn(W, per_class=1, min_per_class=1)
    np.testing.assert_allclose(Wq, [[1.5, 0, 0], [0, 0, 1.5]])


def test_quantisation_keeps_every_weight_when_the_target_exceeds_the_non_zeros():
    W = np.array([[0.5, -0.5], [0.0, 1.0]])
    Wq, a = quantize_qsenn(W, per_class=2)  # T = 4 >= 3 non-zeros: all kept, a = (0.5 + 0.5 + 1) / 3
    assert a == pytest.approx(2 / 3)
    np.testing.assert_allclose(Wq, [[2 / 3, -2 / 3], [0, 2 / 3]])
    # the reference uses t = smallest magnitude and drops the positive 0.5 (but keeps -0.5)
    assert reference_quantize(W, 2)[0, 0] == 0 and reference_quantize(W, 2)[0, 1] < 0


def test_bias_rule_by_hand():
    Wq = np.array([[1.0, 1.0, 0.0], [1.0, -1.0, 0.0], [-1.0, -1.0, 1.0]])
    b = np.array([0.2, -0.5, 0.1])
    # net positives n = [2, 0, -1]; d = n - min n = [3, 1, 0]; spread 3; B = 0.5; b_c = 0.5 - d_c * 2 * 0.5 / 3
    np.testing.assert_allclose(qsenn_bias(Wq, b), [-0.5, 0.5 - 1 / 3, 0.5])


def test_bias_rule_without_spread_gives_zero_not_nan():
    Wq = np.array([[1.0, -1.0], [0.0, 0.0], [1.0, -1.0]])  # every class nets 0 positive weights
    b = np.array([0.3, -0.1, 0.2])
    out = qsenn_bias(Wq, b)
    assert np.isfinite(out).all()  # the reference divided by max d = 0 (spec bug 2)
    np.testing.assert_array_equal(out, [0.0, 0.0, 0.0])


# ------------------------------------------------------------------------------------------------ SLDD


def test_sldd_point_is_the_densest_under_the_cap_lowest_index_on_ties():
    assert choose_sldd_point([0.0, 0.5, 3.0, 9.9, 10.0, 10.0, 12.0], cap=10) == 4
    assert choose_sldd_point([0.0, 2.0, 1.0], cap=10) == 1


def test_sldd_point_choice_fails_loudly_when_nothing_qualifies():
    with pytest.raises(ValueError, match="sldd.fit.path_points|epsilon"):  # the reference returned point 0 (bug 5)
        choose_sldd_point([0.0, 11.0, 20.0], cap=10)


def test_sldd_pruning_keeps_a_weight_for_every_class():
    W = np.array([[5.0, 4.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.1], [0.0, 0.0, -0.2, 0.0]])
    # k = 1 -> 3 weights. A global cut (the reference) keeps 5, 4, 3 and leaves class 2 empty
    np.testing.assert_allclose(prune_sldd(W, 1, min_per_class=0), [[5, 4, 0, 0], [3, 0, 0, 0], [0, 0, 0, 0]])
    # ours first keeps each class's largest entry (5, 3, -0.2): the budget of 3 is then used up
    np.testing.assert_allclose(prune_sldd(W, 1), [[5, 0, 0, 0], [3, 0, 0, 0], [0, 0, -0.2, 0]])


def test_sldd_pruning_uses_n_per_class_not_a_fixed_five():
    W = np.array([[5.0, 4.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.1], [0.0, 0.0, -0.2, 0.0]])
    # k = 2 -> 6 weights: the guaranteed 5, 3, -0.2 then the largest of the rest (4, 0.1; only 2 left)
    np.testing.assert_allclose(prune_sldd(W, 2), [[5, 4, 0, 0], [3, 0, 0, 0.1], [0, 0, -0.2, 0]])
    rng = np.random.default_rng(0)
    big = rng.normal(size=(10, 30))
    for k in (1, 3, 7):  # the reference kept 5·C whatever n_per_class was (spec bug 4)
        pruned = prune_sldd(big, k)
        assert np.count_nonzero(pruned) == 10 * k and (pruned != 0).any(axis=1).all()


def test_empty_rows_take_their_row_from_the_next_denser_point():
    W = np.array([[1.0, 0.0], [0.0, 0.0]])
    later = [np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([[1.0, 0.5], [0.0, -0.3]]), np.array([[2.0, 2.0], [1.0, 1.0]])]
    filled, rows = fill_empty_rows(W, later)
    np.testing.assert_allclose(filled, [[1.0, 0.0], [0.0, -0.3]])
    assert rows == [1]
