import pytest

from solver_service import solve
from solver_service.preprocess import prepare
from solver_service.synthetic import random_problem

pytest.importorskip("highspy", reason="highspy is not installed")


def test_highs_equals_brute_force(tiny_cases):
    for problem, optimum in tiny_cases:
        result = solve(problem, backend="highs")
        assert result.status == "optimal"
        assert result.objective == pytest.approx(optimum, abs=1e-6)
        assert result.bound == pytest.approx(optimum, rel=1e-5)


@pytest.mark.parametrize("options", [dict(tau=0.2), dict(penalty="all")])
def test_given_penalties(options):
    from solver_bruteforce import brute_force

    p = random_problem(9, 4, 4, 2, seed=2, **options)
    assert solve(p, backend="highs").objective == pytest.approx(brute_force(prepare(p))[0], abs=1e-6)


def test_auto_picks_highs_for_small_loose_problems_and_fast_when_uniqueness_binds():
    result = solve(random_problem(10, 3, 5, 3, seed=1))
    assert result.backend == "highs" and "auto: highs" in result.log
    tight = solve(random_problem(10, 20, 6, 3, seed=1))  # 20 classes, C(6,3) = 20 sets: all must be used
    assert tight.backend == "fast" and "auto: fast" in tight.log


def test_time_limited_highs_returns_a_repaired_valid_solution():
    p = random_problem(40, 20, 10, 3, seed=3)
    result = solve(p, backend="highs", time_limit=0.5)
    assert result.status in ("time_limit", "optimal")
    assert result.bound >= result.objective - 1e-6
