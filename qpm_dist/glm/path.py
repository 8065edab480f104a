"""λ-path walks shared by both solvers (specs/qsenn_sldd.md §4, §5, §10).

Feature selection (group lasso, α = 0.8): walk the λ grid from λ_max down with warm starts and record the
order in which input features become active; stop as soon as n features have entered. Features entering at
the same λ are ordered by their column norm. This is the "continue from the current λ" variant the spec's
scaling notes suggest: the reference instead lets at most one new feature in at a time through a modified
proximal operator that never zeroes (and can reflect) selected columns, and restarts the whole path from the
top after every addition (spec §4.3–4.4, bugs 6–7) — 50 restarted path walks, its most expensive step.

Sparse fit (elastic net, α = 0.99): the same walk on the selected features, keeping every path point;
SLDD stops after the first point that is denser than it can use (spec §10), Q-SENN walks to λ_min.

The walks do no communication themselves: a FastGLM solver all-reduces inside `solve` (every rank walks),
a SagaGLM solver runs on rank 0 alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from qpm_dist.glm.problem import column_scores
from qpm_dist.utils import log


@dataclass
class PathPoint:
    index: int
    lam: float
    weight: np.ndarray  # C x D
    bias: np.ndarray  # C
    nnz: int
    train_acc: float | None = None
    test_acc: float | None = None
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def per_class(self) -> float:
        return self.nnz / self.weight.shape[0]


def select_features(solver, lams: list[float], alpha: float, n_features: int, fallback_scores: torch.Tensor,
                    progress: Callable[[str], None] | None = None) -> tuple[list[int], list[dict]]:
    """The first `n_features` input features to enter the group-lasso path, in entry order."""
    order: list[int] = []
    entered: set[int] = set()
    records = []
    for k, lam in enumerate(lams):
        start = time.perf_counter()
        info = solver.solve(lam, alpha, group=True)
        norms = solver.W.norm(dim=0).cpu()
        new = [int(j) for j in torch.argsort(-norms, stable=True).tolist() if norms[j] > 0 and int(j) not in entered]
        order.extend(new)
        entered.update(new)
        records.append({"index": k, "lam": lam, "active": int((norms > 0).sum()), "entered": new,
                        "seconds": round(time.perf_counter() - start, 3), **info})
        if progress and (new or k == 0):
            progress(f"selection: λ {k + 1}/{len(lams)} = {lam:.4g}, {len(order)}/{n_features} features entered")
        if len(order) >= n_features:
            break
    if len(order) < n_features:
        rest = [int(j) for j in torch.argsort(-fallback_scores.cpu(), stable=True).tolist() if int(j) not in entered]
        log.warning("selection: only %d features entered the path down to λ_min = %.3g; the remaining %d are "
                    "taken by their correlation with the labels", len(order), lams[-1], n_features - len(order))
        order.extend(rest[: n_features - len(order)])
    return order[:n_features], records


def fit_path(solver, lams: list[float], alpha: float, stop: Callable[[list[PathPoint]], bool] | None = None,
             columns: torch.Tensor | None = None,
             progress: Callable[[str], None] | None = None) -> list[PathPoint]:
    """Elastic-net path on the solver's features, every point kept (weights copied to the host)."""
    points: list[PathPoint] = []
    for k, lam in enumerate(lams):
        start = time.perf_counter()
        info = solver.solve(lam, alpha, group=False)
        acc = solver.accuracy()
        W, b = solver.W.detach().cpu().numpy().copy(), solver.b.detach().cpu().numpy().copy()
        points.append(PathPoint(k, lam, W, b, int(np.count_nonzero(W)), acc.get("train_acc"), acc.get("test_acc"),
                                round(time.perf_counter() - start, 3), info))
        if progress and (k % 10 == 0 or k == len(lams) - 1):
            progress(f"fit: λ {k + 1}/{len(lams)} = {lam:.4g}, {points[-1].per_class:.2f} non-zeros per class, "
                     f"train {acc.get('train_acc', float('nan')):.1f}%")
        if stop is not None and stop(points):
            break
    return points


def scores_at_start(corr: torch.Tensor, group: bool) -> torch.Tensor:
    """How strongly each feature's gradient pulls at W = 0 (D): the fallback ranking for the selection."""
    return column_scores(corr.T, group)
