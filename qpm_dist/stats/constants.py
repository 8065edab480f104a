"""QPM's problem constants from the all-reduced feature sums (specs/qpm.md §5.2–5.4).

A (F x C): Pearson correlation of feature j with the indicator of class c, in the closed form
    A_jc = (μ_{j|c} − μ_j) / σ_j · sqrt(p_c / (1 − p_c)),
divided by max |A|. A feature with zero variance gets A = 0 (the reference produced NaN, spec bug 15).
R (F x F): cosine similarity of A's rows, divided by max |R|.
B (F): locality bias from the share-weighted softmax peaks and border hits, outlier-clipped with
MeanShift and scaled to ±0.1·√10. The clip keeps values on their side of the cluster bounds (the
reference mapped v < lo to |lo|·sign(v), which flips the side for values of the other sign, spec bug 10).
"""

from __future__ import annotations

import math

import numpy as np

from qpm_dist.stats.accumulate import FeatureSums
from qpm_dist.utils import log

B_SCALE = 0.1 * math.sqrt(10)


def compute_A(sums: FeatureSums) -> np.ndarray:
    n = float(sums.count)
    mean, std = sums.mean.numpy(), sums.std.numpy()
    counts = sums.class_counts.numpy()
    if np.any(counts == 0):
        raise ValueError(f"classes without training samples: {np.flatnonzero(counts == 0)[:10].tolist()}")
    class_means = sums.class_sums.numpy() / counts[:, None]  # C x F
    p = counts / n
    dead = std <= 1e-12 * max(1.0, float(np.abs(mean).max()))
    if dead.any():
        log.warning("%d feature(s) have zero variance on the training set; their A rows are 0", int(dead.sum()))
    safe_std = np.where(dead, 1.0, std)
    A = (class_means - mean[None, :]) / safe_std[None, :] * np.sqrt(p / (1 - p))[:, None]
    A[:, dead] = 0.0
    A = A.T  # F x C
    scale = np.abs(A).max()
    return A / scale if scale > 0 else A


def compute_R(A: np.ndarray) -> np.ndarray:
    norms = np.maximum(np.linalg.norm(A, axis=1), 1e-8)
    unit = A / norms[:, None]
    R = unit @ unit.T
    scale = np.abs(R).max()
    return R / scale if scale > 0 else R


def clip_scale(values: np.ndarray) -> np.ndarray:
    """Clip outliers to the bounds of the most populated MeanShift cluster, centre, scale to ±B_SCALE."""
    from sklearn.cluster import MeanShift  # scikit-learn's import costs ~0.5 s; only B needs it

    v = np.asarray(values, dtype=np.float64)
    if v.size > 1 and np.ptp(v) > 0:
        labels = MeanShift().fit(v.reshape(-1, 1)).labels_
        main = np.bincount(labels).argmax()
        lo, hi = v[labels == main].min(), v[labels == main].max()
        v = np.clip(v, lo, hi)
    v = v - v.mean()
    scale = np.abs(v).max()
    return v / scale * B_SCALE if scale > 0 else v


def compute_B(sums: FeatureSums) -> np.ndarray:
    peak_share = sums.peak_sum.numpy() / float(sums.count)  # L_j
    edge_mass = -sums.edge_sum.numpy()  # E_j: larger = less border-focused
    L, E = clip_scale(peak_share), clip_scale(edge_mass)
    combined = np.where(E >= 0, L, L.min())  # border-focused features get the worst locality score
    return clip_scale(combined)
