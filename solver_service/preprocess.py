"""From the raw inputs (A, R, b) to the objective's coefficients (spec 5.3, 5.5, 5.6).

* R+ = strict upper triangle of R with negatives set to 0 (diagonal dropped, spec 5.3).
* The penalised pairs D = {i < j : R+_ij >= tau}. By default tau is the lowest threshold for which a
  set of n features without any penalised pair can still be found (spec 5.5, with the target n and
  not a hard-coded 50: bug 11). The reference lowers tau in 100 steps and rebuilds networkx graphs;
  here tau is found by bisection over the sorted distinct values of R+, and each probe runs a
  greedy clique search on a boolean adjacency matrix with numpy (about 20 probes at F = 2048).
* Penalty weights are min-max scaled on D: (R+_ij - m) / (max R+ - m), m = smallest positive R+.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from .problem import Problem

CLIQUE_SEEDS = 8  # greedy clique starts per threshold probe (highest-degree vertices first)


@dataclasses.dataclass(eq=False)
class Prepared:
    """Objective coefficients shared by all backends and by the independent result check."""

    a: np.ndarray          # F x C, already multiplied by alpha = 1000 / (k C)
    alpha: float
    b: np.ndarray          # F
    n: int
    k: int
    pair_i: np.ndarray     # penalised pairs (i < j), sorted row-major
    pair_j: np.ndarray
    pair_w: np.ndarray     # their scaled weights R~ (> 0)
    tau: float             # threshold used (inf when no pair is penalised)
    penalty_mode: str      # "clique", "tau" or "all"
    clique: np.ndarray | None  # sorted n feature ids with no penalised pair (clique mode), else None
    seconds: float

    @property
    def n_features_total(self) -> int:
        return int(self.a.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.a.shape[1])

    def penalty_matrix(self) -> np.ndarray:
        """Dense symmetric F x F matrix of the pair weights (zero outside D); used by `fast`."""
        F = self.n_features_total
        P = np.zeros((F, F))
        P[self.pair_i, self.pair_j] = self.pair_w
        P[self.pair_j, self.pair_i] = self.pair_w
        return P

    def describe(self) -> str:
        start = "" if self.clique is None else f", penalty-free start of {self.clique.size} features"
        return f"penalty={self.penalty_mode} tau={self.tau:.6g} |D|={self.pair_w.size}{start}"


def clipped_upper(R: np.ndarray) -> np.ndarray:
    """R+ of spec 5.3: strict upper triangle, negatives set to 0."""
    return np.triu(np.maximum(np.asarray(R, dtype=np.float64), 0.0), k=1)


def greedy_clique(adj: np.ndarray, target: int, n_seeds: int = CLIQUE_SEEDS) -> np.ndarray | None:
    """Try to find `target` pairwise-adjacent vertices; None if the greedy search fails.

    From each of the highest-degree seeds, repeatedly add the candidate with the most neighbours
    among the remaining candidates (all of which are adjacent to every vertex chosen so far). The
    in-candidate degrees are updated by subtracting the rows of dropped candidates, so one seed
    costs O(F^2) in total (adjacency is symmetric).
    """
    F = adj.shape[0]
    if target <= 1:
        return np.arange(min(target, F))
    deg = adj.sum(axis=1)
    for seed in np.argsort(-deg, kind="stable")[:n_seeds]:
        if deg[seed] + 1 < target:
            break
        clique = [int(seed)]
        cand = adj[seed].copy()
        inner = adj[cand].sum(axis=0, dtype=np.int32)   # neighbours of each vertex among candidates
        while len(clique) < target:
            n_cand = int(cand.sum())
            if len(clique) + n_cand < target:
                break
            v = int(np.argmax(np.where(cand, inner, -1)))
            clique.append(v)
            dropped = cand & ~adj[v]
            cand &= adj[v]
            inner -= adj[dropped].sum(axis=0, dtype=np.int32)
        if len(clique) >= target:
            return np.array(clique[:target])
    return None


def clique_threshold(Rp: np.ndarray, target: int) -> tuple[float, np.ndarray]:
    """Lowest tau (a value of R+, or inf) at which a greedy clique of size `target` exists in the
    graph of allowed pairs {R+ < tau}; returns (tau, sorted clique).

    Bisection assumes the greedy test is monotone in tau (it is for the true clique number and
    nearly so for the heuristic); whatever the bisection returns comes with a verified clique.
    """
    S = Rp + Rp.T
    values = np.unique(Rp[Rp > 0])
    thresholds = np.append(values, np.inf)

    def probe(i: int) -> np.ndarray | None:
        adj = S < thresholds[i]
        np.fill_diagonal(adj, False)
        return greedy_clique(adj, target)

    lo, hi = 0, thresholds.size - 1
    best = probe(hi)
    assert best is not None, "the complete graph always contains a clique of size <= F"
    while lo < hi:
        mid = (lo + hi) // 2
        found = probe(mid)
        if found is not None:
            hi, best = mid, found
        else:
            lo = mid + 1
    tau = float(thresholds[hi])
    sub = S[np.ix_(best, best)]
    assert np.all(sub[~np.eye(best.size, dtype=bool)] < tau), "clique check failed"
    return tau, np.sort(best)


def prepare(problem: Problem) -> Prepared:
    """Compute alpha*A, the penalised pairs with their weights, tau and the penalty-free start."""
    t0 = time.perf_counter()
    n, k, C = problem.n_features, problem.n_per_class, problem.n_classes
    alpha = 1000.0 / (k * C)
    Rp = clipped_upper(problem.R)
    positive = Rp[Rp > 0]
    clique = None
    mode = problem.option("penalty", "clique")
    if problem.option("tau") is not None:
        mode, tau = "tau", float(problem.option("tau"))
    elif mode == "all":
        tau = float(positive.min()) if positive.size else np.inf
    else:
        tau, clique = clique_threshold(Rp, n)
    if positive.size and positive.max() > positive.min():
        m, M = float(positive.min()), float(positive.max())
        pi, pj = np.nonzero((Rp >= tau) & (Rp > m))  # pairs at the minimum get weight 0: dropped
        pw = (Rp[pi, pj] - m) / (M - m)
    else:
        pi = pj = np.zeros(0, dtype=np.int64)
        pw = np.zeros(0)
    return Prepared(
        a=alpha * np.asarray(problem.A, dtype=np.float64),
        alpha=alpha,
        b=np.asarray(problem.b, dtype=np.float64),
        n=n,
        k=k,
        pair_i=pi.astype(np.int64),
        pair_j=pj.astype(np.int64),
        pair_w=pw.astype(np.float64),
        tau=tau,
        penalty_mode=mode,
        clique=clique,
        seconds=time.perf_counter() - t0,
    )
