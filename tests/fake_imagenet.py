"""A small ImageNet (ILSVRC2012) in the layouts it is distributed in, for reader tests and end-to-end runs.

`make_fake_imagenet(root)` writes 10 real wnids with

* the official layout: ``train/<wnid>/<wnid>_<n>.JPEG``; flat ``val/ILSVRC2012_val_000000NN.JPEG``; the devkit
  archive ``ILSVRC2012_devkit_t12.tar.gz`` (``data/meta.mat``: a ``synsets`` struct array with the real fields,
  leaf ids NOT in sorted-wnid order, plus non-leaf synsets with ``num_children > 0`` as in the real file;
  ``data/ILSVRC2012_validation_ground_truth.txt``); bounding-box XMLs in PASCAL-VOC form under
  ``bbox/train/<wnid>/<wnid>_<n>.xml`` (ILSVRC2012_bbox_train_v2.tar.gz unpacked; not every train image has
  one) and ``bbox/val/ILSVRC2012_val_000000NN.xml`` (ILSVRC2012_bbox_val_v3.tgz unpacked);
* or, with ``layout="kaggle"``, the Kaggle "ImageNet Object Localization Challenge" layout:
  ``ILSVRC/Data/CLS-LOC/{train/<wnid>/, val/}``, ``ILSVRC/Annotations/CLS-LOC/{train/<wnid>/, val/}`` XMLs,
  ``LOC_val_solution.csv`` and ``LOC_synset_mapping.txt`` (no devkit).

Awkward files as the real dataset has them: a grayscale JPEG, a CMYK JPEG and a PNG named ``.JPEG``. Some
images show two objects (two boxes). Each class is a coloured shape on a noisy background at a random place, so
a tiny backbone learns it within seconds (measured: tiny_resnet width 8, 32 px, 12 dense epochs in 9 s on one
core: 93% top-1 on the 30 val images with augment=light, 57% with augment=imagenet; chance is 10%); the object
boxes are where the shapes are drawn. Writing the default size (60 train + 30 val images, 0.75 MB) takes 0.3 s.
`describe` returns what the files say (classes, sizes, boxes), for tests to compare the readers against.
"""

from __future__ import annotations

import csv
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# The first ten ILSVRC2012 classes by wnid, with their devkit `words`.
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475",
         "n01496331", "n01498041", "n01514668", "n01514859", "n01518878"]
WORDS = ["tench, Tinca tinca", "goldfish, Carassius auratus",
         "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias",
         "tiger shark, Galeocerdo cuvieri", "hammerhead, hammerhead shark", "electric ray, crampfish, numbfish, torpedo",
         "stingray", "cock", "hen", "ostrich, Struthio camelus"]
# ILSVRC2012_ID of each wnid above: a permutation, as the real ids follow the WordNet hierarchy, not wnid order.
ILSVRC_IDS = [3, 7, 1, 10, 5, 2, 9, 4, 8, 6]
# Non-leaf synsets (ids after the leaves, as in the real meta.mat): wnid, words, children (ILSVRC2012_IDs).
INNER = [("n01473806", "aquatic vertebrate", [11 + 1, 11 + 2]), ("n02512053", "fish", [3, 7, 1, 10, 5]),
         ("n01482330", "shark", [1, 10, 5])]
COLOURS = np.array([[230, 40, 40], [40, 200, 40], [40, 60, 230], [230, 220, 40], [200, 40, 220],
                    [40, 220, 220], [250, 140, 20], [120, 60, 20], [250, 250, 250], [20, 20, 20]], dtype=np.uint8)
DEVKIT = "ILSVRC2012_devkit_t12"


@dataclass
class FakeImage:
    """One written image: its file (relative to its split folder), class and object boxes (xmin, ymin, xmax, ymax)."""

    path: str
    wnid: str
    size: tuple[int, int]  # (width, height)
    objects: list[tuple[int, int, int, int]]
    box_file: bool = True  # False: no XML (not every train image is annotated)
    kind: str = "rgb"  # rgb | gray | cmyk | png


def _pixels(rng: np.random.Generator, label: int, size: tuple[int, int],
            objects: list[tuple[int, int, int, int]]) -> np.ndarray:
    width, height = size
    image = rng.integers(60, 160, (height, width, 3)).astype(np.uint8)
    for x0, y0, x1, y1 in objects:
        image[y0:y1, x0:x1] = COLOURS[label]
        if label % 2:  # a stripe pattern on odd classes: colour alone does not separate all of them in gray
            image[y0:y1:3, x0:x1] = 255 - COLOURS[label]
    return image


def _objects(rng: np.random.Generator, size: tuple[int, int], count: int) -> list[tuple[int, int, int, int]]:
    width, height = size
    boxes = []
    for _ in range(count):
        w, h = int(rng.integers(width // 3, width // 2)), int(rng.integers(height // 3, height // 2))
        x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        boxes.append((x0, y0, x0 + w, y0 + h))
    return boxes


def _save(path: Path, pixels: np.ndarray, kind: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    if kind == "gray":
        image.convert("L").save(path, format="JPEG", quality=90)
    elif kind == "cmyk":
        image.convert("CMYK").save(path, format="JPEG", quality=90)
    elif kind == "png":
        image.save(path, format="PNG")  # named .JPEG, as n02105855_2933.JPEG in the real train set
    else:
        image.save(path, format="JPEG", quality=90)


def voc_xml(folder: str, filename: str, size: tuple[int, int], wnid: str,
            objects: list[tuple[int, int, int, int]]) -> str:
    """An annotation file in the PASCAL-VOC form the ILSVRC2012 box archives use."""
    parts = [f"<annotation>\n\t<folder>{folder}</folder>\n\t<filename>{filename}</filename>\n"
             f"\t<source>\n\t\t<database>ILSVRC_2012</database>\n\t</source>\n"
             f"\t<size>\n\t\t<width>{size[0]}</width>\n\t\t<height>{size[1]}</height>\n\t\t<depth>3</depth>\n"
             f"\t</size>\n\t<segmented>0</segmented>\n"]
    for x0, y0, x1, y1 in objects:
        parts.append(f"\t<object>\n\t\t<name>{wnid}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
                     f"\t\t<difficult>0</difficult>\n\t\t<bndbox>\n\t\t\t<xmin>{x0}</xmin>\n\t\t\t<ymin>{y0}</ymin>\n"
                     f"\t\t\t<xmax>{x1}</xmax>\n\t\t\t<ymax>{y1}</ymax>\n\t\t</bndbox>\n\t</object>\n")
    parts.append("</annotation>\n")
    return "".join(parts)


def meta_mat_bytes(wnids=WNIDS, words=WORDS, ids=ILSVRC_IDS, inner=INNER) -> bytes:
    """data/meta.mat: the `synsets` struct array with the real devkit's fields (leaves first, then inner nodes)."""
    from scipy.io import savemat

    names = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
             "num_train_images"]
    rows = [(i, w, t, f"gloss of {t.split(',')[0]}", 0, np.zeros((1, 0)), 0, 1300) for i, w, t in zip(ids, wnids, words)]
    rows += [(len(wnids) + 1 + k, w, t, f"gloss of {t}", len(children), np.array([children], dtype=float), 1 + k, 0)
             for k, (w, t, children) in enumerate(inner)]
    synsets = np.zeros((len(rows), 1), dtype=[(n, "O") for n in names])
    for r, row in enumerate(rows):
        synsets[r, 0] = row
    buf = io.BytesIO()
    savemat(buf, {"synsets": synsets})
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, blob: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(blob)
    tar.addfile(info, io.BytesIO(blob))


def describe(per_class: int = 6, val_per_class: int = 3, seed: int = 0) -> list:
    """The images to write, as (train, val) lists of FakeImage (deterministic in `seed`)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label, wnid in enumerate(WNIDS):
        for n in range(per_class):
            size = (int(rng.integers(40, 65)), int(rng.integers(40, 65)))
            objects = _objects(rng, size, 2 if n == 1 else 1)
            train.append(FakeImage(f"{wnid}/{wnid}_{n + 1}.JPEG", wnid, size, objects, box_file=n % 3 != 2))
    # awkward files, where the real train set has them too
    train[0].kind, train[per_class].kind, train[2 * per_class + 1].kind = "gray", "cmyk", "png"
    order = rng.permutation(len(WNIDS) * val_per_class)  # val file numbers are not grouped by class
    for number, k in enumerate(order, start=1):
        wnid = WNIDS[int(k) % len(WNIDS)]
        size = (int(rng.integers(40, 65)), int(rng.integers(40, 65)))
        val.append(FakeImage(f"ILSVRC2012_val_{number:08d}.JPEG", wnid, size,
                             _objects(rng, size, 2 if number % 7 == 0 else 1)))
    val[3].kind = "gray"
    return [train, val]


def make_fake_imagenet(root: Path, layout: str = "official", per_class: int = 6, val_per_class: int = 3,
                       seed: int = 0) -> Path:
    """Write the fake ImageNet under `root` (created) and return the folder to give as data.root."""
    if layout not in ("official", "kaggle"):
        raise ValueError(f"layout: expected 'official' or 'kaggle', got {layout!r}")
    root = Path(root)
    train, val = describe(per_class, val_per_class, seed)
    rng = np.random.default_rng(seed + 1)
    if layout == "official":
        train_dir, val_dir, train_xml, val_xml = root / "train", root / "val", root / "bbox" / "train", root / "bbox" / "val"
    else:
        data, annotations = root / "ILSVRC" / "Data" / "CLS-LOC", root / "ILSVRC" / "Annotations" / "CLS-LOC"
        train_dir, val_dir, train_xml, val_xml = data / "train", data / "val", annotations / "train", annotations / "val"
    for split_dir, xml_dir, images in ((train_dir, train_xml, train), (val_dir, val_xml, val)):
        for image in images:
            _save(split_dir / image.path, _pixels(rng, WNIDS.index(image.wnid), image.size, image.objects), image.kind)
            if image.box_file:
                stem = image.path.rsplit(".", 1)[0]
                xml = xml_dir / f"{stem}.xml"
                xml.parent.mkdir(parents=True, exist_ok=True)
                folder = image.wnid if "/" in image.path else "val"
                xml.write_text(voc_xml(folder, stem.split("/")[-1], image.size, image.wnid, image.objects))
    if layout == "official":
        truth = "".join(f"{ILSVRC_IDS[WNIDS.index(image.wnid)]}\n" for image in val).encode()
        with tarfile.open(root / f"{DEVKIT}.tar.gz", "w:gz") as tar:
            _add(tar, f"{DEVKIT}/data/meta.mat", meta_mat_bytes())
            _add(tar, f"{DEVKIT}/data/ILSVRC2012_validation_ground_truth.txt", truth)
            _add(tar, f"{DEVKIT}/readme.txt", b"ILSVRC2012 devkit (fake)\n")
    else:
        (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {t}\n" for w, t in zip(WNIDS, WORDS)))
        with open(root / "LOC_val_solution.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["ImageId", "PredictionString"])
            for image in sorted(val, key=lambda i: i.wnid):  # the real file is not in file-number order either
                boxes = " ".join(f"{image.wnid} {x0} {y0} {x1} {y1}" for x0, y0, x1, y1 in image.objects)
                writer.writerow([image.path.rsplit(".", 1)[0], boxes + " "])
    return root
