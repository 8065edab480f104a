import dataclasses
import io

import numpy as np
import pytest

from solver_service import Problem, Result, ResultError, solve, validate_result
from solver_service.objective import duplicate_groups, evaluate, topk_assignment
from solver_service.preprocess import prepare


@pytest.fixture(scope="module")
def hand():
    """F=4, C=2, n=3, k=2 with numbers small enough to check by hand."""
    A = np.array([[1.0, 0.2], [0.5, -0.4], [0.1, 0.9], [-1.0, 0.3]])
    R = np.array([[1, 0.6, 0.2, 0], [0.6, 1, 0.4, 0], [0.2, 0.4, 1, 0], [0, 0, 0, 1.0]])
    b = np.array([0.1, -0.2, 0.3, 0.0])
    return Problem.create(A, R, b, 3, 2, tau=0.3)


def test_objective_by_hand(hand):
    prep = prepare(hand)
    assert prep.alpha == 250.0  # 1000 / (k C)
    # R+ positive entries 0.6, 0.2, 0.4 -> m = 0.2, max 0.6; tau = 0.3 keeps (0,1): 1.0 and (1,2): 0.5
    np.testing.assert_array_equal(prep.pair_i, [0, 1])
    np.testing.assert_array_equal(prep.pair_j, [1, 2])
    np.testing.assert_allclose(prep.pair_w, [1.0, 0.5])
    selected = np.array([0, 1, 2])
    assignment = np.array([[True, True, False], [True, False, True]])  # class 0: {0,1}, class 1: {0,2}
    terms = evaluate(prep, selected, assignment)
    assert terms.assignment == pytest.approx(250 * (1.0 + 0.5 + 0.2 + 0.9))
    assert terms.penalty == pytest.approx(1.5)
    assert terms.bias == pytest.approx(0.2)
    assert terms.total == pytest.approx(650 - 1.5 + 0.2)


def test_topk_and_duplicates():
    a_sel = np.array([[3.0, 1.0, 3.0], [2.0, 2.0, 2.0], [1.0, 3.0, 1.0]])
    top = topk_assignment(a_sel, 2)
    np.testing.assert_array_equal(top, [[1, 1, 0], [0, 1, 1], [1, 1, 0]])
    groups = duplicate_groups(top)
    assert len(groups) == 1 and groups[0].tolist() == [0, 2]
    assert duplicate_groups(np.eye(3, dtype=bool)) == []


@pytest.fixture(scope="module")
def solved(hand):
    return solve(hand, backend="highs")


def tamper(result, **changes):
    return dataclasses.replace(result, **changes)


def test_a_correct_result_passes_and_survives_a_file_round_trip(hand, solved, tmp_path):
    validate_result(hand, solved)
    solved.save(tmp_path / "r.npz")
    loaded = Result.load(tmp_path / "r.npz")
    validate_result(hand, loaded)
    assert loaded.objective == solved.objective and loaded.log == solved.log
    with np.load(tmp_path / "r.npz", allow_pickle=False) as z:  # plain arrays only
        assert {"selected", "assignment", "objective", "bound", "gap", "backend", "log"} <= set(z.files)


@pytest.mark.parametrize("corrupt, message", [
    (lambda r: tamper(r, selected=r.selected[:2], assignment=r.assignment[:, :2]), "exactly n"),
    (lambda r: tamper(r, selected=np.array([0, 0, 1])), "distinct"),
    (lambda r: tamper(r, selected=np.array([0, 1, 9])), "in \\[0, 4\\)"),
    (lambda r: tamper(r, selected=r.selected.astype(float)), "integer"),
    (lambda r: tamper(r, assignment=np.ones_like(r.assignment)), "exactly k"),
    (lambda r: tamper(r, assignment=r.assignment.astype(int)), "bool"),
    (lambda r: tamper(r, assignment=np.repeat(r.assignment[:1], 2, axis=0)), "identical"),
    (lambda r: tamper(r, objective=r.objective + 1.0), "objective"),
    (lambda r: tamper(r, penalty_term=r.penalty_term + 0.5, objective=r.objective - 0.5), "penalty_term"),
    (lambda r: tamper(r, bound=r.objective - 1.0), "bound"),
    (lambda r: tamper(r, tau=0.25), "tau"),
])
def test_corrupted_results_are_rejected(hand, solved, corrupt, message):
    with pytest.raises(ResultError, match=message):
        validate_result(hand, corrupt(solved))


def test_result_file_without_required_keys_is_rejected():
    buf = io.BytesIO()
    np.savez(buf, selected=np.arange(3))
    with pytest.raises(ResultError, match="lacks"):
        Result.from_bytes(buf.getvalue())
