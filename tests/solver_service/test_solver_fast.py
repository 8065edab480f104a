import numpy as np
import pytest

from solver_service import solve
from solver_service.backends.fast import Context, SwapState
from solver_service.preprocess import prepare
from solver_service.synthetic import random_problem, realistic_problem


def test_fast_reaches_the_brute_force_optimum(tiny_cases):
    for problem, optimum in tiny_cases:
        result = solve(problem, backend="fast", seed=0)
        assert result.objective == pytest.approx(optimum, abs=1e-7), problem.A.shape
        assert result.bound >= optimum - 1e-7  # a valid upper bound


def test_swap_deltas_equal_recomputed_values():
    prep = prepare(realistic_problem(40, 12, 8, 3, seed=5))
    ctx = Context(prep, float("inf"))
    state = SwapState(ctx, np.arange(0, 40, 5))
    d = state.deltas()
    rng = np.random.default_rng(0)
    outside = np.setdiff1d(np.arange(40), state.sel)
    for _ in range(25):
        pos, j = int(rng.integers(8)), int(rng.choice(outside))
        assert state.value + d[j, pos] == pytest.approx(state.swapped(pos, j).value, abs=ctx.slack)
    assert np.isneginf(d[state.sel]).all()


def test_same_seed_same_result_and_other_seed_still_valid():
    p = realistic_problem(96, 30, 12, 3, seed=6)
    a, b = solve(p, backend="fast", seed=3, effort=0.2), solve(p, backend="fast", seed=3, effort=0.2)
    np.testing.assert_array_equal(a.selected, b.selected)
    np.testing.assert_array_equal(a.assignment, b.assignment)
    assert a.objective == b.objective and a.status == "heuristic"
    assert np.isfinite(a.bound) and a.bound >= a.objective and 0 <= a.gap < 0.5


def test_time_cap_is_reported_not_hidden():
    """Bug 14: a time-limited answer says so."""
    result = solve(realistic_problem(96, 30, 12, 3, seed=6), backend="fast", time_limit=0.01)
    assert result.status == "time_limit" and "time cap" in result.log


def test_uniqueness_binds_and_fast_still_finds_the_optimum():
    """C = C(n, k): every k-subset of the selection must be used by exactly one class."""
    from solver_bruteforce import brute_force

    p = random_problem(8, 6, 4, 2, seed=11)
    optimum = brute_force(prepare(p))[0]
    result = solve(p, backend="fast")
    assert result.objective == pytest.approx(optimum, abs=1e-7)
    assert len({row.tobytes() for row in result.assignment}) == 6
