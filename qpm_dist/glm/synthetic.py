"""Synthetic "deep features" for solver tests and the sparse-solver benchmark.

Post-ReLU-like, correlated, with class information spread unevenly over a subset of features:
x = relu(P[y] + L·z + ε), P (C x D) sparse non-negative class profiles on `informative` features with
feature-dependent strength, z ~ N(0, I_k) shared factors (correlated features), ε ~ N(0, noise²).
"""

from __future__ import annotations

import numpy as np


def synthetic_features(n: int, d: int, c: int, informative: int | None = None, noise: float = 1.0,
                       factors: int = 8, density: float = 0.15, seed: int = 0,
                       n_test: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X_train, y_train, X_test, y_test), float32 features and int64 labels."""
    rng = np.random.default_rng(seed)
    informative = informative or max(1, d // 4)
    strength = rng.uniform(0.3, 1.5, size=informative)
    profiles = np.zeros((c, d), dtype=np.float32)
    mask = rng.random((c, informative)) < density
    profiles[:, :informative] = mask * rng.gamma(2.0, 1.0, size=(c, informative)) * strength
    loadings = rng.normal(0, 0.5, size=(d, factors)).astype(np.float32)
    offset = rng.normal(0.5, 0.3, size=d).astype(np.float32)
    perm = rng.permutation(d)  # informative features are not the first columns

    def draw(m: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, c, m)
        z = rng.normal(size=(m, factors)).astype(np.float32)
        x = profiles[y] + z @ loadings.T + offset + rng.normal(0, noise, size=(m, d)).astype(np.float32)
        return np.maximum(x, 0)[:, perm].astype(np.float32), y.astype(np.int64)

    X, y = draw(n)
    Xt, yt = draw(n_test)
    return X, y, Xt, yt
