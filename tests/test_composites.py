"""Composite images (data.composites): tiling geometry, the negatives plan, each backend's negatives loader (ranks,
resume, the images it names), the WebDataset pool's same-class repair, in-batch negatives and the errors."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from data_helpers import convert, source_cfg
from qpm_dist.data.batch import Batch
from qpm_dist.data.composites import (CompositeLoader, NegativesPlan, TooFewClasses, composite_loader,
                                      in_batch_negatives, pool_negatives, quadrants, tile)
from qpm_dist.data.datasets import sample_seed
from qpm_dist.data.sources import build_datasets
from qpm_dist.errors import BadInput

SEED = 3


def cell(composites: torch.Tensor, j: int) -> torch.Tensor:
    """Cell j (reading order) of B x C x 2s x 2s composites."""
    s = composites.shape[-1] // 2
    return composites[:, :, (j // 2) * s:(j // 2 + 1) * s, (j % 2) * s:(j % 2 + 1) * s]


def assert_layout(batch: Batch, negatives: torch.Tensor | None = None) -> None:
    """The positive in its quadrant, the negatives (B x 3 x C x s x s, if given) in the other cells in slot order."""
    composites, quadrant = batch["composites"], batch["quadrant"]
    for b in range(batch.size):
        q, others = int(quadrant[b]), [j for j in range(4) if j != int(quadrant[b])]
        assert torch.equal(cell(composites, q)[b], batch.images[b].to(composites.dtype))
        if negatives is not None:
            for slot, j in enumerate(others):
                assert torch.equal(cell(composites, j)[b], negatives[b, slot].to(composites.dtype))


def all_batches(loader) -> list[Batch]:
    """Clones (FFCV reuses its image buffers)."""
    return [Batch({k: v.clone() for k, v in b.items()}) for b in loader]


# ------------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("channels_last", [False, True])
def test_tile_puts_the_positive_in_its_quadrant_and_the_negatives_in_slot_order(channels_last):
    b, c, s = 8, 3, 5
    positives = torch.randn(b, c, s, s)
    negatives = torch.randn(b, 3, c, s, s)
    if channels_last:
        positives = positives.contiguous(memory_format=torch.channels_last)
    quadrant = torch.arange(b) % 4  # every q, twice
    composites = tile(positives, negatives, quadrant)
    assert composites.shape == (b, c, 2 * s, 2 * s)
    assert composites.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert_layout(Batch(images=positives, targets=torch.zeros(b), composites=composites, quadrant=quadrant), negatives)
    with pytest.raises(ValueError, match="negatives"):
        tile(positives, negatives[:, :2], quadrant)


def test_quadrants_are_a_function_of_seed_epoch_and_index():
    index = torch.arange(4000)
    q = quadrants(index, SEED, 1)
    assert torch.equal(q, quadrants(index.flip(0), SEED, 1).flip(0))
    assert not torch.equal(q, quadrants(index, SEED, 2))
    assert torch.bincount(q, minlength=4).min() > 900  # about 1000 each


# ------------------------------------------------------------------------------------------- the plan
def test_plan_draws_other_classes_uniformly_with_replacement_and_images_uniformly():
    # class sizes 2000, 10, 40, 5, 300; label 7 absent, -1: a left-out sample (never drawn)
    labels = np.concatenate([np.full(n, c) for c, n in ((0, 2000), (1, 10), (2, 40), (3, 5), (4, 300))] + [[-1]])
    plan = NegativesPlan(labels, SEED)
    index = np.flatnonzero(labels == 0)
    negatives, seeds = plan.draw(2, index)
    assert negatives.shape == seeds.shape == (2000, 3)
    classes = labels[negatives]
    assert (classes != 0).all() and (classes >= 0).all()
    # uniform over the 4 other classes, not over their samples: 6000 draws, 1500 each (sd ~34)
    assert np.abs(np.bincount(classes.ravel(), minlength=5)[1:] - 1500).max() < 150
    assert (classes[:, 0] == classes[:, 1]).mean() > 0.15  # with replacement: 1/4 of pairs share a class
    # within a class, every image alike: class 1's 10 images, ~150 draws each
    drawn = np.bincount(negatives[classes == 1] - 2000, minlength=10)
    assert drawn.min() > 90 and drawn.max() < 220
    # the other direction: samples of the small classes draw class 0 a quarter of the time
    small = plan.draw(2, np.flatnonzero((labels > 0)))[0]
    assert 0.2 < (labels[small] == 0).mean() < 0.3


def test_plan_is_a_function_of_seed_epoch_and_index():
    labels = np.arange(1000) % 7
    plan = NegativesPlan(labels, SEED)
    index = np.random.default_rng(0).permutation(1000)
    negatives, seeds = plan.draw(1, index)
    again, again_seeds = plan.draw(1, index[::-1])  # another order, or another rank's share: the same draws
    assert np.array_equal(again[::-1], negatives) and np.array_equal(again_seeds[::-1], seeds)
    other_epoch, other_seeds = plan.draw(2, index)
    assert (other_epoch != negatives).mean() > 0.9 and (other_seeds != seeds).all()
    assert (NegativesPlan(labels, SEED + 1).draw(1, index)[0] != negatives).mean() > 0.9
    # a negative's augmentation seed is its own, not the seed that image gets as a positive, and differs by slot
    as_positive = np.vectorize(lambda i: sample_seed(SEED, 1, int(i)))(negatives)
    assert (seeds != as_positive).all() and (seeds >= 0).all()
    assert len(np.unique(seeds)) == seeds.size


def test_a_training_set_of_one_class_is_refused(tiny_data):
    with pytest.raises(TooFewClasses, match="1 class"):
        NegativesPlan(np.zeros(10, dtype=np.int64), SEED)
    with pytest.raises(TooFewClasses):
        NegativesPlan(np.array([2, -1, 2]), SEED)  # placeholders are not a class
    bundle = build_datasets(source_cfg("folder", None, tiny_data), seed=SEED)
    one_class = replace(bundle, train_split=replace(bundle.train_split, labels=np.zeros(128, dtype=np.int64)))
    with pytest.raises(BadInput, match="gc.negatives=dataset: the training set has 1 class"):
        composite_loader(one_class, "dataset", 8, 16, 0, 1)


# ------------------------------------------------------------------------------------------- folder backend
@pytest.fixture(scope="module")
def folder(tiny_data):
    return build_datasets(source_cfg("folder", None, tiny_data), seed=SEED)


def epoch_batches(data, micro, global_batch, rank, world, epoch=1, skip=0, mode="dataset") -> list[Batch]:
    loader = composite_loader(data, mode, micro, global_batch, rank, world)
    loader.set_epoch(epoch, skip)
    batches = all_batches(loader)
    assert len(batches) == len(loader) == loader.batches_per_epoch - skip
    return batches


def test_folder_two_ranks_give_the_composites_of_one_rank(folder):
    one = epoch_batches(folder, 16, 16, 0, 1)
    ranks = [epoch_batches(folder, 8, 16, r, 2) for r in range(2)]
    assert len(one) == 8 and [len(r) for r in ranks] == [8, 8]
    for step, whole in enumerate(one):
        for r in range(2):  # rank r holds positions r, r+2, ... of the global batch
            part = ranks[r][step]
            for name in ("index", "targets", "quadrant", "negative_index", "composites", "same_class_negatives"):
                assert torch.equal(part[name], whole[name][r::2]), name
    labels = folder.train_split.labels
    for batch in one:
        assert_layout(batch)
        assert batch["composites"].shape == (16, 3, 64, 64)
        assert (labels[batch["negative_index"]] != labels[batch["index"]][:, None]).all()
        assert (batch["same_class_negatives"] == 0).all()


def test_folder_resume_mid_epoch_gives_the_uninterrupted_composites(folder):
    full = epoch_batches(folder, 8, 16, 1, 2, epoch=2)
    rest = epoch_batches(folder, 8, 16, 1, 2, epoch=2, skip=5)
    for a, b in zip(rest, full[5:], strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_folder_negatives_are_the_planned_images_under_their_own_seeds(folder):
    dataset = folder.dataset("train", augment=True)
    plan = NegativesPlan(folder.train_split.labels, SEED)
    batch = epoch_batches(folder, 4, 8, 0, 2, epoch=3)[2]
    negatives, seeds = plan.draw(3, batch["index"].numpy())
    assert np.array_equal(batch["negative_index"].numpy(), negatives)
    images = torch.stack([torch.stack([dataset[(int(i), 3, int(s))][0] for i, s in zip(row, srow)])
                          for row, srow in zip(negatives, seeds)])
    assert_layout(batch, images)
    # under the seed it gets as a positive, the same image is cropped otherwise
    assert not torch.equal(images[0, 0], dataset[(int(negatives[0, 0]), 3)][0])


def test_image_dataset_keys_keep_their_meaning(folder):
    dataset = folder.dataset("train", augment=True)
    assert torch.equal(dataset[5][0], dataset[(5, 0)][0])
    assert torch.equal(dataset[(5, 2)][0], dataset[(5, 2, sample_seed(SEED, 2, 5))][0])
    assert not torch.equal(dataset[(5, 2)][0], dataset[(5, 2, 12345)][0])


# ------------------------------------------------------------------------------------------- in-batch negatives
def test_in_batch_negatives_are_other_samples_with_other_labels_where_the_batch_has_them(folder):
    targets = torch.tensor([0, 0, 0, 0, 0, 1])
    index = torch.arange(10, 16)
    chosen, same = in_batch_negatives(targets, index, SEED, 0)
    assert (chosen != torch.arange(6).unsqueeze(1)).all()  # never the sample itself
    assert all(len(set(row.tolist())) == 3 for row in chosen)
    assert (targets[chosen[5]] == 0).all() and same[5] == 0  # label 1 gets three of label 0
    assert (chosen[:5] == 5).sum(dim=1).eq(1).all() and (same[:5] == 2).all()  # the only other label, then 2 same
    batch = epoch_batches(folder, 8, 16, 0, 2, mode="in_batch")[1]
    labels = folder.train_split.labels
    assert set(batch["negative_index"].flatten().tolist()) <= set(batch["index"].tolist())
    differs = labels[batch["negative_index"]] != labels[batch["index"]][:, None]
    assert torch.equal(batch["same_class_negatives"], torch.from_numpy((~differs).sum(1)).float())
    position = {int(i): p for p, i in enumerate(batch["index"])}
    positions = torch.tensor([[position[int(i)] for i in row] for row in batch["negative_index"]])
    assert_layout(batch, batch.images[positions])


# ------------------------------------------------------------------------------------------- pool repair, errors
def test_pool_negatives_replace_same_class_slots_with_other_classes_of_the_pool():
    targets = torch.tensor([0, 1])
    pool_targets = torch.tensor([0, 2, 0, 1, 1, 1])  # sample 0: slots 0, 2 need another class; sample 1: all
    pool_index = torch.arange(100, 106)
    chosen, same = pool_negatives(targets, torch.tensor([7, 8]), pool_targets, pool_index, SEED, 0)
    assert chosen[0, 1] == 1  # kept
    assert (pool_targets[chosen[0]] != 0).all() and same[0] == 0
    assert (pool_targets[chosen[1]] != 1).all() and same[1] == 0
    again, _ = pool_negatives(targets, torch.tensor([7, 8]), pool_targets, pool_index, SEED, 0)
    assert torch.equal(chosen, again)
    # no other class in the pool: the slots stay and are counted
    chosen, same = pool_negatives(torch.tensor([1]), torch.tensor([7]), torch.tensor([1, 1, 1]),
                                  torch.arange(3), SEED, 0)
    assert chosen.tolist() == [[0, 1, 2]] and same.tolist() == [3.0]


def test_a_negatives_batch_of_the_wrong_size_is_refused():
    positives = [(torch.zeros(4, 3, 8, 8), torch.arange(4), torch.arange(4))]
    negatives = [(torch.zeros(11, 3, 8, 8), torch.arange(11) % 4, torch.arange(11))]
    with pytest.raises(ValueError, match="gave 11 images for a batch of 4"):
        list(CompositeLoader(positives, negatives, "dataset", SEED))


def test_a_negatives_loader_out_of_step_with_the_positives_is_refused():
    positives = [(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]), torch.tensor([0, 1]))] * 2
    negatives = [(torch.zeros(6, 3, 8, 8), torch.tensor([1, 1, 1, 0, 0, 0]), torch.arange(6))]
    with pytest.raises(ValueError, match="shorter"):
        list(CompositeLoader(positives, negatives, "dataset", SEED))


# ------------------------------------------------------------------------------------------- FFCV and WebDataset
def assert_converted_composites(loader, truth: np.ndarray, micro: int) -> list[Batch]:
    loader.set_epoch(1)
    batches = []
    for batch in loader:
        assert batch["composites"].shape == (micro, 3, 64, 64)
        assert_layout(batch)
        labels = truth[batch["negative_index"]]
        assert torch.equal(batch["targets"], torch.from_numpy(truth[batch["index"]]))
        assert (labels != truth[batch["index"]][:, None]).all()  # 4 classes: a pool always holds another
        assert (batch["same_class_negatives"] == 0).all()
        batches.append(Batch(index=batch["index"].clone(), negative_index=batch["negative_index"].clone()))
    assert len(batches) == loader.batches_per_epoch
    loader.set_epoch(1, skip_batches=2)
    rest = [(b["index"].clone(), b["negative_index"].clone()) for b in loader]
    assert [(a.tolist(), b.tolist()) for a, b in rest] == \
        [(b["index"].tolist(), b["negative_index"].tolist()) for b in batches[2:]]
    return batches


def test_ffcv_composites_classes_quadrants_and_resume(tiny_data, folder, request):
    pytest.importorskip("ffcv")
    src = build_datasets(source_cfg("ffcv", request.getfixturevalue("tiny_ffcv"), tiny_data), seed=SEED)
    truth = folder.train_split.labels
    batches = assert_converted_composites(composite_loader(src, "dataset", 8, 16, 1, 2), truth, 8)
    plan = NegativesPlan(truth, SEED)  # the folder backend's plan: the same negatives
    for batch in batches:
        assert np.array_equal(batch["negative_index"].numpy(), plan.draw(1, batch["index"].numpy())[0])


def test_wds_composites_take_other_classes_from_the_pool_and_resume(tiny_data, tmp_path_factory, folder):
    converted = convert("wds", tiny_data, tmp_path_factory.mktemp("conv") / "wds", "--samples-per-shard", "24")
    src = build_datasets(source_cfg("wds", converted, tiny_data, num_workers=2), seed=SEED)
    truth = folder.train_split.labels
    loader = composite_loader(src, "dataset", 8, 16, 0, 2)
    batches = assert_converted_composites(loader, truth, 8)
    # the pool: the raw stream, 24 per batch; slots holding the positive's class were replaced, the others kept
    loader.negatives.set_epoch(1)
    raw = [index.clone() for _, _, index in loader.negatives]
    replaced = 0
    for batch, pool in zip(batches, raw, strict=True):
        slots = pool.reshape(8, 3)
        same = truth[slots] == truth[batch["index"]][:, None]
        assert torch.equal(batch["negative_index"][~same], slots[~same])
        assert set(batch["negative_index"][same].tolist()) <= set(pool.tolist())
        replaced += int(same.sum())
    assert replaced > 0  # 4 classes: about a quarter of the raw slots

