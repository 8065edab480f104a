"""Streamed, all-reduced evaluation of a model: accuracy and the interpretability metrics.

Two passes with test-time transforms, each rank over its shard, nothing per-image kept except a small
uniform subsample of training feature rows for the contrastiveness GMMs:
* test set: top-1/top-5, diversity@k and SID@k (needs the feature maps, processed batch by batch — the
  reference kept all test maps in RAM, ~320 GB for a dense ResNet-50 on ImageNet);
* training set: feature sums (class independence), XᵀX (correlation), dependence, the GMM subsample.
Then, where the dataset has boxes, the pointing game, SPG and CH of the true class's Grad-CAM (metrics.pointing;
its own pass, the reference's whole-image input with eval.pointing_resize) and the synthetic part localisation.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from qpm_dist import dist
from qpm_dist.config import DataConfig, EvalConfig
from qpm_dist.dist import DistInfo
from qpm_dist.engine.evaluate import accuracy_terms
from qpm_dist.engine.streaming import model_outputs
from qpm_dist.metrics import interpretability as M
from qpm_dist.metrics.parts import part_boxes_available, part_localisation
from qpm_dist.metrics.pointing import pointing_metrics
from qpm_dist.stats.accumulate import FeatureSums

def _ks(n_per_class: int) -> range:
    """diversity@k / SID@k for k = 1..max(5, features per class): @5 is the paper's, @k the model's own."""
    return range(1, max(5, n_per_class) + 1)


def _test_pass(model, loader, info: DistInfo, autocast, weights: torch.Tensor, ks: range) -> dict:
    device = info.device
    acc = torch.zeros(4, dtype=torch.float64, device=device)
    div = {name: [torch.zeros(len(ks), dtype=torch.float64, device=device) for _ in range(2)]
           for name in ("diversity", "SID")}
    for out, labels in model_outputs(model, loader, info, autocast, desc="metrics: test set"):
        logits = out.logits.float()
        acc += accuracy_terms(logits, labels)
        for name, sum_n_max in (("diversity", False), ("SID", True)):
            s, c = M.diversity_terms(out.feature_maps, logits, weights, ks, sum_n_max)
            div[name][0] += s
            div[name][1] += c
    loss, top1, top5, count = dist.all_reduce(acc).tolist()
    result = {"accuracy": 100 * top1 / max(count, 1), "top5": 100 * top5 / max(count, 1),
              "test_loss": loss / max(count, 1), "test_images": int(count)}
    for name, (s, c) in div.items():
        s, c = dist.all_reduce(s).cpu().numpy(), dist.all_reduce(c).cpu().numpy()
        for k, a, b in zip(ks, s, c):  # None where no predicted class has k features
            result[f"{name}@{k}"] = float(a / b) if b > 0 else None
    return result


def _train_pass(model, loader, info: DistInfo, autocast, weights: torch.Tensor, num_classes: int,
                num_samples: int, cfg: EvalConfig, seed: int) -> dict:
    device = info.device
    n_feat = weights.shape[1]
    sums = FeatureSums.zeros(n_feat, num_classes, device)
    gram = torch.zeros(n_feat, n_feat, dtype=torch.float64, device=device)
    dep = torch.zeros(2, dtype=torch.float64, device=device)
    keep_gmm = n_feat <= cfg.gmm_max_features
    keep_prob = min(1.0, cfg.gmm_samples / max(num_samples, 1))
    rng = torch.Generator().manual_seed(seed * 1000 + info.rank)
    subsample: list[torch.Tensor] = []
    for out, labels in model_outputs(model, loader, info, autocast, desc="metrics: training set"):
        x = out.features.double()
        sums.update(x, labels)
        gram += x.T @ x
        s, c = M.dependence_terms(out.features, out.logits, weights)
        dep += torch.stack([s, c])
        if keep_gmm:
            mask = torch.rand(x.shape[0], generator=rng) < keep_prob
            subsample.append(out.features.float()[mask.to(device)].cpu())
    sums.all_reduce()
    dist.all_reduce(gram)
    dist.all_reduce(dep)
    result = {
        "class_independence": M.class_independence(sums.min.cpu().numpy(), sums.sum.cpu().numpy(),
                                                   sums.class_sums.cpu().numpy(), sums.class_counts.cpu().numpy(),
                                                   float(sums.count)),
        "correlation": M.correlation(gram.cpu().numpy(), sums.sum.cpu().numpy(), float(sums.count)),
        "dependence": float(dep[0] / dep[1]) if dep[1] > 0 else None,
        "train_images": int(sums.count),
    }
    contrast = None
    if keep_gmm:
        gathered = dist.all_gather_object(torch.cat(subsample) if subsample else torch.zeros(0, n_feat))
        if info.is_main:
            contrast = M.contrastiveness(torch.cat(gathered).numpy(), seed=seed)
        contrast = dist.broadcast_object(contrast)
    result["contrastiveness"] = contrast
    return result


def evaluate_model(model: torch.nn.Module, data, info: DistInfo, cfg: EvalConfig,
                   autocast: Callable[[], contextlib.AbstractContextManager], seed: int = 0,
                   gt_similarity: np.ndarray | None = None, class_parts: np.ndarray | None = None,
                   n_per_class: int = 5) -> dict:
    """All metrics of `model` (dense or sparse) on `data`; identical dict on every rank."""
    model.eval()
    weights = model.head.class_weights().detach().float()
    per_rank = max(1, cfg.batch_size // info.world_size)
    pin = info.device.type == "cuda"
    test_loader = data.eval_loader("test", per_rank, info.rank, info.world_size, pin_memory=pin)
    train_loader = data.eval_loader("train", per_rank, info.rank, info.world_size, pin_memory=pin)
    result = _test_pass(model, test_loader, info, autocast, weights, _ks(n_per_class))
    result.update(_train_pass(model, train_loader, info, autocast, weights, data.num_classes,
                              data.num_samples("train"), cfg, seed))
    # PG, SPG, CH on the object boxes, for every dataset that has boxes (read from data.root on converted data)
    result.update(pointing_metrics(model, data, info, autocast, per_rank, cfg.pointing_resize,
                                   tolerance=cfg.pointing_tolerance, seed=seed))
    w = weights.cpu().numpy()
    result.update(M.sparsity(w))
    if gt_similarity is not None:
        result["structural_grounding"] = M.finite_or_none(M.structural_grounding(w, gt_similarity))
        result["structural_grounding_positive"] = M.finite_or_none(
            M.structural_grounding(w, gt_similarity, positive=True))
    if class_parts is not None:
        links = M.class_links(w, n_per_class)
        recovery = M.part_recovery(links, class_parts)
        scores = M.link_scores(w, links, class_parts, recovery["matching"])
        result["part_recovery"] = recovery["recovered"]
        result["part_precision"] = scores["precision"]
        result["part_f1"] = scores["f1"]
        result["negative_links"] = scores["negative_links"]
        result["negative_links_on_absent_parts"] = scores["negative_on_absent"]
        result["feature_part_matching"] = recovery["matching"]
        # the baseline: random assignments with this model's number of links per class
        result["part_recovery_random"] = M.random_part_recovery(class_parts, links.shape[1], links.sum(axis=1),
                                                                seed=seed)
        if hasattr(data, "dataset") and part_boxes_available(Path(data.cfg.root)):  # map-style synthetic data
            result.update(part_localisation(model, data, info, autocast, per_rank))
            result["part_links_by_localisation"] = M.links_recovered(links, class_parts,
                                                                     result["feature_part_localisation"])
    return result


def attributes_root(cfg: DataConfig) -> Path:
    """Where CUB's attributes/ are: data.cub_root for travelingbirds (its tree holds only images), else data.root."""
    return Path(cfg.cub_root if cfg.dataset == "travelingbirds" else cfg.root)


def ground_truth_class_similarity(root: Path, class_parts: np.ndarray | None) -> np.ndarray | None:
    """Cosine similarity of the classes' ground-truth descriptions: the synthetic class x part matrix, or
    CUB's continuous class attributes (attributes/class_attribute_labels_continuous.txt); None otherwise."""
    if class_parts is not None:
        return M.cosine_matrix(np.asarray(class_parts, dtype=np.float64))
    for candidate in (Path(root) / "attributes" / "class_attribute_labels_continuous.txt",
                      Path(root) / "CUB_200_2011" / "attributes" / "class_attribute_labels_continuous.txt"):
        if candidate.is_file():
            return M.cosine_matrix(np.loadtxt(candidate))
    return None
