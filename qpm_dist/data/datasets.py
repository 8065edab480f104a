"""Map-style image datasets with per-sample deterministic augmentation.

The random transform of a sample is a pure function of (seed, epoch, index): every sample is augmented
under its own RNG seed, forked from (and restored to) the caller's RNG. Consequences we rely on:
* a run on 2 ranks sees exactly the images a run on 1 rank sees (same global batches, same crops);
* a resumed run continues with exactly the augmentations the interrupted one would have used;
* the number of loader workers never changes the data.
The sampler passes `(index, epoch)` keys; a plain integer key means epoch 0.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image, read_file

from qpm_dist.config import DataConfig
from qpm_dist.data.loaders import TrainLoader, eval_loader
from qpm_dist.data.transforms import test_transform, train_transform

_MASK63 = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample in one epoch (SplitMix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & _MASK63


def read_image(path: Path) -> torch.Tensor:
    """Decode an image file to a uint8 RGB CHW tensor with torchvision's native decoders."""
    try:
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except RuntimeError as exc:
        raise RuntimeError(f"cannot decode image {path}: {exc}") from exc


class ImageListDataset(Dataset):
    """Images named by a list of paths, with integer labels and optional crop boxes (x, y, w, h)."""

    def __init__(
        self,
        image_dir: Path,
        paths: Sequence[str],
        labels: np.ndarray,
        transform: Callable[[torch.Tensor], torch.Tensor],
        seed: int = 0,
        boxes: np.ndarray | None = None,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.image_dir = Path(image_dir)
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.seed = seed
        self.boxes = boxes

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> torch.Tensor:
        image = read_image(self.image_dir / self.paths[index])
        if self.boxes is not None:
            x, y, w, h = (int(round(v)) for v in self.boxes[index])
            _, height, width = image.shape
            x0, y0 = max(0, x), max(0, y)
            image = image[:, y0 : min(height, y + max(h, 1)), x0 : min(width, x + max(w, 1))]
        return image

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        image = self.load(index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            image = self.transform(image)
        return image, int(self.labels[index])


@dataclass(frozen=True)
class Split:
    """The images of one split: where they are, their labels and (optionally) their object boxes."""

    image_dir: Path
    paths: list[str]
    labels: np.ndarray
    boxes: np.ndarray | None = None
    image_ids: np.ndarray | None = None  # the dataset's own ids (CUB layout), to join per-image annotations

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class DatasetBundle:
    """A dataset's splits and the loaders every stage uses (the map-style 'folder' backend).

    `train_loader` yields augmented, rank-sharded training batches (resumable mid-epoch); `eval_loader`
    yields test-transformed batches of the "train" or "test" split, sharded over ranks without padding,
    for evaluation, feature statistics and metrics.
    """

    cfg: DataConfig
    train_split: Split
    test_split: Split
    num_classes: int
    class_names: list[str]
    fingerprint: str  # identifies the annotation files: a changed dataset never reuses cached results
    seed: int = 0
    class_parts: np.ndarray | None = None  # ground-truth class x part matrix (synthetic data only)

    def num_samples(self, split: str) -> int:
        return len({"train": self.train_split, "test": self.test_split}[split])

    def dataset(self, split: str, augment: bool) -> ImageListDataset:
        s = {"train": self.train_split, "test": self.test_split}[split]
        transform = train_transform(self.cfg) if augment else test_transform(self.cfg)
        boxes = s.boxes if self.cfg.crop_to_box else None
        return ImageListDataset(s.image_dir, s.paths, s.labels, transform, seed=self.seed, boxes=boxes)

    def train_loader(self, micro_batch: int, global_batch: int, rank: int, world_size: int,
                     pin_memory: bool = False) -> TrainLoader:
        return TrainLoader(self.dataset("train", augment=True), micro_batch, global_batch, rank, world_size,
                           self.seed, self.cfg.num_workers, pin_memory=pin_memory)

    def eval_loader(self, split: str, batch_size: int, rank: int, world_size: int,
                    pin_memory: bool = False) -> DataLoader:
        return eval_loader(self.dataset(split, augment=False), batch_size, rank, world_size, self.cfg.num_workers,
                           pin_memory=pin_memory)


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()


def _cub_like(cfg: DataConfig, seed: int) -> DatasetBundle:
    from qpm_dist.data.cub import load_cub_metadata

    meta = load_cub_metadata(Path(cfg.root))
    files = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt")
    fingerprint = _digest(*((meta.root / f).read_bytes() for f in files if (meta.root / f).is_file()))

    def split(train: bool) -> Split:
        idx = np.flatnonzero(meta.is_train == train)
        return Split(meta.root / "images", [meta.paths[i] for i in idx], meta.labels[idx], meta.boxes[idx],
                     meta.image_ids[idx])

    return DatasetBundle(cfg, split(True), split(False), len(meta.class_names), list(meta.class_names),
                         fingerprint, seed, class_parts=meta.class_parts)


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


def build_datasets(cfg: DataConfig, seed: int) -> DatasetBundle:
    """Read the dataset's annotations (cheap) and check they exist before any training starts."""
    root = Path(cfg.root)
    if not root.exists():
        hint = " (create it with `qpm-dist make-synthetic`)" if cfg.dataset == "synthetic" else ""
        raise FileNotFoundError(f"data.root: dataset folder not found: {root}{hint}")
    if cfg.dataset in ("synthetic", "cub"):
        return _cub_like(cfg, seed)
    if cfg.dataset == "folder":
        return _class_folders(cfg, seed)
    raise ValueError(f"data.dataset: unknown dataset {cfg.dataset!r}")
