"""The `glm` config section: the sparse GLM behind SLDD and Q-SENN (and later IIS), declared by each method that
uses it (qpm_dist.methods)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from qpm_dist.config import bounded


@dataclass
class GLMPathConfig:
    """One regularisation path of the sparse GLM (specs/qsenn_sldd.md §3.2, §4, §5)."""

    alpha: float = bounded(0.99, ge=0, le=1)  # share of the L1 / group term in the elastic net
    path_points: int = bounded(100, ge=2)  # λ values from λ_max down to epsilon·λ_max, geometric
    epsilon: float = bounded(1e-3, gt=0, lt=1)
    lookbehind: int = bounded(5, ge=1)  # glm_saga only: stop a λ after this many epochs without improvement


@dataclass
class SelectionConfig:
    """Greedy feature selection (qpm_dist.glm.path): the features selected so far are fitted with a ridge term
    of epsilon·λ_max (λ_max of the group lasso with this alpha) before the next one is chosen."""

    # the group lasso's share in the reference's selection penalty (sets λ_max)
    alpha: float = bounded(0.8, gt=0, le=1)
    epsilon: float = bounded(1e-3, gt=0, lt=1)
    lookbehind: int = bounded(3, ge=1)  # glm_saga only: stop a fit after this many epochs without improvement


@dataclass
class SagaSolverConfig:
    """glm-saga's settings (the reference's values)."""

    batch_size: int = bounded(256, ge=1)
    lr: float = bounded(0.1, gt=0)
    max_epochs: int = bounded(2000, ge=1)  # per λ
    tol: float = bounded(1e-4, gt=0)


@dataclass
class FastSolverConfig:
    tol: float = bounded(1e-4, gt=0)  # per λ: stop at ‖proximal-gradient residual‖_∞ <= tol (a KKT measure)
    max_iter: int = bounded(2000, ge=1)  # per λ
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
    saga_max_table: int = bounded(100_000_000, ge=0)  # float32 entries: 400 MB
    # The features stage: global batch of its pass and the dtype of the per-rank feature files.
    batch_size: int = bounded(128, ge=1)
    features_dtype: Literal["float32", "float16"] = "float32"
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    fit: GLMPathConfig = field(default_factory=lambda: GLMPathConfig(alpha=0.99, lookbehind=5))
    saga: SagaSolverConfig = field(default_factory=SagaSolverConfig)
    fast: FastSolverConfig = field(default_factory=FastSolverConfig)
