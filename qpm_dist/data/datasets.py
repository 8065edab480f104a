"""Map-style image datasets with per-sample deterministic augmentation.

The random transform of a sample is a pure function of (seed, epoch, index): every sample is augmented
under its own RNG seed, forked from (and restored to) the caller's CPU RNG. Consequences we rely on:
* a run on 2 ranks sees exactly the images a run on 1 rank sees (same global batches, same crops);
* a resumed run continues with exactly the augmentations the interrupted one would have used;
* the number of loader workers never changes the data.
The sampler passes `(index, epoch)` keys; a plain integer key means epoch 0. A composite image's negative
(data.composites) is read with an `(index, epoch, seed)` key: its own augmentation seed, from the negatives plan.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from qpm_dist.config import DataConfig
from qpm_dist.data.composites import NegativesPlan
from qpm_dist.data.decode import CorruptImageError, crop_box, decode, read_bytes
from qpm_dist.data.digests import SplitDigests
from qpm_dist.data.loaders import TrainLoader, eval_loader
from qpm_dist.data.transforms import test_transform, train_transform

_MASK63 = (1 << 63) - 1


@contextmanager
def seeded_cpu_rng(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU generator seeded by `seed`, then restore the generator's state.

    Why not torch.random.fork_rng + torch.manual_seed: manual_seed also queues the seeding of CUDA
    generators and records a stack trace with it, about 0.65 ms per call on our CUDA builds (more than
    cropping and resizing an image); the CPU transforms only draw from the CPU generator.
    """
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample in one epoch (SplitMix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & _MASK63


class ImageListDataset(Dataset):
    """Images named by a list of paths, with integer labels and optional crop boxes (x, y, w, h).

    A file that cannot be decoded, or whose bytes differ from their recorded digest (`digests`, see
    qpm_dist.data.digests), stops the run (`on_corrupt="error"`) or is replaced, with a warning naming it, by
    the next readable sample of the list (`"skip"`): batches stay full, so every rank still gets the same
    number of batches.
    """

    def __init__(
        self,
        image_dir: Path,
        paths: Sequence[str],
        labels: np.ndarray,
        transform: Callable[[torch.Tensor], torch.Tensor],
        seed: int = 0,
        boxes: np.ndarray | None = None,
        decoder: str = "torchvision",
        on_corrupt: str = "error",
        return_index: bool = False,
        digests: SplitDigests | None = None,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.image_dir = Path(image_dir)
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.seed = seed
        self.boxes = boxes
        self.decoder = decoder
        self.on_corrupt = on_corrupt
        self.return_index = return_index  # also yield the index of the sample used (see data.batch)
        self.digests = digests

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> torch.Tensor:
        path = self.image_dir / self.paths[index]
        data = read_bytes(path)
        if self.digests is not None:  # before decoding: changed bytes may still decode, to other pixels
            self.digests.check(index, data, path)
        image = decode(data, str(path), self.decoder)
        if self.boxes is not None:
            image = crop_box(image, self.boxes[index])
        return image

    def load_readable(self, index: int) -> tuple[torch.Tensor, int]:
        """Sample `index`, or under on_corrupt="skip" the next readable one; returns (image, its index)."""
        for step in range(len(self)):
            i = (index + step) % len(self)
            try:
                return self.load(i), i
            except CorruptImageError as exc:
                if self.on_corrupt != "skip":
                    raise
                warnings.warn(f"{exc}; skipped (data.on_corrupt=skip): sample {i} is replaced by the next "
                              f"readable one", RuntimeWarning, stacklevel=2)
        raise CorruptImageError(f"no image under {self.image_dir} can be decoded")

    def __getitem__(self, key: int | tuple[int, int] | tuple[int, int, int]) -> tuple:
        """key: index, (index, epoch), or (index, epoch, augmentation seed) (a composite's negative)."""
        index, epoch, *seed = key if isinstance(key, tuple) else (key, 0)
        image, used = self.load_readable(index)
        with seeded_cpu_rng(seed[0] if seed else sample_seed(self.seed, epoch, index)):
            image = self.transform(image)
        return (image, int(self.labels[used]), used) if self.return_index else (image, int(self.labels[used]))


class ObjectBoxes(NamedTuple):
    """The annotated objects of one image, each its own box (ImageNet's XMLs and Kaggle CSV list several)."""

    boxes: np.ndarray  # n x 4 float32 (x, y, w, h), in the convention of the dataset's Split.boxes
    difficult: np.ndarray  # n bool: the XML's <difficult> flag (the pointing game skips all-difficult images)


@dataclass(frozen=True)
class Split:
    """The images of one split: where they are, their labels and (optionally) their object boxes."""

    image_dir: Path
    paths: list[str]
    labels: np.ndarray
    boxes: np.ndarray | None = None  # one box per image (NaN: none), for crop_to_box: the union of its objects
    image_ids: np.ndarray | None = None  # the dataset's own ids (CUB layout), to join per-image annotations
    digests: SplitDigests | None = None  # recorded image digests (data.digests), checked on every read
    # Each image's objects, one box each (ImageNet: several per image; none for an image without annotation);
    # None where the dataset has one box per image (then `boxes` is the object's box).
    object_boxes: list[ObjectBoxes] | None = None

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
    # what reports call the classes (ImageNet: the devkit's words); None: class_names. class_names stay the
    # classes' identity (folder names, wnids), which conversions and checks compare.
    display_names: list[str] | None = None

    def __post_init__(self) -> None:
        if self.display_names is None:
            self.display_names = list(self.class_names)

    def num_samples(self, split: str) -> int:
        return len({"train": self.train_split, "test": self.test_split}[split])

    def dataset(self, split: str, augment: bool, return_index: bool = False) -> ImageListDataset:
        s = {"train": self.train_split, "test": self.test_split}[split]
        transform = train_transform(self.cfg) if augment else test_transform(self.cfg)
        boxes = s.boxes if self.cfg.crop_to_box else None
        return ImageListDataset(s.image_dir, s.paths, s.labels, transform, seed=self.seed, boxes=boxes,
                                decoder=self.cfg.decoder, on_corrupt=self.cfg.on_corrupt, return_index=return_index,
                                digests=s.digests)

    def train_loader(self, micro_batch: int, global_batch: int, rank: int, world_size: int,
                     pin_memory: bool = False, return_index: bool = False) -> TrainLoader:
        return TrainLoader(self.dataset("train", augment=True, return_index=return_index), micro_batch, global_batch,
                           rank, world_size, self.seed, self.cfg.num_workers, pin_memory=pin_memory)

    def negatives_loader(self, micro_batch: int, global_batch: int, rank: int, world_size: int,
                         pin_memory: bool = False) -> TrainLoader:
        """The negatives of composite images (data.composites): batch k holds the 3 x micro_batch images the
        NegativesPlan names for the k-th batch of `train_loader` (same arguments), each under its own seed."""
        plan = NegativesPlan(self.train_split.labels, self.seed)
        return TrainLoader(self.dataset("train", augment=True, return_index=True), micro_batch, global_batch,
                           rank, world_size, self.seed, self.cfg.num_workers, pin_memory=pin_memory, plan=plan)

    def eval_loader(self, split: str, batch_size: int, rank: int, world_size: int, pin_memory: bool = False,
                    return_index: bool = False) -> DataLoader:
        return eval_loader(self.dataset(split, augment=False, return_index=return_index), batch_size, rank,
                           world_size, self.cfg.num_workers, pin_memory=pin_memory)
