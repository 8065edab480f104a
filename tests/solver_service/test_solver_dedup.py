import itertools

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from solver_service import dedup
from solver_service.objective import duplicate_groups, topk_assignment


def optimum_over_all_subsets(a_sel, k):
    """Reference: dense assignment over every k-subset (exact)."""
    n, C = a_sel.shape
    subsets = np.array([[j in s for j in range(n)] for s in itertools.combinations(range(n), k)])
    top = np.where(topk_assignment(a_sel, k), a_sel.T, 0).sum(1)
    cost = top[:, None] - a_sel.T @ subsets.T
    r, c = linear_sum_assignment(cost)
    return cost[r, c].sum()


def clustered_values(n, C, groups, seed):
    """Classes in a few groups with nearly equal values, so many top-k sets coincide."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n, groups))
    return centres[:, rng.integers(groups, size=C)] + 0.05 * rng.normal(size=(n, C))


def check(a_sel, k, expected_cost):
    assignment, cost = dedup.distinct_assignment(a_sel, k)
    assert assignment.shape == a_sel.shape[::-1] and (assignment.sum(1) == k).all()
    assert duplicate_groups(assignment) == []
    got = (np.where(topk_assignment(a_sel, k), a_sel.T, 0).sum() - np.where(assignment, a_sel.T, 0).sum())
    assert cost == pytest.approx(got, abs=1e-9)
    assert cost == pytest.approx(expected_cost, abs=1e-9)


@pytest.mark.parametrize("n, C, k, groups", [(6, 12, 2, 3), (9, 40, 3, 4), (10, 45, 2, 2)])
@pytest.mark.parametrize("seed", range(3))
def test_matching_equals_the_dense_assignment_over_all_subsets(n, C, k, groups, seed):
    """Heavily clustered classes (many collide, some need two or more swaps): the candidate lists
    and the growing active set must still give the exact optimum."""
    a_sel = clustered_values(n, C, groups, seed)
    assert duplicate_groups(topk_assignment(a_sel, k))
    check(a_sel, k, optimum_over_all_subsets(a_sel, k))


def test_a_class_without_duplicate_moves_when_that_is_cheaper():
    """Classes 0 and 1 share {0,1}; class 0's cheap alternative {0,2} belongs to class 2, whose own
    alternative {0,3} costs almost nothing: the optimum moves class 2, which had no duplicate."""
    a_sel = np.array([[10.0, 10.0, 10.0], [9.0, 9.0, 0.0], [8.9, 0.0, 9.0], [0.0, 0.0, 8.99]])
    assignment, cost = dedup.distinct_assignment(a_sel, 2)
    assert cost == pytest.approx(optimum_over_all_subsets(a_sel, 2)) == pytest.approx(0.11)
    assert assignment[2].tolist() == [True, False, False, True]


def test_more_classes_than_subsets_is_an_error_not_a_silent_duplicate():
    with pytest.raises(RuntimeError, match="no distinct assignment"):
        dedup.distinct_assignment(clustered_values(4, 7, 1, 0), 2)  # C(4,2) = 6 < 7


def test_cheapest_subsets_come_in_order():
    values = np.array([5.0, 1.0, 4.0, 3.0, 2.0])
    masks, costs = dedup.cheapest_subsets(values, 2, 10)
    sums = masks @ values
    assert np.all(np.diff(costs) >= 0) and len({m.tobytes() for m in masks}) == 10
    np.testing.assert_allclose(costs, 9.0 - sums)
