"""Sharded epoch order: disjoint ranks, equal batch counts, world-size invariant global batches, resume."""

import pytest
import torch

from qpm_dist.data.datasets import sample_seed
from qpm_dist.data.loaders import EpochShardSampler


def shard(n, batch, world, rank, epoch=0, skip=0):
    s = EpochShardSampler(n, batch, rank, world, seed=3)
    s.set_epoch(epoch, skip)
    return [i for i, e in s]


def test_ranks_are_disjoint_equal_and_cover_the_cut_permutation():
    n, batch, world = 103, 8, 2  # 103 -> 12 full global batches (96 samples), 7 dropped
    shards = [shard(n, batch, world, r) for r in range(world)]
    assert len(shards[0]) == len(shards[1]) == 48
    assert not set(shards[0]) & set(shards[1])
    assert len(set(shards[0]) | set(shards[1])) == 96


def test_global_batches_do_not_depend_on_world_size():
    n, batch = 64, 8
    one = shard(n, batch, 1, 0)
    two = [shard(n, batch, 2, r) for r in range(2)]
    for step in range(n // batch):
        single = set(one[step * batch:(step + 1) * batch])
        split = set(two[0][step * 4:(step + 1) * 4]) | set(two[1][step * 4:(step + 1) * 4])
        assert single == split


def test_epochs_reshuffle_and_skip_resumes_with_the_next_batch():
    full = shard(64, 8, 2, 1, epoch=5)
    assert full != shard(64, 8, 2, 1, epoch=6)
    assert shard(64, 8, 2, 1, epoch=5, skip=12) == full[12:]


def test_sample_seeds_differ_by_sample_and_epoch():
    seeds = {sample_seed(0, e, i) for e in range(3) for i in range(1000)}
    assert len(seeds) == 3000
    assert all(0 <= s < 2**63 for s in seeds)


def test_folder_backend_returns_sample_indices_and_a_batch_joins_per_sample_fields(tiny_data):
    """The index the trainer joins a task's per-sample fields by (data.batch): the sample's position in its split,
    the same numbering the FFCV and WebDataset backends use (tests/test_ffcv_loader.py, test_wds_loader.py)."""
    import numpy as np

    from qpm_dist.config import DataConfig
    from qpm_dist.data.batch import Batch
    from qpm_dist.data.sources import build_datasets

    data = build_datasets(DataConfig(root=str(tiny_data), img_size=32, num_workers=0), seed=3)
    labels = data.train_split.labels
    loader = data.train_loader(8, 16, 1, 2, return_index=True)  # rank 1 of 2
    loader.set_epoch(2)
    sampler = EpochShardSampler(len(labels), 16, 1, 2, seed=3)
    sampler.set_epoch(2)
    items = list(loader)
    assert torch.cat([index for _, _, index in items]).tolist() == [i for i, _ in sampler]
    table = np.arange(len(labels)) * 10
    for item in items:
        batch = Batch.of(item).join({"tenfold": table, "label_again": labels})
        assert batch.size == 8 and batch["tenfold"].tolist() == (batch["index"] * 10).tolist()
        assert batch["label_again"].tolist() == batch.targets.tolist() == labels[batch["index"].numpy()].tolist()
    for _, test_labels, index in data.eval_loader("test", 5, 1, 3, return_index=True):
        assert index.tolist() and all(i % 3 == 1 for i in index.tolist())  # rank 1 of 3: rows 1, 4, 7, ...
        assert test_labels.tolist() == data.test_split.labels[index.numpy()].tolist()
    with pytest.raises(KeyError, match="did not return sample indices"):
        Batch.of(next(iter(data.train_loader(8, 16, 0, 2)))).join({"tenfold": table})
