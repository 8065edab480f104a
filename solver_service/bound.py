"""A valid upper bound for heuristic backends, so that their gap is known.

Drop the uniqueness constraint and the penalty (it is subtracted and >= 0, so dropping it can only
raise the optimum) and take the LP relaxation of what is left:

    max sum a_jc E_jc + sum b_j s_j   s.t.  0 <= E_jc <= s_j <= 1,  sum_j E_jc = k,  sum_j s_j = n.

Its LP dual, after eliminating the multipliers of E <= s, the bounds and sum s = n in closed form,
depends on one price u_c per class only:

    UB(u) = k sum_c u_c  +  top-n_j ( b_j + sum_c max(0, a_jc - u_c) )   >=  optimum, for every u.

(For j among the n best, sum_c max(0, a_jc - u_c) is what feature j earns above the class prices.)
UB is convex and piecewise linear in u, with subgradient k - #{j in top-n : a_jc > u_c} per class.
Started at the prices of a good solution (u_c = k-th best value of class c in it; there UB equals
the classic "current value + n best marginal gains" bound of submodular maximisation), projected
subgradient steps with Polyak step size reach the LP bound in a few hundred C-dimensional steps.
"""
from __future__ import annotations

import math
import time

import numpy as np


def dual_value(a: np.ndarray, b: np.ndarray, n: int, k: int, u: np.ndarray) -> tuple[float, np.ndarray]:
    """UB(u) and the n features that attain the top-n."""
    w = b + np.maximum(a - u, 0.0).sum(axis=1)
    top = np.argpartition(-w, n - 1)[:n] if n < w.size else np.arange(w.size)
    return float(k * u.sum() + w[top].sum()), top


def lp_bound(a: np.ndarray, b: np.ndarray, n: int, k: int, u0: np.ndarray, target: float,
             iterations: int = 300, time_limit: float = math.inf) -> tuple[float, int]:
    """Best UB(u) found from u0 in at most `iterations` steps; `target` (the best known value of
    assignment + bias) only steers the step size. Returns (bound, iterations run)."""
    u = np.asarray(u0, dtype=np.float64).copy()
    best, theta, stall, it = math.inf, 1.0, 0, 0
    t_end = time.perf_counter() + time_limit
    for it in range(1, iterations + 1):
        value, top = dual_value(a, b, n, k, u)
        if value < best - 1e-12 * max(1.0, abs(value)):
            best, stall = value, 0
        else:
            stall += 1
            if stall >= 10:
                theta, stall = theta / 2, 0
        grad = k - (a[top] > u).sum(axis=0)
        norm2 = float(grad @ grad)
        if norm2 == 0 or theta < 1e-4 or time.perf_counter() > t_end:
            break  # norm2 == 0: u is optimal
        u -= theta * max(value - target, 1e-9 * max(1.0, abs(value))) / norm2 * grad
    return best, it
