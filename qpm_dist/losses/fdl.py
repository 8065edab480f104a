"""Feature diversity loss (QPM and the glm-based sparse layers), as defined in specs/qpm.md §4.3.

For each sample b with predicted class c = argmax(logits_b):

    w_bj = |V[c, j]| / (||V[c]||_2 + 1e-5)                 relevance of feature j for the predicted class
    s_bj = a_bj / max(max_k a_bk, 1e-6),  a_bj = mean_hw M_bjhw   relative activation strength
    P_bj = softmax over the H*W positions of the raw map M_bj
    L    = -(beta / B) * sum_b sum_p max_j (w_bj * s_bj * P_bj(p))

Maximising the summed channel-wise maximum rewards the maps of the class's relevant features for
peaking at different locations. The reference lets the loss' gradient flow into V (spec bug 24);
with `detach_weights=True` (our default) V only weighs the maps.
"""

from __future__ import annotations

import torch


def feature_diversity_loss(
    feature_maps: torch.Tensor,
    logits: torch.Tensor,
    class_weights: torch.Tensor,
    beta: float,
    detach_weights: bool = True,
) -> torch.Tensor:
    maps = feature_maps.float()
    weights = class_weights[logits.argmax(dim=1)].float()  # B x F
    if detach_weights:
        weights = weights.detach()
    relevance = weights.abs() / (weights.norm(dim=1, keepdim=True) + 1e-5)
    mean_act = maps.mean(dim=(2, 3))
    strength = mean_act / mean_act.max(dim=1, keepdim=True).values.clamp_min(1e-6)
    spatial = torch.softmax(maps.flatten(2), dim=2)  # B x F x HW
    weighted = (relevance * strength).unsqueeze(2) * spatial
    return -beta * weighted.max(dim=1).values.sum(dim=1).mean()
