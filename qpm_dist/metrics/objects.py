"""Does a model's class evidence point at the object? The pointing game (Zhang et al., 2018) on object boxes.

For every test image with an object box, the peak of its true class's evidence map sum_j w_cj * M_j (the class
activation map: the head's class weights times the feature maps, what the sparse models' explanations show) is
mapped back to the original image (`transforms.test_point_to_source`); it is a hit if it lies inside the box.
Images without a box (ImageNet: no box XML for them) are left out and counted apart, never scored as misses.
The chance level is the mean share of the image the box covers (where a peak at a random position would land).

Computed on the folder backend (the boxes and original image sizes are read from the source; converted data
holds neither) and not with data.crop_to_box, where the box is the whole image.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from qpm_dist import dist
from qpm_dist.data.transforms import test_point_to_source
from qpm_dist.dist import DistInfo
from qpm_dist.engine.streaming import model_outputs


def object_boxes_available(data) -> bool:
    split = getattr(data, "test_split", None)
    return (hasattr(data, "dataset") and not data.cfg.crop_to_box and split is not None
            and split.boxes is not None)


def object_pointing(model, data, info: DistInfo, autocast, batch_size: int) -> dict:
    """Hit rate of the class evidence peak on the test images that have a box; identical on every rank."""
    split, cfg = data.test_split, data.cfg
    weights = model.head.class_weights().detach().float()
    loader = data.eval_loader("test", batch_size, info.rank, info.world_size, return_index=True)
    hits = annotated = unannotated = chance = 0.0
    for output, labels, indices in model_outputs(model, loader, info, autocast, desc="metrics: object pointing"):
        cam = torch.einsum("bf,bfhw->bhw", weights[labels], output.feature_maps.float())
        b, h, w = cam.shape
        peak = cam.reshape(b, h * w).argmax(dim=1).cpu()
        rows, cols = (peak // w).numpy(), (peak % w).numpy()
        for i, index in enumerate(indices.tolist()):
            box = split.boxes[index]
            if not np.isfinite(box).all():
                unannotated += 1
                continue
            with Image.open(split.image_dir / split.paths[index]) as image:  # reads the header only
                width, height = image.size
            x, y = test_point_to_source(cfg, width, height, (cols[i] + 0.5) / w * cfg.img_size,
                                        (rows[i] + 0.5) / h * cfg.img_size)
            bx, by, bw, bh = (float(v) for v in box)
            hits += float(bx <= x <= bx + bw and by <= y <= by + bh)
            annotated += 1
            chance += min(1.0, bw * bh / (width * height))
    totals = dist.all_reduce(torch.tensor([hits, annotated, unannotated, chance], dtype=torch.float64,
                                          device=info.device)).tolist()
    hits, annotated, unannotated, chance = totals
    return {
        "object_pointing": hits / annotated if annotated else None,
        "object_pointing_chance": chance / annotated if annotated else None,
        "object_pointing_images": int(annotated),
        "object_pointing_unannotated": int(unannotated),
    }
