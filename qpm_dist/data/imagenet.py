"""Reader for ImageNet-1k (ILSVRC2012) as it is distributed.

Layout under `root`::

    train/<wnid>/*.JPEG                     class folders; label = position of the wnid in sorted order
    val/<wnid>/*.JPEG                       either class folders (the usual re-sorted copy) ...
    val/ILSVRC2012_val_00000001.JPEG ...    ... or the flat folder, labelled by the devkit:
    ILSVRC2012_devkit_t12/data/meta.mat                                  (unpacked devkit) or
    ILSVRC2012_devkit_t12.tar.gz                                         (the archive as downloaded)

The devkit's ground truth lists an ILSVRC2012_ID (1..1000) per validation image in file-number order, and
meta.mat maps those ids to wnids. Class order is sorted wnids, as torchvision's ImageFolder/ImageNet use.
Only file names are listed here (no image is opened), so reading takes seconds even for 1.28M files.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from pathlib import Path

import numpy as np

from qpm_dist.data.datasets import Split

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
DEVKIT_DIR = "ILSVRC2012_devkit_t12"
META = "data/meta.mat"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.", re.IGNORECASE)


def _images_in(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))


def _class_folder_split(split_dir: Path, classes: list[str]) -> Split:
    paths, labels = [], []
    for label, wnid in enumerate(classes):
        if not (split_dir / wnid).is_dir():
            continue
        names = _images_in(split_dir / wnid)
        paths += [f"{wnid}/{n}" for n in names]
        labels += [label] * len(names)
    return Split(split_dir, paths, np.array(labels, dtype=np.int64))


def _devkit_files(root: Path) -> tuple[bytes, bytes]:
    """(meta.mat, validation ground truth) bytes from the unpacked devkit or its .tar.gz archive."""
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
    raise FileNotFoundError(
        f"{root / 'val'} is a flat folder, so its labels come from the ILSVRC2012 devkit: expected "
        f"{folder / META} and {folder / GROUND_TRUTH}, or the archive {archive}")


def devkit_val_wnids(meta_mat: bytes, ground_truth: bytes, source: str) -> list[str]:
    """The wnid of validation image 1, 2, ... from the devkit files."""
    from scipy.io import loadmat

    synsets = loadmat(io.BytesIO(meta_mat), squeeze_me=True)["synsets"]
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    try:
        ids = [int(line) for line in ground_truth.decode().split()]
    except ValueError:
        raise ValueError(f"{source}: {GROUND_TRUTH} must hold one integer class id per line") from None
    unknown = sorted(set(ids) - set(id_to_wnid))
    if unknown:
        raise ValueError(f"{source}: {GROUND_TRUTH} uses class ids {unknown[:5]} that meta.mat does not define")
    return [id_to_wnid[i] for i in ids]


def _flat_val_split(val_dir: Path, root: Path, classes: list[str]) -> Split:
    wnids = devkit_val_wnids(*_devkit_files(root), source=str(root))
    index = {wnid: i for i, wnid in enumerate(classes)}
    paths, labels = [], []
    for name in _images_in(val_dir):
        match = _VAL_NAME.match(name)
        if match is None:
            raise ValueError(f"{val_dir / name}: cannot label this file: flat ImageNet validation images are "
                             f"named ILSVRC2012_val_<8 digits>.JPEG")
        number = int(match.group(1))
        if not 1 <= number <= len(wnids):
            raise ValueError(f"{val_dir / name}: the devkit labels images 1..{len(wnids)} only")
        wnid = wnids[number - 1]
        if wnid not in index:
            raise ValueError(f"{val_dir / name}: its class {wnid} has no folder under {root / 'train'}")
        paths.append(name)
        labels.append(index[wnid])
    return Split(val_dir, paths, np.array(labels, dtype=np.int64))


def read_imagenet(root: Path) -> tuple[Split, Split, list[str], str]:
    """(train, val, class names = wnids, fingerprint of the file lists and labels)."""
    root = Path(root)
    train_dir, val_dir = root / "train", root / "val"
    for folder in (train_dir, val_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"data.root: expected the ImageNet folder {folder}")
    classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"data.root: {train_dir} has no class folders")
    train = _class_folder_split(train_dir, classes)
    has_class_folders = any(e.is_dir() for e in os.scandir(val_dir))
    val = _class_folder_split(val_dir, classes) if has_class_folders else _flat_val_split(val_dir, root, classes)
    for name, split in (("train", train), ("val", val)):
        if len(split) == 0:
            raise FileNotFoundError(f"data.root: no images found under {root / name}")
    h = hashlib.sha256()
    for split in (train, val):
        h.update("\n".join(split.paths).encode())
        h.update(split.labels.tobytes())
    return train, val, classes, h.hexdigest()
