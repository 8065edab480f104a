"""A valid upper bound for heuristic backends, so that their gap is known.

Drop the uniqueness constraint and the penalty (it is subtracted and >= 0: dropping it can only
raise the optimum) and dualise the coupling E_jc <= s_j with multipliers mu_jc >= 0:

    L(mu) = sum_c top-k_j (a_jc - mu_jc)  +  top-n_j (b_j + sum_c mu_jc)  >=  optimum.

Both parts are solved exactly by sorting, and every mu gives a valid bound; mu = 0 is the trivial
bound (each class its global top-k, plus the n best b). Projected subgradient descent with Polyak
steps towards the best known objective lowers it; its limit equals the LP relaxation's bound.
"""
from __future__ import annotations

import math
import time

import numpy as np


def lagrangian_bound(a: np.ndarray, b: np.ndarray, n: int, k: int, target: float,
                     iterations: int = 300, time_limit: float = math.inf) -> tuple[float, int]:
    """Returns (best bound, iterations run). `target` is the best known value of the relaxed
    objective (assignment + bias) and only steers the step size."""
    F, C = a.shape
    mu = np.zeros_like(a)
    best = math.inf
    theta, stall = 2.0, 0
    t_end = time.perf_counter() + time_limit
    cols = np.arange(C)
    it = 0
    for it in range(1, iterations + 1):
        reduced = a - mu
        top = np.argpartition(-reduced, k - 1, axis=0)[:k] if k < F else np.tile(np.arange(F)[:, None], (1, C))
        weights = b + mu.sum(axis=1)
        chosen = np.argpartition(-weights, n - 1)[:n] if n < F else np.arange(F)
        value = float(reduced[top, cols].sum() + weights[chosen].sum())
        if value < best - 1e-12 * max(1.0, abs(best)):
            best, stall = value, 0
        else:
            stall += 1
            if stall >= 10:
                theta, stall = theta / 2, 0
        # gradient of L in mu_jc: s_j - E_jc (E: the per-class top-k, s: the top-n features)
        s = np.zeros(F, dtype=bool)
        s[chosen] = True
        E = np.zeros((F, C), dtype=bool)
        E[top, cols] = True
        grad = s[:, None].astype(np.float64) - E
        norm2 = float(np.sum(grad * grad))
        if norm2 == 0 or theta < 1e-6 or time.perf_counter() > t_end:
            break
        step = theta * max(value - target, 1e-9 * max(1.0, abs(value))) / norm2
        np.maximum(mu - step * grad, 0.0, out=mu)
    return best, it
