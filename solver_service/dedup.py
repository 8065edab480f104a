"""Best distinct class assignment for a fixed feature selection S.

Without the uniqueness constraint every class takes its top-k features of S. With it, the problem
for fixed S is a min-cost bipartite matching of classes to k-subsets of S, a subset costing its
loss against the class's own top-k. This replaces the reference's greedy swap loop (spec 5.8
"sophisticated deduplication", hotspots H8/H9) by an optimal matching over few candidates:

* Only classes in a duplicate group are "active" at first; the others keep their top-k set.
* Relaxation: active classes may take any subset, even one held by an inactive class. The relaxed
  optimum is a lower bound on the true cost (inactive classes cost >= 0 wherever they go). If it
  takes no held set it is feasible, hence optimal; otherwise the holders become active and we repeat.
* Candidates: in an optimal matching of m classes, a class never needs more than its m cheapest
  subsets (if all m were taken by the other m - 1 classes, one would be free). So each active class
  gets its m cheapest k-subsets. Exact as long as m <= MAX_CANDIDATES.
* Those are found for all active classes at once: subsets are patterns over positions in each
  class's sorted order (every subset when C(n, k) is small, else all subsets within two swaps of
  the top-k), priced with one matrix product. A class whose m-th cheapest pattern costs more than
  its cheapest three-swap falls back to a best-first enumeration.
"""
from __future__ import annotations

import functools
import heapq
import itertools
import math

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from .objective import duplicate_groups, row_keys, topk_assignment

MAX_CANDIDATES = 256  # per class; the matching is exact while at most this many classes are active
ALL_SUBSETS = 5000    # up to this many k-subsets, the patterns are all of them
DENSE_ENTRIES = 200_000  # smaller matchings use the dense solver (less overhead than the sparse one)
NO_EDGE = 1e12


def cheapest_subsets(values: np.ndarray, k: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The `limit` k-subsets with the largest sums, best first: (masks, loss against the top-k).

    Best-first search over sorted positions: a child moves one chosen position one step down, so it
    never costs less than its parent, and every subset is reachable from the top-k.
    """
    order = np.argsort(-values, kind="stable")
    v = values[order].tolist()
    n = len(v)
    start = tuple(range(k))
    heap, seen, out = [(0.0, start)], {start}, []
    while heap and len(out) < limit:
        cost, sub = heapq.heappop(heap)
        out.append((cost, sub))
        for t in range(k):
            nxt = sub[t] + 1
            if nxt < n and (t == k - 1 or nxt < sub[t + 1]):
                child = sub[:t] + (nxt,) + sub[t + 1:]
                if child not in seen:
                    seen.add(child)
                    heapq.heappush(heap, (cost + v[sub[t]] - v[nxt], child))
    masks = np.zeros((len(out), n), dtype=bool)
    masks[np.repeat(np.arange(len(out)), k), order[np.array([s for _, s in out]).ravel()]] = True
    return masks, np.array([c for c, _ in out])


@functools.lru_cache(maxsize=8)
def _patterns(n: int, k: int) -> tuple[np.ndarray, bool]:
    """(T x n bool subsets over sorted positions, top-k first; whether they are all subsets)."""
    if math.comb(n, k) <= ALL_SUBSETS:
        combos = list(itertools.combinations(range(n), k))
        exhaustive = True
    else:
        top = tuple(range(k))
        combos = [top]
        for d in (1, 2):
            for out in itertools.combinations(range(k), d):
                for into in itertools.combinations(range(k, n), d):
                    combos.append(tuple(sorted(set(top) - set(out) | set(into))))
        exhaustive = False
    pats = np.zeros((len(combos), n), dtype=bool)
    pats[np.repeat(np.arange(len(combos)), k), np.array(combos).ravel()] = True
    return pats, exhaustive


def candidate_sets(a_sel: np.ndarray, classes: np.ndarray, k: int, limit: int):
    """The `limit` cheapest k-subsets of every class in `classes`: (masks, costs, row per class)."""
    n = a_sel.shape[0]
    vals = a_sel[:, classes].T                                   # m x n
    order = np.argsort(-vals, axis=1, kind="stable")
    sv = np.take_along_axis(vals, order, axis=1)
    pats, exhaustive = _patterns(n, k)
    costs = sv[:, :k].sum(axis=1, keepdims=True) - sv @ pats.T.astype(np.float64)   # m x T
    L = min(limit, pats.shape[0])
    idx = np.argsort(costs, axis=1, kind="stable")[:, :L]
    chosen = np.take_along_axis(costs, idx, axis=1)
    masks = np.zeros((classes.size, L, n), dtype=bool)
    np.put_along_axis(masks, np.repeat(order[:, None, :], L, axis=1), pats[idx], axis=2)
    if not exhaustive:
        if min(k, n - k) >= 3:
            three = sv[:, k - 3:k].sum(axis=1) - sv[:, k:k + 3].sum(axis=1)   # cheapest three-swap
        else:
            three = np.full(classes.size, np.inf)
        # (non-exhaustive patterns number >= 645 > MAX_CANDIDATES, so L == limit here)
        for r in np.flatnonzero(chosen[:, -1] > three):
            masks_r, costs_r = cheapest_subsets(vals[r], k, L)
            masks[r], chosen[r] = masks_r, costs_r
    return masks.reshape(-1, n), chosen.reshape(-1), np.repeat(np.arange(classes.size), L)


def _match(costs, rows, cols, n_rows: int, n_cols: int):
    """Min-cost matching of every row to a distinct column over the given edges; returns fewer
    matched rows than n_rows if that is impossible."""
    if n_rows > n_cols:
        return (), ()
    if n_rows * n_cols <= DENSE_ENTRIES:
        dense = np.full((n_rows, n_cols), NO_EDGE)
        dense[rows, cols] = costs
        r_ind, c_ind = linear_sum_assignment(dense)
        ok = dense[r_ind, c_ind] < NO_EDGE
        return r_ind[ok], c_ind[ok]
    # weights + 1: the sparse matching treats explicit zeros as missing edges
    graph = coo_matrix((costs + 1.0, (rows, cols)), shape=(n_rows, n_cols)).tocsr()
    try:
        return min_weight_full_bipartite_matching(graph)
    except ValueError:
        return (), ()


def cost_lower_bound(member: np.ndarray, step: np.ndarray) -> float:
    """Cheap lower bound on the deduplication cost: in a group of g classes with the same top-k set,
    g - 1 must move, each losing at least its `step` (k-th minus (k+1)-th best value).
    member: C x n top-k sets; step: C."""
    return float(sum(np.sort(step[g])[:-1].sum() for g in duplicate_groups(member)))


def distinct_assignment(a_sel: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Distinct k-subsets for every class maximising the assignment term for fixed S.

    a_sel: n x C values (alpha * A on the selected features). Returns (C x n bool, cost), where
    cost >= 0 is the loss against every class taking its own top-k.
    """
    n, C = a_sel.shape
    top = topk_assignment(a_sel, k)
    groups = duplicate_groups(top)
    if not groups:
        return top, 0.0
    top_value = np.where(top, a_sel.T, 0.0).sum(axis=1)
    holder = {key.tobytes(): c for c, key in enumerate(row_keys(top))}  # set -> a class holding it
    active = np.zeros(C, dtype=bool)
    active[np.concatenate(groups)] = True
    while True:
        classes = np.flatnonzero(active)
        limit = min(classes.size, MAX_CANDIDATES, math.comb(n, k))
        masks, costs, rows = candidate_sets(a_sel, classes, k, limit)
        ukeys, first, col = np.unique(row_keys(masks), return_index=True, return_inverse=True)
        r_ind, c_ind = _match(costs, rows, col.reshape(-1), classes.size, ukeys.size)
        if len(r_ind) < classes.size:
            raise RuntimeError(f"no distinct assignment among the {limit} cheapest sets of {classes.size} "
                               f"classes (C(n, k) = {math.comb(n, k)}, MAX_CANDIDATES = {MAX_CANDIDATES})")
        blockers = {holder.get(ukeys[c].tobytes()) for c in c_ind} - set(classes.tolist()) - {None}
        if not blockers:
            out = top.copy()
            out[classes[r_ind]] = masks[first[c_ind]]
            return out, float(max(0.0, (top_value - np.where(out, a_sel.T, 0.0).sum(axis=1)).sum()))
        active[sorted(blockers)] = True
