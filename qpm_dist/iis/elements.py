"""Visual elements of an image, the raw material of IIS's prototype concepts (specs/iis.md §2.2, §2.3).

Two kinds, both computed in memory from a uint8 RGB image (H x W x 3 numpy array) and returned as uint8 RGB
images (numpy, H' x W' x 3) in a deterministic order; the caller sends them through the backbone's test
transform like any image (§2.4):

* patches (§2.3): the non-overlapping `grid` x `grid` grid, cell = (⌊W/grid⌋, ⌊H/grid⌋), the right/bottom
  remainder dropped, each cell resized (bicubic) to `patch_size` x `patch_size` (the model input); row-major.
* segments (§2.2, ACE-style SLIC superpixels): one SLIC run per entry of `n_segments` (compactness 10, sigma 1,
  scikit-image's other defaults). Within a run the labels are scanned in ascending order and a label's mask is
  accepted when its area is > `min_area` (a fraction of the image) and its Jaccard overlap with every mask
  accepted in EARLIER runs is <= `max_jaccard`; at most `per_run` masks per run. A mask is rendered as the
  image with every pixel outside it set to `fill` (117, all channels), cut to the mask's bounding box and
  resized bicubic to the source size (W, H), i.e. the segment is stretched to the full image.

Fixes of the reference (concept_extractor/segment_extractor.py):
* bug 9: it scans `range(labels.max())`; scikit-image >= 0.19 numbers labels from 1, so it considers the empty
  label 0 and never the last label. Here every label that occurs is considered.
* bug 10: it cuts the bounding box with an exclusive upper bound (`[h1:h2, w1:w2]` with h2 = the last row), losing
  the mask's last row and column. Here the box is inclusive.
Order: the reference writes segments in reverse acceptance order (file index 0 = the last mask accepted); here
segments come in acceptance order (run by run, labels ascending), which the element ids record.

Resources: SLIC and the Jaccard checks are O(pixels) per mask; an image whose longer side exceeds
`max_side` (an untrusted, huge file) is first downscaled (aspect kept) so that one element costs a bounded
amount of CPU and memory. The reference has no such bound; ImageNet-sized images (~500 px) are unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from qpm_dist.errors import BadInput

ELEMENT_KINDS = ("segments", "patches")


class BadElementInput(BadInput, ValueError):
    """An image or setting the element extraction cannot work with (named in the message)."""


@dataclass(frozen=True)
class ElementConfig:
    """How elements are cut from an image (spec §2.2, §2.3 defaults)."""

    kind: str = "segments"  # "segments" (SLIC superpixels) or "patches" (grid cells)
    n_segments: tuple[int, ...] = (10, 20, 30)  # one SLIC run per entry
    compactness: float = 10.0
    sigma: float = 1.0
    per_run: int = 5  # masks accepted per SLIC run at most
    min_area: float = 0.001  # a mask must cover MORE than this fraction of the image
    max_jaccard: float = 0.5  # ... and overlap every mask of earlier runs by at most this (Jaccard)
    fill: int = 117  # value of every channel outside the mask
    grid: int = 4  # patches: grid x grid cells
    max_side: int = 1024  # longer image side above which the image is downscaled first (resource bound)

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in ELEMENT_KINDS:
            problems.append(f"kind {self.kind!r}: expected one of {', '.join(ELEMENT_KINDS)}")
        if not self.n_segments or any(int(n) < 1 for n in self.n_segments):
            problems.append(f"n_segments {list(self.n_segments)}: expected one or more integers >= 1")
        if self.per_run < 1:
            problems.append(f"per_run {self.per_run}: expected >= 1")
        if not 0.0 <= self.min_area < 1.0:
            problems.append(f"min_area {self.min_area}: expected a fraction in [0, 1)")
        if not 0.0 <= self.max_jaccard <= 1.0:
            problems.append(f"max_jaccard {self.max_jaccard}: expected a value in [0, 1]")
        if not 0 <= self.fill <= 255:
            problems.append(f"fill {self.fill}: expected a pixel value in [0, 255]")
        if self.grid < 1:
            problems.append(f"grid {self.grid}: expected >= 1")
        if self.max_side < 8:
            problems.append(f"max_side {self.max_side}: expected >= 8")
        if problems:
            raise BadElementInput("iis elements: " + "; ".join(problems))

    @property
    def max_elements(self) -> int:
        """Elements one image yields at most (the bound of a loader item)."""
        return self.grid * self.grid if self.kind == "patches" else self.per_run * len(self.n_segments)


def _check_image(image: np.ndarray, source: str) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise BadElementInput(f"{source}: image of shape {image.shape} and dtype {image.dtype}; "
                              "expected uint8 H x W x 3 (RGB)")


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bicubic resize of a uint8 H x W x 3 array (PIL, as the reference)."""
    return np.array(Image.fromarray(image).resize((width, height), Image.BICUBIC))  # writable (torch.from_numpy)


def bounded(image: np.ndarray, max_side: int) -> np.ndarray:
    """The image, downscaled (aspect kept, bicubic) if its longer side exceeds `max_side`."""
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image
    scale = max_side / max(h, w)
    return _resize(image, max(1, round(w * scale)), max(1, round(h * scale)))


# ------------------------------------------------------------------------------------------------- patches


def patch_elements(image: np.ndarray, patch_size: int, grid: int = 4, source: str = "image") -> list[np.ndarray]:
    """The grid x grid non-overlapping cells of `image`, row-major, each resized to patch_size² (spec §2.3)."""
    _check_image(image, source)
    h, w = image.shape[:2]
    cell_h, cell_w = h // grid, w // grid
    if cell_h < 1 or cell_w < 1:
        raise BadElementInput(f"{source}: image of {w}x{h} pixels is smaller than the {grid}x{grid} patch grid")
    if patch_size < 1:
        raise BadElementInput(f"iis elements: patch size {patch_size}; expected >= 1")
    return [_resize(np.ascontiguousarray(image[r * cell_h:(r + 1) * cell_h, c * cell_w:(c + 1) * cell_w]),
                    patch_size, patch_size)
            for r in range(grid) for c in range(grid)]


# ------------------------------------------------------------------------------------------------ segments


def slic_label_maps(image: np.ndarray, cfg: ElementConfig) -> list[np.ndarray]:
    """One SLIC label map per entry of cfg.n_segments (scikit-image defaults otherwise: Lab, connectivity)."""
    from skimage.segmentation import slic  # imported here: only the segment path needs scikit-image

    return [slic(image, n_segments=int(n), compactness=cfg.compactness, sigma=cfg.sigma, channel_axis=-1)
            for n in cfg.n_segments]


def select_masks(label_maps: list[np.ndarray], cfg: ElementConfig) -> list[np.ndarray]:
    """The accepted masks (bool H x W) of successive label maps, in acceptance order (spec §2.2).

    Every label occurring in a map is considered, ascending (bug 9). Area: strictly more than cfg.min_area of the
    image. De-duplication: Jaccard <= cfg.max_jaccard against every mask accepted in an EARLIER map (labels of one
    map are disjoint, so they are not compared with each other, as in the reference). At most cfg.per_run per map.
    """
    accepted: list[np.ndarray] = []
    for labels in label_maps:
        earlier = len(accepted)
        pixels = labels.size
        for label in np.unique(labels):
            mask = labels == label
            area = int(mask.sum())
            if area / pixels <= cfg.min_area:
                continue
            if any(jaccard(mask, seen) > cfg.max_jaccard for seen in accepted[:earlier]):
                continue
            accepted.append(mask)
            if len(accepted) - earlier >= cfg.per_run:
                break
    return accepted


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|a ∩ b| / |a ∪ b| of two bool masks (0 for two empty masks)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def segment_crop(image: np.ndarray, mask: np.ndarray, fill: int = 117) -> np.ndarray:
    """The image with pixels outside `mask` set to `fill`, cut to the mask's INCLUSIVE bounding box (bug 10)."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise BadElementInput("iis elements: an empty segment mask has no bounding box")
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    crop = np.where(mask[r0:r1, c0:c1, None], image[r0:r1, c0:c1], np.uint8(fill))
    return np.ascontiguousarray(crop, dtype=np.uint8)


def render_segment(image: np.ndarray, mask: np.ndarray, fill: int = 117) -> np.ndarray:
    """segment_crop resized bicubic to the source size (W, H): the segment stretched to the whole image."""
    h, w = image.shape[:2]
    return _resize(segment_crop(image, mask, fill), w, h)


def segment_elements(image: np.ndarray, cfg: ElementConfig, source: str = "image") -> list[np.ndarray]:
    """The rendered segments of `image` in acceptance order (at most cfg.per_run per SLIC run)."""
    _check_image(image, source)
    image = bounded(image, cfg.max_side)
    return [render_segment(image, mask, cfg.fill) for mask in select_masks(slic_label_maps(image, cfg), cfg)]


def image_elements(image: np.ndarray, cfg: ElementConfig, patch_size: int, source: str = "image") -> list[np.ndarray]:
    """The elements of one image, of the kind cfg.kind; element id = position in the returned list."""
    if cfg.kind == "patches":
        _check_image(image, source)
        return patch_elements(bounded(image, cfg.max_side), patch_size, cfg.grid, source)
    return segment_elements(image, cfg, source)


def save_elements(elements: list[np.ndarray], folder: Path, stem: str) -> list[Path]:
    """Write elements as `<folder>/<stem>_<id>.png` (lossless, for reports; the pass itself keeps them in memory)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}_{i}.png" for i in range(len(elements))]
    for element, path in zip(elements, paths):
        Image.fromarray(element).save(path)
    return paths
