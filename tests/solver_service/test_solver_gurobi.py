import sys

import numpy as np
import pytest

from solver_service import Problem, solve
from solver_service.backends import gurobi as gurobi_backend
from solver_service.backends.base import BackendUnavailable, LicenceLimitError
from solver_service.synthetic import random_problem


def _gurobipy():
    return pytest.importorskip("gurobipy", reason="gurobipy is not installed: the gurobi backend cannot be compared")


@pytest.mark.parametrize("seed", range(4))
def test_gurobi_equals_highs_within_the_pip_licence(seed):
    """F=8, C=4: 40 binaries (+9 per deduplicated pair), within the 200-variable quadratic limit."""
    _gurobipy()
    p = random_problem(8, 4, 4, 2, seed=seed)
    g = solve(p, backend="gurobi", mip_gap=0)
    h = solve(p, backend="highs", mip_gap=0)
    assert g.status == "optimal" and g.objective == pytest.approx(h.objective, abs=1e-6)


def test_the_loop_runs_the_reference_constraints_until_nothing_is_violated():
    """Seed 3 needs ClassSparsity rounds and Deduplication rounds (see the log) and still ends optimal."""
    _gurobipy()
    g = solve(random_problem(8, 4, 4, 2, seed=3), backend="gurobi", mip_gap=0)
    assert "classes below k" in g.log and "norm constrs" in g.log and "7 solves" in g.log
    assert g.status == "optimal"


def test_no_extra_solve_once_nothing_is_violated():
    """Bug 13: with one class and positive A, the first solve uses exactly k features: one solve."""
    _gurobipy()
    rng = np.random.default_rng(0)
    A = rng.uniform(0.1, 1, (8, 1))
    p = Problem.create(A, np.eye(8), np.zeros(8), 4, 2)
    g = solve(p, backend="gurobi")
    assert "gurobi: 1 solves" in g.log


def test_loop_constraints_span_all_features():
    """Bug 12: ClassSparsity and Deduplication rows cover every feature, also never-selected ones."""
    gp = _gurobipy()
    with gp.Env(params={"OutputFlag": 0}) as env, gp.Model(env=env) as m:
        E = m.addMVar((7, 3), vtype=gp.GRB.BINARY)
        row = gurobi_backend.add_class_sparsity(m, E, 1, 2)
        d, _ = gurobi_backend.add_distinct(m, gp, E, 0, 2)
        m.update()
        assert m.getRow(row).size() == 7 and row.RHS == 2
        assert d.shape == (7,) and m.NumGenConstrs == 1


def test_solver_parameters_are_set_from_the_options():
    """Bug 14: seed, threads and gap are set (the reference left them at the defaults)."""
    _gurobipy()
    g = solve(random_problem(8, 4, 4, 2, seed=1), backend="gurobi", seed=7, threads=1, mip_gap=0.01)
    assert "MIPGap=0.01 Seed=7 Threads=1" in g.log


def test_violation_checks():
    full = np.zeros((5, 3))
    full[[0, 1], 0] = full[[0, 1], 1] = full[[2], 2] = 1
    few, groups = gurobi_backend.violations(full, 2)
    assert few.tolist() == [2] and [g.tolist() for g in groups] == [[0, 1]]


def test_just_over_the_licence_gives_the_friendly_error():
    """F=10, C=20: 210 binaries with a quadratic objective, just over the pip licence's 200."""
    gp = _gurobipy()
    p = random_problem(10, 20, 6, 3, seed=0, penalty="all")
    try:
        solve(p, backend="gurobi", time_limit=30)
    except LicenceLimitError as exc:
        message = str(exc)
    else:
        pytest.skip(f"gurobipy {gp.gurobi.version()} found an unrestricted licence: no size limit to hit")
    for words in ("10010", "too large for the licence", "backend='highs'", "backend='fast'", "210 variables"):
        assert words in message


def test_auto_prefers_gurobi_only_when_asked_and_falls_back_when_it_cannot():
    """F=10, C=20, n=8: 210 binaries, over the pip licence; without it auto picks highs again."""
    _gurobipy()
    p = random_problem(10, 20, 8, 3, seed=0, penalty="all")
    assert solve(p, time_limit=60).backend == "highs"
    r = solve(p, prefer_gurobi=True, time_limit=60)
    assert r.backend in ("highs", "gurobi")
    if r.backend == "highs":
        assert "gurobi is not usable here" in r.log and "auto: highs" in r.log


def test_missing_gurobipy_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gurobipy", None)  # import gurobipy -> ImportError
    with pytest.raises(BackendUnavailable, match="pip install gurobipy.*'highs'.*'fast'"):
        solve(random_problem(8, 4, 4, 2, seed=0), backend="gurobi")
