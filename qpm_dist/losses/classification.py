"""CE + beta * FDL, the loss of every training phase of QPM and the glm-based methods (specs/qpm.md §4.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qpm_dist.losses.fdl import feature_diversity_loss
from qpm_dist.models.net import ModelOutput


class ClassificationLoss:
    def __init__(self, fdl_beta: float, fdl_detach_weights: bool = True, label_smoothing: float = 0.0) -> None:
        self.beta, self.detach, self.label_smoothing = fdl_beta, fdl_detach_weights, label_smoothing

    def __call__(self, output: ModelOutput, targets: torch.Tensor, module: nn.Module
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ce = F.cross_entropy(output.logits.float(), targets, label_smoothing=self.label_smoothing)
        if self.beta == 0:
            return ce, {"ce": ce}
        fdl = feature_diversity_loss(output.feature_maps, output.logits, module.head.class_weights(), self.beta,
                                     self.detach)
        return ce + fdl, {"ce": ce, "fdl": fdl}
