"""The single gate every result passes before it is returned or written, whatever produced it."""
from __future__ import annotations

import math

import numpy as np

from .objective import Terms, duplicate_groups, evaluate
from .preprocess import Prepared, prepare
from .problem import Problem
from .result import Result, ResultError


def check_solution(prep: Prepared, selected, assignment) -> None:
    """Raise ResultError unless: exactly n distinct features (ascending ids in range), a C x n bool
    assignment with exactly k per class, and no two classes with identical feature sets."""
    F, C, n, k = prep.n_features_total, prep.n_classes, prep.n, prep.k
    sel = np.asarray(selected)
    if sel.ndim != 1 or sel.dtype.kind not in "iu":
        raise ResultError(f"selected: expected a 1-D integer array, got dtype {sel.dtype} shape {sel.shape}")
    if sel.size != n:
        raise ResultError(f"selected: expected exactly n = {n} features, got {sel.size}")
    if sel.size and (sel.min() < 0 or sel.max() >= F):
        raise ResultError(f"selected: feature ids must lie in [0, {F}), got [{sel.min()}, {sel.max()}]")
    if np.any(np.diff(sel) <= 0):
        raise ResultError("selected: expected distinct feature ids in ascending order")
    W = np.asarray(assignment)
    if W.dtype != bool or W.shape != (C, n):
        raise ResultError(f"assignment: expected a bool array of shape (C, n) = ({C}, {n}), got {W.dtype} {W.shape}")
    counts = W.sum(axis=1)
    bad = np.flatnonzero(counts != k)
    if bad.size:
        raise ResultError(f"assignment: expected exactly k = {k} features per class; class {bad[0]} has {counts[bad[0]]} "
                          f"({bad.size} classes wrong)")
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
