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
Scores are fractions in [0, 1] like the other metrics (the paper prints 100x).

Boxes are (x, y, w, h) in continuous pixel-edge coordinates (CUB's and the synthetic data's convention); a pixel
belongs to a box if its centre does. The mask is the union of the image's object boxes, each filled (§7.1):
ImageNet's `Split.object_boxes` (one per <object> of the XML, or per object of Kaggle's CSV), the one box of
`Split.boxes` elsewhere (CUB's bird, the synthetic image's bounding_boxes.txt: the box around the class's parts).
ImageNet's boxes are the XML's 1-based inclusive corners as read, converted by `voc_to_pixel_edges`; the mask
clamps at the image edge, where the reference's xmin - 1 turned a 0 coordinate into -1 and slicing wrapped
(§11.12); such boxes are counted (`pointing_clamped_boxes`). The class is always the ground truth, never the
prediction (§11.10); its map is the head's element-wise Grad-CAM (gradcam.class_maps).

Converted data (ffcv, wds) keeps neither boxes nor original sizes: the metrics read the source images under
data.root instead, whatever the training backend (`pointing_source`), or are None with the reason.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import distance_transform_edt

from qpm_dist import dist, gradcam
from qpm_dist.data.datasets import ImageListDataset, ObjectBoxes
from qpm_dist.data.loaders import eval_loader
from qpm_dist.data.transforms import full_image_transform, test_point_to_source
from qpm_dist.dist import DistInfo
from qpm_dist.engine.preemption import stop_point
from qpm_dist.engine.streaming import Autocast
from qpm_dist.utils import log, progress

TOLERANCE = 15.0  # pixels of the original image (the reference's, and TorchRay's)
SAMPLES = 100  # points per image of the sampled SPG
VOC_BOX_DATASETS = ("imagenet",)  # Split.boxes / object_boxes hold 1-based inclusive VOC corners for these
BOX_DATASETS = ("synthetic", "cub", "travelingbirds", "cars", "imagenet")  # readers that give object boxes
SCORES = ("pointing_game", "stochastic_pointing", "stochastic_pointing_sampled", "content_heatmap")
# per-rank sums, all-reduced: PG/SPG images and their SPG sums, CH images and their CH sum, images left out
TALLIES = ("images", "spg", "spg_sampled", "ch_images", "ch", "skipped", "unannotated", "outside", "clamped")


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
    """The non-empty `mask` and the pixels closer than `tolerance` (Euclidean, strict) to one of its pixels
    (tolerance 0: the mask itself)."""
    return mask | (distance_transform_edt(~mask) < tolerance)


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
    """PG hit, SPG (exact and sampled) and CH of one map on the union of its class's boxes (each filled); None if
    no box pixel is in the image."""
    mask = box_mask(boxes, *heatmap.shape)
    if not mask.any():
        return None
    near = near_mask(mask, tolerance)
    return ImageScores(pointing_hit(heatmap, near), stochastic_pointing(heatmap, near),
                       sampled_stochastic_pointing(heatmap, near, rng, samples), content_heatmap(heatmap, mask))


def boxes_reaching_out(boxes: np.ndarray) -> int:
    """How many boxes (x, y, w, h; pixel edges) start left of or above the image: a 0 coordinate of a 1-based file,
    which the reference turned into -1 and wrapped (§11.12); box_mask clamps them, the result counts them."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return int(((boxes[:, 0] < 0) | (boxes[:, 1] < 0)).sum())


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


def image_objects(split, index: int, voc: bool) -> ObjectBoxes:
    """Image `index`'s objects as pixel-edge boxes: Split.object_boxes where the reader keeps each object
    (ImageNet), else the one box of Split.boxes (none if it is NaN); never difficult there."""
    if split.object_boxes is not None:
        boxes, difficult = split.object_boxes[index]
    else:
        box = np.asarray(split.boxes[index], dtype=np.float64).reshape(1, 4)
        finite = np.isfinite(box).all()
        boxes, difficult = (box, np.zeros(1, dtype=bool)) if finite else (np.zeros((0, 4)), np.zeros(0, dtype=bool))
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return ObjectBoxes(voc_to_pixel_edges(boxes) if voc else boxes, np.asarray(difficult, dtype=bool))


def pointing_source(data):
    """(the folder DataSource whose test images and boxes the metrics read, None) or (None, why not); (None, None)
    for a dataset without boxes (no metrics at all). The same answer on every rank.

    Converted data (ffcv, wds) holds neither the boxes nor the original image sizes, so they come from data.root,
    read as the folder backend would (same data config), if it is what was converted (the manifest's
    source_fingerprint)."""
    from qpm_dist.data.sources import missing_files, read_splits

    cfg = data.cfg
    if cfg.dataset not in BOX_DATASETS:
        return None, None
    if cfg.crop_to_box or cfg.crop_root is not None:
        return None, ("the images are cropped to their boxes (data.crop_to_box or data.crop_root), so a box is the "
                      "whole image")
    source, reason = data, None
    if getattr(data, "test_split", None) is None:
        try:
            source = read_splits(cfg, data.seed)
            converted_from = getattr(data, "manifest", {}).get("source_fingerprint", source.fingerprint)
            missing = missing_files(source.test_split, 0, 1)  # one listing per folder
            if source.fingerprint != converted_from:
                source, reason = None, (f"data.root {cfg.root} holds other data than data.converted {cfg.converted} "
                                        f"(dataset fingerprints differ)")
            elif missing:
                source, reason = None, f"{len(missing)} test image(s) missing under data.root, e.g. {missing[0]}"
        except (OSError, ValueError) as exc:
            source, reason = None, (f"data.backend={cfg.backend} keeps neither the boxes nor the original image "
                                    f"sizes, and data.root {cfg.root} (the source images) cannot be read: {exc}")
        if dist.any_rank(source is None):  # every rank scores or none does, else the all-reduce would hang
            return None, reason or "data.root cannot be read on every rank"
    if source.test_split.boxes is None and source.test_split.object_boxes is None:
        return None, f"no box annotations found under data.root {cfg.root}"
    return source, None


def _class_maps(model, loader, info: DistInfo, autocast: Autocast):
    """Yield (normalised Grad-CAM of the true class on the CPU, labels, indices) per batch: the closed form for
    a head with a linear form, else the autograd path (one backward per batch, no graph kept of the gradient)."""
    closed = gradcam.linear_form(model.head) is not None
    was_training = model.training
    model.eval()
    bar = progress(len(loader), "metrics: pointing game", show=info.is_main, unit="batches")
    try:
        for images, labels, indices in loader:
            stop_point()
            images, labels = images.to(info.device, non_blocking=True), labels.to(info.device, non_blocking=True)
            with torch.set_grad_enabled(not closed), autocast():
                images.requires_grad_(not closed)  # a graph to differentiate even with frozen parameters
                maps = gradcam.class_maps(model, images, labels, create_graph=False).maps
            yield gradcam.normalise(maps.detach().float()).cpu(), labels.cpu(), indices
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)


def pointing_metrics(model, data, info: DistInfo, autocast: Autocast, batch_size: int, resize: int | None = None,
                     tolerance: float = TOLERANCE, samples: int = SAMPLES, seed: int = 0) -> dict:
    """PG, SPG (exact and sampled) and CH of the ground-truth class's Grad-CAM (head feature maps; closed form
    where the head has one, autograd otherwise) over the test images with a box; identical on every rank.
    {} for a dataset without boxes; the scores are None (with the reason logged and in `pointing_not_computed`)
    where the boxes cannot be read.

    `resize`: None scores the test transform's view (batches of `batch_size`); an int the reference's input
    (§7.1): the whole image with its shorter side resized to it, batch 1. Either way the map is resized onto the
    original image. Each rank scores its shard; per-class hits and trials and per-image sums are all-reduced.
    The sampled SPG draws from a generator seeded by (seed, image index): independent of the number of ranks.

    An image is left out (counted apart, never a miss) without a box (`pointing_unannotated`) or when its
    boxes miss the image (`pointing_box_outside_image`); PG and SPG also skip it when all of its boxes are
    difficult (`pointing_skipped`, §7.2), CH scores it (§7.4)."""
    source, reason = pointing_source(data)
    if source is None:
        if reason is None:
            return {}
        log.warning("metrics: pointing game, SPG and CH not computed: %s", reason)
        return {**{key: None for key in SCORES}, "pointing_not_computed": reason}
    split, cfg = source.test_split, source.cfg
    num_classes = source.num_classes
    voc = cfg.dataset in VOC_BOX_DATASETS
    if resize is None:
        loader = source.eval_loader("test", batch_size, info.rank, info.world_size, return_index=True)
    else:
        full = ImageListDataset(split.image_dir, split.paths, split.labels, full_image_transform(cfg, resize),
                                seed=source.seed, decoder=cfg.decoder, on_corrupt=cfg.on_corrupt, return_index=True,
                                digests=split.digests)
        loader = eval_loader(full, 1, info.rank, info.world_size, cfg.num_workers)
    hits = torch.zeros(num_classes, dtype=torch.float64)
    trials = torch.zeros(num_classes, dtype=torch.float64)
    tally = dict.fromkeys(TALLIES, 0.0)
    for cams, labels, indices in _class_maps(model, loader, info, autocast):
        for cam, label, index in zip(cams, labels.tolist(), indices.tolist()):
            boxes, difficult = image_objects(split, index, voc)
            if len(boxes) == 0:
                tally["unannotated"] += 1
                continue
            with Image.open(split.image_dir / split.paths[index]) as image:  # reads the header only
                width, height = image.size
            if resize is None:
                s = cfg.img_size
                region = (*test_point_to_source(cfg, width, height, 0, 0),
                          *test_point_to_source(cfg, width, height, s, s))
            else:
                region = (0, 0, width, height)  # the whole image, resized without a crop
            heatmap = source_heatmap(cam, height, width, region)
            scores = score_image(heatmap, boxes, np.random.default_rng([seed, index]), tolerance, samples)
            if scores is None:
                tally["outside"] += 1
                continue
            tally["clamped"] += boxes_reaching_out(boxes)
            tally["ch"] += scores.ch
            tally["ch_images"] += 1
            if difficult.all():
                tally["skipped"] += 1
                continue
            hits[label] += scores.hit
            trials[label] += 1
            tally["spg"] += scores.spg
            tally["spg_sampled"] += scores.spg_sampled
            tally["images"] += 1
    sums = torch.tensor([tally[key] for key in TALLIES], dtype=torch.float64)
    totals = dist.all_reduce(torch.cat([hits, trials, sums]).to(info.device)).cpu()
    hits, trials = totals[:num_classes], totals[num_classes:2 * num_classes]
    tally = dict(zip(TALLIES, totals[2 * num_classes:].tolist()))
    evaluated = trials > 0
    images, ch_images = tally["images"], tally["ch_images"]
    return {
        # mean over the classes with at least one scored image (the reference counts the others as 0)
        "pointing_game": float((hits[evaluated] / trials[evaluated]).mean()) if evaluated.any() else None,
        "stochastic_pointing": tally["spg"] / images if images else None,
        "stochastic_pointing_sampled": tally["spg_sampled"] / images if images else None,
        "content_heatmap": tally["ch"] / ch_images if ch_images else None,
        "pointing_images": int(images),
        "pointing_classes": int(evaluated.sum()),
        "pointing_skipped": int(tally["skipped"]),
        "pointing_unannotated": int(tally["unannotated"]),
        "pointing_box_outside_image": int(tally["outside"]),
        "pointing_clamped_boxes": int(tally["clamped"]),
        "content_heatmap_images": int(ch_images),
    }
