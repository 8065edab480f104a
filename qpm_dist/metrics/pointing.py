"""Pointing game (PG), stochastic pointing game (SPG) and content heatmap (CH) of Grad-CAM maps on object boxes
(specs/gc_consistency.md §7; the GC paper's localisation metrics).

All three read H, the class's Grad-CAM map as a distribution over the ORIGINAL image's pixels, and the mask of
the class's boxes at that resolution:
* PG: the peak of H (first maximum in row-major order, as (row, col)) is a hit if it lies closer than the
  tolerance (15 px, strict) to a mask pixel; the score is the mean over classes of each class's hit rate.
* SPG: the same rule for 100 points drawn from H; its expectation is the mass of H within the tolerance of
  the mask, which is what `stochastic_pointing` computes exactly (one distance transform per image and class,
  not one meshgrid per sample, §10.6); the sampled value is kept for fidelity to the reference. Mean over images.
* CH: the mass of H inside the mask (no tolerance); a uniform map scores the box's share of the image.
Scores are fractions in [0, 1] (the paper prints 100x).

Boxes are (x, y, w, h) in continuous pixel-edge coordinates (CUB's and the synthetic data's convention); a pixel
belongs to a box if its centre does. ImageNet's boxes are the XML's 1-based inclusive corners (`Split.boxes`
keeps them as read), converted by `voc_to_pixel_edges`, which clamps at the image edge: the reference's
xmin - 1 turned a 0 coordinate into -1 and slicing wrapped (§11.12). The class is always the ground truth,
never the prediction (§11.10).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import distance_transform_edt

from qpm_dist import dist, gradcam
from qpm_dist.data.transforms import test_point_to_source
from qpm_dist.dist import DistInfo
from qpm_dist.engine.streaming import model_outputs

TOLERANCE = 15.0  # pixels of the original image (the reference's, and TorchRay's)
SAMPLES = 100  # points per image of the sampled SPG
VOC_BOX_DATASETS = ("imagenet",)  # Split.boxes holds 1-based inclusive VOC corners for these


def voc_to_pixel_edges(boxes: np.ndarray) -> np.ndarray:
    """(x, y, w, h) of 1-based inclusive corners (x = xmin, w = xmax - xmin) -> pixel edges: pixels xmin-1..xmax-1."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return boxes + np.array([-1.0, -1.0, 1.0, 1.0])


def box_mask(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """height x width bool mask of the union of `boxes` (N x 4 or 4: x, y, w, h); a pixel is in a box if its
    centre is. Parts outside the image are cut off (never wrapped), so a box may leave the mask empty."""
    mask = np.zeros((height, width), dtype=bool)
    for x, y, w, h in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        c0, c1 = max(0, int(np.ceil(x - 0.5))), min(width - 1, int(np.floor(x + w - 0.5)))
        r0, r1 = max(0, int(np.ceil(y - 0.5))), min(height - 1, int(np.floor(y + h - 0.5)))
        if c0 <= c1 and r0 <= r1:
            mask[r0:r1 + 1, c0:c1 + 1] = True
    return mask


def near_mask(mask: np.ndarray, tolerance: float = TOLERANCE) -> np.ndarray:
    """Pixels closer than `tolerance` (Euclidean, strict) to a pixel of the non-empty `mask`."""
    return distance_transform_edt(~mask) < tolerance


def peak(heatmap: np.ndarray) -> tuple[int, int]:
    """(row, col) of the first maximum in row-major order."""
    row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return int(row), int(col)


def pointing_hit(heatmap: np.ndarray, near: np.ndarray) -> bool:
    return bool(near[peak(heatmap)])


def stochastic_pointing(heatmap: np.ndarray, near: np.ndarray) -> float:
    """Exact expected SPG: the share of the map's mass within the tolerance of the mask."""
    return float(heatmap[near].sum() / heatmap.sum())


def sampled_stochastic_pointing(heatmap: np.ndarray, near: np.ndarray, rng: np.random.Generator,
                                samples: int = SAMPLES) -> float:
    """SPG as the reference draws it: the hit rate of `samples` pixels drawn (with replacement) from the map."""
    p = heatmap.ravel().astype(np.float64)
    drawn = rng.choice(p.size, size=samples, p=p / p.sum())
    return float(near.ravel()[drawn].mean())


def content_heatmap(heatmap: np.ndarray, mask: np.ndarray) -> float:
    return float(heatmap[mask].sum() / heatmap.sum())


class ImageScores(NamedTuple):
    hit: bool
    spg: float
    spg_sampled: float
    ch: float


def score_image(heatmap: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, tolerance: float = TOLERANCE,
                samples: int = SAMPLES) -> ImageScores | None:
    """PG hit, SPG (exact and sampled) and CH of one map on its class's boxes; None if no box pixel is in the image."""
    mask = box_mask(boxes, *heatmap.shape)
    if not mask.any():
        return None
    near = near_mask(mask, tolerance)
    return ImageScores(pointing_hit(heatmap, near), stochastic_pointing(heatmap, near),
                       sampled_stochastic_pointing(heatmap, near, rng, samples), content_heatmap(heatmap, mask))


def source_heatmap(cam: torch.Tensor, height: int, width: int, region: tuple[float, float, float, float]) -> np.ndarray:
    """The h x w map of the network input as a distribution over the height x width original image.

    `region` (x0, y0, x1, y1) is the part of the original image the network saw (the whole image for a squashing
    test transform, the centre crop's source otherwise); the map is resized bilinearly onto it (half-pixel
    centres, as cv2.INTER_LINEAR and F.interpolate(align_corners=False)) and is zero outside."""
    x0, y0, x1, y1 = region
    xs = ((np.arange(width) + 0.5) - x0) / (x1 - x0)  # position in the map, 0..1 inside the region
    ys = ((np.arange(height) + 0.5) - y0) / (y1 - y0)
    grid = torch.stack(torch.meshgrid(torch.from_numpy(2 * ys - 1), torch.from_numpy(2 * xs - 1), indexing="ij")[::-1],
                       dim=-1)
    resized = F.grid_sample(cam.detach().double()[None, None], grid[None], mode="bilinear", padding_mode="border",
                            align_corners=False)[0, 0].clamp_min(0).numpy()
    resized[(ys < 0) | (ys > 1), :] = 0
    resized[:, (xs < 0) | (xs > 1)] = 0
    total = resized.sum()
    return resized / total if total > 0 else np.full((height, width), 1.0 / (height * width))


def pointing_metrics(model, data, info: DistInfo, autocast, batch_size: int, tolerance: float = TOLERANCE,
                     samples: int = SAMPLES, seed: int = 0) -> dict:
    """PG, SPG (exact and sampled) and CH of the ground-truth class's Grad-CAM (head feature maps, closed form)
    over the test images with a box (metrics.objects.object_boxes_available); identical on every rank.

    Each rank scores its shard; per-class hits and trials and per-image sums are all-reduced. The sampled SPG
    draws from a generator seeded by (seed, image index), so it does not depend on the number of ranks."""
    form = gradcam.linear_form(model.head)
    if form is None:
        raise ValueError(f"pointing metrics need a head with a linear form {sorted(gradcam.LINEAR_FORMS)}, "
                         f"got {getattr(model.head, 'kind', None)!r}")
    split, cfg = data.test_split, data.cfg
    num_classes = data.num_classes
    voc = cfg.dataset in VOC_BOX_DATASETS
    s = cfg.img_size
    hits = torch.zeros(num_classes, dtype=torch.float64)
    trials = torch.zeros(num_classes, dtype=torch.float64)
    sums = np.zeros(6)  # spg, spg_sampled, ch, images, unannotated, box outside the image
    loader = data.eval_loader("test", batch_size, info.rank, info.world_size, return_index=True)
    for output, labels, indices in model_outputs(model, loader, info, autocast, desc="metrics: pointing game"):
        with torch.no_grad():
            cams = gradcam.normalise(gradcam.closed_form(output.feature_maps, form.weights, labels, form.pooling)).cpu()
        for cam, label, index in zip(cams, labels.tolist(), indices.tolist()):
            box = split.boxes[index]
            if not np.isfinite(box).all():
                sums[4] += 1
                continue
            with Image.open(split.image_dir / split.paths[index]) as image:  # reads the header only
                width, height = image.size
            region = (*test_point_to_source(cfg, width, height, 0, 0), *test_point_to_source(cfg, width, height, s, s))
            heatmap = source_heatmap(cam, height, width, region)
            boxes = voc_to_pixel_edges(box) if voc else box
            scores = score_image(heatmap, boxes, np.random.default_rng([seed, index]), tolerance, samples)
            if scores is None:
                sums[5] += 1
                continue
            hits[label] += scores.hit
            trials[label] += 1
            sums[:4] += (scores.spg, scores.spg_sampled, scores.ch, 1)
    totals = dist.all_reduce(torch.cat([hits, trials, torch.from_numpy(sums)]).to(info.device)).cpu()
    hits, trials, sums = totals[:num_classes], totals[num_classes:2 * num_classes], totals[2 * num_classes:].tolist()
    evaluated = trials > 0
    images = sums[3]
    return {
        # mean over the classes with at least one scored image (the reference counts the others as 0)
        "pointing_game": float((hits[evaluated] / trials[evaluated]).mean()) if evaluated.any() else None,
        "stochastic_pointing_game": sums[0] / images if images else None,
        "stochastic_pointing_game_sampled": sums[1] / images if images else None,
        "content_heatmap": sums[2] / images if images else None,
        "pointing_images": int(images),
        "pointing_classes": int(evaluated.sum()),
        "pointing_unannotated": int(sums[4]),
        "pointing_box_outside_image": int(sums[5]),
    }
