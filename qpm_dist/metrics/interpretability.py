"""Interpretability metrics of specs/qpm.md §7, as pure functions of streamed sums or small matrices.

Each function documents which sums it needs; `qpm_dist.metrics.collect` accumulates them over ranks.
Deviations from the reference, all listed as bugs in the spec:
* SID/diversity counts every test image (the reference dropped the last partial chunk, bug 18);
* Correlation is the Pearson correlation for every model (the reference used uncentred cosine for dense
  models and standardised features for sparse ones, so the two were not comparable, bug 20);
* Contrastiveness fits seeded GMMs (bug 20) on a uniform subsample of the training rows;
* Structural grounding runs wherever a ground-truth class similarity exists (CUB attributes, the
  synthetic class x part matrix), not "if the training set is smaller than 7000 images" (bug 19).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import norm


def diversity_terms(feature_maps: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor, ks: range,
                    sum_n_max: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per batch: Σ_b D_k(b) and the number of counted images, for every k in `ks` (spec §7.3).

    D_k(b) = (1/k) Σ_p max_{j ∈ top-k(V[ĉ_b])} P_j(p); an image counts for k only if its predicted class has
    at least k nonzero weights. With `sum_n_max`, each map is divided by its mean absolute value (clamped at
    1e-5) before the spatial softmax (the SID variant). A k above the model's number of features counts no image
    (no class can have k weights), so a model with fewer than 5 features still gets @1..@n and no @5.
    """
    maps = feature_maps.float()
    b, f, h, w = maps.shape
    flat = maps.reshape(b, f, h * w)
    if sum_n_max:
        flat = flat / flat.abs().mean(dim=2, keepdim=True).clamp_min(1e-5)
    prob = torch.softmax(flat, dim=2)
    rows = weights[logits.argmax(dim=1)].float()  # B x F
    nonzero = (rows != 0).sum(dim=1)
    sums, counts = [], []
    for k in ks:
        top = rows.topk(min(k, f), dim=1).indices  # largest signed weights; k > f counts no image below
        chosen = prob.gather(1, top[:, :, None].expand(-1, -1, h * w))
        d = chosen.max(dim=1).values.sum(dim=1) / k
        counted = nonzero >= k
        sums.append((d * counted).sum())
        counts.append(counted.sum())
    return torch.stack(sums).double(), torch.stack(counts).double()


def dependence_terms(features: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ over samples of max_j |x_j V[ĉ, j]| / Σ_j |x_j V[ĉ, j]|, and the number of samples (spec §7.8)."""
    contrib = (features.float() * weights[logits.argmax(dim=1)].float()).abs()
    total = contrib.sum(dim=1)
    valid = total > 0
    share = contrib.max(dim=1).values / total.clamp_min(1e-30)
    return (share * valid).sum().double(), valid.sum().double()


def class_independence(min_: np.ndarray, total: np.ndarray, class_sums: np.ndarray, class_counts: np.ndarray,
                       count: float) -> float:
    """CI = 1 − mean_j max_c share_cj with features shifted to a zero minimum (spec §7.4).

    share_cj = Σ_{i∈c} (x_ij − min_j) / Σ_i (x_ij − min_j) = (S_cj − n_c·min_j) / (T_j − N·min_j).
    """
    shifted_class = class_sums - class_counts[:, None] * min_[None, :]
    shifted_total = np.maximum(total - count * min_, 1e-8)
    return float(1.0 - (shifted_class / shifted_total[None, :]).max(axis=0).mean())


def correlation(gram: np.ndarray, total: np.ndarray, count: float) -> float:
    """mean_j max_{j'≠j} Pearson(x_j, x_j') from XᵀX, Σx and N (spec §7.7, centred for every model)."""
    mean = total / count
    cov = gram / count - np.outer(mean, mean)
    std = np.sqrt(np.clip(np.diag(cov), 0, None))
    std = np.where(std > 0, std, np.inf)  # constant features correlate with nothing
    corr = cov / np.outer(std, std)
    np.fill_diagonal(corr, -np.inf)
    if corr.shape[0] < 2:
        return float("nan")
    return float(corr.max(axis=1).mean())


def gaussian_overlap(mu1: float, s1: float, mu2: float, s2: float, grid: int = 4001) -> float:
    """Overlapping coefficient ∫ min(N(μ1, s1²), N(μ2, s2²)) of two normal densities (numerically)."""
    lo = min(mu1 - 8 * s1, mu2 - 8 * s2)
    hi = max(mu1 + 8 * s1, mu2 + 8 * s2)
    x = np.linspace(lo, hi, grid)
    return float(np.trapezoid(np.minimum(norm.pdf(x, mu1, s1), norm.pdf(x, mu2, s2)), x))


def contrastiveness(samples: np.ndarray, seed: int = 0) -> float:
    """1 − mean_j OVL_j of a 2-component GMM fitted to each feature column (spec §7.5; weights ignored)."""
    from sklearn.mixture import GaussianMixture  # scikit-learn's import costs ~0.5 s; only this metric needs it

    overlaps = []
    for column in samples.T:
        if np.ptp(column) == 0:
            overlaps.append(1.0)  # a constant feature separates nothing
            continue
        gmm = GaussianMixture(n_components=2, random_state=seed).fit(column.reshape(-1, 1))
        mu = gmm.means_.ravel()
        sd = np.sqrt(gmm.covariances_.ravel())
        overlaps.append(gaussian_overlap(mu[0], sd[0], mu[1], sd[1]))
    return float(1.0 - np.mean(overlaps))


def cosine_matrix(rows: np.ndarray) -> np.ndarray:
    norms = np.maximum(np.linalg.norm(rows, axis=1), 1e-12)
    unit = rows / norms[:, None]
    sim = unit @ unit.T
    np.fill_diagonal(sim, 0.0)
    return sim


def structural_grounding(weights: np.ndarray, gt_similarity: np.ndarray, top: int = 50,
                         positive: bool = False) -> float:
    """Σ Q / Σ G over the `top` most similar class pairs of the ground truth G (spec §7.6).

    Q is the cosine similarity of the classes' weight rows (used features only), diagonal 0; `positive=True`
    clips negative weights to 0 first (the similarity of what each class looks for, without what it rules out).
    Entries tied with the `top`-th largest G are averaged (each weighs (top − entries above) / tied entries):
    numerator and denominator are their expected values over the arbitrary choice a plain top-`top` cut makes
    (the reference's argsort). The score is not bounded by 1: where the model's rows are more alike than the
    ground truth's (Q > G), it exceeds 1.
    """
    w = np.clip(weights, 0, None) if positive else weights
    used = np.abs(w).sum(axis=0) > 0
    q = cosine_matrix(w[:, used])
    g = gt_similarity.copy()
    np.fill_diagonal(g, 0.0)
    values = np.sort(g, axis=None)[::-1]
    top = min(top, values.size)
    threshold = values[top - 1]
    above = g > threshold
    tied = g == threshold
    weight = above + tied * (top - above.sum()) / max(tied.sum(), 1)
    denom = float((weight * g).sum())
    return float((weight * q).sum() / denom) if denom > 0 else float("nan")


def sparsity(weights: np.ndarray) -> dict:
    used = np.abs(weights).sum(axis=0) > 0
    return {"NFfeatures": int(used.sum()), "PerClass": float((weights[:, used] != 0).sum() / weights.shape[0])}


def part_recovery(assignment: np.ndarray, class_parts: np.ndarray) -> dict:
    """How well a binary class x feature assignment recovers the ground-truth class x part matrix.

    Features are matched one-to-one to parts (Hungarian) maximising the Jaccard agreement of their class
    sets; `recovered` is the share of ground-truth class–part links whose matched feature is assigned to
    that class, `precision` the share of the matched features' assignments that are true links.
    """
    a = (np.asarray(assignment) != 0).astype(np.float64)  # C x n
    g = (np.asarray(class_parts) != 0).astype(np.float64)  # C x P
    inter = a.T @ g  # n x P
    union = a.sum(0)[:, None] + g.sum(0)[None, :] - inter
    jaccard = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    feat, part = linear_sum_assignment(-jaccard)
    recovered = inter[feat, part].sum()
    return {
        "recovered": float(recovered / max(g.sum(), 1)),
        "precision": float(recovered / max(a[:, feat].sum(), 1)),
        "matched_jaccard": float(jaccard[feat, part].mean()),
        "matching": {int(f): int(p) for f, p in zip(feat, part)},
    }


def links_recovered(assignment: np.ndarray, class_parts: np.ndarray, matching: dict[int, int]) -> float:
    """Share of ground-truth class–part links (c, p) whose feature (matching: feature -> part) is assigned
    to class c."""
    a, g = np.asarray(assignment) != 0, np.asarray(class_parts) != 0
    hit = sum(int((a[:, f] & g[:, p]).sum()) for f, p in matching.items())
    return float(hit / max(g.sum(), 1))


def random_part_recovery(class_parts: np.ndarray, n_features: int, links_per_class, draws: int = 200,
                         seed: int = 0) -> float:
    """Expected `recovered` of random assignments with the same number of links per class as the evaluated
    model (`links_per_class`: one count per class, or one count for every class)."""
    rng = np.random.default_rng(seed)
    c = class_parts.shape[0]
    counts = np.broadcast_to(np.asarray(links_per_class, dtype=np.int64), (c,))
    values = []
    for _ in range(draws):
        a = np.zeros((c, n_features))
        for row, k in zip(a, counts):
            row[rng.choice(n_features, size=int(min(k, n_features)), replace=False)] = 1
        values.append(part_recovery(a, class_parts)["recovered"])
    return float(np.mean(values))


def top_k_assignment(weights: np.ndarray, k: int) -> np.ndarray:
    """Binary C x F matrix of each class's k largest positive weights (to compare dense models too)."""
    out = np.zeros_like(weights, dtype=np.float64)
    idx = np.argsort(-weights, axis=1)[:, :k]
    np.put_along_axis(out, idx, 1.0, axis=1)
    return out * (weights > 0)


def class_links(weights: np.ndarray, k: int) -> np.ndarray:
    """The class–feature links a head asserts, as a binary C x F matrix: a sparse head's positive weights
    (binary, signed and ternary heads alike: a negative weight says the class lacks the feature); a
    dense head, which has no zeros, by its k largest positive weights per class (to compare it at all)."""
    w = np.asarray(weights)
    if (w == 0).any():
        return (w > 0).astype(np.float64)
    return top_k_assignment(w, k)


def link_scores(weights: np.ndarray, links: np.ndarray, class_parts: np.ndarray, matching: dict[int, int]) -> dict:
    """Precision and F1 of the links against the ground truth through the feature–part `matching`, and the
    share of negative weights on matched features that fall on parts the class lacks (what a negative weight
    should say)."""
    g = np.asarray(class_parts) != 0
    feats = np.array(sorted(matching), dtype=np.int64)
    parts = np.array([matching[f] for f in feats], dtype=np.int64)
    truth = g[:, parts]  # C x matched features: does the class have the feature's part?
    linked = np.asarray(links)[:, feats] != 0
    hits = int((linked & truth).sum())
    precision = hits / max(int(linked.sum()), 1)
    recall = hits / max(int(g.sum()), 1)
    negative = np.asarray(weights)[:, feats] < 0
    return {"precision": precision, "f1": 2 * precision * recall / (precision + recall) if hits else 0.0,
            "negative_links": int(negative.sum()),
            "negative_on_absent": float((negative & ~truth).sum() / negative.sum()) if negative.any() else None}


def finite_or_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else value
