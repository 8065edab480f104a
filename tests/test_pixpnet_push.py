"""The distributed prototype push (qpm_dist.methods.pixpnet_push; specs/pixpnet.md §3, §7 B9, §7.2, §8 items 4
and 7): prototypes become training latent vectors, each image used once, ties by the rule, classes without
images keep their prototypes, 2 gloo ranks push bitwise what 1 process pushes, buffers do not grow."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
from torch import nn

from qpm_dist.methods.pixpnet_push import (EMPTY, PatchCandidates, assign, push_prototypes, scan)
from qpm_dist.models.backbones import TinyResNet
from qpm_dist.models.net import Classifier
from qpm_dist.models.protonet import PrototypeHead

BATCH = 8


def tiny_model(classes: int = 3, per_class: int = 3, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    backbone = TinyResNet(width=8, reduced_strides=True)
    return Classifier(backbone, PrototypeHead(backbone.num_features, classes, per_class, dim=16))


def in_memory_data(n: int, labels: list[int] | None = None, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=generator)
    labels = torch.tensor(labels) if labels is not None else torch.randint(0, 2, (n,), generator=generator)
    return images, labels


def shard_batches(images, labels, rank=0, world=1, batch=BATCH):
    """What eval_loader(..., return_index=True) yields on `rank`: rows rank, rank + W, ... in batches."""
    rows = torch.arange(rank, len(images), world)
    return [(images[rows[i:i + batch]], labels[rows[i:i + batch]], rows[i:i + batch])
            for i in range(0, len(rows), batch)]


def latent_of(model: Classifier, image: torch.Tensor, batch: int = BATCH) -> torch.Tensor:
    """The latent map of one image, recomputed in a batch of the push's shape (the image repeated)."""
    with torch.no_grad():
        return model.head.latent(model.backbone(image[None].expand(batch, -1, -1, -1)))[0]


def test_every_prototype_becomes_the_latent_vector_at_its_recorded_sample_and_cell():
    """§8.4: recompute the latent map of the recorded image: the prototype is its vector at the recorded cell,
    bitwise; the recorded distance is the old prototype's distance to that cell and the image's minimum. Class 0's
    three prototypes are equal, so they rank the images alike and the 2nd and 3rd must take their 2nd and 3rd best
    (vectors from other candidate slots than the first)."""
    model = tiny_model().eval()
    with torch.no_grad():
        model.head.prototypes[1:3] = model.head.prototypes[0]
    images, labels = in_memory_data(37, [0, 1] * 18 + [0])  # class 2: no images
    before = model.head.prototypes.detach().clone()
    record = push_prototypes(model, shard_batches(images, labels), BATCH)
    after = model.head.prototypes.detach().clone()
    assert record.updated.tolist() == [True] * 6 + [False] * 3
    pushed = torch.cat([record.sample[:6], record.sample[:2]])  # a batch of the push's shape: 6 images, 2 repeats
    with torch.no_grad():
        latents = model.head.latent(model.backbone(images[pushed]))
        model.head.prototypes.copy_(before)  # the distances the push saw: to the prototypes before it
        old = model.head.own_class_distances(latents, labels[pushed])
        model.head.prototypes.copy_(after)
    for j in range(6):
        sample, (h, w) = int(record.sample[j]), record.cell[j].tolist()
        assert labels[sample] == j // 3  # its own class
        assert torch.equal(after[j], latents[j, :, h, w].float()), j
        own = old[j, j % 3]  # prototype j's distances over the cells of its image
        assert own[h, w].item() == record.distance[j].item() == own.min().item(), j
    assert torch.equal(model.head.source_sample[:6], record.sample[:6])
    assert torch.equal(model.head.source_cell[:6], record.cell[:6, 0] * 8 + record.cell[:6, 1])
    assert not model.training


def test_each_image_is_used_at_most_once_and_a_class_short_of_images_keeps_the_rest(caplog):
    """B9: class 2 has no images, class 1 two images for three prototypes: those prototypes keep their previous
    vectors (never zero), their records say so (-1, NaN) and a warning names them."""
    model = tiny_model()
    images, labels = in_memory_data(12, [0] * 10 + [1] * 2)
    before = model.head.prototypes.detach().clone()
    with caplog.at_level(logging.WARNING, logger="qpm_dist"):
        record = push_prototypes(model, shard_batches(images, labels), BATCH)
    pushed = record.sample[record.updated]
    assert len(set(pushed.tolist())) == len(pushed) == 5
    kept = record.kept  # one of class 1 (two images for three prototypes; which one: the distances), all of class 2
    assert len(kept) == 4 and kept[0] in (3, 4, 5) and kept[1:] == [6, 7, 8]
    assert torch.equal(model.head.prototypes[record.kept], before[record.kept])
    assert record.sample[record.kept].tolist() == [-1] * 4 and record.cell[record.kept].eq(-1).all()
    assert torch.isnan(record.distance[record.kept]).all()
    assert model.head.source_sample[record.kept].tolist() == [-1] * 4
    assert "4 of 9 prototypes found no training image" in caplog.text and f"{kept}" in caplog.text
    summary = record.summary()
    assert summary["pushed"] == 5 and summary["kept"] == kept and summary["distance"][6] is None
    assert summary["sample"] == record.sample.tolist() and summary["cell"][8] == [-1, -1]
    assert model.training  # its mode restored


def test_ties_are_resolved_by_distance_sample_cell_prototype():
    """assign on hand-built candidates of 2 ranks x 1 class x 2 prototypes: equal distances go to the smaller
    sample, then the smaller prototype index; a sample taken by one prototype is skipped by the other."""
    inf = float("inf")
    # rank 0 holds samples 4 and 6, rank 1 samples 3 and 5; per prototype, its 2 best (distance, sample, cell)
    distances = torch.tensor([[[0.5, 0.5], [0.5, 0.7]], [[0.5, 0.9], [0.5, 0.5]]])
    samples = torch.tensor([[[4, 6], [4, 6]], [[5, 3], [5, 3]]])
    cells = torch.tensor([[[1, 2], [0, 2]], [[7, 3], [0, 1]]])
    out = assign(distances, samples, cells)
    # all at 0.5: (p0, s4), (p0, s5), (p0, s6), (p1, s3), (p1, s4), (p1, s5): sorted by sample -> p1 takes 3,
    # p0 takes 4
    assert out.sample.tolist() == [4, 3] and out.rank.tolist() == [0, 1] and out.slot.tolist() == [0, 1]
    assert out.cell.tolist() == [1, 1] and out.distance.tolist() == [0.5, 0.5]
    # same sample, same distance for both prototypes: the smaller prototype index takes it
    out = assign(torch.tensor([[[0.2, inf], [0.2, 0.4]]]), torch.tensor([[[9, EMPTY], [9, 2]]]),
                 torch.zeros(1, 2, 2, dtype=torch.long))
    assert out.sample.tolist() == [9, 2]


def test_identical_images_tie_everywhere_and_the_rule_decides():
    """Ten copies of one image: every prototype has the same best distance for every image, so the prototype
    with the smallest distance takes image 0, the next image 1, ... (sample index breaks the ties)."""
    model = tiny_model(classes=1, per_class=3).eval()
    images = torch.randn(1, 3, 32, 32).expand(10, -1, -1, -1).contiguous()
    labels = torch.zeros(10, dtype=torch.long)
    with torch.no_grad():
        best = model.head.distances(latent_of(model, images[0], batch=4)[None])[0].flatten(1).amin(dim=1)
    record = push_prototypes(model, shard_batches(images, labels, batch=4), 4)
    order = sorted(range(3), key=lambda j: (best[j].item(), j))
    assert [int(record.sample[j]) for j in order] == [0, 1, 2]
    assert record.distance.tolist() == best.tolist()


def test_candidates_keep_the_best_per_prototype_whatever_the_insertion_order():
    """PatchCandidates.add: the kept M per prototype are the M best by (distance, sample), in that order,
    however the candidates are split into batches; a repeated (prototype, sample) pair is kept once."""
    generator = torch.Generator().manual_seed(0)
    n = 40
    protos = torch.randint(0, 4, (n,), generator=generator)
    dists = torch.randint(0, 5, (n,), generator=generator).float() / 4  # many ties
    samples = torch.randperm(n, generator=generator)
    cells = torch.randint(0, 9, (n,), generator=generator)
    vectors = torch.randn(n, 2, generator=generator)
    expected = {j: sorted((dists[i].item(), samples[i].item(), i) for i in range(n) if protos[i] == j)[:3]
                for j in range(4)}
    for chunk in (n, 7, 1):
        buffer = PatchCandidates(4, 3, 2)
        for start in range(0, n, chunk):
            sl = slice(start, start + chunk)
            buffer.add(protos[sl], dists[sl], samples[sl], cells[sl], vectors[sl])
        for j in range(4):
            rows = [i for _, _, i in expected[j]]
            assert buffer.samples[j].tolist() == samples[rows].tolist(), (chunk, j)
            assert torch.equal(buffer.vectors[j], vectors[rows]) and torch.equal(buffer.cells[j], cells[rows])
    buffer.add(protos, dists, samples, cells, vectors)  # the same candidates again: each kept once
    for j in range(4):
        assert buffer.samples[j].tolist() == samples[[i for _, _, i in expected[j]]].tolist()


def test_candidate_buffers_do_not_grow_with_the_dataset():
    """O(P x M x D) per rank: the same buffer shapes after 16 and 64 images."""
    model = tiny_model(classes=2, per_class=3)
    shapes = []
    for n in (16, 64):
        images, labels = in_memory_data(n)
        candidates, grid = scan(model, shard_batches(images, labels), BATCH)
        shapes.append({name: tuple(getattr(candidates, name).shape)
                       for name in ("distances", "samples", "cells", "vectors")})
        assert grid == (8, 8)
        assert (candidates.samples != EMPTY).all()  # every slot filled: 8+ images per class
    assert shapes[0] == shapes[1] == {"distances": (6, 3), "samples": (6, 3), "cells": (6, 3), "vectors": (6, 3, 16)}


def test_the_push_does_not_depend_on_how_the_images_are_split_into_shards_and_batches():
    """The scan's candidates merged over 3 shards (batches of 5, the last one padded) give the assignment of one
    shard: the in-process counterpart of the 2-rank test, covering the padding rule."""
    from qpm_dist.methods.pixpnet_push import gather_candidates

    model = tiny_model()
    images, labels = in_memory_data(19, [0, 1, 2, 2] * 4 + [1, 0, 0])
    one, _ = scan(model, shard_batches(images, labels, batch=5), 5)
    parts = [scan(model, shard_batches(images, labels, r, 3, batch=5), 5)[0] for r in range(3)]
    single = assign(*gather_candidates(one))
    stacked = [torch.cat([gather_candidates(p)[k] for p in parts]) for k in range(3)]
    split = assign(*stacked)
    assert torch.equal(single.sample, split.sample) and torch.equal(single.cell, split.cell)
    assert torch.equal(single.distance, split.distance)
    for j in range(9):
        assert torch.equal(one.vectors[j, single.slot[j]], parts[split.rank[j]].vectors[j, split.slot[j]])


def test_bad_loaders_and_models_stop_with_one_clear_line():
    model = tiny_model()
    images, labels = in_memory_data(8)
    with pytest.raises(ValueError, match=r"yield \(images, labels, sample indices\)"):
        scan(model, [(images, labels)], BATCH)
    with pytest.raises(ValueError, match="a batch of 8 images exceeds the push batch size 4"):
        scan(model, shard_batches(images, labels), 4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), found 0..5"):
        scan(model, [(images, labels * 5, torch.arange(8))], BATCH)
    with pytest.raises(ValueError, match="expected a PrototypeHead"):
        scan(Classifier(nn.Identity(), nn.Identity()), [], BATCH)
    broken = tiny_model()
    with torch.no_grad():
        broken.head.prototypes.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="training sample 0 has a non-finite distance"):
        scan(broken, shard_batches(images, labels), BATCH)


@pytest.fixture(scope="module")
def one_process_push(tiny_data):
    from pixpnet_push_probe import push

    from qpm_dist import dist

    return push(str(tiny_data), dist.init("cpu"))


def test_two_gloo_ranks_push_bitwise_what_one_process_pushes(tiny_data, tmp_path, one_process_push):
    """§8.7 on 37 synthetic images (19 + 18 per rank, classes interleaved, one class short of images, one without):
    the records and the prototype tensor of both ranks equal the one-process push, bitwise."""
    from helpers import REPO, clean_env

    out = tmp_path / "push"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "tests" / "pixpnet_push_probe.py"), str(tiny_data), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=clean_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = one_process_push
    record = one["record"]
    updated = record["updated"]  # class 2: 2 images for 3 prototypes; class 3: none
    assert updated[:6].all() and updated[6:9].sum() == 2 and not updated[9:].any()
    assert not torch.isin(one["prototypes"][updated], one["before"]).any()
    assert torch.equal(one["prototypes"][~updated], one["before"][~updated])
    for rank in (0, 1):
        two = torch.load(f"{out}.rank{rank}.pt", weights_only=False)
        assert torch.equal(two["prototypes"], one["prototypes"]), rank
        assert torch.equal(two["source_sample"], one["source_sample"]) and torch.equal(two["source_cell"],
                                                                                        one["source_cell"])
        for key in ("sample", "cell", "updated"):
            assert torch.equal(two["record"][key], record[key]), (rank, key)
        bits = lambda t: t.view(torch.int32)  # noqa: E731 - bitwise, NaN (kept prototypes) included
        assert torch.equal(bits(two["record"]["distance"]), bits(record["distance"])), rank


def test_an_images_candidates_do_not_depend_on_the_batch_it_came_in():
    """The padding rule: image 0 alone in a batch (a rank's short last batch) gives bitwise the candidate it gives
    inside a full batch of other classes' images (on CPU a 3x3 conv of ONE image takes another algorithm)."""
    model = tiny_model(classes=2, per_class=1)
    images, labels = in_memory_data(4, [0, 1, 1, 1])
    alone, _ = scan(model, [(images[:1], labels[:1], torch.tensor([0]))], 4)
    batched, _ = scan(model, [(images, labels, torch.arange(4))], 4)
    assert alone.samples[0, 0] == batched.samples[0, 0] == 0
    assert torch.equal(alone.vectors[0, 0], batched.vectors[0, 0])
    assert alone.distances[0, 0].item() == batched.distances[0, 0].item()


def test_the_assignment_is_the_greedy_over_all_image_prototype_pairs():
    """An oracle: every image's best cell for each own-class prototype from one forward of all images, then the
    greedy rule in plain Python over all pairs (ascending distance, sample, prototype; each image once). The
    push (batches of 8, M = 3 candidates kept per prototype) assigns the same images and cells."""
    model = tiny_model(classes=2).eval()
    with torch.no_grad():
        model.head.prototypes[1] = model.head.prototypes[0]  # a tie between prototypes 0 and 1 on every image
    images, labels = in_memory_data(21, [0, 1, 1] * 7)
    with torch.no_grad():
        latent = model.head.latent(model.backbone(images))
        best, cells = model.head.own_class_distances(latent, labels).flatten(2).min(2)
    pairs = sorted((best[i, k].item(), i, cells[i, k].item(), int(labels[i]) * 3 + k)
                   for i in range(21) for k in range(3))
    expected, used = {}, set()
    for distance, i, cell, j in pairs:
        if j not in expected and i not in used:
            expected[j] = (i, cell)
            used.add(i)
    record = push_prototypes(model, shard_batches(images, labels), BATCH)
    assert [(int(record.sample[j]), int(record.cell[j, 0] * 8 + record.cell[j, 1])) for j in range(6)] == [
        expected[j] for j in range(6)]
    assert record.distance.tolist() == pytest.approx([best[expected[j][0], j % 3].item() for j in range(6)], abs=1e-6)
