"""Problem generators for tests, the benchmark and trainer smoke runs.

`realistic_problem` mimics the structure of real QPM inputs: image features are non-negative
responses (ReLU) to a low-rank latent code; classes are grouped into superclasses (similar classes
share prototypes); A is the Pearson correlation of each feature with each class indicator in the
closed form of spec 5.2, R the cosine similarity of A's rows (5.3), b a locality-like score clipped
and scaled as in 5.4. Only sufficient statistics are accumulated, class by class, so the N x F
feature matrix is never held in memory.
"""
from __future__ import annotations

import numpy as np

from .problem import Problem

B_SCALE = 0.1 * np.sqrt(10.0)  # spec 5.4: values end in [-0.316, 0.316]


def cosine_similarity_rows(A: np.ndarray) -> np.ndarray:
    """R of spec 5.3: cosine similarity of A's rows (norms clamped at 1e-8), divided by max |R|."""
    U = A / np.maximum(np.linalg.norm(A, axis=1, keepdims=True), 1e-8)
    R = U @ U.T
    R = 0.5 * (R + R.T)
    return R / max(float(np.max(np.abs(R))), 1e-12)


def clip_scale(v: np.ndarray, lo_q: float = 0.02, hi_q: float = 0.98) -> np.ndarray:
    """Spec 5.4 step 4 with a quantile range standing in for the MeanShift cluster, and outliers
    clipped *into* [lo, hi] (the reference's |lo| * sign(v) flips sides for some values: bug 10)."""
    lo, hi = np.quantile(v, [lo_q, hi_q])
    v = np.clip(v, lo, hi)
    v = v - v.mean()
    return B_SCALE * v / max(float(np.max(np.abs(v))), 1e-12)


def correlation_from_stats(class_sums, class_counts, total_sum, total_sq) -> np.ndarray:
    """A_jc = (mu_j|c - mu_j) / sigma_j * sqrt(p_c / (1 - p_c)), population statistics (spec 5.2).

    A feature with zero variance gets A = 0 instead of NaN (bug 15)."""
    N = class_counts.sum()
    mu = total_sum / N
    sigma = np.sqrt(np.maximum(total_sq / N - mu**2, 0.0))
    p = class_counts / N
    mu_c = class_sums / class_counts[:, None]                  # C x F
    safe = np.where(sigma > 1e-12, sigma, np.inf)
    A = ((mu_c - mu) / safe).T * np.sqrt(p / (1 - p))[None, :]
    return A / max(float(np.max(np.abs(A))), 1e-12)


def realistic_problem(F: int = 2048, C: int = 1000, n: int = 50, k: int = 5, *, rank: int = 64,
                      samples_per_class: int = 12, superclass_size: int = 10, seed: int = 0,
                      **options) -> Problem:
    rng = np.random.default_rng(seed)
    rank = min(rank, max(2, C))
    n_super = max(1, C // superclass_size)
    centres = rng.normal(size=(n_super, rank))
    protos = centres[rng.integers(n_super, size=C)] + 0.8 * rng.normal(size=(C, rank))
    mixing = rng.normal(size=(rank, F)) * (rng.random((rank, F)) < 0.3)  # sparse feature loadings
    mixing /= np.maximum(np.linalg.norm(mixing, axis=0, keepdims=True), 1e-8)
    offset = rng.normal(-0.3, 0.3, size=F)
    class_sums = np.zeros((C, F))
    total_sum, total_sq = np.zeros(F), np.zeros(F)
    counts = np.full(C, float(samples_per_class))
    for c in range(C):
        z = protos[c] + 0.7 * rng.normal(size=(samples_per_class, rank))
        x = np.maximum(z @ mixing + offset + 0.3 * rng.normal(size=(samples_per_class, F)), 0.0)
        class_sums[c] = x.sum(axis=0)
        total_sum += class_sums[c]
        total_sq += (x * x).sum(axis=0)
    A = correlation_from_stats(class_sums, counts, total_sum, total_sq)
    R = cosine_similarity_rows(A)
    peak = rng.beta(2.0, 5.0, size=F)
    peak[rng.random(F) < 0.02] *= 4.0   # a few outliers, as MeanShift would see them
    edge = rng.normal(size=F)
    combined = np.where(clip_scale(edge) >= 0, clip_scale(peak).min(), clip_scale(peak))
    b = clip_scale(combined)
    return Problem.create(A, R, b, n, k, options=options)


def random_problem(F: int, C: int, n: int, k: int, *, seed: int = 0, **options) -> Problem:
    """Small unstructured instance: A uniform in [-1, 1], R = cosine of A's rows, b in [-0.316, 0.316]."""
    rng = np.random.default_rng(seed)
    A = rng.uniform(-1, 1, size=(F, C))
    A /= np.max(np.abs(A))
    return Problem.create(A, cosine_similarity_rows(A), rng.uniform(-B_SCALE, B_SCALE, size=F), n, k,
                          options=options)
