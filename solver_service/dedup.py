"""Best distinct class assignment for a fixed feature selection S.

Without the uniqueness constraint every class simply takes its top-k features of S. With it, the
problem for fixed S is a min-cost bipartite matching of classes to k-subsets of S, the cost of a
subset being its loss against the class's top-k. This replaces the reference's greedy swap loop
(spec 5.8 "sophisticated deduplication", hotspots H8/H9) with an optimal matching:

* small C(n, k): all subsets are candidates, so the matching is exact;
* otherwise every class in a duplicate group gets its top-k set plus all single swaps
  (k (n - k) sets) as candidates. Classes without a duplicate keep their top-k set unless the
  matching wants that set, in which case they join the matching too (repeat until stable). If no
  full matching exists the candidate lists grow to the cheapest L subsets per class.
"""
from __future__ import annotations

import heapq
import itertools
import math

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from .objective import duplicate_groups, row_keys, topk_assignment

FULL_ENUMERATION_SUBSETS = 4000   # enumerate all C(n, k) subsets up to this many ...
FULL_ENUMERATION_ENTRIES = 4_000_000  # ... and C * C(n, k) cost-matrix entries


def _all_subsets(n: int, k: int) -> np.ndarray:
    combos = np.array(list(itertools.combinations(range(n), k)), dtype=np.int64).reshape(-1, k)
    masks = np.zeros((combos.shape[0], n), dtype=bool)
    masks[np.arange(combos.shape[0])[:, None], combos] = True
    return masks


def _single_swaps(a_sel: np.ndarray, top: np.ndarray, classes: np.ndarray, k: int):
    """Top-k set and all single-swap neighbours of each class: (masks, costs, class row)."""
    n = a_sel.shape[0]
    T = top[classes]                                           # m x n
    order = np.argsort(~T, axis=1, kind="stable")
    inside, outside = order[:, :k], order[:, k:]               # m x k, m x (n-k)
    m = classes.size
    vals = a_sel[:, classes].T                                 # m x n
    v_in = np.take_along_axis(vals, inside, 1)
    v_out = np.take_along_axis(vals, outside, 1)
    costs = (v_in[:, :, None] - v_out[:, None, :]).reshape(m, -1)
    masks = np.repeat(T[:, None, :], k * (n - k), axis=1)      # m x k(n-k) x n
    p = np.repeat(np.arange(k), n - k)
    q = np.tile(np.arange(n - k), k)
    r = np.arange(m)[:, None]
    masks[r, np.arange(p.size)[None, :], inside[:, p]] = False
    masks[r, np.arange(p.size)[None, :], outside[:, q]] = True
    masks = np.concatenate([T[:, None, :], masks], axis=1)
    costs = np.concatenate([np.zeros((m, 1)), costs], axis=1)
    rows = np.repeat(np.arange(m), costs.shape[1])
    return masks.reshape(-1, n), costs.reshape(-1), rows


def _cheapest_subsets(values: np.ndarray, k: int, limit: int):
    """The `limit` k-subsets with the largest sums, best first (best-first search over increments)."""
    order = np.argsort(-values, kind="stable")
    v = values[order]
    n = v.size
    start = tuple(range(k))
    best = float(v[:k].sum())
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
                    heapq.heappush(heap, (best - float(v[list(child)].sum()), child))
    masks = np.zeros((len(out), n), dtype=bool)
    for i, (_, sub) in enumerate(out):
        masks[i, order[list(sub)]] = True
    return masks, np.array([c for c, _ in out])


def _cheapest_candidates(a_sel: np.ndarray, classes: np.ndarray, k: int, limit: int):
    masks, costs, rows = [], [], []
    for r, c in enumerate(classes):
        m, cst = _cheapest_subsets(a_sel[:, c], k, limit)
        masks.append(m)
        costs.append(cst)
        rows.append(np.full(cst.size, r))
    return np.concatenate(masks), np.concatenate(costs), np.concatenate(rows)


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
    n_sub = math.comb(n, k)
    if n_sub <= FULL_ENUMERATION_SUBSETS and n_sub * C <= FULL_ENUMERATION_ENTRIES:
        subsets = _all_subsets(n, k)
        cost = top_value[:, None] - a_sel.T @ subsets.T.astype(np.float64)
        rows, cols = linear_sum_assignment(cost)
        return subsets[cols], float(max(0.0, cost[rows, cols].sum()))

    active = np.zeros(C, dtype=bool)
    active[np.concatenate(groups)] = True
    owner = {key.tobytes(): c for c, key in enumerate(row_keys(top))}  # set -> a class holding it
    limit = 0  # 0: single swaps; > 0: the `limit` cheapest subsets per class
    while True:
        classes = np.flatnonzero(active)
        if limit:
            masks, costs, rows = _cheapest_candidates(a_sel, classes, k, limit)
        else:
            masks, costs, rows = _single_swaps(a_sel, top, classes, k)
        keys = row_keys(masks)
        ukeys, first, col = np.unique(keys, return_index=True, return_inverse=True)
        graph = coo_matrix((costs + 1.0, (rows, col.reshape(-1))), shape=(classes.size, ukeys.size)).tocsr()
        try:
            if ukeys.size < classes.size:
                raise ValueError("fewer candidate sets than classes")
            r_ind, c_ind = min_weight_full_bipartite_matching(graph)
        except ValueError:
            if limit >= n_sub:
                raise RuntimeError("no distinct assignment exists for this selection") from None
            limit = min(n_sub, max(2 * limit, 4 * classes.size, 64))
            continue
        blockers = {owner.get(ukeys[c].tobytes()) for c in c_ind} - set(classes.tolist()) - {None}
        if not blockers:
            out = top.copy()
            out[classes[r_ind]] = masks[first[c_ind]]
            return out, float(max(0.0, (top_value - np.where(out, a_sel.T, 0.0).sum(axis=1)).sum()))
        active[sorted(blockers)] = True
