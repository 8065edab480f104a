"""A validation split carved from the training split: model selection without looking at the test set.

PixPNet's reference validates on a random 10 % of the *augmented* training set and selects nothing with it
(specs/pixpnet.md §2.4, B4); its numbers are then read on the test set it also monitored. Here a seeded,
class-stratified fraction of the training split is held out (`held_out_indices`) and `HeldOutSource` serves the
rest as the training split, to every loader of the run:

* `train_loader`: augmented batches of the remaining images only (the usual resumable, rank-sharded order over
  them, each image augmented under its ORIGINAL index's seed);
* `eval_loader("train", ...)`: the remaining images, test-transformed (what a prototype push scans);
* `eval_loader("val", ...)`: the held-out images, test-transformed, never augmented, never trained on;
* `eval_loader("test", ...)`: the test split, unchanged.

Loaders with `return_index=True` yield the ORIGINAL training indices (positions in the dataset's train split),
so what a push records names the image in the dataset, whichever images were held out. Any method can use it:
wrap the run's data source, hand the wrapper to the trainer.

Only the map-style folder backend (`datasets.DatasetBundle`) is supported: FFCV and WebDataset read their train
split as a whole (a method should refuse a held-out fraction on them in its config check).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from qpm_dist.data.datasets import DatasetBundle
from qpm_dist.data.loaders import TrainLoader, eval_loader

SPLITS = ("train", "val", "test")


def held_out_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of round(fraction x n_c) images of every class c (n_c its training images), at most n_c - 1
    so that every class keeps a training image; drawn by a numpy Generator seeded with `seed`, class by class in
    class order, so the split depends on (labels, fraction, seed) only."""
    if not 0 <= fraction < 1:
        raise ValueError(f"held-out fraction must lie in [0, 1), got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = min(int(round(fraction * len(members))), len(members) - 1)
        chosen.append(np.sort(rng.permutation(members)[:k]))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


class IndexedSubset(Dataset):
    """`dataset` restricted to `indices`, keyed like the dataset itself: an int, or a tuple (index, epoch, ...)
    whose first element is a position in `indices` (the loaders' keys), mapped to the original index."""

    def __init__(self, dataset: Dataset, indices: np.ndarray) -> None:
        self.dataset, self.indices = dataset, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            return self.dataset[(int(self.indices[key[0]]), *key[1:])]
        return self.dataset[int(self.indices[key])]


class HeldOutSource:
    """A `DatasetBundle` whose training split lacks the held-out images, which form the "val" split (see the
    module docstring). Every other attribute (num_classes, class_names, fingerprint, ...) is the bundle's."""

    def __init__(self, data: DatasetBundle, fraction: float, seed: int) -> None:
        if not isinstance(data, DatasetBundle):
            raise ValueError(f"a held-out validation split needs the folder backend's dataset, got "
                             f"{type(data).__name__} (data.backend ffcv/wds read the train split as a whole)")
        self.data, self.fraction = data, fraction
        labels = data.train_split.labels
        self.val_indices = held_out_indices(labels, fraction, seed)
        keep = np.ones(len(labels), dtype=bool)
        keep[self.val_indices] = False
        self.train_indices = np.flatnonzero(keep)

    def __getattr__(self, name: str):  # only called for attributes this class does not define
        return getattr(self.data, name)

    def indices(self, split: str) -> np.ndarray | None:
        """The original training indices of "train" / "val"; None for "test" (the whole test split)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return {"train": self.train_indices, "val": self.val_indices, "test": None}[split]

    def num_samples(self, split: str) -> int:
        chosen = self.indices(split)
        return self.data.num_samples("test") if chosen is None else len(chosen)

    def train_loader(self, micro_batch: int, global_batch: int, rank: int, world_size: int,
                     pin_memory: bool = False, return_index: bool = False) -> TrainLoader:
        dataset = IndexedSubset(self.data.dataset("train", augment=True, return_index=return_index),
                                self.train_indices)
        return TrainLoader(dataset, micro_batch, global_batch, rank, world_size, self.data.seed,
                           self.data.cfg.num_workers, pin_memory=pin_memory)

    def eval_loader(self, split: str, batch_size: int, rank: int, world_size: int, pin_memory: bool = False,
                    return_index: bool = False) -> Iterable[tuple[torch.Tensor, ...]] | DataLoader:
        chosen = self.indices(split)
        if chosen is None:
            return self.data.eval_loader(split, batch_size, rank, world_size, pin_memory, return_index)
        dataset = IndexedSubset(self.data.dataset("train", augment=False, return_index=return_index), chosen)
        return eval_loader(dataset, batch_size, rank, world_size, self.data.cfg.num_workers, pin_memory=pin_memory)
