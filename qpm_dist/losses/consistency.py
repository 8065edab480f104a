"""The Grad-CAM consistency loss (specs/gc_consistency.md §5): a sample's map should be the same alone and in
its quadrant of a 2x2 composite, and the composite's map should be zero in the other three quadrants.

P, the normalised map of the positive (B x h x w), is placed into the quadrant q of an otherwise zero target
T (B x 2h x 2w); the loss is the mean absolute difference between T and Q, the normalised map of the composite
for the same class, over all B * 2h * 2w cells (`nn.L1Loss` with mean reduction, as the reference). Neither P nor
T is detached: the positive's map is pulled toward the composite's quadrant as much as the other way round.
Both maps sum to about 1, so a sample contributes at most 2 / (4 h w); λ = 25 is tuned for 7 x 7 maps (224 px
crops on a ResNet): other map sizes, reductions or normalisations need another λ (§5.9).
The target is built with tensor indexing on the maps' device, never reading q on the host (§10.2).
"""

from __future__ import annotations

import torch

from qpm_dist.gradcam import normalise


def quadrant_target(positive: torch.Tensor, quadrant: torch.Tensor) -> torch.Tensor:
    """B x 2h x 2w: `positive` (B x h x w) in quadrant q (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right),
    exact zeros elsewhere (no eps, §5.5)."""
    b, h, w = positive.shape
    q = quadrant.to(device=positive.device, dtype=torch.int64)
    cells = torch.zeros(b, 4, h, w, dtype=positive.dtype, device=positive.device)
    cells = cells.scatter(1, q.view(b, 1, 1, 1).expand(b, 1, h, w), positive.unsqueeze(1))
    return cells.reshape(b, 2, 2, h, w).permute(0, 1, 3, 2, 4).reshape(b, 2 * h, 2 * w)


def consistency_loss(positive_maps: torch.Tensor, composite_maps: torch.Tensor,
                     quadrant: torch.Tensor) -> torch.Tensor:
    """L_GC = mean |normalise(composite) - T(normalise(positive), q)| from the raw (un-normalised, ReLU'd) Grad-CAM
    maps: positives B x h x w, composites B x 2h x 2w, in fp32."""
    b, h, w = positive_maps.shape
    if composite_maps.shape != (b, 2 * h, 2 * w):
        raise ValueError(f"the composite's map is {tuple(composite_maps.shape[1:])}, not twice the positive's "
                         f"{(h, w)}: the crop size must be a multiple of the network's total stride, so that the "
                         f"quadrant borders fall on map cells")
    with torch.autocast(positive_maps.device.type, enabled=False):
        target = quadrant_target(normalise(positive_maps.float()), quadrant)
        return (normalise(composite_maps.float()) - target).abs().mean()
