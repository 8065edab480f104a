"""How SLDD and Q-SENN turn a regularisation path into a final layer (specs/qsenn_sldd.md §6, §7.2, §7.3).

Pure numpy functions on small matrices (C x n), each with the reference's behaviour and the fixes:

SLDD point choice (§6.1): the densest path point with at most `cap` = n_per_class / drop_rate non-zeros per
class on average; ties go to the lower index (more regularised). An all-zero point never qualifies, and when
no point qualifies it is an error naming the setting (the reference silently used point 0, spec bug 5).

SLDD pruning (§6.2): keep the k·C largest |w| of the whole matrix (k = n_per_class; the reference hard-coded
5, bug 4), but first each class's `min_per_class` largest entries, so no class ends without weights (the
reference's global cut could empty a class). Ties at the cut go to the lower (class, feature) index.

Q-SENN quantisation (§7.2): T = per_class·C; t = midpoint between the T-th and (T+1)-th largest non-zero
magnitude; entries with |w| > t become sign(w)·a with a = mean |w| of the kept entries, the rest 0. Fixed:
the largest-magnitude weight keeps its sign (the reference's bucketize boundaries sent w = −max|w| to +a,
bug 1) and ties are symmetric (the reference dropped +t but kept −t). If T ≥ nnz all non-zeros are kept (the
reference then dropped the positive entries of the smallest magnitude). Optionally each class keeps its
largest entry so that no class is empty (`min_per_class`).

Q-SENN bias rule (§7.3): B = max|b|; n_c = #positive − #negative weights of class c; d = n − min n;
b_c = B − d_c·2B/max d. When every class has the same n_c (max d = 0) the reference divided by zero (NaN
biases, bug 2); then no class is favoured: b = 0.
"""

from __future__ import annotations

import numpy as np


def choose_sldd_point(per_class: list[float], cap: float) -> int:
    """Index of the densest point with 0 < non-zeros per class ≤ cap (lowest index among ties)."""
    candidates = [i for i, m in enumerate(per_class) if 0 < m <= cap]
    if not candidates:
        raise ValueError(f"no point of the regularisation path has between 0 and {cap:g} non-zero weights per "
                         f"class (per class along the path: {[round(m, 2) for m in per_class][:20]}...); use more "
                         "path points (sldd.fit.path_points) or a smaller sldd.fit.epsilon")
    return max(candidates, key=lambda i: (per_class[i], -i))


def fill_empty_rows(weight: np.ndarray, later: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """Rows (classes) that are all zero take their row from the first later (denser) path point where it is not."""
    weight = weight.copy()
    filled = []
    for c in np.flatnonzero(~weight.any(axis=1)):
        for W in later:
            if W[c].any():
                weight[c] = W[c]
                filled.append(int(c))
                break
    return weight, filled


def prune_sldd(weight: np.ndarray, n_per_class: int, min_per_class: int = 1) -> np.ndarray:
    """Keep the n_per_class·C largest-magnitude weights, each class's `min_per_class` largest first."""
    C, D = weight.shape
    mag = np.abs(weight)
    keep = np.zeros_like(weight, dtype=bool)
    if min_per_class > 0:
        for c in range(C):
            order = np.argsort(-mag[c], kind="stable")[:min_per_class]
            keep[c, order[mag[c, order] > 0]] = True
    budget = n_per_class * C - int(keep.sum())
    if budget > 0:
        flat = np.flatnonzero((~keep & (mag > 0)).ravel())
        order = flat[np.argsort(-mag.ravel()[flat], kind="stable")]
        keep.ravel()[order[:budget]] = True
    return np.where(keep, weight, 0.0).astype(weight.dtype)


def quantize_qsenn(weight: np.ndarray, per_class: int, min_per_class: int = 0) -> tuple[np.ndarray, float]:
    """Ternary weights {−a, 0, +a} and the shared magnitude a."""
    C = weight.shape[0]
    mag = np.abs(weight)
    values = np.sort(mag[mag > 0])[::-1]
    target = per_class * C
    if values.size == 0:
        return np.zeros_like(weight), 0.0
    if target < values.size:
        threshold = (values[target - 1] + values[target]) / 2
        keep = mag > threshold
    else:
        keep = mag > 0
    if min_per_class > 0:
        for c in np.flatnonzero(keep.sum(axis=1) < min_per_class):
            order = np.argsort(-mag[c], kind="stable")[:min_per_class]
            keep[c, order[mag[c, order] > 0]] = True
    a = float(mag[keep].mean()) if keep.any() else 0.0
    return (np.sign(weight) * keep * a).astype(weight.dtype), a


def qsenn_bias(ternary: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The bias rule: linear in the net number of positive weights, from +B (fewest) to −B (most)."""
    B = float(np.abs(bias).max()) if bias.size else 0.0
    net = (ternary > 0).sum(axis=1) - (ternary < 0).sum(axis=1)
    d = net - net.min()
    spread = d.max()
    if spread == 0:
        return np.zeros_like(bias)
    return np.clip(B - d * 2 * B / spread, -B, B).astype(bias.dtype)
