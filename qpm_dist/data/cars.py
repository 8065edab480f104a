"""Reader for Stanford Cars (196 classes, 8,144 train / 8,041 test images) from its devkit .mat files.

Layout under `root` (the folder that holds them, or its parent with a `stanford_cars/` sub-folder)::

    devkit/cars_meta.mat                 class_names: 196 strings, class k+1 -> label k
    devkit/cars_train_annos.mat          annotations: bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, fname
    cars_test_annos_withlabels.mat       the same fields for the test images (also found under devkit/)
    cars_train/*.jpg, cars_test/*.jpg

Boxes become (x, y, w, h) = (x1, y1, x2 - x1, y2 - y1) in pixels, the usual PIL-style crop of these
annotations. Every listed image is checked to exist, so a missing file is named before training starts.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from qpm_dist.data.datasets import Split

TEST_ANNOS = "cars_test_annos_withlabels.mat"


def _resolve_root(root: Path) -> Path:
    if not (root / "devkit").is_dir() and (root / "stanford_cars" / "devkit").is_dir():
        return root / "stanford_cars"
    return root


def _loadmat(path: Path, key: str):
    from scipy.io import loadmat

    if not path.is_file():
        raise FileNotFoundError(f"missing Stanford Cars annotation file {path}")
    try:
        content = loadmat(path, squeeze_me=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable .mat file ({exc})") from None
    if key not in content:
        raise ValueError(f"{path}: expected the variable '{key}', found {sorted(k for k in content if not k.startswith('__'))}")
    return content[key]


def _annotations(path: Path, image_dir: Path, num_classes: int) -> Split:
    annos = np.atleast_1d(_loadmat(path, "annotations"))
    fields = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
    missing = [f for f in fields if f not in (annos.dtype.names or ())]
    if missing:
        raise ValueError(f"{path}: annotations lack the fields {missing}")
    paths = [str(a["fname"]) for a in annos]
    classes = np.array([int(a["class"]) for a in annos], dtype=np.int64)
    bad = np.flatnonzero((classes < 1) | (classes > num_classes))
    if len(bad):
        raise ValueError(f"{path}: image {paths[bad[0]]} has class {classes[bad[0]]}, not in 1..{num_classes}")
    x1, y1, x2, y2 = (np.array([float(a[f]) for a in annos], dtype=np.float32) for f in fields[:4])
    boxes = np.stack([x1, y1, np.maximum(x2 - x1, 1), np.maximum(y2 - y1, 1)], axis=1)
    for p in paths:
        if not (image_dir / p).is_file():
            raise FileNotFoundError(f"image listed in {path} not found: {image_dir / p}")
    return Split(image_dir, paths, classes - 1, boxes)


def read_stanford_cars(root: Path) -> tuple[Split, Split, list[str], str]:
    """(train, test, class names, fingerprint of the annotation files)."""
    root = _resolve_root(Path(root))
    meta = root / "devkit" / "cars_meta.mat"
    class_names = [str(n) for n in np.atleast_1d(_loadmat(meta, "class_names"))]
    test_annos = root / TEST_ANNOS if (root / TEST_ANNOS).is_file() else root / "devkit" / TEST_ANNOS
    train = _annotations(root / "devkit" / "cars_train_annos.mat", root / "cars_train", len(class_names))
    test = _annotations(test_annos, root / "cars_test", len(class_names))
    h = hashlib.sha256()
    for path in (meta, root / "devkit" / "cars_train_annos.mat", test_annos):
        h.update(path.read_bytes())
    return train, test, class_names, h.hexdigest()
