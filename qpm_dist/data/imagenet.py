"""Reader for ImageNet-1k (ILSVRC2012) as it is distributed: the official files, or Kaggle's copy of them.

Official layout under `root`::

    train/<wnid>/*.JPEG                     class folders; label = position of the wnid in sorted order
    val/<wnid>/*.JPEG                       either class folders (the usual re-sorted copy) ...
    val/ILSVRC2012_val_00000001.JPEG ...    ... or the flat folder, labelled by the devkit:
    ILSVRC2012_devkit_t12/data/meta.mat                                  (unpacked devkit) or
    ILSVRC2012_devkit_t12.tar.gz                                         (the archive as downloaded)
    bbox/train/<wnid>/<wnid>_<n>.xml        optional: ILSVRC2012_bbox_train_v2.tar.gz unpacked into bbox/train
    bbox/val/ILSVRC2012_val_<n>.xml         optional: ILSVRC2012_bbox_val_v3.tgz unpacked into bbox/ (it holds val/)

Kaggle layout (the "ImageNet Object Localization Challenge" download), recognised by ILSVRC/Data/CLS-LOC::

    ILSVRC/Data/CLS-LOC/train/<wnid>/*.JPEG, ILSVRC/Data/CLS-LOC/val/*.JPEG (flat)
    LOC_val_solution.csv                    ImageId, PredictionString "wnid xmin ymin xmax ymax ...": val labels
                                            and val boxes
    LOC_synset_mapping.txt                  "wnid words" per line: class names
    ILSVRC/Annotations/CLS-LOC/train/<wnid>/*.xml   train boxes (optional)

The devkit's ground truth lists an ILSVRC2012_ID (1..1000) per validation image in file-number order, and
meta.mat maps those ids to wnids (and gives each class its `words`, the display name reports use). Class order
is sorted wnids, as torchvision's ImageFolder/ImageNet use; the wnids stay the classes' identity.
Only file names are listed (no image is opened), so reading takes seconds even for 1.28M files; box XMLs, where
present, are parsed: the val ones always, the train ones when asked (`read_imagenet(train_boxes=True)`: about
0.54M small files, ~35 s at 64 us each with a warm file cache).

Boxes: an image's box is the union of its annotated objects, as (x, y, w, h) in the image's pixels like CUB's
and Cars' boxes (one box per image is what `Split.boxes` holds, for crop_to_box; the union contains every object
of the class). `Split.object_boxes` keeps each object's own box and <difficult> flag, for the pointing metrics,
whose mask is the union of the filled object boxes (two boxes in opposite corners leave the rest uncovered). The
coordinates are the files' 1-based inclusive corners as read (x = xmin, w = xmax - xmin); the metrics convert them.
An image without an annotation file (about 58% of the train images) has a NaN box: users of boxes must skip it.
A box file naming another class than its image's, or one that cannot be parsed, stops the reader naming it.
Boxes are not part of the fingerprint: no stage output depends on them (`data.crop_to_box` is refused for
ImageNet, whose train images are not all annotated).
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import re
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qpm_dist.data.datasets import ObjectBoxes, Split

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
DEVKIT_DIR = "ILSVRC2012_devkit_t12"
META = "data/meta.mat"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
KAGGLE_DATA = "ILSVRC/Data/CLS-LOC"
KAGGLE_BOXES = "ILSVRC/Annotations/CLS-LOC"
KAGGLE_VAL = "LOC_val_solution.csv"
KAGGLE_SYNSETS = "LOC_synset_mapping.txt"
_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.", re.IGNORECASE)
VAL_CLASSES_HINT = "set data.val_classes=train (converters: --val-classes train) to evaluate on the train classes only"


@dataclass(frozen=True)
class ImageNet:
    """What the reader found: the splits (boxes where annotated), class wnids and their display names."""

    train: Split
    val: Split
    wnids: list[str]
    words: list[str]  # the devkit's / LOC_synset_mapping's names of the classes; the wnid where unknown
    fingerprint: str


@dataclass(frozen=True)
class _Layout:
    train_dir: Path
    val_dir: Path
    train_boxes: Path | None  # folder of <wnid>/<stem>.xml, if present
    val_boxes: Path | None  # folder of <stem>.xml, if present
    kaggle: bool


def _layout(root: Path) -> _Layout:
    if (root / KAGGLE_DATA / "train").is_dir():
        data, boxes = root / KAGGLE_DATA, root / KAGGLE_BOXES
        return _Layout(data / "train", data / "val", _dir_or_none(boxes / "train"), None, kaggle=True)
    return _Layout(root / "train", root / "val", _dir_or_none(root / "bbox" / "train"),
                   _dir_or_none(root / "bbox" / "val"), kaggle=False)


def _dir_or_none(path: Path) -> Path | None:
    return path if path.is_dir() else None


def _images_in(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _xml_objects(path: Path, wnid: str) -> list[tuple[float, float, float, float, float]]:
    """(xmin, ymin, xmax, ymax, difficult) of every object of a PASCAL-VOC annotation file, all of class `wnid`
    (difficult: 1 if the object's <difficult> is 1, else 0; ILSVRC's val files say 0 throughout)."""
    try:
        tree = ET.parse(path)
    except (ET.ParseError, OSError) as exc:
        raise ValueError(f"{path}: not a readable bounding-box XML ({exc})") from None
    objects = []
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name != wnid:
            raise ValueError(f"{path}: an object of class {name or '(none)'!r}, but the image is of class {wnid}")
        try:
            box = tuple(float(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"{path}: an <object> without numeric <bndbox> xmin, ymin, xmax, ymax") from None
        difficult = (obj.findtext("difficult") or "0").strip()
        if difficult not in ("0", "1"):
            raise ValueError(f"{path}: <difficult> must be 0 or 1, found {difficult!r}")
        objects.append((*box, float(difficult)))
    if not objects:
        raise ValueError(f"{path}: no <object> with a bounding box")
    return objects


def _union(objects, source) -> list[float]:
    """(x, y, w, h) of the smallest box holding every object (xmin, ymin, xmax, ymax, ...)."""
    if not all(math.isfinite(v) for box in objects for v in box) or any(b[2] < b[0] or b[3] < b[1] for b in objects):
        raise ValueError(f"{source}: a box with xmax < xmin or ymax < ymin, or not finite: {objects}")
    x0, y0 = min(b[0] for b in objects), min(b[1] for b in objects)
    return [x0, y0, max(b[2] for b in objects) - x0, max(b[3] for b in objects) - y0]


def _objects(objects) -> ObjectBoxes:
    """Each object (xmin, ymin, xmax, ymax[, difficult]) as its own (x, y, w, h) box, the convention of the union
    in Split.boxes; the pointing metrics fill each one (spec §7.1), not their bounding rectangle."""
    a = np.array([b[:4] for b in objects], dtype=np.float32).reshape(-1, 4)
    difficult = np.array([len(b) > 4 and b[4] == 1 for b in objects], dtype=bool)
    return ObjectBoxes(np.concatenate([a[:, :2], a[:, 2:] - a[:, :2]], axis=1), difficult)


NO_OBJECTS = ObjectBoxes(np.zeros((0, 4), dtype=np.float32), np.zeros(0, dtype=bool))


def _boxes(paths: list[str], wnids: list[str], box_dir: Path | None,
           flat: bool) -> tuple[np.ndarray | None, list[ObjectBoxes] | None]:
    """Union box and objects per image from `box_dir/<path stem>.xml`, or `box_dir/<file name stem>.xml` if
    `flat` (the val boxes also of a val re-sorted into class folders); NaN and no objects where there is none;
    None, None without a box folder. One listing per folder, not one stat per image."""
    if box_dir is None:
        return None, None
    boxes = np.full((len(paths), 4), np.nan, dtype=np.float32)
    objects = [NO_OBJECTS] * len(paths)
    listed: dict[str, set[str]] = {}
    for i, (path, wnid) in enumerate(zip(paths, wnids)):
        folder, _, name = path.rpartition("/")
        folder = "" if flat else folder
        if folder not in listed:
            try:
                listed[folder] = {e.name for e in os.scandir(box_dir / folder)}
            except (FileNotFoundError, NotADirectoryError):
                listed[folder] = set()
        xml = f"{_stem(name)}.xml"
        if xml in listed[folder]:
            source = box_dir / folder / xml
            found = _xml_objects(source, wnid)
            boxes[i], objects[i] = _union(found, source), _objects(found)
    return boxes, objects


def _class_folder_split(split_dir: Path, classes: list[str], box_dir: Path | None, flat_boxes: bool) -> Split:
    paths, labels = [], []
    for label, wnid in enumerate(classes):
        if not (split_dir / wnid).is_dir():
            continue
        names = _images_in(split_dir / wnid)
        paths += [f"{wnid}/{n}" for n in names]
        labels += [label] * len(names)
    wnids = [p.split("/")[0] for p in paths]
    boxes, objects = _boxes(paths, wnids, box_dir, flat_boxes)
    return Split(split_dir, paths, np.array(labels, dtype=np.int64), boxes, object_boxes=objects)


def _devkit_files(root: Path) -> tuple[bytes, bytes] | None:
    """(meta.mat, validation ground truth) bytes from the unpacked devkit or its .tar.gz archive; None if absent."""
    folder = root / DEVKIT_DIR
    if (folder / META).is_file() and (folder / GROUND_TRUTH).is_file():
        return (folder / META).read_bytes(), (folder / GROUND_TRUTH).read_bytes()
    archive = root / f"{DEVKIT_DIR}.tar.gz"
    if archive.is_file():
        with tarfile.open(archive) as tar:
            try:
                return (tar.extractfile(f"{DEVKIT_DIR}/{META}").read(),
                        tar.extractfile(f"{DEVKIT_DIR}/{GROUND_TRUTH}").read())
            except KeyError as exc:
                raise ValueError(f"{archive}: not an ILSVRC2012 devkit archive ({exc})") from None
    return None


def _leaf_synsets(meta_mat: bytes) -> dict[int, tuple[str, str]]:
    """ILSVRC2012_ID -> (wnid, words) of the 1000 leaf classes in meta.mat (inner nodes have children)."""
    from scipy.io import loadmat

    synsets = loadmat(io.BytesIO(meta_mat), squeeze_me=True)["synsets"]
    return {int(s["ILSVRC2012_ID"]): (str(s["WNID"]), str(s["words"]))
            for s in synsets if int(s["num_children"]) == 0}


def devkit_val_wnids(meta_mat: bytes, ground_truth: bytes, source: str) -> list[str]:
    """The wnid of validation image 1, 2, ... from the devkit files."""
    id_to_wnid = {i: wnid for i, (wnid, _) in _leaf_synsets(meta_mat).items()}
    try:
        ids = [int(line) for line in ground_truth.decode().split()]
    except ValueError:
        raise ValueError(f"{source}: {GROUND_TRUTH} must hold one integer class id per line") from None
    unknown = sorted(set(ids) - set(id_to_wnid))
    if unknown:
        raise ValueError(f"{source}: {GROUND_TRUTH} uses class ids {unknown[:5]} that meta.mat does not define")
    return [id_to_wnid[i] for i in ids]


def kaggle_val_solution(path: Path) -> dict[str, tuple[str, list[float], ObjectBoxes]]:
    """ImageId -> (wnid, union box (x, y, w, h), each object's box) from LOC_val_solution.csv (no difficult
    flags: the file has none)."""
    if not path.is_file():
        raise FileNotFoundError(f"the flat Kaggle validation folder is labelled by {path}, which is missing")
    solution = {}
    with open(path, newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise ValueError(f"{path}: expected the header 'ImageId,PredictionString', found {header}")
        for line, row in enumerate(rows, start=2):
            tokens = row[1].split() if len(row) == 2 else []
            where = f"{path} line {line}"
            if not tokens or len(tokens) % 5:
                raise ValueError(f"{where}: expected 'ImageId,wnid xmin ymin xmax ymax ...', found {row}")
            wnids = set(tokens[0::5])
            if len(wnids) != 1:
                raise ValueError(f"{where}: objects of several classes {sorted(wnids)}: the image's class is ambiguous")
            try:
                objects = [tuple(float(t) for t in tokens[k + 1:k + 5]) for k in range(0, len(tokens), 5)]
            except ValueError:
                raise ValueError(f"{where}: box coordinates must be numbers, found {row[1]!r}") from None
            solution[row[0].strip()] = (tokens[0], _union(objects, where), _objects(objects))
    return solution


def _words(root: Path, layout: _Layout, devkit: tuple[bytes, bytes] | None, classes: list[str]) -> list[str]:
    """Display name per class: the devkit's `words` or LOC_synset_mapping.txt's; the wnid where neither has it."""
    known: dict[str, str] = {}
    if devkit is not None:
        known = dict(_leaf_synsets(devkit[0]).values())
    elif layout.kaggle and (root / KAGGLE_SYNSETS).is_file():
        for line in (root / KAGGLE_SYNSETS).read_text().splitlines():
            wnid, _, words = line.strip().partition(" ")
            if wnid:
                known[wnid] = words.strip() or wnid
    return [known.get(wnid, wnid) for wnid in classes]


def _flat_val_split(layout: _Layout, root: Path, devkit, classes: list[str], val_classes: str) -> Split:
    """The flat val folder, labelled by the devkit (official) or LOC_val_solution.csv (Kaggle)."""
    val_dir = layout.val_dir
    boxes_of: dict[str, tuple[list[float], ObjectBoxes]] = {}
    if layout.kaggle:
        solution = kaggle_val_solution(root / KAGGLE_VAL)
        wnid_of = {image_id: wnid for image_id, (wnid, _, _) in solution.items()}
        boxes_of = {image_id: (box, objects) for image_id, (_, box, objects) in solution.items()}
        labelled_by = str(root / KAGGLE_VAL)
    else:
        if devkit is None:
            raise FileNotFoundError(
                f"{val_dir} is a flat folder, so its labels come from the ILSVRC2012 devkit: expected "
                f"{root / DEVKIT_DIR / META} and {root / DEVKIT_DIR / GROUND_TRUTH}, or the archive "
                f"{root / DEVKIT_DIR}.tar.gz")
        wnids = devkit_val_wnids(*devkit, source=str(root))
        wnid_of = {f"ILSVRC2012_val_{n:08d}": wnid for n, wnid in enumerate(wnids, start=1)}
        labelled_by = f"the devkit (images 1..{len(wnids)})"
    index = {wnid: i for i, wnid in enumerate(classes)}
    paths, labels, image_wnids = [], [], []
    for name in _images_in(val_dir):
        wnid = wnid_of.get(_stem(name))
        if wnid is None:
            if not layout.kaggle and _VAL_NAME.match(name) is None:
                raise ValueError(f"{val_dir / name}: cannot label this file: flat ImageNet validation images are "
                                 f"named ILSVRC2012_val_<8 digits>.JPEG")
            raise ValueError(f"{val_dir / name}: not labelled by {labelled_by}")
        if wnid not in index:
            if val_classes == "train":
                continue
            raise ValueError(f"{val_dir / name}: its class {wnid} has no folder under {layout.train_dir} "
                             f"({VAL_CLASSES_HINT})")
        paths.append(name)
        labels.append(index[wnid])
        image_wnids.append(wnid)
    if layout.kaggle:
        boxes = np.array([boxes_of[_stem(p)][0] for p in paths], dtype=np.float32).reshape(-1, 4)
        objects = [boxes_of[_stem(p)][1] for p in paths]
    else:
        boxes, objects = _boxes(paths, image_wnids, layout.val_boxes, flat=True)
    return Split(val_dir, paths, np.array(labels, dtype=np.int64), boxes, object_boxes=objects)


def read_imagenet(root: Path, val_classes: str = "all", train_boxes: bool = False) -> ImageNet:
    """The splits, wnids, display names and fingerprint (of the file lists and labels) of ImageNet at `root`.

    `val_classes="train"` keeps only validation images of classes that have a train folder (a class subset);
    with "all" such an image stops the reader, naming it and the option. Val boxes are always read (50k small
    files, about 3 s); train boxes only with `train_boxes=True`: nothing in training reads them (crop_to_box
    is refused for ImageNet, the pointing game scores the val images), and parsing their ~544k files would
    cost every rank ~40 s at every start."""
    root = Path(root)
    layout = _layout(root)
    for folder in (layout.train_dir, layout.val_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"data.root: expected the ImageNet folder {folder}")
    classes = sorted(e.name for e in os.scandir(layout.train_dir) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"data.root: {layout.train_dir} has no class folders")
    devkit = None if layout.kaggle else _devkit_files(root)
    train = _class_folder_split(layout.train_dir, classes, layout.train_boxes if train_boxes else None,
                                flat_boxes=False)
    val_folders = sorted(e.name for e in os.scandir(layout.val_dir) if e.is_dir())
    if val_folders:
        extra = sorted(set(val_folders) - set(classes))
        if extra and val_classes != "train":
            raise ValueError(f"{layout.val_dir / extra[0]}: class {extra[0]} has no folder under {layout.train_dir} "
                             f"({VAL_CLASSES_HINT})")
        val = _class_folder_split(layout.val_dir, classes, layout.val_boxes, flat_boxes=True)
    else:
        val = _flat_val_split(layout, root, devkit, classes, val_classes)
    for folder, split in ((layout.train_dir, train), (layout.val_dir, val)):
        if len(split) == 0:
            raise FileNotFoundError(f"data.root: no images found under {folder}")
    h = hashlib.sha256()
    for split in (train, val):
        h.update("\n".join(split.paths).encode())
        h.update(split.labels.tobytes())
    return ImageNet(train, val, classes, _words(root, layout, devkit, classes), h.hexdigest())
