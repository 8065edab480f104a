"""Sharded epoch order: disjoint ranks, equal batch counts, world-size invariant global batches, resume."""

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
