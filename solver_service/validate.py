"""The single gate every result passes before it is returned or written, whatever produced it."""
from __future__ import annotations

import math

import numpy as np

from .objective import Terms, duplicate_groups, evaluate
from .preprocess import Prepared, prepare
from .problem import Problem
from .result import Result, ResultError, check_selection


def check_solution(prep: Prepared, selected, assignment) -> None:
    """Raise ResultError unless: exactly n distinct features (ascending ids in range), a C x n bool
    assignment with exactly k per class, and no two classes with identical feature sets."""
    check_selection(selected, assignment, prep.n_features_total, prep.n_classes, prep.n, prep.k)
    W = np.asarray(assignment)
    dups = duplicate_groups(W)
    if dups:
        raise ResultError(f"assignment: classes {dups[0].tolist()} have identical feature sets "
                          f"({len(dups)} groups of duplicates)")


def objective_tolerance(terms: Terms) -> float:
    return 1e-7 * max(1.0, abs(terms.assignment) + abs(terms.penalty) + abs(terms.bias))


def validate_result(problem: Problem, result: Result, prep: Prepared | None = None) -> Terms:
    """Check the structure, then recompute each objective term from A, D/R~ and b and compare it with
    what the result claims. Returns the recomputed terms."""
    prep = prep if prep is not None else prepare(problem)
    check_solution(prep, result.selected, result.assignment)
    if not (math.isnan(result.tau) or result.tau == prep.tau):
        raise ResultError(f"tau: the result was solved with tau = {result.tau}, the problem gives {prep.tau}")
    terms = evaluate(prep, result.selected, result.assignment)
    tol = objective_tolerance(terms)
    for name, recomputed in (("assignment_term", terms.assignment), ("penalty_term", terms.penalty),
                             ("bias_term", terms.bias), ("objective", terms.total)):
        claimed = getattr(result, name)
        if not abs(claimed - recomputed) <= tol:
            raise ResultError(f"{name}: the result claims {claimed!r}, recomputed {recomputed!r}")
    if result.bound < result.objective - tol:  # NaN bounds pass: unknown
        raise ResultError(f"bound: {result.bound!r} is below the objective {result.objective!r}")
    return terms
