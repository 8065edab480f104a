"""The sparse GLM both solvers fit (specs/qsenn_sldd.md §3.1, §3.2).

Multinomial logistic regression on standardised features x̃ = (x − μ) / max(σ, 1e-6), bias unpenalised:

    F(W, b) = (1/n) Σ_i CE(W x̃_i + b, y_i) + λ·[α·P(W) + ((1 − α)/2)·‖W‖_F²],

with P(W) = ‖W‖₁ (elastic net) or Σ_j ‖W_:,j‖₂ (group lasso over the classes of input feature j, used
for feature selection). W is C × D (rows: classes, columns: input features), as in torch's nn.Linear.

λ_max is the smallest λ whose solution is W = 0 (with b at its optimum, softmax(b) = ȳ). It is computed
exactly on the standardised features from the all-reduced class sums (the reference used the raw features
for the selection and fitted n = 0.9·N rows with n_ex = N, spec bug 6).

One clamp for σ everywhere (1e-6, the sparse head's): the solver sees exactly the features the head will
compute (the reference clamped at 1e-5 in the solver and 1e-6 in the head, spec bug 16).
"""

from __future__ import annotations

import math

import torch

STD_CLAMP = 1e-6


def standardise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean) / std.clamp_min(STD_CLAMP)


def class_correlation(class_sums: torch.Tensor, class_counts: torch.Tensor, mean: torch.Tensor,
                      std: torch.Tensor, count: float) -> torch.Tensor:
    """(1/n) Σ_i x̃_ij (Y_ic − ȳ_c) as a D × C float64 matrix, from streamed sums (no N × D matrix).

    Σ_i x̃_ij (Y_ic − ȳ_c) = (S_cj − n_c μ_j) / σ_j with S = Xᵀ·onehot(y) the raw class sums.
    This is minus the gradient of the mean cross-entropy w.r.t. W at W = 0 and the optimal bias.
    """
    S = class_sums.double()  # C x D
    centred = S - class_counts.double()[:, None] * mean.double()[None, :]
    return (centred / std.double().clamp_min(STD_CLAMP)[None, :]).T / float(count)


def column_scores(grad: torch.Tensor, group: bool) -> torch.Tensor:
    """Per input feature: the size of the gradient block that its penalty term must absorb (C x D -> D)."""
    return grad.norm(dim=0) if group else grad.abs().amax(dim=0)


def lambda_max(corr: torch.Tensor, alpha: float, group: bool) -> float:
    """Smallest λ with an all-zero W; `corr` is class_correlation (D x C). Same α guard as glm-saga."""
    return float(column_scores(corr.T, group).max()) / max(alpha, 1e-3)


def lambda_grid(lam_max: float, points: int, epsilon: float) -> list[float]:
    """`points` values from λ_max down to ε·λ_max, geometric (glm-saga's logspace grid, spec §3.2)."""
    if points == 1:
        return [lam_max]
    lo, hi = math.log10(lam_max * epsilon), math.log10(lam_max)
    return [10 ** (hi + (lo - hi) * k / (points - 1)) for k in range(points)]


def prox(V: torch.Tensor, tau: float, kappa: float, group: bool) -> torch.Tensor:
    """Proximal operator of τ·P(W) + (κ/2)·‖W‖² (τ = step·λ·α, κ = step·λ·(1 − α)).

    Elastic net: soft-threshold then shrink by 1/(1 + κ). Group: each column is scaled by
    max(0, 1 − τ/‖v_j‖) / (1 + κ); an all-zero column stays zero (glm-saga divides 0 by 0, spec bug 8).
    """
    if group:
        norms = V.norm(dim=0, keepdim=True)
        scale = (1 - tau / norms.clamp_min(1e-30)).clamp_min(0)
        return V * scale / (1 + kappa)
    return V.sign() * (V.abs() - tau).clamp_min(0) / (1 + kappa)


def penalty(W: torch.Tensor, lam: float, alpha: float, group: bool) -> float:
    sparse = W.norm(dim=0).sum() if group else W.abs().sum()
    return float(lam * (alpha * sparse + 0.5 * (1 - alpha) * W.double().square().sum()))


def optimal_bias(class_counts: torch.Tensor) -> torch.Tensor:
    """b with softmax(b) = ȳ and Σ_c b_c = 0 (the bias both solvers keep: the bias gradient sums to 0)."""
    p = class_counts.double() / class_counts.double().sum()
    b = p.clamp_min(1e-12).log()
    return (b - b.mean()).float()
