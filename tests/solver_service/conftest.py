"""Shared helpers: tiny instances with a brute-force optimum."""
from __future__ import annotations

import pytest

from solver_service.preprocess import prepare
from solver_service.synthetic import random_problem

from solver_bruteforce import brute_force

# (F, C, n, k): small enough to enumerate; (8, 6, 4, 2) needs all C(4,2) = 6 subsets, so uniqueness binds.
TINY = [(8, 4, 4, 2), (8, 6, 4, 2), (10, 3, 5, 3)]


@pytest.fixture(scope="session")
def tiny_cases():
    """[(problem, brute-force optimum)] for a few seeds of each TINY shape."""
    cases = []
    for seed in range(3):
        for F, C, n, k in TINY:
            problem = random_problem(F, C, n, k, seed=seed)
            cases.append((problem, brute_force(prepare(problem))[0]))
    return cases
