"""IIS prototype concepts (specs/iis.md §2.1–§2.4, §2.6): elements (patches, SLIC segments), the class-balanced
choice of concept images, the sharded resumable element-vector pass and the prototype libraries."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import REPO, clean_env
from iis_concepts_probe import CHUNK_IMAGES, IMAGES_PER_CLASS, concept_pass
from qpm_dist.config import DataConfig
from qpm_dist.data.sources import read_splits
from qpm_dist.dist import DistInfo
from qpm_dist.iis import concepts
from qpm_dist.iis.concepts import BadConceptInput, balanced_choice, concept_images
from qpm_dist.iis.elements import (BadElementInput, ElementConfig, jaccard, patch_elements, render_segment,
                                   save_elements, segment_crop, segment_elements, select_masks, slic_label_maps)
from qpm_dist.iis.library import (cluster_library, element_index, prototype_library, read_elements,
                                  stratified_draw)

ONE_RANK = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="none")
CFG = ElementConfig()


def columns_map(*bounds: tuple[int, int, int], shape=(100, 100)) -> np.ndarray:
    """A label map whose label `l` covers columns [a, b) of every row, for each (l, a, b)."""
    labels = np.zeros(shape, dtype=np.int64)
    for label, a, b in bounds:
        labels[:, a:b] = label
    return labels


# ---------------------------------------------------------------------------------------- segment selection


def test_area_filter_rejects_masks_of_at_most_a_thousandth_of_the_image():
    labels = np.full((100, 100), 3)  # 10,000 pixels: 0.1 % = 10 pixels
    labels[0, :10] = 1  # exactly 0.1 %: rejected (the area must be MORE than 0.1 %)
    labels[1, :11] = 2  # 11 pixels: accepted
    masks = select_masks([labels], CFG)
    assert [int(m.sum()) for m in masks] == [11, 10000 - 21]
    assert np.array_equal(masks[0], labels == 2)


def test_every_label_is_considered_including_the_last_one():
    """Bug 9: the reference scans range(labels.max()); with labels numbered from 1 it never sees the last."""
    masks = select_masks([columns_map((1, 0, 50), (2, 50, 100))], CFG)
    assert [np.flatnonzero(m[0])[[0, -1]].tolist() for m in masks] == [[0, 49], [50, 99]]


def test_jaccard_dedup_against_masks_of_earlier_runs():
    first = columns_map((1, 0, 50), (2, 50, 100))
    # label 1: Jaccard 0.5 with first's label 1 (kept: <= 0.5); label 2: 2500 / 5500 and 500 / 7500 (kept);
    # label 3: 4500 / 5000 = 0.9 with first's label 2 (dropped)
    second = columns_map((1, 0, 25), (2, 25, 55), (3, 55, 100))
    assert jaccard(first == 1, second == 1) == 0.5
    masks = select_masks([first, second], CFG)
    expected = [first == 1, first == 2, second == 1, second == 2]
    assert len(masks) == 4 and all(np.array_equal(m, e) for m, e in zip(masks, expected))
    # masks of the same run are never compared with each other: a run alone keeps all three of its labels
    assert len(select_masks([second], CFG)) == 3


def test_at_most_five_masks_per_run():
    eight = columns_map(*((label, 12 * label, 12 * (label + 1)) for label in range(8)), shape=(100, 96))
    shifted = np.roll(eight, 6, axis=1)  # Jaccard 6 / 18 with the overlapping label of `eight`: all pass
    masks = select_masks([eight, shifted], CFG)
    assert len(masks) == 10
    assert all(np.array_equal(m, eight == label) for m, label in zip(masks[:5], range(5)))  # labels ascending
    assert all(np.array_equal(m, shifted == label) for m, label in zip(masks[5:], range(5)))
    assert len(select_masks([eight], ElementConfig(per_run=3))) == 3


# ------------------------------------------------------------------------------------------ SLIC rendering


def quadrants(h: int = 48, w: int = 64) -> np.ndarray:
    """An image of four flat colours, one per quadrant."""
    image = np.empty((h, w, 3), dtype=np.uint8)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]
    for q, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        image[r * h // 2:(r + 1) * h // 2, c * w // 2:(c + 1) * w // 2] = colours[q]
    return image


def test_slic_segments_of_flat_regions(tmp_path):
    image = quadrants()
    maps = slic_label_maps(image, CFG)
    assert len(maps) == 3 and all(m.shape == image.shape[:2] for m in maps)
    masks = select_masks(maps, CFG)
    # the run each mask comes from: a mask is one label of its run's map (acceptance order is run by run)
    runs = [next(r for r, m in enumerate(maps) if np.array_equal(m == m[mask][0], mask)) for mask in masks]
    assert runs == sorted(runs) and max(np.bincount(runs)) <= 5 and len(masks) <= 15
    assert len(select_masks(maps[:1], CFG)) == 5  # 6 superpixels of which 5 are kept
    for i, mask in enumerate(masks):
        assert mask.mean() > 0.001
        assert not any((mask & masks[j]).any() for j in range(i) if runs[j] == runs[i])  # one run: disjoint
        assert all(jaccard(mask, masks[j]) <= 0.5 for j in range(len(masks)) if runs[j] < runs[i])
    elements = segment_elements(image, CFG)
    assert len(elements) == len(masks)
    assert all(np.array_equal(e, render_segment(image, m, 117)) for e, m in zip(elements, masks))
    paths = save_elements(elements[:2], tmp_path / "examples", "quadrants")
    assert [p.name for p in paths] == ["quadrants_0.png", "quadrants_1.png"]
    assert np.array_equal(np.array(Image.open(paths[1])), elements[1])


def test_segment_crop_fills_outside_the_mask_and_keeps_the_whole_bounding_box():
    """Bug 10: the reference cuts the box with an exclusive upper bound, losing the last row and column."""
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    mask = np.zeros((20, 30), dtype=bool)
    mask[4:9, 6] = True  # an L: a column of 5 rows and a bottom row of 7 columns
    mask[8, 6:13] = True
    crop = segment_crop(image, mask)
    assert crop.shape == (5, 7, 3)
    inside = mask[4:9, 6:13]
    assert np.array_equal(crop[inside], image[4:9, 6:13][inside])
    assert (crop[~inside] == 117).all()
    assert segment_crop(image, mask, fill=3)[0, 1].tolist() == [3, 3, 3]
    single = np.zeros((20, 30), dtype=bool)
    single[19, 29] = True  # the last pixel: an exclusive box would be empty
    assert segment_crop(image, single).tolist() == [[image[19, 29].tolist()]]
    with pytest.raises(BadElementInput, match="empty segment mask"):
        segment_crop(image, np.zeros((20, 30), dtype=bool))


def test_rendered_segment_is_stretched_to_the_source_size():
    image = quadrants(40, 60)
    mask = np.zeros((40, 60), dtype=bool)
    mask[20:40, 0:30] = True  # the bottom-left quadrant, one flat colour
    rendered = render_segment(image, mask)
    assert rendered.shape == (40, 60, 3)
    assert (rendered == [30, 30, 200]).all()  # the 20 x 30 box fills the whole 40 x 60 image
    mask[20:30, 0:15] = False  # the box stays (rows 20-39, columns 0-29); its top-left quarter becomes fill
    rendered = render_segment(image, mask)
    assert (rendered[:16, :26] == 117).all() and (rendered[24:, 34:] == [30, 30, 200]).all()  # away from the edge


# ------------------------------------------------------------------------------------------------- patches


def test_patches_are_the_4x4_grid_row_major_without_the_remainder():
    h, w = 38, 50  # cells of 9 x 12 pixels; rows 36-37 and columns 48-49 are dropped
    image = np.full((h, w, 3), 255, dtype=np.uint8)
    for r in range(4):
        for c in range(4):
            image[r * 9:(r + 1) * 9, c * 12:(c + 1) * 12] = 10 * r + c + 1
    patches = patch_elements(image, patch_size=8)
    assert len(patches) == 16 and all(p.shape == (8, 8, 3) for p in patches)
    assert [np.unique(p).tolist() for p in patches] == [[10 * r + c + 1] for r in range(4) for c in range(4)]
    with pytest.raises(BadElementInput, match="smaller than the 4x4 patch grid"):
        patch_elements(np.zeros((3, 40, 3), dtype=np.uint8), patch_size=8)


def test_bad_element_settings_and_images_stop_with_one_line():
    with pytest.raises(BadElementInput, match="kind 'superpixels'"):
        ElementConfig(kind="superpixels")
    with pytest.raises(BadElementInput, match="max_jaccard 1.5"):
        ElementConfig(max_jaccard=1.5)
    with pytest.raises(BadElementInput, match="expected uint8 H x W x 3"):
        segment_elements(np.zeros((8, 8), dtype=np.uint8), CFG)


# -------------------------------------------------------------------------------------- the image choice


def test_balanced_choice_every_class_equally_seeded_and_independent_of_list_order():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], [5, 9, 4])
    paths = [f"c{label}/img{rng.integers(1000):04d}_{i}.jpg" for i, label in enumerate(labels)]
    chosen = balanced_choice(paths, labels, 3, 3, seed=7)
    assert np.bincount(labels[chosen]).tolist() == [3, 3, 3]
    assert np.array_equal(chosen, balanced_choice(paths, labels, 3, 3, seed=7))
    assert any(not np.array_equal(chosen, balanced_choice(paths, labels, 3, 3, seed=s)) for s in range(8, 12))
    order = rng.permutation(len(paths))  # the same files listed in another order: the same files chosen
    again = balanced_choice([paths[i] for i in order], labels[order], 3, 3, seed=7)
    assert sorted(paths[i] for i in chosen) == sorted(paths[order[i]] for i in again)
    with pytest.raises(BadConceptInput, match="class 2 has only 4 training images"):
        balanced_choice(paths, labels, 3, 5, seed=7)


def test_concept_images_come_from_the_training_split(tiny_data):
    data = read_splits(DataConfig(dataset="synthetic", root=str(tiny_data), img_size=32))
    chosen = concept_images(data, 2, seed=0)
    train = data.train_split
    assert np.bincount(train.labels[chosen], minlength=data.num_classes).tolist() == [2] * data.num_classes
    assert {train.paths[i] for i in chosen} <= set(train.paths) - set(data.test_split.paths)
    order = [(train.labels[i], train.paths[i]) for i in chosen]
    assert order == sorted(order)  # recorded in (class, path) order


# --------------------------------------------------------------------------------------- the concept pass


def all_rows(folder):
    index = element_index(folder)
    return index, read_elements(folder, index, np.arange(len(index)))


@pytest.fixture(scope="module")
def one_process_pass(tiny_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("iis") / "one"
    summary = concept_pass(str(tiny_data), str(folder), ONE_RANK)
    return folder, summary


def test_concept_pass_rows_by_image_and_element(one_process_pass, tiny_data):
    folder, summary = one_process_pass
    index, x = all_rows(folder)
    assert summary["images"] == 4 * IMAGES_PER_CLASS and summary["element_rows"] == len(index) == x.shape[0]
    assert x.shape[1] == 32 and torch.isfinite(x).all() and x.abs().sum() > 0
    images = np.unique(index.ids[:, 0])
    assert len(images) == 4 * IMAGES_PER_CLASS
    for image in images:  # element ids 0..E-1 of every image, 1 <= E <= 15
        ids = index.ids[index.ids[:, 0] == image, 1]
        assert 1 <= len(ids) <= 15 and ids.tolist() == list(range(len(ids)))
    assert not (folder / "chunks").exists()
    record = json.loads((folder / "images.json").read_text())
    assert (record["split"], record["images_per_class"], record["seed"]) == ("train", IMAGES_PER_CLASS, 0)
    train = read_splits(DataConfig(dataset="synthetic", root=str(tiny_data), img_size=32)).train_split
    assert [(r["index"], r["label"]) for r in record["images"]] == [(i, train.labels[i]) for i in images]
    assert [r["path"] for r in record["images"]] == [train.paths[i] for i in images]


def test_concept_pass_on_two_processes_equals_one_process(one_process_pass, tiny_data, tmp_path):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "tests" / "iis_concepts_probe.py"), str(tiny_data), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=clean_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    index_1, x_1 = all_rows(one_process_pass[0])
    index_2, x_2 = all_rows(out)
    assert sorted(set(index_2.shard.tolist())) == [0, 1]  # both ranks wrote rows
    assert np.array_equal(index_1.ids, index_2.ids) and np.array_equal(index_1.labels, index_2.labels)
    assert torch.equal(x_1, x_2)


def test_killed_concept_pass_resumes_to_the_same_result(one_process_pass, tiny_data, tmp_path, monkeypatch):
    folder = tmp_path / "killed"
    save, saved = concepts._save_chunk, []

    def save_then_die(path, parts):
        if len(saved) == 2:
            (path.parent / f".{path.name}.partial.tmp").write_bytes(b"half a chunk")  # killed mid-write
            raise KeyboardInterrupt("killed")
        save(path, parts)
        saved.append(path.name)

    monkeypatch.setattr(concepts, "_save_chunk", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        concept_pass(str(tiny_data), str(folder), ONE_RANK)
    assert sorted(p.name for p in (folder / "chunks").glob("c*.npz")) == saved == ["c000000.npz", "c000001.npz"]
    monkeypatch.setattr(concepts, "_save_chunk", save)
    import iis_concepts_probe

    with monkeypatch.context() as m:  # the chunks were cut for 2 images each: another chunk size must not mix in
        m.setattr(iis_concepts_probe, "CHUNK_IMAGES", 3)
        with pytest.raises(BadConceptInput, match=r"plan.json: chunks of another plan: chunk_images 2 \(expected 3\)"):
            iis_concepts_probe.concept_pass(str(tiny_data), str(folder), ONE_RANK)
    summary = concept_pass(str(tiny_data), str(folder), ONE_RANK)
    assert summary["computed_chunks"] == 4 * IMAGES_PER_CLASS // CHUNK_IMAGES - 2  # only the missing chunks
    index_1, x_1 = all_rows(one_process_pass[0])
    index_2, x_2 = all_rows(folder)
    assert np.array_equal(index_1.ids, index_2.ids) and torch.equal(x_1, x_2)
    assert concept_pass(str(tiny_data), str(folder), ONE_RANK)["computed_chunks"] == 0  # a finished folder


@pytest.mark.slow
def test_concept_pass_killed_on_two_processes_resumes_to_the_same_result(one_process_pass, tiny_data, tmp_path):
    """The real thing: SIGKILL to both ranks of a torchrun between chunks, then a fresh 2-process run."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "tests" / "iis_concepts_probe.py"), str(tiny_data), str(out)]
    proc = subprocess.Popen(cmd + ["30"], env=clean_env(), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while len(list((out / "chunks").glob("c*.npz"))) < 2 and proc.poll() is None:
            assert time.monotonic() < deadline, "no chunk was written"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = sorted(p.name for p in (out / "chunks").glob("c*.npz"))
    assert 2 <= len(done) < 4 * IMAGES_PER_CLASS // CHUNK_IMAGES and not (out / "shards" / "meta.json").exists()
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=clean_env(), cwd=REPO)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summaries = [json.loads(line.split(" ", 1)[1]) for line in rerun.stdout.splitlines() if line.startswith("SUMMARY")]
    assert sum(s["computed_chunks"] for s in summaries) == 4 * IMAGES_PER_CLASS // CHUNK_IMAGES - len(done)
    index_1, x_1 = all_rows(one_process_pass[0])
    index_2, x_2 = all_rows(out)
    assert np.array_equal(index_1.ids, index_2.ids) and torch.equal(x_1, x_2)


def test_concept_pass_refuses_a_folder_of_another_plan(one_process_pass, tiny_data, monkeypatch):
    monkeypatch.setattr(concepts, "image_elements", None)  # would fail if anything were computed
    import iis_concepts_probe

    monkeypatch.setattr(iis_concepts_probe, "CHUNK_IMAGES", 3)
    with pytest.raises(BadConceptInput, match=r"meta.json: element vectors of another plan: chunk_images 2 \(expected"):
        iis_concepts_probe.concept_pass(str(tiny_data), str(one_process_pass[0]), ONE_RANK)
    monkeypatch.setattr(iis_concepts_probe, "CHUNK_IMAGES", CHUNK_IMAGES)
    with pytest.raises(BadConceptInput, match=r"another plan: model_sha256 '[0-9a-f]{16}' \(expected '[0-9a-f]+'\);"):
        iis_concepts_probe.concept_pass(str(tiny_data), str(one_process_pass[0]), ONE_RANK, model_seed=1)


# ------------------------------------------------------------------------------------------ the libraries


def test_stratified_draw_balances_classes_and_is_seeded():
    labels = np.repeat([0, 1, 2], [10, 10, 2])
    drawn = stratified_draw(labels, 9, seed=0)
    counts = np.bincount(labels[drawn]).tolist()
    assert counts[2] == 2 and sorted(counts[:2]) == [3, 4]  # class 2 runs out after two rounds
    assert np.array_equal(drawn, stratified_draw(labels, 9, seed=0)) and (np.diff(drawn) > 0).all()
    assert np.bincount(labels[stratified_draw(labels, 6, seed=3)]).tolist() == [2, 2, 2]
    with pytest.raises(BadConceptInput, match="23 prototypes requested from a pool of 22"):
        stratified_draw(labels, 23, seed=0)


def test_prototype_library_draws_recorded_elements_from_every_class(one_process_pass):
    """Bug 4: the reference takes the first K rows, i.e. the first classes' elements only."""
    folder = one_process_pass[0]
    library = prototype_library(folder, 8, seed=0)
    assert library.vectors.shape == (8, 32) and np.bincount(library.labels).tolist() == [2, 2, 2, 2]
    index, x = all_rows(folder)
    rows = [int(np.flatnonzero((index.ids == pair).all(axis=1))[0]) for pair in library.ids]
    assert torch.allclose(library.vectors, torch.nn.functional.normalize(x[rows], dim=1))
    assert torch.allclose(library.vectors.norm(dim=1), torch.ones(8))
    again = prototype_library(folder, 8, seed=0)
    assert torch.equal(library.vectors, again.vectors) and np.array_equal(library.ids, again.ids)
    assert not np.array_equal(prototype_library(folder, 8, seed=1).ids, library.ids)


def test_cluster_library_is_seeded_unit_centroids(one_process_pass, tmp_path):
    folder = one_process_pass[0]
    library = cluster_library(folder, 5, seed=0, max_rows=40)
    assert library.vectors.shape == (5, 32) and len(library.ids) == 40
    assert torch.allclose(library.vectors.norm(dim=1), torch.ones(5))
    assert torch.equal(library.vectors, cluster_library(folder, 5, seed=0, max_rows=40).vectors)
    library.save(tmp_path / "lib.npz")
    loaded = type(library).load(tmp_path / "lib.npz")
    assert torch.equal(loaded.vectors, library.vectors) and loaded.kind == "cluster" and loaded.seed == 0
