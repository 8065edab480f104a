"""Which reader and which storage backend a config names: `read_splits` (the image files and labels of
`data.dataset`) and `build_datasets` (the run's DataSource for `data.backend`).

Kept apart from `datasets.py`, which the dataset readers (cub, imagenet, cars) and the backends build on:
this module imports all of them, none of them imports it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np

from qpm_dist.config import DataConfig
from qpm_dist.data.datasets import DatasetBundle, Split
from qpm_dist.data.integrity import MAX_NAMED
from qpm_dist.errors import MissingInput


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()


def _cub_like(cfg: DataConfig, seed: int) -> DatasetBundle:
    """The CUB layout (cub, synthetic) and TravelingBirds (images under data.root, CUB's annotations from
    data.cub_root); with data.crop_root, the pre-cropped copies of the same images instead."""
    from qpm_dist.data.cub import load_cub_metadata

    birds = cfg.dataset == "travelingbirds"
    if birds and not (cfg.cub_root and Path(cfg.cub_root).is_dir()):
        raise MissingInput(f"data.cub_root: CUB-200-2011 folder not found: {cfg.cub_root} (travelingbirds takes "
                           f"its images.txt, split and boxes from there)")
    meta = load_cub_metadata(Path(cfg.cub_root if birds else cfg.root))
    files = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt")
    identity = [(meta.root / f).read_bytes() for f in files if (meta.root / f).is_file()]
    image_dirs = {True: meta.root / "images", False: meta.root / "images"}
    if birds:
        from qpm_dist.data.travelingbirds import check_same_images, resolve_image_root

        image_root = resolve_image_root(cfg.root)
        image_dirs = {True: image_root / "train", False: image_root / "test"}
        for folder in image_dirs.values():
            check_same_images(folder, meta)
        identity.append(f"travelingbirds:{image_root.name}".encode())  # CUB_fixed: which backgrounds
    if cfg.crop_root is not None:
        image_dirs = _cropped_dirs(Path(cfg.crop_root), (image_root if birds else meta.root).name)
        identity.append(b"crop_root")  # other pixels than the originals: never reuse their results
    fingerprint = _digest(*identity)

    def split(train: bool) -> Split:
        idx = np.flatnonzero(meta.is_train == train)
        return Split(image_dirs[train], [meta.paths[i] for i in idx], meta.labels[idx], meta.boxes[idx],
                     meta.image_ids[idx])

    return DatasetBundle(cfg, split(True), split(False), len(meta.class_names), list(meta.class_names),
                         fingerprint, seed, class_parts=meta.class_parts)


def _cropped_dirs(crop_root: Path, name: str) -> dict[bool, Path]:
    """train_cropped/ and test_cropped/ of data.crop_root, directly in it or in its sub-folder `name` (the
    reference's PPCUB200/CUB_200_2011/ and PPTravelingBirds/CUB_fixed/)."""
    for folder in (crop_root, crop_root / name):
        if (folder / "train_cropped").is_dir() and (folder / "test_cropped").is_dir():
            return {True: folder / "train_cropped", False: folder / "test_cropped"}
    raise MissingInput(f"data.crop_root: {crop_root} holds neither train_cropped/ and test_cropped/ nor "
                       f"{name}/train_cropped/ and {name}/test_cropped/ (pre-cropped images under the dataset's "
                       f"relative paths)")


def _class_folders(cfg: DataConfig, seed: int) -> DatasetBundle:
    """`root/train/<class>/*` and `root/val/<class>/*` (the ImageNet / generic folder layout)."""
    root = Path(cfg.root)
    for name in ("train", "val"):
        if not (root / name).is_dir():
            raise FileNotFoundError(f"data.root: expected the folder {root / name} with one sub-folder per class")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"data.root: {root / 'train'} has no class sub-folders")

    def scan(split_dir: Path) -> Split:
        paths, labels = [], []
        for label, c in enumerate(classes):
            for p in sorted((split_dir / c).glob("*")) if (split_dir / c).is_dir() else []:
                if p.suffix.lower() in (".jpg", ".jpeg", ".png"):
                    paths.append(f"{c}/{p.name}")
                    labels.append(label)
        return Split(split_dir, paths, np.array(labels, dtype=np.int64))

    train, test = scan(root / "train"), scan(root / "val")
    fingerprint = _digest("\n".join(train.paths).encode(), b"|", "\n".join(test.paths).encode())
    return DatasetBundle(cfg, train, test, len(classes), classes, fingerprint, seed)


def _from_reader(cfg: DataConfig, seed: int, read) -> DatasetBundle:
    """A bundle from a reader that returns (train Split, test Split, class names, fingerprint)."""
    train, test, class_names, fingerprint = read(Path(cfg.root))
    return DatasetBundle(cfg, train, test, len(class_names), list(class_names), fingerprint, seed)


def _imagenet(cfg: DataConfig, seed: int) -> DatasetBundle:
    """ImageNet: wnids are the classes' identity (folders, labels, conversions), the devkit's words their names."""
    from qpm_dist.data.imagenet import read_imagenet

    found = read_imagenet(Path(cfg.root), cfg.val_classes)
    return DatasetBundle(cfg, found.train, found.val, len(found.wnids), found.wnids, found.fingerprint, seed,
                         display_names=found.words)


def read_splits(cfg: DataConfig, seed: int = 0) -> DatasetBundle:
    """The image files and labels of `cfg.dataset` under `cfg.root` (what the converters read too)."""
    root = Path(cfg.root)
    if not root.exists():
        hint = " (create it with `qpm-dist make-synthetic`)" if cfg.dataset == "synthetic" else ""
        raise FileNotFoundError(f"data.root: dataset folder not found: {root}{hint}")
    if cfg.dataset in ("synthetic", "cub", "travelingbirds"):
        return _cub_like(cfg, seed)
    if cfg.dataset == "folder":
        return _class_folders(cfg, seed)
    if cfg.dataset == "imagenet":
        return _imagenet(cfg, seed)
    if cfg.dataset == "cars":
        from qpm_dist.data.cars import read_stanford_cars

        return _from_reader(cfg, seed, read_stanford_cars)
    raise ValueError(f"data.dataset: unknown dataset {cfg.dataset!r}")


def missing_files(split: Split, rank: int, world_size: int) -> list[str]:
    """The files of `split` missing on disk, among this rank's share of its folders (folder r, r+W, ...).

    One directory listing per folder instead of one stat per file: ImageNet's 1.3M images are 2000 listings."""
    by_folder: dict[str, list[str]] = {}
    for path in split.paths:
        by_folder.setdefault(os.path.dirname(path), []).append(path)
    missing = []
    for folder in sorted(by_folder)[rank::world_size]:
        try:
            present = set(os.listdir(split.image_dir / folder))
        except (FileNotFoundError, NotADirectoryError):
            present = set()
        missing += [str(split.image_dir / p) for p in by_folder[folder] if os.path.basename(p) not in present]
    return missing


def check_files_exist(bundle: DatasetBundle) -> None:
    """Every image of both splits exists, or FileNotFoundError naming the first few missing (the same error on
    every rank): without it, a missing test image is found at the first evaluation, after epochs of training.
    Each rank lists its share of the folders; the results are gathered over the process group, if any."""
    from qpm_dist import dist

    mine = [p for split in (bundle.train_split, bundle.test_split)
            for p in missing_files(split, dist.rank(), dist.world_size())]
    missing = sorted(p for share in dist.all_gather_object(mine) for p in share)
    if missing:
        listed = ", ".join(missing[:MAX_NAMED]) + (" ..." if len(missing) > MAX_NAMED else "")
        raise FileNotFoundError(f"data.root: {len(missing)} image file(s) listed by the dataset's annotations are "
                                f"missing: {listed}")


def attach_digests(bundle: DatasetBundle) -> DatasetBundle:
    """The bundle with each split's recorded image digests (data.digests), which its datasets check on every
    read; unchanged when there is no list. A damaged list, or one without some image of the dataset, is refused
    here, naming it."""
    from qpm_dist.data.digests import digest_list_path, load_digest_list, split_digests

    cfg = bundle.cfg
    if cfg.crop_root is not None and cfg.digests in ("auto", True):
        return bundle  # data.root's own list describes the originals, which are not read
    path = digest_list_path(cfg.digests, cfg.root)
    if path is None:
        return bundle
    files = load_digest_list(path, cfg.root)
    for name in ("train_split", "test_split"):
        split = getattr(bundle, name)
        digests = split_digests(path, files, split.image_dir, split.paths, cfg.root, cfg.dataset)
        setattr(bundle, name, dataclasses.replace(split, digests=digests))
    return bundle


def build_datasets(cfg: DataConfig, seed: int):
    """The run's DataSource for `data.backend`; reads annotations or the converted manifest and checks the data
    files cheaply (folder: every image exists; ffcv/wds: sizes and structure), so a missing or damaged dataset
    fails before any training starts. Under a process group every rank must call it (the folder check gathers).
    The folder backend also loads the image digest list (data.digests), if any."""
    if cfg.backend == "ffcv":
        try:
            from qpm_dist.data.ffcv_loader import FFCVSource
        except ImportError as exc:
            raise ValueError(f"data.backend=ffcv: FFCV is not installed ({exc}); see requirements/ffcv.txt") from None

        return FFCVSource(cfg, seed)
    if cfg.backend == "wds":
        from qpm_dist.data.wds_loader import WebDatasetSource

        return WebDatasetSource(cfg, seed)
    bundle = read_splits(cfg, seed)
    check_files_exist(bundle)
    return attach_digests(bundle)
