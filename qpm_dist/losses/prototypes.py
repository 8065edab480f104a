"""The prototype network's objective (specs/pixpnet.md §2.2, reference protonets/loss.py):

    total = λ_xent CE + λ_clst Cluster + λ_sep Separation + λ_l1 L1

* Cluster: mean over the batch of the min over the true class's prototypes of their min distance (pulls each
  image's nearest own-class prototype closer).
* Separation: minus the mean over the batch of the min over the other classes' prototypes of their min distance
  (pushes the nearest other-class prototype away). "avg_separation" (the mean over other-class prototypes) is
  logged, never optimised, as in the reference.
* L1: the sum of |w| of the `linear` read-out's other-class connections (ProtoPNet); a `proto` read-out has no
  weights, so no L1 term.

PixPNet's configs use CE only (1, 0, 0, 0); ProtoPNet's CLI defaults are (1, 0.8, 0.08, 1e-4). Distances are used
raw (cosine d in [0, 2]), without ProtoPNet's max-distance trick. A term whose coefficient is 0 is reported but
not added, so it cannot turn the total into NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qpm_dist.models.net import ModelOutput


class PrototypeLoss:
    def __init__(self, cross_entropy: float = 1.0, cluster: float = 0.0, separation: float = 0.0,
                 l1: float = 0.0) -> None:
        for name, value in (("cross_entropy", cross_entropy), ("cluster", cluster), ("separation", separation),
                            ("l1", l1)):
            if not value >= 0:
                raise ValueError(f"prototype loss: the {name} coefficient must be >= 0, got {value}")
        self.coefficients = {"ce": cross_entropy, "cluster": cluster, "separation": separation, "l1": l1}

    def __call__(self, output: ModelOutput, targets: torch.Tensor, module: nn.Module
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if output.prototypes is None:
            raise ValueError("prototype loss: the model's head computes no prototype distances "
                             f"(head kind {getattr(module.head, 'kind', None)!r}; expected 'prototype')")
        head = module.head
        min_distances = output.prototypes.min_distances.float()  # B x P
        own = head.class_identity.T[targets].bool()  # B x P: the prototypes of each image's class
        inf = torch.tensor(float("inf"), device=min_distances.device)
        parts = {"ce": F.cross_entropy(output.logits.float(), targets)}
        parts["cluster"] = torch.where(own, min_distances, inf).amin(dim=1).mean()
        # one class: no other-class prototype, nothing to separate from (not -inf)
        parts["separation"] = (-torch.where(own, inf, min_distances).amin(dim=1).mean() if head.num_classes > 1
                               else min_distances.new_zeros(()))
        others = (~own).sum(dim=1).clamp_min(1)
        parts["avg_separation"] = (torch.where(own, 0.0, min_distances).sum(dim=1) / others).mean().detach()
        if head.linear is not None:
            parts["l1"] = (head.linear.weight * (1 - head.class_identity.T)).abs().sum()
        total = sum((self.coefficients[name] * value for name, value in parts.items()
                     if self.coefficients.get(name, 0.0) != 0.0), start=min_distances.new_zeros(()))
        return total, parts
