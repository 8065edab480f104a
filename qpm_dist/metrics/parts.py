"""Do the selected features localise the ground-truth parts? (synthetic dataset, which has part boxes)

For every test image and selected feature j, the arg-max of j's map is mapped back to the original image
(the test transform squashes the whole image, so the mapping is a plain rescale); it "hits" part p when it
lies inside a box of p drawn in that image (distractor instances included: they show the same part). Over
the images that show p, L_jp = hits_jp / images_with_p. A one-to-one matching (Hungarian, maximising L)
names each feature's part; `part_localisation` is the mean L of the matched pairs, and the chance level is
the mean share of the image a part's boxes cover (what a peak at a random position would hit).

Coverage: each feature's own part is the one whose boxes its peak falls in most often (the largest L_jp; large
parts are hit more often by chance, so this favours them a little); `parts_covered` counts the distinct parts the
model's features localise (for a sparse model: its selected features), `part_coverage` that count over P.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.optimize import linear_sum_assignment

from qpm_dist import dist
from qpm_dist.data.cub import load_part_boxes
from qpm_dist.dist import DistInfo
from qpm_dist.engine.streaming import model_outputs


def part_boxes_available(root: Path) -> bool:
    return (Path(root) / "parts" / "part_boxes.txt").is_file()


def part_localisation(model, data, info: DistInfo, autocast, batch_size: int) -> dict:
    """Hit rates L (n features x P parts) over the test set, the matching and its mean hit rate."""
    root = Path(data.cfg.root)
    boxes = load_part_boxes(root)
    split = data.test_split
    n_parts = data.class_parts.shape[1]
    loader = data.eval_loader("test", batch_size, info.rank, info.world_size, return_index=True)
    hits = present = chance = None
    for output, _, indices in model_outputs(model, loader, info, autocast, desc="metrics: part localisation"):
        maps = output.feature_maps.float()
        b, n, h, w = maps.shape
        if hits is None:
            hits = torch.zeros(n, n_parts, dtype=torch.float64)
            present = torch.zeros(n_parts, dtype=torch.float64)
            chance = torch.zeros(n_parts, dtype=torch.float64)
        pos = maps.reshape(b, n, h * w).argmax(dim=2).cpu()
        rows, cols = (pos // w).numpy(), (pos % w).numpy()
        for i, index in enumerate(indices.tolist()):
            image_boxes = boxes.get(int(split.image_ids[index]))
            if image_boxes is None:
                continue
            width, height = Image.open(split.image_dir / split.paths[index]).size
            x = (cols[i] + 0.5) / w * width  # peak position of every feature, in original pixels
            y = (rows[i] + 0.5) / h * height
            for p in np.unique(image_boxes[:, 0].astype(int)) - 1:
                part = image_boxes[image_boxes[:, 0].astype(int) == p + 1]
                inside = ((x[:, None] >= part[None, :, 1]) & (x[:, None] <= part[None, :, 1] + part[None, :, 3])
                          & (y[:, None] >= part[None, :, 2]) & (y[:, None] <= part[None, :, 2] + part[None, :, 4]))
                hits[:, p] += torch.from_numpy(inside.any(axis=1).astype(np.float64))
                present[p] += 1
                chance[p] += min(1.0, float((part[:, 3] * part[:, 4]).sum()) / (width * height))
    totals = dist.all_reduce(torch.cat([hits.flatten(), present, chance]))
    n = hits.shape[0]
    hits, present, chance = totals[: n * n_parts].view(n, n_parts), totals[n * n_parts:-n_parts], totals[-n_parts:]
    rate = (hits / present.clamp_min(1)).numpy()
    feat, part = linear_sum_assignment(-rate)
    best = rate.argmax(axis=1)  # each feature's own part: where its peak falls most often
    return {
        "part_localisation": float(rate[feat, part].mean()),
        "part_localisation_chance": float((chance / present.clamp_min(1)).mean()),
        "feature_part_localisation": {int(f): int(p) for f, p in zip(feat, part)},
        "feature_best_part": {int(f): int(p) for f, p in enumerate(best)},
        "parts_covered": int(len(set(best.tolist()))),
        "part_coverage": len(set(best.tolist())) / n_parts,
    }

