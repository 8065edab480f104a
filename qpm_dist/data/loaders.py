"""Distributed, resumable loaders for map-style datasets.

Training order: one permutation of the whole training set per epoch, seeded by (seed, epoch) and
identical on every rank and for every world size. It is cut to a multiple of the global batch (drop
last), and rank r takes positions r, r+W, r+2W, ...; so the union of the ranks' micro-batches at step t
is exactly the global batch a single process would use at step t, and every rank has the same number of
batches (no collective can hang at the epoch end). `set_epoch(epoch, skip_batches)` resumes mid-epoch
with the next unseen batch.

Evaluation: rank r takes samples r, r+W, ... without padding, so all-reduced sums count every test
sample exactly once.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Protocol

import numpy as np

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, default_collate, get_worker_info

from qpm_dist.data.composites import NEGATIVES


class EpochLoader(Protocol):
    """A rank's training batches, epoch by epoch, resumable at a batch position."""

    @property
    def batches_per_epoch(self) -> int: ...

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class DataSource(Protocol):
    """What stages need from a dataset, whatever the storage backend (folders, FFCV, WebDataset).

    Loaders yield (images, labels), or (images, labels, index) with `return_index` (the samples' positions in
    their source split, numbered alike on every backend; see data.batch).

    Implementations: datasets.DatasetBundle (`data.backend: folder`), ffcv_loader.FFCVSource (`ffcv`),
    wds_loader.WebDatasetSource (`wds`); `sources.build_datasets` picks one from the config.
    """

    num_classes: int
    class_names: list[str]
    display_names: list[str]  # what reports call the classes (ImageNet: the devkit's words, not the wnids)
    fingerprint: str
    class_parts: "np.ndarray | None"  # ground-truth class x part matrix where known (synthetic data)

    def num_samples(self, split: str) -> int: ...

    def train_loader(self, micro_batch: int, global_batch: int, rank: int, world_size: int,
                     pin_memory: bool = False, return_index: bool = False) -> EpochLoader: ...

    def eval_loader(self, split: str, batch_size: int, rank: int, world_size: int, pin_memory: bool = False,
                    return_index: bool = False) -> Iterable[tuple[torch.Tensor, ...]]: ...


def collate(batch: list[tuple]) -> list:
    """default_collate, except that images in channels-last memory (as decode_jpeg and
    transforms.RandomResizedCrop leave them) are stacked into a channels_last batch: a plain copy instead of
    a transposing one. Inside a loader worker the batch goes to shared memory, as with default_collate."""
    first = batch[0][0]
    if not (type(first) is torch.Tensor and first.ndim == 3 and first.shape[0] > 1 and first.stride(0) == 1):
        return default_collate(batch)
    images = torch.empty((len(batch), *first.shape), dtype=first.dtype, memory_format=torch.channels_last)
    if get_worker_info() is not None:
        images.share_memory_()
    for i, sample in enumerate(batch):
        images[i].copy_(sample[0])
    return [images, *default_collate([sample[1:] for sample in batch])]


class EpochShardSampler(Sampler[tuple[int, int]]):
    """Yields `(index, epoch)` keys of this rank's share of the epoch's permutation."""

    def __init__(self, num_samples: int, global_batch: int, rank: int, world_size: int, seed: int) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by the world size {world_size}")
        self.steps = num_samples // global_batch
        if self.steps == 0:
            raise ValueError(f"the training set has {num_samples} samples, fewer than one global batch ({global_batch})")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.per_rank = self.steps * global_batch // world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_samples: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_samples

    def __len__(self) -> int:
        return self.per_rank - self.skip

    def indices(self) -> list[int]:
        """This rank's sample indices of the epoch, after the skip."""
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g)[: self.steps * self.global_batch]
        return order[self.rank :: self.world_size][self.skip :].tolist()  # tolist: 20x faster than int() per item

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return iter([(i, epoch) for i in self.indices()])


class NegativeKeys(Sampler[tuple[int, int, int]]):
    """Yields `(negative index, epoch, augmentation seed)` keys of the negatives `plan` (a
    composites.NegativesPlan) names for the samples of `sampler`, NEGATIVES (3) per sample in slot order."""

    def __init__(self, sampler: EpochShardSampler, plan) -> None:
        self.sampler, self.plan = sampler, plan

    def __len__(self) -> int:
        return NEGATIVES * len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        epoch = self.sampler.epoch
        negatives, seeds = self.plan.draw(epoch, np.array(self.sampler.indices(), dtype=np.int64))
        return iter([(i, epoch, s) for i, s in zip(negatives.ravel().tolist(), seeds.ravel().tolist())])


class TrainLoader:
    """A DataLoader over an EpochShardSampler with epoch/position control for resume. With a negatives `plan`
    (composites.NegativesPlan), it yields instead the 3 x micro_batch negatives of each batch of that sampler."""

    def __init__(self, dataset: Dataset, micro_batch: int, global_batch: int, rank: int, world_size: int,
                 seed: int, num_workers: int, pin_memory: bool = False, plan=None) -> None:
        self.micro_batch = micro_batch
        self.sampler = EpochShardSampler(len(dataset), global_batch, rank, world_size, seed)
        if self.sampler.per_rank % micro_batch:
            raise ValueError(f"per-rank batch share {self.sampler.per_rank} is not a multiple of {micro_batch}")
        per_sample = 1 if plan is None else NEGATIVES
        self.loader = DataLoader(
            dataset,
            batch_size=micro_batch * per_sample,
            sampler=self.sampler if plan is None else NegativeKeys(self.sampler, plan),
            drop_last=True,
            num_workers=num_workers,
            collate_fn=collate,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            # A private generator: creating an iterator must not consume the global RNG, or a run resumed
            # mid-epoch would draw different dropout masks than the uninterrupted run.
            generator=torch.Generator(),
        )

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.per_rank // self.micro_batch

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.sampler.set_epoch(epoch, skip_batches * self.micro_batch)

    def __len__(self) -> int:
        return len(self.sampler) // self.micro_batch

    def __iter__(self):
        return iter(self.loader)


def eval_loader(dataset: Dataset, batch_size: int, rank: int, world_size: int, num_workers: int,
                pin_memory: bool = False) -> DataLoader:
    shard = Subset(dataset, range(rank, len(dataset), world_size))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate,
                      pin_memory=pin_memory, generator=torch.Generator())
