"""Synthetic image-classification dataset with a known class x part structure.

Why it exists: interpretable methods (QPM, Q-SENN, SLDD) learn a sparse
class x feature assignment. On this dataset every class is a fixed set of
``k`` visual parts out of a vocabulary of ``P`` part types, so a learned
assignment can be checked against the saved ground-truth class x part matrix,
and a small CNN can learn it on CPU in minutes.

Each image: a natural-looking cluttered background (1/f noise, gradients,
low-contrast blobs and lines, sensor grain), a faint "object" body whose box
encloses the class's parts, the class's parts (each missing with probability
``missing_prob``, never all), and sometimes one distractor part of a type the
class does not use. The output uses CUB-200-2011 file names (see
``qpm_dist.data.cub``), plus ``parts/part_boxes.txt``, ``class_parts.txt``
and ``synthetic.json``.

Determinism: the class design comes from ``default_rng([seed, 0])`` and image
``i`` from ``default_rng([seed, 1, i])`` (layout) and ``default_rng([seed, 2,
i])`` (pixels), so the output is byte-identical for any number of workers and
an interrupted run can skip images that are already on disk.

Only numpy and Pillow are used (no torch), so data preparation stays cheap.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Bump whenever the rendered bytes or the file formats change, so that an old
# output directory is not mistaken for a complete dataset of the new version.
GENERATOR_VERSION = 1

META_FILE = "synthetic.json"
# Written when generation starts, removed after META_FILE: marks an unfinished
# run of *this* generator so a rerun with the same parameters may resume it.
PARTIAL_FILE = ".synthetic.partial.json"
# Everything the generator owns inside OUT_DIR (deleted by --force).
OWNED_FILES = (
    "images.txt",
    "image_class_labels.txt",
    "train_test_split.txt",
    "bounding_boxes.txt",
    "classes.txt",
    "class_parts.txt",
    "qpm_dist_digests.json",  # qpm_dist.data.digests.DIGEST_LIST
)
OWNED_DIRS = ("images", "parts")

# Attribute vocabularies. Their sizes 9, 8, 5 are pairwise coprime, so part
# type i = (shape i%9, colour i%8, texture i%5) is a distinct combination for
# i < 360 (Chinese remainder theorem), consecutive types differ in every
# attribute, and any two of the first 40 types differ in at least two.
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon", "crescent")
COLOURS = {
    "red": (220, 35, 35),
    "green": (40, 170, 50),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 40),
    "magenta": (225, 50, 200),
    "cyan": (40, 205, 215),
    "orange": (250, 140, 25),
    "purple": (125, 50, 175),
}
TEXTURES = ("solid", "striped", "dotted", "checkered", "shaded")
MAX_PARTS = len(SHAPES) * len(COLOURS) * len(TEXTURES)
DEFAULT_PARTS = 16

SUPERSAMPLE = 4  # anti-aliasing factor for part outlines
PART_DIAMETER = (0.22, 0.32)  # part size as a fraction of the shorter image side
MAX_ROTATION_DEG = 25.0
MIN_SIZE_LIMIT = 32  # smaller images cannot hold k parts legibly


class PartType(NamedTuple):
    """One entry of the part vocabulary."""

    shape: str
    colour: str
    texture: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.texture} {self.shape}"


def part_type(part: int) -> PartType:
    """Attributes of 0-based part id ``part`` (see the comment on SHAPES)."""
    return PartType(SHAPES[part % len(SHAPES)], list(COLOURS)[part % len(COLOURS)], TEXTURES[part % len(TEXTURES)])


def part_vocabulary(num_parts: int) -> list[PartType]:
    """The first ``num_parts`` part types, spread evenly over the attributes."""
    if not 1 <= num_parts <= MAX_PARTS:
        raise ValueError(f"number of parts must be in 1..{MAX_PARTS}, got {num_parts}")
    return [part_type(i) for i in range(num_parts)]


@dataclass(frozen=True)
class SyntheticParams:
    """Everything that determines the output bytes (workers do not)."""

    classes: int = 20
    parts: int | None = None  # None: DEFAULT_PARTS, raised if needed for binom(P, k) >= classes
    parts_per_class: int = 4
    min_size: int = 64
    max_size: int = 96
    train_per_class: int = 100
    test_per_class: int = 50
    jpeg_quality: int = 90
    seed: int = 0
    distractor_prob: float = 0.3
    missing_prob: float = 0.1

    @property
    def images_per_class(self) -> int:
        return self.train_per_class + self.test_per_class

    @property
    def num_images(self) -> int:
        return self.classes * self.images_per_class


def min_num_parts(classes: int, parts_per_class: int, start: int = 1) -> int:
    """Smallest P >= start with binom(P, k) >= classes (enough distinct part sets)."""
    p = max(start, parts_per_class)
    while math.comb(p, parts_per_class) < classes and p < MAX_PARTS:
        p += 1
    return p


def auto_num_parts(classes: int, parts_per_class: int) -> int:
    """Default P: DEFAULT_PARTS, raised until binom(P, k) >= classes.

    Capped below at classes * k so that every part is used by some class when
    C is tiny.
    """
    return min_num_parts(classes, parts_per_class, start=min(DEFAULT_PARTS, classes * parts_per_class))


def resolve_params(**kwargs) -> SyntheticParams:
    """Validate parameters and fill in ``parts``; errors say which flag to change."""
    p = SyntheticParams(**kwargs)
    if p.parts_per_class < 1:
        raise ValueError(f"--parts-per-class must be >= 1, got {p.parts_per_class}")
    if p.classes < 1:
        raise ValueError(f"--classes must be >= 1, got {p.classes}")
    if p.parts is None:
        p = dataclasses.replace(p, parts=auto_num_parts(p.classes, p.parts_per_class))
    P, k, C = p.parts, p.parts_per_class, p.classes
    if not k <= P <= MAX_PARTS:
        raise ValueError(f"--parts must be in {k}..{MAX_PARTS} (>= --parts-per-class), got {P}")
    if math.comb(P, k) < C:
        raise ValueError(
            f"--classes {C} needs {C} distinct sets of {k} parts, but with --parts {P} there are only "
            f"binom({P}, {k}) = {math.comb(P, k)}; raise --parts to at least {min_num_parts(C, k)} "
            f"(or omit --parts to choose it automatically)"
        )
    if C * k < P:
        raise ValueError(
            f"{C} classes x {k} parts use at most {C * k} part types, so some of --parts {P} would "
            f"never be used; lower --parts or raise --classes/--parts-per-class"
        )
    if not MIN_SIZE_LIMIT <= p.min_size <= p.max_size:
        raise ValueError(f"need {MIN_SIZE_LIMIT} <= --min-size <= --max-size, got {p.min_size}, {p.max_size}")
    if p.train_per_class < 0 or p.test_per_class < 0 or p.images_per_class < 1:
        raise ValueError("--train-per-class and --test-per-class must be >= 0 and not both 0")
    if not 1 <= p.jpeg_quality <= 100:
        raise ValueError(f"--jpeg-quality must be in 1..100, got {p.jpeg_quality}")
    if not 0.0 <= p.distractor_prob <= 1.0 or not 0.0 <= p.missing_prob < 1.0:
        raise ValueError("need 0 <= --distractor-prob <= 1 and 0 <= --missing-prob < 1")
    if p.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {p.seed}")
    return p


# ---------------------------------------------------------------------------
# Class design


def design_classes(classes: int, parts: int, parts_per_class: int, seed: int) -> np.ndarray:
    """Ground-truth class x part 0/1 matrix (uint8, C x P).

    Rows are distinct k-subsets and every part is used: the first ceil(P/k)
    sets are chunks of a random permutation (covering all parts), the rest are
    random distinct k-subsets; rows are shuffled at the end so the covering
    sets are not always the first classes.
    """
    C, P, k = classes, parts, parts_per_class
    rng = np.random.default_rng([seed, 0])
    perm = rng.permutation(P)
    sets: list[tuple[int, ...]] = []
    for start in range(0, P, k):
        chunk = [int(x) for x in perm[start : start + k]]
        if len(chunk) < k:  # pad the last chunk with parts from other chunks
            others = np.setdiff1d(np.arange(P), chunk)
            chunk += [int(x) for x in rng.choice(others, k - len(chunk), replace=False)]
        sets.append(tuple(sorted(chunk)))
    used = set(sets)
    remaining = C - len(sets)
    total = math.comb(P, k)
    if remaining > 0 and remaining > (total - len(used)) // 2:
        # Dense case (C close to binom(P, k)): rejection sampling would stall, so
        # enumerate all subsets. Only reachable when binom(P, k) < 2C, i.e. small.
        free = [s for s in itertools.combinations(range(P), k) if s not in used]
        sets += [free[i] for i in sorted(rng.choice(len(free), remaining, replace=False))]
    else:
        while len(sets) < C:
            s = tuple(sorted(int(x) for x in rng.choice(P, k, replace=False)))
            if s not in used:
                used.add(s)
                sets.append(s)
    matrix = np.zeros((C, P), dtype=np.uint8)
    for row, s in zip(rng.permutation(C), sets):
        matrix[row, list(s)] = 1
    return matrix


def class_dir_name(class_index: int, classes: int) -> str:
    """CUB-style ``NNN.name`` folder name (1-based, zero-padded to >= 3 digits)."""
    width = max(3, len(str(classes)))
    return f"{class_index + 1:0{width}d}.synth_class_{class_index + 1:0{width}d}"


def image_rel_path(image_id: int, params: SyntheticParams) -> str:
    """Path of an image relative to ``images/``; ids run class by class."""
    c, j = divmod(image_id - 1, params.images_per_class)
    width = max(4, len(str(params.images_per_class)))
    return f"{class_dir_name(c, params.classes)}/synth_{c + 1}_{j + 1:0{width}d}.jpg"


# ---------------------------------------------------------------------------
# Layout: everything about an image except its pixels (positions, boxes).


@dataclass
class Instance:
    """One drawn part instance."""

    part: int  # 0-based part id
    cx: float
    cy: float
    radius: float  # circumradius in pixels
    angle: float  # radians
    distractor: bool
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # tight x0, y0, x1, y1 (exclusive)
    mask: np.ndarray | None = None  # anti-aliased coverage over crop
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)  # x0, y0, x1, y1 of mask in the image


@dataclass
class Layout:
    """Geometry and annotations of one image."""

    image_id: int
    label: int  # 0-based class
    is_train: bool
    width: int
    height: int
    instances: list[Instance]  # in drawing order
    object_box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    missing: list[int]  # 0-based ids of class parts left out


def _place(rng, radius, region, placed, tries=30) -> tuple[float, float]:
    """Centre for a part inside ``region`` that overlaps already placed parts little.

    Rejection sampling on circumcircles; if no candidate is clear after
    ``tries`` we keep the one with the least overlap (the region may be tight).
    """
    x0, y0, x1, y1 = region
    best, best_score = None, -1.0
    for _ in range(tries):
        cx = rng.uniform(x0 + radius, max(x0 + radius, x1 - radius))
        cy = rng.uniform(y0 + radius, max(y0 + radius, y1 - radius))
        score = min(
            (math.hypot(cx - o.cx, cy - o.cy) / (radius + o.radius) for o in placed), default=math.inf
        )
        if score > best_score:
            best, best_score = (cx, cy), score
        if score >= 0.8:
            break
    return best


def make_layout(image_id: int, params: SyntheticParams, class_parts: np.ndarray) -> Layout:
    """Sample the image size, which parts appear, and where (uses RNG [seed, 1, id])."""
    rng = np.random.default_rng([params.seed, 1, image_id])
    label, j = divmod(image_id - 1, params.images_per_class)
    W, H = (int(v) for v in rng.integers(params.min_size, params.max_size + 1, size=2))
    own = np.flatnonzero(class_parts[label])
    present = rng.random(len(own)) >= params.missing_prob
    if not present.any():
        present[rng.integers(len(own))] = True
    instances = [Instance(int(p), 0, 0, 0, 0, False) for p in own[present]]
    others = np.flatnonzero(class_parts[label] == 0)
    if len(others) and rng.random() < params.distractor_prob:
        instances.append(Instance(int(rng.choice(others)), 0, 0, 0, 0, True))
    short = min(W, H)
    for inst in instances:
        inst.radius = rng.uniform(*PART_DIAMETER) * short / 2
        inst.angle = math.radians(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    # The object region: a random sub-rectangle that the class parts are placed in.
    rw, rh = rng.uniform(0.55, 0.95) * (W - 2), rng.uniform(0.55, 0.95) * (H - 2)
    rx, ry = rng.uniform(1, W - 1 - rw), rng.uniform(1, H - 1 - rh)
    placed: list[Instance] = []
    for inst in instances:
        region = (rx, ry, rx + rw, ry + rh) if not inst.distractor else (1, 1, W - 1, H - 1)
        inst.cx, inst.cy = _place(rng, inst.radius, region, placed)
        placed.append(inst)
    order = rng.permutation(len(instances))  # random occlusion order
    instances = [instances[i] for i in order]
    for inst in instances:
        _rasterise(inst, W, H)
    class_boxes = [i.box for i in instances if not i.distractor]
    margin = max(2, round(0.05 * short))
    object_box = (
        max(0, min(b[0] for b in class_boxes) - margin),
        max(0, min(b[1] for b in class_boxes) - margin),
        min(W, max(b[2] for b in class_boxes) + margin),
        min(H, max(b[3] for b in class_boxes) + margin),
    )
    return Layout(
        image_id=image_id,
        label=label,
        is_train=j < params.train_per_class,
        width=W,
        height=H,
        instances=instances,
        object_box=object_box,
        missing=[int(p) for p in own[~present]],
    )


def _polygon(shape: str) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape with circumradius ~1, centred at 0."""
    def ring_of(n, r, start):
        return [(r * math.cos(start + 2 * math.pi * i / n), r * math.sin(start + 2 * math.pi * i / n)) for i in range(n)]

    if shape == "square":
        return ring_of(4, 0.95, math.pi / 4)
    if shape == "triangle":
        return ring_of(3, 1.0, -math.pi / 2)
    if shape == "hexagon":
        return ring_of(6, 1.0, 0.0)
    if shape == "diamond":
        return [(0, -1), (0.62, 0), (0, 1), (-0.62, 0)]
    if shape == "star":
        outer, inner = ring_of(5, 1.0, -math.pi / 2), ring_of(5, 0.45, -math.pi / 2 + math.pi / 5)
        return [v for pair in zip(outer, inner) for v in pair]
    if shape == "cross":
        a = 0.32
        return [(a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a), (-a, -1)]
    raise ValueError(f"not a polygon shape: {shape}")


def _shape_mask(shape: str, cx: float, cy: float, r: float, angle: float, crop) -> np.ndarray:
    """Anti-aliased coverage (float32 in 0..1) of one shape over the ``crop`` box."""
    x0, y0, x1, y1 = crop
    s = SUPERSAMPLE
    img = Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)
    draw = ImageDraw.Draw(img)
    ccx, ccy, rr = (cx - x0) * s, (cy - y0) * s, r * s

    def disc(x, y, radius, fill):
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill)

    if shape == "circle":
        disc(ccx, ccy, rr, 255)
    elif shape == "ring":
        disc(ccx, ccy, rr, 255)
        disc(ccx, ccy, 0.55 * rr, 0)
    elif shape == "crescent":
        disc(ccx, ccy, rr, 255)
        disc(ccx + 0.45 * rr * math.cos(angle), ccy + 0.45 * rr * math.sin(angle), 0.8 * rr, 0)
    else:
        ca, sa = math.cos(angle), math.sin(angle)
        pts = [(ccx + rr * (ca * u - sa * v), ccy + rr * (sa * u + ca * v)) for u, v in _polygon(shape)]
        draw.polygon(pts, fill=255)
    return np.asarray(img.reduce(s), dtype=np.float32) / 255.0


def _rasterise(inst: Instance, W: int, H: int) -> None:
    """Compute the instance's coverage mask and tight box (needed for annotations)."""
    shape = part_type(inst.part).shape
    crop = (
        max(0, math.floor(inst.cx - inst.radius) - 1),
        max(0, math.floor(inst.cy - inst.radius) - 1),
        min(W, math.ceil(inst.cx + inst.radius) + 2),
        min(H, math.ceil(inst.cy + inst.radius) + 2),
    )
    mask = _shape_mask(shape, inst.cx, inst.cy, inst.radius, inst.angle, crop)
    ys, xs = np.nonzero(mask > 0.15)
    inst.mask, inst.crop = mask, crop
    inst.box = (crop[0] + int(xs.min()), crop[1] + int(ys.min()), crop[0] + int(xs.max()) + 1, crop[1] + int(ys.max()) + 1)


# ---------------------------------------------------------------------------
# Pixels


def _muted_colour(rng, sat=(0.1, 0.45), val=(0.25, 0.8), hue=None) -> np.ndarray:
    """A random low-saturation RGB colour (0..255 floats), so parts stand out."""
    h = rng.random() if hue is None else hue % 1.0
    s, v = rng.uniform(*sat), rng.uniform(*val)
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32) * 255.0


def _pink_noise(rng, H: int, W: int, exponent: float) -> np.ndarray:
    """Unit-variance noise with amplitude spectrum 1/f**exponent (natural-image-like)."""
    spec = np.fft.rfft2(rng.standard_normal((H, W)))
    fy = np.fft.fftfreq(H)[:, None]
    fx = np.fft.rfftfreq(W)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    spec /= f**exponent
    spec[0, 0] = 0.0
    field = np.fft.irfft2(spec, s=(H, W))
    return (field / (field.std() + 1e-8)).astype(np.float32)


def _background(rng, H: int, W: int) -> np.ndarray:
    """Cluttered, photo-like background (float32 H x W x 3 in 0..255).

    A colour gradient, 1/f luminance and chroma noise (the statistics of
    natural images, which also gives realistic JPEG sizes) and a few soft,
    low-contrast blobs and lines.
    """
    hue = rng.random()
    c1, c2 = _muted_colour(rng, hue=hue), _muted_colour(rng, hue=hue + rng.uniform(-0.15, 0.15))
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    t = (xx * math.cos(theta) + yy * math.sin(theta)) / max(H, W)
    t = (t - t.min()) / (t.max() - t.min() + 1e-8)
    img = c1 + (c2 - c1) * t[..., None]
    exponent = rng.uniform(0.85, 1.15)
    img += rng.uniform(14, 30) * _pink_noise(rng, H, W, exponent)[..., None]
    for _ in range(2):  # chroma noise along random colour directions
        direction = rng.normal(size=3).astype(np.float32)
        direction /= np.linalg.norm(direction)
        img += rng.uniform(4, 10) * _pink_noise(rng, H, W, exponent)[..., None] * direction
    # Clutter: soft low-contrast blobs and lines blended in one pass.
    base = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    overlay = Image.new("RGB", (W, H))
    alpha = Image.new("L", (W, H), 0)
    d_over, d_alpha = ImageDraw.Draw(overlay), ImageDraw.Draw(alpha)
    for _ in range(int(rng.integers(3, 9))):
        colour = tuple(int(v) for v in _muted_colour(rng, val=(0.15, 0.9)))
        a = int(rng.uniform(0.15, 0.4) * 255)
        x, y = rng.uniform(0, W), rng.uniform(0, H)
        if rng.random() < 0.6:
            rx, ry = rng.uniform(0.05, 0.35) * W, rng.uniform(0.05, 0.35) * H
            box = [x - rx, y - ry, x + rx, y + ry]
            d_over.ellipse(box, fill=colour)
            d_alpha.ellipse(box, fill=a)
        else:
            x2, y2 = rng.uniform(0, W), rng.uniform(0, H)
            width = max(1, int(rng.uniform(0.005, 0.03) * max(W, H)))
            d_over.line([x, y, x2, y2], fill=colour, width=width)
            d_alpha.line([x, y, x2, y2], fill=a, width=width)
    blur = ImageFilter.GaussianBlur(radius=max(0.6, min(W, H) / 120))
    mixed = Image.composite(overlay.filter(blur), base, alpha.filter(blur))
    return np.asarray(mixed, dtype=np.float32)


def _texture(texture: str, colour: np.ndarray, inst: Instance, rng) -> np.ndarray:
    """Fill colours (h x w x 3) of a part over its crop, in the part's rotated frame."""
    x0, y0, x1, y1 = inst.crop
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    dx, dy = xx - inst.cx, yy - inst.cy
    ca, sa = math.cos(inst.angle), math.sin(inst.angle)
    u, v = (ca * dx + sa * dy) / inst.radius, (-sa * dx + ca * dy) / inst.radius  # in ~[-1, 1]
    dark = colour * 0.35
    phase = rng.random()
    if texture == "solid":
        pattern = np.zeros_like(u)
    elif texture == "striped":
        pattern = np.floor(v * 3.5 / 2 + phase) % 2
    elif texture == "checkered":
        pattern = (np.floor(u * 2 + phase) + np.floor(v * 2 + phase)) % 2
    elif texture == "dotted":
        cu, cv = (u * 1.5 + phase) % 1 - 0.5, (v * 1.5 + phase) % 1 - 0.5
        pattern = (cu * cu + cv * cv < 0.28**2).astype(np.float32)
    elif texture == "shaded":  # glossy: light centre fading to a darker rim
        t = np.clip(np.sqrt(u * u + v * v), 0, 1)[..., None]
        light = 0.45 * colour + 0.55 * 255
        return light * (1 - t) + colour * 0.6 * t
    else:
        raise ValueError(f"unknown texture {texture}")
    return colour + (dark - colour) * pattern[..., None]


def render_image(layout: Layout, params: SyntheticParams) -> Image.Image:
    """Draw the image described by ``layout`` (uses RNG [seed, 2, id])."""
    rng = np.random.default_rng([params.seed, 2, layout.image_id])
    H, W = layout.height, layout.width
    img = _background(rng, H, W)
    # Object body: a faint rounded box, so the object box is visible in the image.
    x0, y0, x1, y1 = layout.object_box
    body = Image.new("L", (W, H), 0)
    ImageDraw.Draw(body).rounded_rectangle(
        [x0, y0, x1 - 1, y1 - 1], radius=max(2, min(x1 - x0, y1 - y0) // 5), fill=int(rng.uniform(0.3, 0.55) * 255)
    )
    a = np.asarray(body, dtype=np.float32)[..., None] / 255.0
    img = img * (1 - a) + _muted_colour(rng, val=(0.2, 0.85)) * a
    for inst in layout.instances:
        ptype = part_type(inst.part)
        colour = np.array(COLOURS[ptype.colour], dtype=np.float32) * rng.uniform(0.85, 1.1)
        fill = np.clip(_texture(ptype.texture, colour, inst, rng), 0, 255)
        cx0, cy0, cx1, cy1 = inst.crop
        m = inst.mask[..., None]
        img[cy0:cy1, cx0:cx1] = img[cy0:cy1, cx0:cx1] * (1 - m) + fill * m
    img += rng.normal(0, rng.uniform(1.5, 4.0), size=(H, W, 1)).astype(np.float32)  # sensor grain
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------
# Annotation lines (formatted in the workers, written in id order by the parent)


def _fmt(v: float) -> str:
    return f"{v:.1f}"


def annotation_lines(layout: Layout, params: SyntheticParams) -> dict[str, str]:
    """Lines this image contributes to each metadata file (keyed by relative file name)."""
    i = layout.image_id
    x0, y0, x1, y1 = layout.object_box
    locs = {inst.part: inst for inst in layout.instances if not inst.distractor}
    part_locs = []
    for p in range(params.parts):
        inst = locs.get(p)
        if inst is None:
            part_locs.append(f"{i} {p + 1} 0.0 0.0 0\n")
        else:
            part_locs.append(f"{i} {p + 1} {_fmt(inst.cx)} {_fmt(inst.cy)} 1\n")
    part_boxes = [
        f"{i} {inst.part + 1} {_fmt(b[0])} {_fmt(b[1])} {_fmt(b[2] - b[0])} {_fmt(b[3] - b[1])} {int(inst.distractor)}\n"
        for inst in sorted(layout.instances, key=lambda x: (x.distractor, x.part))
        for b in [inst.box]
    ]
    return {
        "images.txt": f"{i} {image_rel_path(i, params)}\n",
        "image_class_labels.txt": f"{i} {layout.label + 1}\n",
        "train_test_split.txt": f"{i} {int(layout.is_train)}\n",
        "bounding_boxes.txt": f"{i} {_fmt(x0)} {_fmt(y0)} {_fmt(x1 - x0)} {_fmt(y1 - y0)}\n",
        "parts/part_locs.txt": "".join(part_locs),
        "parts/part_boxes.txt": "".join(part_boxes),
    }


STREAMED_FILES = (
    "images.txt",
    "image_class_labels.txt",
    "train_test_split.txt",
    "bounding_boxes.txt",
    "parts/part_locs.txt",
    "parts/part_boxes.txt",
)


# ---------------------------------------------------------------------------
# Per-image work (runs in worker processes)

_WORKER: dict = {}


def _init_worker(out_dir: str, params: SyntheticParams, class_parts: np.ndarray, skip_existing: bool) -> None:
    """Pool initializer: keep the shared read-only state in a module global."""
    _WORKER.update(out_dir=Path(out_dir), params=params, class_parts=class_parts, skip_existing=skip_existing)


def _process_image(image_id: int) -> tuple[dict[str, str], int, int]:
    """Lay out, render and save one image; return its annotation lines and counts.

    The JPEG is written to a temp file and renamed, so a file that exists is
    complete and a resumed run may skip it (its annotations come from the
    layout RNG alone).
    """
    params, class_parts = _WORKER["params"], _WORKER["class_parts"]
    layout = make_layout(image_id, params, class_parts)
    path = _WORKER["out_dir"] / "images" / image_rel_path(image_id, params)
    if not (_WORKER["skip_existing"] and path.exists()):
        tmp = path.with_name(path.name + ".tmp")
        render_image(layout, params).save(tmp, format="JPEG", quality=params.jpeg_quality)
        os.replace(tmp, path)
    n_distractors = sum(inst.distractor for inst in layout.instances)
    return annotation_lines(layout, params), n_distractors, len(layout.missing)


# ---------------------------------------------------------------------------
# Output directory handling


def _write_atomic(path: Path, text: str) -> None:
    """Write via temp file + os.replace, so readers never see a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _identity(params: SyntheticParams) -> dict:
    """What must match for an existing directory to count as the same dataset."""
    return {"generator_version": GENERATOR_VERSION, "params": dataclasses.asdict(params)}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _clear_owned(out: Path) -> None:
    """Delete only what the generator writes (synthetic.json first: never half-valid)."""
    for name in (META_FILE, PARTIAL_FILE, *OWNED_FILES):
        (out / name).unlink(missing_ok=True)
    for name in OWNED_DIRS:
        if (out / name).exists():
            shutil.rmtree(out / name)


def _prepare_out_dir(out: Path, params: SyntheticParams, force: bool) -> str:
    """Decide what to do with ``out``: 'complete', 'resume' or 'fresh'.

    Raises FileExistsError instead of overwriting data the user did not ask
    us to replace.
    """
    wanted = _identity(params)
    meta = _read_json(out / META_FILE)
    if meta is not None and {k: meta.get(k) for k in wanted} == wanted:
        (out / PARTIAL_FILE).unlink(missing_ok=True)
        return "complete"
    partial = _read_json(out / PARTIAL_FILE)
    if meta is None and partial == wanted:
        return "resume"
    if out.exists() and any(out.iterdir()):
        if not force:
            found = meta if meta is not None else partial
            if isinstance(found, dict) and isinstance(found.get("params"), dict):
                old = {"generator_version": found.get("generator_version"), **found["params"]}
                new = {"generator_version": GENERATOR_VERSION, **wanted["params"]}
                diff = ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in new.items() if old.get(k) != v)
                state = "a complete" if meta is not None else "an unfinished"
                what = f"{state} synthetic dataset with different parameters ({diff})"
            else:
                what = "files that are not a synthetic dataset with these parameters"
            raise FileExistsError(
                f"{out} already holds {what}; pass --force (force=True) to delete its images/, parts/ "
                f"and metadata files and generate anew"
            )
        _clear_owned(out)
    return "fresh"


# ---------------------------------------------------------------------------
# Public API


def generate(
    out_dir: str | os.PathLike,
    *,
    workers: int | None = None,
    force: bool = False,
    progress: bool = False,
    **params,
) -> Path:
    """Generate the synthetic dataset into ``out_dir`` and return its path.

    ``params`` are the fields of SyntheticParams. Does nothing if ``out_dir``
    already holds a complete dataset with the same parameters; resumes an
    interrupted run with the same parameters; refuses to replace anything
    else unless ``force``. ``workers`` (default: CPU count) never changes the output;
    with workers > 1 the pool uses the spawn start method, so a calling script
    needs the usual ``if __name__ == "__main__":`` guard.
    """
    p = resolve_params(**params)
    out = Path(out_dir)
    state = _prepare_out_dir(out, p, force)
    if state == "complete":
        return out
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / PARTIAL_FILE, json.dumps(_identity(p), indent=2) + "\n")
    class_parts = design_classes(p.classes, p.parts, p.parts_per_class, p.seed)
    for c in range(p.classes):
        (out / "images" / class_dir_name(c, p.classes)).mkdir(parents=True, exist_ok=True)
    (out / "parts").mkdir(exist_ok=True)

    vocab = part_vocabulary(p.parts)
    _write_atomic(out / "classes.txt", "".join(f"{c + 1} {class_dir_name(c, p.classes)}\n" for c in range(p.classes)))
    _write_atomic(out / "parts" / "parts.txt", "".join(f"{i + 1} {t.name}\n" for i, t in enumerate(vocab)))
    _write_atomic(out / "class_parts.txt", "".join(" ".join(map(str, row)) + "\n" for row in class_parts))

    counts = _render_all(out, p, class_parts, workers, state == "resume", progress)
    _write_digest_list(out, p)

    meta = {
        **_identity(p),
        "counts": {
            "images": p.num_images,
            "train": p.classes * p.train_per_class,
            "test": p.classes * p.test_per_class,
            "classes": p.classes,
            "parts": p.parts,
            **counts,
        },
        "part_types": [t._asdict() for t in vocab],
        "layout": "CUB-200-2011 files + parts/part_boxes.txt + class_parts.txt; see data_prep/synthetic.py",
    }
    _write_atomic(out / META_FILE, json.dumps(meta, indent=2) + "\n")  # last: marks completeness
    (out / PARTIAL_FILE).unlink(missing_ok=True)
    return out


def _write_digest_list(out: Path, p: SyntheticParams) -> None:
    """The digest of every image (qpm_dist.data.digests), so the folder backend checks each read against it."""
    from qpm_dist.data.digests import DIGEST_LIST, image_digest, write_digest_list

    rel = [f"images/{image_rel_path(i, p)}" for i in range(1, p.num_images + 1)]
    write_digest_list(out / DIGEST_LIST, {r: image_digest((out / r).read_bytes()) for r in rel}, "synthetic")


def _usable_cpus() -> int:
    """CPUs this process may run on (os.cpu_count() ignores affinity masks, e.g. under Slurm)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _render_all(out: Path, p: SyntheticParams, class_parts, workers, skip_existing, progress) -> dict[str, int]:
    """Render all images (in parallel) and stream their annotations to temp files in id order."""
    from qpm_dist.utils import progress as progress_bar, to_stderr

    workers = max(1, min(workers or _usable_cpus(), p.num_images))
    ids = range(1, p.num_images + 1)
    init_args = (str(out), p, class_parts, skip_existing)
    handles = {name: open(out / (name + ".tmp"), "w") for name in STREAMED_FILES}
    counts = {"part_instances": 0, "distractors": 0, "missing_parts": 0}
    pool = None
    try:
        if workers == 1:
            _init_worker(*init_args)
            results = map(_process_image, ids)
        else:
            # spawn, not fork: safe even if the caller has threads (e.g. torch) running.
            pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, init_args)
            chunk = max(1, min(64, p.num_images // (workers * 8)))
            results = pool.imap(_process_image, ids, chunksize=chunk)
        bar = progress_bar(p.num_images, "make-synthetic", show=progress, unit="img", emit=to_stderr)
        for lines, n_distractors, n_missing in results:
            bar.update(1)
            for name, text in lines.items():
                handles[name].write(text)
            counts["part_instances"] += lines["parts/part_boxes.txt"].count("\n")
            counts["distractors"] += n_distractors
            counts["missing_parts"] += n_missing
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    except BaseException:  # incl. KeyboardInterrupt: leave no temp files, keep finished JPEGs
        if pool is not None:
            pool.terminate()
        for f in handles.values():
            f.close()
        for name in STREAMED_FILES:
            (out / (name + ".tmp")).unlink(missing_ok=True)
        raise
    for name, f in handles.items():
        f.close()
        os.replace(out / (name + ".tmp"), out / name)
    return counts


# ---------------------------------------------------------------------------
# CLI (registered as `python -m data_prep make-synthetic`)


def register(subparsers) -> None:
    """Add the ``make-synthetic`` subcommand to the data_prep CLI."""
    d = SyntheticParams()
    ap = subparsers.add_parser(
        "make-synthetic",
        help="render the synthetic part-based dataset (CUB-compatible layout)",
        description="Render a synthetic dataset whose classes are known sets of visual parts "
        "(CUB-200-2011 file layout plus parts/part_boxes.txt, class_parts.txt, synthetic.json). "
        "Output is deterministic given the parameters and seed.",
    )
    ap.add_argument("out_dir", type=Path, help="output directory")
    ap.add_argument("--classes", type=int, default=d.classes, help="number of classes C (default %(default)s)")
    ap.add_argument(
        "--parts", type=int, default=None,
        help=f"number of part types P (default {DEFAULT_PARTS}, raised until binom(P, k) >= C)",
    )
    ap.add_argument("--parts-per-class", type=int, default=d.parts_per_class, help="parts per class k (default %(default)s)")
    ap.add_argument("--min-size", type=int, default=d.min_size, help="min image side in px (default %(default)s)")
    ap.add_argument("--max-size", type=int, default=d.max_size, help="max image side in px (default %(default)s)")
    ap.add_argument("--train-per-class", type=int, default=d.train_per_class, help="(default %(default)s)")
    ap.add_argument("--test-per-class", type=int, default=d.test_per_class, help="(default %(default)s)")
    ap.add_argument(
        "--distractor-prob", type=float, default=d.distractor_prob,
        help="chance of one distractor part (a type the class lacks) per image (default %(default)s)",
    )
    ap.add_argument(
        "--missing-prob", type=float, default=d.missing_prob,
        help="chance that each class part is left out, never all (default %(default)s)",
    )
    ap.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality, help="(default %(default)s)")
    ap.add_argument("--seed", type=int, default=d.seed, help="(default %(default)s)")
    ap.add_argument(
        "--workers", type=int, default=None,
        help="worker processes (default: CPU count); the output does not depend on it",
    )
    ap.add_argument("--force", action="store_true", help="replace a different dataset or other files in OUT_DIR")
    ap.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    ap.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    """Handler for ``make-synthetic``: returns a process exit code."""
    params = {f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticParams)}
    start = time.perf_counter()
    try:
        out = generate(args.out_dir, workers=args.workers, force=args.force, progress=not args.quiet, **params)
    except (ValueError, FileExistsError) as e:
        print(f"make-synthetic: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"make-synthetic: interrupted; rerun the same command to resume {args.out_dir}", file=sys.stderr)
        return 130
    meta = json.loads((out / META_FILE).read_text())
    n = meta["counts"]["images"]
    if not args.quiet:
        print(f"{out}: {n} images, {meta['params']['classes']} classes, {meta['params']['parts']} part types "
              f"(ready after {time.perf_counter() - start:.1f} s)")
    return 0
