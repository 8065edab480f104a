"""Brute-force optimum of tiny problems, written independently of the package's solvers.

All selections S are enumerated; for each, the best distinct assignment is found by enumerating
injective maps of classes to k-subsets of S (itertools.permutations), so nothing here shares code
with dedup.py or any backend. Only the objective coefficients come from `prepare`.
"""
from __future__ import annotations

import itertools

import numpy as np


def best_distinct(values: np.ndarray, k: int) -> tuple[float, tuple]:
    """values: n x C. Max over injective class -> k-subset maps of the summed values."""
    n, C = values.shape
    subsets = list(itertools.combinations(range(n), k))
    sub_val = np.array([[values[list(s), c].sum() for s in subsets] for c in range(C)])  # C x m
    best, arg = -np.inf, None
    for perm in itertools.permutations(range(len(subsets)), C):
        v = sub_val[np.arange(C), perm].sum()
        if v > best:
            best, arg = v, perm
    return best, tuple(subsets[p] for p in arg)


def brute_force(prep) -> tuple[float, np.ndarray, np.ndarray]:
    """(optimum, selected, assignment C x n) by full enumeration."""
    F, C = prep.a.shape
    P = np.zeros((F, F))
    P[prep.pair_i, prep.pair_j] = prep.pair_w
    best = (-np.inf, None, None)
    for S in itertools.combinations(range(F), prep.n):
        S = list(S)
        pen = P[np.ix_(S, S)].sum()
        val, subsets = best_distinct(prep.a[S], prep.k)
        total = val - pen + prep.b[S].sum()
        if total > best[0] + 1e-12:
            W = np.zeros((C, prep.n), dtype=bool)
            for c, s in enumerate(subsets):
                W[c, list(s)] = True
            best = (total, np.array(S), W)
    return best
