"""The `glm` config section: the sparse GLM behind SLDD and Q-SENN (and later IIS), declared by each method that
uses it (qpm_dist.methods)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from qpm_dist.config import ConfigError


@dataclass
class GLMPathConfig:
    """One regularisation path of the sparse GLM (specs/qsenn_sldd.md §3.2, §4, §5)."""

    alpha: float = 0.99  # share of the L1 / group term in the elastic net
    path_points: int = 100  # λ values from λ_max down to epsilon·λ_max, geometric
    epsilon: float = 1e-3
    lookbehind: int = 5  # glm_saga only: stop a λ after this many epochs without improvement

    def check(self, key: str) -> None:
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"{key}.alpha: expected a number in [0, 1], got {self.alpha}")
        if self.path_points < 2 or not 0 < self.epsilon < 1 or self.lookbehind < 1:
            raise ConfigError(f"{key}: expected path_points >= 2, 0 < epsilon < 1 and lookbehind >= 1, got "
                              f"{self.path_points}, {self.epsilon}, {self.lookbehind}")


@dataclass
class SelectionConfig:
    """Greedy feature selection (qpm_dist.glm.path): the features selected so far are fitted with a ridge term
    of epsilon·λ_max (λ_max of the group lasso with this alpha) before the next one is chosen."""

    alpha: float = 0.8  # the group lasso's share in the reference's selection penalty (sets λ_max)
    epsilon: float = 1e-3
    lookbehind: int = 3  # glm_saga only: stop a fit after this many epochs without improvement

    def check(self, key: str) -> None:
        if not 0 < self.alpha <= 1 or not 0 < self.epsilon < 1 or self.lookbehind < 1:
            raise ConfigError(f"{key}: expected 0 < alpha <= 1, 0 < epsilon < 1 and lookbehind >= 1, got "
                              f"{self.alpha}, {self.epsilon}, {self.lookbehind}")


@dataclass
class SagaSolverConfig:
    """glm-saga's settings (the reference's values)."""

    batch_size: int = 256
    lr: float = 0.1
    max_epochs: int = 2000  # per λ
    tol: float = 1e-4


@dataclass
class FastSolverConfig:
    tol: float = 1e-4  # per λ: stop at ‖proximal-gradient residual‖_∞ <= tol (a KKT measure)
    max_iter: int = 2000  # per λ
    screening: bool = True  # sequential strong rules + KKT check (large feature counts)


@dataclass
class GLMConfig:
    """The sparse GLM: greedy feature selection and the sparse fit (elastic-net path)."""

    # glm_saga: the reference solver (glm-saga's API, rank 0, all rows in memory; small data).
    # fast: full-batch FISTA over the ranks' feature shards, gradients all-reduced (large data).
    # auto: the selection with fast; each fit path with glm_saga where it is affordable (train rows x classes at
    # most saga_max_table, the size of glm-saga's per-example table), else fast. glm-saga stops each λ early,
    # which a method that uses the end of the path (Q-SENN) reads as a more regularised point than the exact
    # solution fast reaches (see qsenn.fast_epsilon).
    solver: Literal["auto", "glm_saga", "fast"] = "auto"
    saga_max_table: int = 100_000_000  # float32 entries: 400 MB
    # The features stage: global batch of its pass and the dtype of the per-rank feature files.
    batch_size: int = 128
    features_dtype: Literal["float32", "float16"] = "float32"
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    fit: GLMPathConfig = field(default_factory=lambda: GLMPathConfig(alpha=0.99, lookbehind=5))
    saga: SagaSolverConfig = field(default_factory=SagaSolverConfig)
    fast: FastSolverConfig = field(default_factory=FastSolverConfig)

    def check(self, key: str) -> None:
        if self.batch_size < 1 or self.saga.batch_size < 1 or self.saga.max_epochs < 1 or self.fast.max_iter < 1:
            raise ConfigError(f"{key}.batch_size, {key}.saga.batch_size, {key}.saga.max_epochs and "
                              f"{key}.fast.max_iter must be positive integers")
        if self.saga_max_table < 0:
            raise ConfigError(f"{key}.saga_max_table: expected a non-negative integer, got {self.saga_max_table}")
        if self.saga.tol <= 0 or self.fast.tol <= 0 or self.saga.lr <= 0:
            raise ConfigError(f"{key}.saga.tol, {key}.saga.lr and {key}.fast.tol must be positive")
