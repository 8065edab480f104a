"""Interpretability of a prototype network (specs/pixpnet.md §4): consistency, stability and the relevance
ordering test (ROT), each for several pixel-space mappings of a prototype match.

The module knows no model: it takes plain tensors and callables, so a method module (PixPNet, or any
ProtoPNet-like network) can call it from its own evaluation loop.

Coordinates. Every box here is (y0, y1, x0, x1), half-open, in continuous model-input pixels (pixel (r, c)
covers [r, r+1) x [c, c+1)), the convention of the receptive-field bounds.

1. Part annotations in model-input coordinates (§4.1, bug B8). `InputGeometry` is the test transform's geometry
   (data/transforms.py test_transform: squash to size x size, or resize the shorter side to
   round(size / crop_ratio) keeping aspect and centre-crop size; box-cropped data first crops to the object box
   as data/decode.crop_box does); `InputGeometry.to_input` maps original-image points through it, for any aspect
   ratio. CUB keypoints (parts/part_locs.txt, visible rows, 15 parts merged into the spec's 12) become 1x1
   boxes at the mapped point and are dropped when the point leaves the crop; the synthetic data's part boxes
   (parts/part_boxes.txt) are mapped corner by corner and clipped to the input, dropped when nothing is left.
   `split_parts(cfg, test_split)` gives (num_parts, parts_of(index)) for a dataset's test split.
2. The prototype patch (§4.2): a box of half-size 36 px at 224 px input around a centre, scaled per axis with
   the input (half = 36 * side / 224, so it covers the same share of the input at any size: 5.14 px at 32 px),
   clipped at the image. Centres: "ours" = centre of the argmin cell's receptive field (`rf_centres`),
   "upsample" = the naive cell centre round((i + 0.5) * H / Hz) (`upsample_centres`), "random" = a uniform
   point drawn per image from a generator seeded by (seed, image index, stream) (`random_centres`).
   o_{i,p,k} = 1 if a box of part k intersects the patch with positive area (the reference's IoU > 0); several
   boxes of one part count once.
3. Consistency (§4.3): n_{p,k} = images of p's class showing part k, m_{p,k} = of those, the images where p's
   patch hits k; s_p = max over parts of m/n IGNORING parts with n = 0 (fix of B6: the reference's NaN max made
   a whole class's prototypes NaN when one part never showed). soft = mean s_p, hard = share of s_p >= 0.8,
   both over the prototypes with a defined s_p (a class without any annotated test image has none; their
   number is reported). Stability (§4.4): the image plus N(0, 0.2^2) noise in normalised input space, drawn per
   image from a generator seeded by (seed, image index), so the draw does not depend on how the test set is
   sharded; per (image, prototype) over the image's visible parts: hard = 1 if the hit vectors are identical,
   soft = Jaccard |o and o'| / |o or o'|. The 0/0 case (neither patch hits any part, B7) is defined as 1: the
   two agree (hard is 1 there too), so soft >= hard always holds; the reference's NaN instead dropped every
   prototype that missed all parts on one image. Per prototype the mean over its class's images, then the mean
   over prototypes. Images with no visible part in the input are skipped (no part to be consistent with).
   The random mapping draws its noisy-image centre independently of the clean one (a chance level, not 1).
   Streamed (`PrototypePartTables`): every rank adds its shard's images to count tables of O(P x K) size per
   mapping; `reduce` sums them with one all-reduce (sums of counts are exact, so the result is the
   single-process result; Jaccard sums may differ in the last bits through summation order).
4. ROT (§4.5): for an image x and prototype p, pixels are ordered by p's relevance map (descending, ties in
   row-major order) and added back to a baseline (one seeded N(0, 1) image in normalised space, shared by all
   mappings) in chunks of `step_fraction` of the pixels (not one forward per pixel); after k pixels the
   similarity s_k of p is recorded. Curves are summed and counted per (sample, prototype) (fix of B5, where
   the reference counted every sample of a batch for the classes of its last sample), averaged per prototype
   and then over prototypes. Summary: area = trapezoid of (C(t) - C(0)) / (C(end) - C(0)) over t = k / k_end
   in [0, 1] (the spec's integral when prop_pixels = 1), and pct@orig.sim = the smallest % of pixels at which
   C >= C(end). Work is bounded: samples, prototypes per image and steps have upper limits.

Entry points for a method module (each ends with a collective: every rank calls it with its shard):
`prototype_part_scores(batches, locate, class_prototypes, rf_bounds, parts_of, num_parts, seed)` and, per mapping,
`relevance_ordering_test(batches, similarity, relevance, num_prototypes, input_shape, ...)`; the pieces
(`PrototypePartTables`, `RotTables`, `rot_curves`, the centre and patch functions) for a loop of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from qpm_dist import dist
from qpm_dist.config import DataConfig
from qpm_dist.data.cub import _int_column, _load_numeric, _resolve_root, load_cub_metadata, load_part_boxes
from qpm_dist.data.datasets import Split
from qpm_dist.data.transforms import eval_crop_ratio, eval_squashes
from qpm_dist.errors import BadInput

MAPPINGS = ("ours", "upsample", "random")
HALF_SIZE_AT_224 = 36.0  # Huang et al. (ICCV 2023) / the reference: a 72 px patch at 224 px input
CONSISTENCY_THRESHOLD = 0.8
NOISE_STD = 0.2

# CUB's 15 parts (1-based ids of parts/parts.txt) merged into the spec's 12 (§4.1): left/right eye, leg, wing
CUB_MERGED_PARTS = ("back", "beak", "belly", "breast", "crown", "forehead", "eye", "leg", "wing", "nape", "tail",
                    "throat")
CUB_PART_TO_MERGED = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 6, 7, 8, 10, 11])  # index: CUB part id - 1

# ROT bounds: the work is samples x prototypes x (steps + 1) forwards of one image
MAX_ROT_SAMPLES = 10_000
MAX_ROT_PROTOTYPES_PER_IMAGE = 100
MAX_ROT_STEPS = 1_000
MAX_ROT_BATCH = 1_024


class PrototypeMetricError(BadInput, ValueError):
    """Bad input to the prototype metrics (a shape, an index or a parameter out of range); the message names it."""


def _fail(what: str, found, expected: str) -> None:
    raise PrototypeMetricError(f"{what}: got {found}, expected {expected}")


# ---------------------------------------------------------------------------------------------------------------
# 1. Part annotations in model-input coordinates


class SourceParts(NamedTuple):
    """The part annotations of one original image: part index (0-based) and box (x0, y0, x1, y1) in original
    pixels; for keypoints x1 = x0 and y1 = y0."""

    parts: np.ndarray  # K int64
    boxes: np.ndarray  # K x 4 float64
    points: bool


class ImageParts(NamedTuple):
    """The part annotations of one image in model-input pixels: part index and box (y0, y1, x0, x1)."""

    parts: np.ndarray  # K int64
    boxes: np.ndarray  # K x 4 float64


@dataclass(frozen=True)
class InputGeometry:
    """Where the test transform moves an original image's points (data/transforms.py test_transform).

    squash: resize to size x size; else resize the shorter side to round(size / crop_ratio) (the longer side to
    int(r * long / short), torchvision's rule) and centre-crop size x size (offsets int(round((side - size) / 2))).
    crop_to_box: the image is first cut to its object box as data/decode.crop_box does.
    """

    size: int
    squash: bool
    crop_ratio: float = 1.0
    crop_to_box: bool = False

    @classmethod
    def of(cls, cfg: DataConfig) -> InputGeometry:
        if cfg.crop_root is not None:
            raise PrototypeMetricError("data.crop_root: the images are pre-cropped copies whose crop boxes are not "
                                       "known here, so part annotations cannot be mapped; use data.crop_to_box")
        return cls(cfg.img_size, eval_squashes(cfg), eval_crop_ratio(cfg), cfg.crop_to_box)

    def to_input(self, width: int, height: int, xs: np.ndarray, ys: np.ndarray,
                 box: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Continuous original-image coordinates (x, y) of a width x height image -> model-input coordinates."""
        xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
        if self.crop_to_box:
            if box is None:
                _fail("InputGeometry.to_input box", None, "the image's object box (x, y, w, h): data.crop_to_box")
            x, y, w, h = (int(round(float(v))) for v in box)  # data/decode.crop_box's rounding and clipping
            x0, y0 = min(max(0, x), width - 1), min(max(0, y), height - 1)
            x1, y1 = max(x0 + 1, min(width, x + max(w, 1))), max(y0 + 1, min(height, y + max(h, 1)))
            xs, ys, width, height = xs - x0, ys - y0, x1 - x0, y1 - y0
        s = self.size
        if self.squash:
            return xs * s / width, ys * s / height
        r = round(s / self.crop_ratio)
        if width <= height:
            new_w, new_h = r, int(r * height / width)
        else:
            new_w, new_h = int(r * width / height), r
        left, top = int(round((new_w - s) / 2.0)), int(round((new_h - s) / 2.0))
        return xs * new_w / width - left, ys * new_h / height - top

    def parts_to_input(self, source: SourceParts, width: int, height: int,
                       box: Sequence[float] | None = None) -> ImageParts:
        """One image's annotations in input pixels: keypoints as 1x1 boxes, dropped outside the input; boxes
        clipped to the input, dropped when empty."""
        s = float(self.size)
        x0, y0 = self.to_input(width, height, source.boxes[:, 0], source.boxes[:, 1], box)
        if source.points:
            keep = (x0 >= 0) & (x0 < s) & (y0 >= 0) & (y0 < s)
            boxes = np.stack([y0, y0 + 1, x0, x0 + 1], axis=1)
        else:
            x1, y1 = self.to_input(width, height, source.boxes[:, 2], source.boxes[:, 3], box)
            boxes = np.stack([np.clip(y0, 0, s), np.clip(y1, 0, s), np.clip(x0, 0, s), np.clip(x1, 0, s)], axis=1)
            keep = (boxes[:, 1] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 2])
        return ImageParts(source.parts[keep].astype(np.int64), boxes[keep].reshape(-1, 4))


def load_cub_parts(root: str | Path) -> dict[int, SourceParts]:
    """parts/part_locs.txt (image id, part id 1..15, x, y, visible) -> image id -> its VISIBLE keypoints with the
    merged part index (CUB_MERGED_PARTS). Images without a visible keypoint have no key."""
    return load_part_locs(root, CUB_PART_TO_MERGED)


def load_part_locs(root: str | Path, part_index: np.ndarray) -> dict[int, SourceParts]:
    """parts/part_locs.txt (image id, part id 1..len(part_index), x, y, visible) -> image id -> its VISIBLE keypoints,
    part id i mapped to part_index[i - 1] (CUB: the merge into 12 parts; the synthetic data: the identity). Images
    without a visible keypoint have no key."""
    path = _resolve_root(root) / "parts" / "part_locs.txt"
    table = _load_numeric(path, 5, "'<image_id> <part_id> <x> <y> <visible>' per image and part")
    image_ids = _int_column(table, 0, path, "image id")
    part_ids = _int_column(table, 1, path, "part id")
    visible = _int_column(table, 4, path, "visible")
    bad = np.flatnonzero((part_ids < 1) | (part_ids > len(part_index)) | ((visible != 0) & (visible != 1))
                         | ~np.isfinite(table[:, 2:4]).all(axis=1))
    if len(bad):
        _fail(f"{path}, row {int(bad[0]) + 1}", table[bad[0]].tolist(),
              f"part id in 1..{len(part_index)}, finite x and y, visible 0 or 1")
    keep = visible == 1
    image_ids, parts, xy = image_ids[keep], np.asarray(part_index)[part_ids[keep] - 1], table[keep, 2:4]
    return _group(image_ids, parts, np.concatenate([xy, xy], axis=1), points=True)


def load_synthetic_parts(root: str | Path, num_parts: int) -> dict[int, SourceParts]:
    """parts/part_boxes.txt of the synthetic data (data/cub.load_part_boxes, distractors included: they show the
    same part, as metrics/parts.py counts them) -> image id -> its part boxes (x0, y0, x1, y1)."""
    result = {}
    for image_id, rows in load_part_boxes(root).items():
        parts = rows[:, 0].astype(np.int64) - 1
        if ((parts < 0) | (parts >= num_parts)).any():
            _fail(f"parts/part_boxes.txt, image {image_id} part id", int(rows[0, 0]), f"1..{num_parts}")
        x, y, w, h = (rows[:, c].astype(np.float64) for c in (1, 2, 3, 4))
        result[image_id] = SourceParts(parts, np.stack([x, y, x + w, y + h], axis=1), points=False)
    return result


def split_parts(cfg: DataConfig, split: Split, synthetic_parts: str = "boxes"
                ) -> tuple[int, Callable[[int], ImageParts | None]]:
    """(number of parts, parts_of) for a test split: parts_of(index) = the part annotations of image `index` of
    `split` in model-input pixels (None: no annotation), for `prototype_part_scores`. CUB (and TravelingBirds,
    whose images are CUB's: keypoints from data.cub_root) has 12 merged parts; the synthetic data the parts of its
    parts/parts.txt, as `synthetic_parts`:
    * "boxes": parts/part_boxes.txt, every drawn part's box, distractors included (metrics/parts.py's view);
    * "keypoints": parts/part_locs.txt, the centre of each of the image's own class parts (no distractors) as a
      keypoint, i.e. the CUB protocol of spec §4.1. With boxes, a patch that touches any pixel of a part counts,
      and a distractor part that shows in one image of a class makes m / n = 1 / 1 by chance (s_p takes the max
      over parts), so even random patches score high; keypoints ask where the part is, as on CUB.
    The original size is read from the image header when an image is first asked for."""
    if synthetic_parts not in ("boxes", "keypoints"):
        _fail("synthetic_parts", repr(synthetic_parts), "'boxes' or 'keypoints'")
    if cfg.dataset in ("cub", "travelingbirds"):
        root = cfg.root if cfg.dataset == "cub" else cfg.cub_root
        num_parts, source = len(CUB_MERGED_PARTS), load_cub_parts(root)
    elif cfg.dataset == "synthetic":
        names = load_cub_metadata(cfg.root).part_names
        if names is None:
            raise PrototypeMetricError(f"data.root: {cfg.root} has no parts/parts.txt, so its part boxes cannot be "
                                       f"read (regenerate it with python -m data_prep make-synthetic)")
        num_parts = len(names)
        if synthetic_parts == "keypoints":
            source = load_part_locs(cfg.root, np.arange(num_parts))
        else:
            source = load_synthetic_parts(cfg.root, num_parts)
    else:
        raise PrototypeMetricError(f"data.dataset: {cfg.dataset} has no part annotations; consistency and stability "
                                   f"need CUB keypoints or the synthetic data's part boxes (spec §4.1)")
    if split.image_ids is None:
        raise PrototypeMetricError(f"data.dataset: the {cfg.dataset} test split has no image ids to join parts on")
    geometry = InputGeometry.of(cfg)

    def parts_of(index: int) -> ImageParts | None:
        found = source.get(int(split.image_ids[index]))
        if found is None:
            return None
        with Image.open(split.image_dir / split.paths[index]) as image:  # reads the header only
            width, height = image.size
        box = split.boxes[index] if cfg.crop_to_box else None
        return geometry.parts_to_input(found, width, height, box)

    return num_parts, parts_of


def _group(image_ids: np.ndarray, parts: np.ndarray, boxes: np.ndarray, points: bool) -> dict[int, SourceParts]:
    order = np.argsort(image_ids, kind="stable")
    image_ids, parts, boxes = image_ids[order], parts[order], boxes[order]
    starts = np.flatnonzero(np.r_[True, image_ids[1:] != image_ids[:-1]]) if len(image_ids) else np.array([], int)
    ends = np.r_[starts[1:], len(image_ids)]
    return {int(image_ids[a]): SourceParts(parts[a:b], boxes[a:b], points) for a, b in zip(starts, ends)}


# ---------------------------------------------------------------------------------------------------------------
# 2. Prototype patches per mapping


def _check_cells(cells: torch.Tensor, grid: tuple[int, int]) -> None:
    if cells.ndim < 1 or cells.shape[-1] != 2:
        _fail("cells shape", tuple(cells.shape), "(..., 2): the (h, w) latent cell of each prototype")
    if cells.numel() and ((cells[..., 0] < 0).any() or (cells[..., 0] >= grid[0]).any()
                          or (cells[..., 1] < 0).any() or (cells[..., 1] >= grid[1]).any()):
        _fail("cells", f"a cell outside the {grid[0]} x {grid[1]} grid", "0 <= h < Hz and 0 <= w < Wz")


def rf_centres(cells: torch.Tensor, rf_bounds: torch.Tensor) -> torch.Tensor:
    """"ours" (the reference's `bbox`): the centre (y, x) of the receptive field of each (h, w) cell.
    cells: (..., 2) integer; rf_bounds: Hz x Wz x 4 (y0, y1, x0, x1), half-open input pixels."""
    rf_bounds = torch.as_tensor(rf_bounds)
    if rf_bounds.ndim != 3 or rf_bounds.shape[2] != 4:
        _fail("rf_bounds shape", tuple(rf_bounds.shape), "Hz x Wz x 4 (y0, y1, x0, x1)")
    cells = torch.as_tensor(cells).long()
    _check_cells(cells, tuple(rf_bounds.shape[:2]))
    b = rf_bounds[cells[..., 0], cells[..., 1]].double()
    return torch.stack([(b[..., 0] + b[..., 1]) / 2, (b[..., 2] + b[..., 3]) / 2], dim=-1)


def upsample_centres(cells: torch.Tensor, grid: tuple[int, int], input_hw: tuple[int, int]) -> torch.Tensor:
    """"upsample" (ProtoPNet's): the naive centre round((i + 0.5) * H / Hz) of each cell on the uniform grid
    (torch.round: halves to even, like the reference's Python round)."""
    cells = torch.as_tensor(cells).long()
    _check_cells(cells, grid)
    scale = torch.tensor([input_hw[0] / grid[0], input_hw[1] / grid[1]], dtype=torch.float64)
    return torch.round((cells.double() + 0.5) * scale)


def image_generator(seed: int, index: int, stream: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, image index, stream): draws do not depend on the sharding."""
    state = np.random.SeedSequence([int(seed), int(index), int(stream)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def random_centres(indices: Sequence[int], per_image: int, input_hw: tuple[int, int], seed: int,
                   stream: int = 0) -> torch.Tensor:
    """"random": per image `per_image` centres (y, x) uniform in the input, seeded by (seed, image index, stream)."""
    out = torch.empty(len(indices), per_image, 2, dtype=torch.float64)
    for row, index in enumerate(indices):
        out[row] = torch.rand(per_image, 2, generator=image_generator(seed, index, 1000 + stream), dtype=torch.float64)
    return out * torch.tensor(input_hw, dtype=torch.float64)


def half_size(input_hw: tuple[int, int]) -> tuple[float, float]:
    """The patch half-size per axis: 36 px at 224 px, scaled with the side (same share of the input)."""
    return HALF_SIZE_AT_224 * input_hw[0] / 224, HALF_SIZE_AT_224 * input_hw[1] / 224


def patch_boxes(centres: torch.Tensor, input_hw: tuple[int, int],
                half: tuple[float, float] | None = None) -> torch.Tensor:
    """(..., 2) centres (y, x) -> (..., 4) patches (y0, y1, x0, x1) of the given half-size, clipped at the image."""
    hy, hx = half_size(input_hw) if half is None else half
    cy, cx = centres[..., 0].double(), centres[..., 1].double()
    return torch.stack([(cy - hy).clamp(min=0), (cy + hy).clamp(max=input_hw[0]),
                        (cx - hx).clamp(min=0), (cx + hx).clamp(max=input_hw[1])], dim=-1)


def part_hits(patches: torch.Tensor, parts: ImageParts, num_parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """o_{p,k}: P' x num_parts bool, True if a box of part k intersects patch p with positive area (several boxes
    of one part count once); and the num_parts bool mask of the parts shown in the image."""
    part_ids = torch.as_tensor(parts.parts, dtype=torch.long)
    if len(part_ids) and ((part_ids < 0) | (part_ids >= num_parts)).any():
        _fail("part index", part_ids.tolist(), f"values in 0..{num_parts - 1}")
    boxes = torch.as_tensor(parts.boxes, dtype=torch.float64).reshape(-1, 4)
    p = patches.double()[:, None, :]
    b = boxes[None]
    inter = ((torch.minimum(p[..., 1], b[..., 1]) > torch.maximum(p[..., 0], b[..., 0]))
             & (torch.minimum(p[..., 3], b[..., 3]) > torch.maximum(p[..., 2], b[..., 2])))  # P' x K
    one_hot = torch.nn.functional.one_hot(part_ids, num_parts).double()  # K x num_parts
    return (inter.double() @ one_hot) > 0, one_hot.sum(0) > 0


def stability_noise(images: torch.Tensor, indices: Sequence[int], seed: int, std: float = NOISE_STD) -> torch.Tensor:
    """images + N(0, std^2) noise (normalised input space), one draw per image seeded by (seed, image index)."""
    if not (math.isfinite(std) and std >= 0):
        _fail("noise std", std, "a finite value >= 0")
    if len(indices) != len(images):
        _fail("indices", f"{len(indices)} for {len(images)} images", "one dataset index per image")
    noise = torch.stack([torch.randn(images.shape[1:], generator=image_generator(seed, i, 0)) for i in indices])
    return images + std * noise.to(images.device, images.dtype)


# ---------------------------------------------------------------------------------------------------------------
# 3. Consistency and stability: streamed count tables


class PrototypePartTables:
    """Per mapping: n, m (P x K consistency counts), stability hard/soft sums and counts (P). O(P x K) memory,
    whatever the number of images; `reduce` combines ranks with one all-reduce."""

    def __init__(self, num_prototypes: int, num_parts: int, mappings: Sequence[str] = MAPPINGS) -> None:
        if num_prototypes < 1 or num_parts < 1:
            _fail("PrototypePartTables size", (num_prototypes, num_parts), "num_prototypes >= 1 and num_parts >= 1")
        self.num_prototypes, self.num_parts, self.mappings = num_prototypes, num_parts, tuple(mappings)
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64)
        self.n = z(num_prototypes, num_parts)  # images of class(p) showing part k (shared by all mappings)
        self.m = {name: z(num_prototypes, num_parts) for name in self.mappings}
        self.stable_hard = {name: z(num_prototypes) for name in self.mappings}
        self.stable_soft = {name: z(num_prototypes) for name in self.mappings}
        self.stable_count = z(num_prototypes)
        self.images = 0.0  # images with at least one visible part

    def add_image(self, prototype_ids: torch.Tensor, parts: ImageParts | None, patches: dict[str, torch.Tensor],
                  noisy_patches: dict[str, torch.Tensor] | None = None) -> None:
        """One image: the ids of its class's prototypes (P'), its parts in input pixels, and per mapping the P' x 4
        patches of the clean (and noisy: for stability) image."""
        ids = torch.as_tensor(prototype_ids, dtype=torch.long).reshape(-1)
        if ((ids < 0) | (ids >= self.num_prototypes)).any() or len(torch.unique(ids)) != len(ids):
            _fail("prototype_ids", ids.tolist(), f"distinct ids in 0..{self.num_prototypes - 1}")
        for name, given in (("patches", patches), ("noisy_patches", noisy_patches)):
            if given is None:
                continue
            if set(given) != set(self.mappings):
                _fail(f"{name} mappings", sorted(given), f"{sorted(self.mappings)}")
            for mapping, boxes in given.items():
                if tuple(boxes.shape) != (len(ids), 4):
                    _fail(f"{name}[{mapping!r}] shape", tuple(boxes.shape), f"({len(ids)}, 4): one box per prototype")
        if parts is None or len(parts.parts) == 0:
            return
        visible = None
        hits = {}
        for mapping in self.mappings:
            hits[mapping], visible = part_hits(patches[mapping], parts, self.num_parts)
        vis = visible.double()
        self.images += 1
        self.n.index_add_(0, ids, vis.expand(len(ids), -1).contiguous())
        for mapping in self.mappings:
            self.m[mapping].index_add_(0, ids, (hits[mapping] & visible).double())
        if noisy_patches is None:
            return
        self.stable_count.index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))
        for mapping in self.mappings:
            o = hits[mapping][:, visible]
            o_noisy = part_hits(noisy_patches[mapping], parts, self.num_parts)[0][:, visible]
            union = (o | o_noisy).sum(1).double()
            jaccard = torch.where(union > 0, (o & o_noisy).sum(1).double() / union.clamp(min=1), 1.0)  # 0/0 := 1
            self.stable_hard[mapping].index_add_(0, ids, (o == o_noisy).all(1).double())
            self.stable_soft[mapping].index_add_(0, ids, jaccard)

    def _flat(self) -> torch.Tensor:
        parts = [self.n.flatten(), self.stable_count, torch.tensor([self.images], dtype=torch.float64)]
        for mapping in self.mappings:
            parts += [self.m[mapping].flatten(), self.stable_hard[mapping], self.stable_soft[mapping]]
        return torch.cat(parts)

    def reduce(self, device: torch.device | str = "cpu") -> PrototypePartTables:
        """Sum the tables of all ranks (one all-reduce; a no-op in one process); returns self."""
        flat = dist.all_reduce(self._flat().to(device)).cpu()
        P, K = self.num_prototypes, self.num_parts
        sizes = [P * K, P, 1] + [P * K, P, P] * len(self.mappings)
        chunks = iter(torch.split(flat, sizes))
        self.n, self.stable_count = next(chunks).view(P, K).clone(), next(chunks).clone()
        self.images = float(next(chunks)[0])
        for mapping in self.mappings:
            self.m[mapping] = next(chunks).view(P, K).clone()
            self.stable_hard[mapping], self.stable_soft[mapping] = next(chunks).clone(), next(chunks).clone()
        return self

    def consistency_per_prototype(self, mapping: str) -> torch.Tensor:
        """s_p = max over parts with n > 0 of m / n (NaN-ignoring, B6); NaN where no part was ever shown."""
        shown = self.n > 0
        ratio = torch.where(shown, self.m[mapping] / self.n.clamp(min=1), -1.0)
        best = ratio.max(dim=1).values
        return torch.where(shown.any(dim=1), best, math.nan)

    def scores(self, threshold: float = CONSISTENCY_THRESHOLD) -> dict[str, float | None]:
        """Per mapping: consistency_soft/_hard and stability_soft/_hard (None when no prototype is defined), plus
        the number of prototypes each is over and the images counted."""
        if not 0 <= threshold <= 1:
            _fail("consistency threshold", threshold, "a value in [0, 1]")
        out: dict[str, float | None] = {"part_images": self.images}
        mean = lambda t: float(t.mean()) if len(t) else None
        seen = self.stable_count > 0
        for mapping in self.mappings:
            s = self.consistency_per_prototype(mapping)
            s = s[~torch.isnan(s)]
            out[f"{mapping}_consistency_soft"] = mean(s)
            out[f"{mapping}_consistency_hard"] = mean((s >= threshold).double())
            out[f"{mapping}_stability_soft"] = mean(self.stable_soft[mapping][seen] / self.stable_count[seen])
            out[f"{mapping}_stability_hard"] = mean(self.stable_hard[mapping][seen] / self.stable_count[seen])
        out["consistency_prototypes"] = int((self.n > 0).any(dim=1).sum())
        out["stability_prototypes"] = int(seen.sum())
        return out


def mapping_centres(cells: torch.Tensor, rf_bounds: torch.Tensor, input_hw: tuple[int, int],
                    indices: Sequence[int], seed: int, stream: int = 0) -> dict[str, torch.Tensor]:
    """B x P' x 2 centres (y, x) of every mapping for B images' argmin cells (B x P' x 2)."""
    rf_bounds = torch.as_tensor(rf_bounds)
    cells = torch.as_tensor(cells).long()
    if cells.ndim != 3 or len(cells) != len(indices):
        _fail("cells shape", tuple(cells.shape), f"({len(indices)}, P', 2): per image and prototype its (h, w) cell")
    grid = tuple(rf_bounds.shape[:2])
    return {"ours": rf_centres(cells, rf_bounds), "upsample": upsample_centres(cells, grid, input_hw),
            "random": random_centres(indices, cells.shape[1], input_hw, seed, stream)}


def prototype_part_scores(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    locate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    class_prototypes: torch.Tensor,
    rf_bounds: torch.Tensor,
    parts_of: Callable[[int], ImageParts | None],
    num_parts: int,
    seed: int = 0,
    noise_std: float = NOISE_STD,
    threshold: float = CONSISTENCY_THRESHOLD,
    device: torch.device | str = "cpu",
) -> dict[str, float | None]:
    """Consistency and stability of every mapping over one rank's shard, combined over ranks (§4.3, §4.4).

    batches: (images B x C x H x W normalised, labels B, dataset indices B) of this rank's shard of the test set;
    locate(images, prototype_ids B x P') -> B x P' x 2 argmin cells (h, w) of those prototypes;
    class_prototypes: C x P' the prototype ids of each class; rf_bounds: Hz x Wz x 4 (y0, y1, x0, x1);
    parts_of(index) -> the image's parts in input pixels (None: no annotation).
    Every rank must call this (it ends with a collective)."""
    class_prototypes = torch.as_tensor(class_prototypes, dtype=torch.long)
    if class_prototypes.ndim != 2:
        _fail("class_prototypes shape", tuple(class_prototypes.shape), "C x P': the prototype ids of each class")
    tables = PrototypePartTables(int(class_prototypes.max()) + 1, num_parts)
    for images, labels, indices in batches:
        if not (len(images) == len(labels) == len(indices)) or images.ndim != 4:
            _fail("batch", (tuple(images.shape), len(labels), len(indices)),
                  "B x C x H x W images, B labels, B indices")
        input_hw = tuple(images.shape[2:])
        indices = [int(i) for i in indices]
        ids = class_prototypes[labels.long().cpu()]
        clean = mapping_centres(locate(images, ids).cpu(), rf_bounds, input_hw, indices, seed, stream=0)
        noisy_images = stability_noise(images, indices, seed, noise_std)
        noisy = mapping_centres(locate(noisy_images, ids).cpu(), rf_bounds, input_hw, indices, seed, stream=1)
        for row, index in enumerate(indices):
            tables.add_image(ids[row], parts_of(index),
                             {k: patch_boxes(v[row], input_hw) for k, v in clean.items()},
                             {k: patch_boxes(v[row], input_hw) for k, v in noisy.items()})
    return tables.reduce(device).scores(threshold)


# ---------------------------------------------------------------------------------------------------------------
# 4. Relevance ordering test


def rot_pixel_counts(input_hw: tuple[int, int], step_fraction: float, prop_pixels: float = 1.0,
                     max_steps: int = MAX_ROT_STEPS) -> torch.Tensor:
    """The numbers of pixels added back at the recorded points: 0, c, 2c, ..., K with c = round(step_fraction * H
    * W) (at least 1) and K = round(H * W * prop_pixels)."""
    if not (0 < prop_pixels <= 1):
        _fail("ROT prop_pixels", prop_pixels, "a fraction in (0, 1]")
    if not (0 < step_fraction <= 1):
        _fail("ROT step_fraction", step_fraction, "a fraction in (0, 1]")
    if not (1 <= max_steps <= MAX_ROT_STEPS):
        _fail("ROT max_steps", max_steps, f"1..{MAX_ROT_STEPS}")
    total = input_hw[0] * input_hw[1]
    k_end = max(1, round(total * prop_pixels))
    chunk = max(1, round(step_fraction * total))
    steps = math.ceil(k_end / chunk)
    if steps > max_steps:
        _fail("ROT steps (prop_pixels / step_fraction)", steps, f"at most {max_steps}: a larger step_fraction")
    return torch.tensor(sorted(set(range(0, k_end, chunk)) | {k_end}), dtype=torch.long)


def rot_baseline(shape: tuple[int, int, int], seed: int = 4) -> torch.Tensor:
    """The spec's baseline: one N(0, 1) image in normalised space (the reference's seed 4), shared by all mappings."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def random_relevance(seed: int) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """The "random" mapping for ROT: U[0, 1) maps seeded by (seed, sample index)."""

    def relevance(image: torch.Tensor, prototype_ids: torch.Tensor, index: int) -> torch.Tensor:
        return torch.rand(len(prototype_ids), *image.shape[1:], generator=image_generator(seed, index, 2000))

    return relevance


def rot_curves(image: torch.Tensor, prototype_ids: torch.Tensor, maps: torch.Tensor,
               similarity: Callable[[torch.Tensor, list[int]], torch.Tensor], baseline: torch.Tensor,
               counts: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """P' x len(counts): the similarity of each prototype while its most relevant pixels are added back.

    image, baseline: C x H x W; maps: P' x H x W relevance; similarity(images, ids) -> B x len(ids)."""
    if image.ndim != 3 or baseline.shape != image.shape:
        _fail("ROT image / baseline shape", (tuple(image.shape), tuple(baseline.shape)), "two equal C x H x W")
    if maps.shape != (len(prototype_ids), *image.shape[1:]):
        _fail("ROT relevance maps shape", tuple(maps.shape), f"({len(prototype_ids)}, {image.shape[1]}, "
                                                            f"{image.shape[2]}): one H x W map per prototype")
    if not 1 <= batch_size <= MAX_ROT_BATCH:
        _fail("ROT batch_size", batch_size, f"1..{MAX_ROT_BATCH}")
    h, w = image.shape[1:]
    curves = torch.empty(len(prototype_ids), len(counts), dtype=torch.float64)
    baseline = baseline.to(image.device, image.dtype)
    for row, p in enumerate(prototype_ids.tolist()):
        order = torch.argsort(maps[row].reshape(-1).float().cpu(), descending=True, stable=True)
        rank = torch.empty(h * w, dtype=torch.long)
        rank[order] = torch.arange(h * w)
        rank = rank.view(1, 1, h, w).to(image.device)
        for start in range(0, len(counts), batch_size):
            k = counts[start:start + batch_size].to(image.device).view(-1, 1, 1, 1)
            perturbed = torch.where(rank < k, image[None], baseline[None])
            sims = similarity(perturbed, [p])
            if tuple(sims.shape) != (len(k), 1):
                _fail("ROT similarity output shape", tuple(sims.shape), f"({len(k)}, 1): images x prototypes asked")
            curves[row, start:start + len(k)] = sims[:, 0].double().cpu()
    return curves


class RotTables:
    """Curve sums and (sample, prototype) counts per prototype (fix of B5); `reduce` combines ranks."""

    def __init__(self, num_prototypes: int, counts: torch.Tensor, total_pixels: int) -> None:
        self.counts, self.total_pixels = counts, total_pixels
        self.sums = torch.zeros(num_prototypes, len(counts), dtype=torch.float64)
        self.samples = torch.zeros(num_prototypes, dtype=torch.float64)

    def add(self, prototype_ids: torch.Tensor, curves: torch.Tensor) -> None:
        ids = torch.as_tensor(prototype_ids, dtype=torch.long).reshape(-1)
        if ((ids < 0) | (ids >= len(self.samples))).any() or len(torch.unique(ids)) != len(ids):
            _fail("ROT prototype_ids", ids.tolist(), f"distinct ids in 0..{len(self.samples) - 1}")
        self.sums.index_add_(0, ids, curves.double())
        self.samples.index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))

    def reduce(self, device: torch.device | str = "cpu") -> RotTables:
        flat = dist.all_reduce(torch.cat([self.sums.flatten(), self.samples]).to(device)).cpu()
        self.sums, self.samples = flat[:self.sums.numel()].view_as(self.sums).clone(), flat[self.sums.numel():].clone()
        return self

    def curve(self) -> torch.Tensor:
        """Curve(k): mean over evaluated prototypes of the mean over their samples."""
        seen = self.samples > 0
        if not seen.any():
            _fail("ROT", "no (sample, prototype) pair", "at least one evaluated pair")
        return (self.sums[seen] / self.samples[seen, None]).mean(dim=0)

    def summary(self) -> dict:
        curve = self.curve()
        t = self.counts.double() / self.counts[-1]
        span = curve[-1] - curve[0]
        normalised = (curve - curve[0]) / span if span != 0 else torch.full_like(curve, math.nan)
        first = int(torch.nonzero(curve >= curve[-1])[0, 0])
        return {"rot_area": float(torch.trapezoid(normalised, t)),
                "rot_pct_at_orig_sim": 100.0 * int(self.counts[first]) / self.total_pixels,
                "rot_curve": curve.tolist(), "rot_pct_pixels": (100.0 * self.counts / self.total_pixels).tolist(),
                "rot_pairs": int(self.samples.sum())}


def relevance_ordering_test(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, Sequence[int]]],
    similarity: Callable[[torch.Tensor, list[int]], torch.Tensor],
    relevance: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    num_prototypes: int,
    input_shape: tuple[int, int, int],
    num_samples: int = 50,
    baseline: torch.Tensor | None = None,
    step_fraction: float = 0.01,
    prop_pixels: float = 1.0,
    max_steps: int = MAX_ROT_STEPS,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> dict:
    """ROT of one mapping over this rank's samples, combined over ranks (§4.5); every rank must call it.

    batches: (images B x C x H x W normalised, prototype_ids B x P' evaluated per image (e.g. its class's),
    dataset indices B) of this rank's share of the samples; read until `num_samples` images (this rank's cap);
    relevance(image, ids, index) -> P' x H x W maps of the mapping; similarity(images, ids) -> B x len(ids) max
    similarities; baseline: C x H x W (default rot_baseline(): seed 4). Bounded work: num_samples <=
    MAX_ROT_SAMPLES, P' <= MAX_ROT_PROTOTYPES_PER_IMAGE, steps <= max_steps: at most num_samples x P' x
    (steps + 1) images through `similarity`, batch_size at a time."""
    if not 1 <= num_samples <= MAX_ROT_SAMPLES:
        _fail("ROT num_samples", num_samples, f"1..{MAX_ROT_SAMPLES}")
    input_shape = tuple(int(v) for v in input_shape)
    if len(input_shape) != 3:
        _fail("ROT input_shape", input_shape, "(C, H, W)")
    counts = rot_pixel_counts(input_shape[1:], step_fraction, prop_pixels, max_steps)
    baseline = rot_baseline(input_shape) if baseline is None else baseline
    tables = RotTables(num_prototypes, counts, input_shape[1] * input_shape[2])
    done = 0
    for images, prototype_ids, indices in batches:
        if done == num_samples:
            break
        prototype_ids = torch.as_tensor(prototype_ids, dtype=torch.long)
        if (tuple(images.shape[1:]) != input_shape or prototype_ids.ndim != 2 or len(prototype_ids) != len(images)
                or len(indices) != len(images)):
            _fail("ROT batch", (tuple(images.shape), tuple(prototype_ids.shape), len(indices)),
                  f"B x {' x '.join(map(str, input_shape))} images, B x P' prototype ids, B indices")
        if prototype_ids.shape[1] > MAX_ROT_PROTOTYPES_PER_IMAGE:
            _fail("ROT prototypes per image", prototype_ids.shape[1], f"at most {MAX_ROT_PROTOTYPES_PER_IMAGE}")
        for ids in prototype_ids:  # before any forward
            if ((ids < 0) | (ids >= num_prototypes)).any() or len(torch.unique(ids)) != len(ids):
                _fail("ROT prototype_ids", ids.tolist(), f"distinct ids in 0..{num_prototypes - 1} per image")
        for image, ids, index in list(zip(images, prototype_ids, indices))[:num_samples - done]:
            maps = relevance(image, ids, int(index))
            tables.add(ids, rot_curves(image, ids, maps, similarity, baseline, counts, batch_size))
            done += 1
    return tables.reduce(device).summary()
