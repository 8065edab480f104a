"""Consistency, stability and the relevance ordering test of qpm_dist.metrics.prototypes (specs/pixpnet.md §4,
bugs B5-B8) on hand-built cases with hand-computed values."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from qpm_dist.config import DataConfig
from qpm_dist.data import transforms as T  # not its test_* names: pytest would collect them
from qpm_dist.metrics import prototypes as PM

# ---------------------------------------------------------------------------------------------------------------
# 1. Part annotations through the test transform (B8)

CUB = DataConfig(dataset="cub", img_size=224, augment="cub")  # shorter side to 224, centre crop 224
IMAGENET = DataConfig(dataset="cub", img_size=224, augment="imagenet")  # shorter side to 256, centre crop 224
SQUASH = DataConfig(dataset="synthetic", img_size=224)  # 224 x 224, aspect not kept


@pytest.mark.parametrize("cfg, width, height, point, expected", [
    # 500 x 375 -> 298 x 224 (int(224 * 500 / 375)), crop left int(round(74 / 2)) = 37: x 150 * 298 / 500 - 37
    (CUB, 500, 375, (150, 100), (52.4, 100 * 224 / 375)),
    (CUB, 375, 500, (100, 150), (100 * 224 / 375, 52.4)),  # portrait: the crop is in y
    # 500 x 375 -> 341 x 256, crop left round(58.5) = 58 (half to even), top 16: (102.3 - 58, 68.27 - 16)
    (IMAGENET, 500, 375, (150, 100), (44.3, 100 * 256 / 375 - 16)),
    (IMAGENET, 375, 500, (100, 150), (100 * 256 / 375 - 16, 44.3)),
    (SQUASH, 500, 375, (150, 100), (67.2, 100 * 224 / 375)),
])
def test_keypoints_of_non_square_images_map_to_the_hand_computed_input_coordinates(cfg, width, height, point,
                                                                                      expected):
    xs, ys = PM.InputGeometry.of(cfg).to_input(width, height, [point[0]], [point[1]])
    assert (xs[0], ys[0]) == pytest.approx(expected, abs=1e-9)
    # and back through the pointing metrics' inverse map
    assert T.test_point_to_source(cfg, width, height, xs[0], ys[0]) == pytest.approx(point, abs=1e-9)


@pytest.mark.parametrize("cfg", [CUB, IMAGENET, SQUASH, DataConfig(dataset="cub", img_size=224, crop_to_box=True)])
@pytest.mark.parametrize("width, height", [(500, 375), (375, 500)])
def test_the_mapping_is_where_the_real_test_transform_moves_a_bright_block(cfg, width, height):
    """A white 12 x 12 block on black: the centroid of the transformed image is the mapped block centre."""
    box = (60, 40, 300, 280)  # (x, y, w, h): the object box of crop_to_box
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    x0, y0 = 180, 200
    image[:, y0:y0 + 12, x0:x0 + 12] = 255
    geometry = PM.InputGeometry.of(cfg)
    if cfg.crop_to_box:
        from qpm_dist.data.decode import crop_box
        image = crop_box(image, box)
    out = T.test_transform(DataConfig(**{**cfg.__dict__, "mean": [0, 0, 0], "std": [1, 1, 1]}))(image)[0]
    rows, cols = torch.meshgrid(torch.arange(224) + 0.5, torch.arange(224) + 0.5, indexing="ij")
    cy, cx = float((out * rows).sum() / out.sum()), float((out * cols).sum() / out.sum())
    xs, ys = geometry.to_input(width, height, [x0 + 6], [y0 + 6], box=box)
    assert (cx, cy) == pytest.approx((xs[0], ys[0]), abs=0.05)


def test_keypoints_leaving_the_crop_are_dropped_and_boxes_are_clipped():
    geometry = PM.InputGeometry.of(CUB)
    # x 10 -> 5.96 - 37 < 0 (cropped away); x 490 -> 292.04 - 37 = 255.04 > 224 (cropped away); x 300 -> 141.8
    source = PM.SourceParts(np.array([0, 1, 2]), np.array([[10, 50, 10, 50], [490, 50, 490, 50], [300, 50, 300, 50.]]),
                            points=True)
    parts = geometry.parts_to_input(source, 500, 375)
    assert parts.parts.tolist() == [2]
    y = 50 * 224 / 375
    assert parts.boxes[0].tolist() == pytest.approx([y, y + 1, 141.8, 142.8])
    # a box from x 0 to 100 is clipped at the crop's left edge: [0, 59.6 - 37]; one left of the crop is dropped
    boxes = PM.SourceParts(np.array([3, 4]), np.array([[0, 0, 100, 375], [0, 0, 50, 10.]]), points=False)
    parts = geometry.parts_to_input(boxes, 500, 375)
    assert parts.parts.tolist() == [3]
    assert parts.boxes[0].tolist() == pytest.approx([0, 224, 0, 22.6])


def test_cub_part_locs_keep_visible_rows_and_merge_left_and_right(tmp_path):
    (tmp_path / "parts").mkdir()
    rows = [(1, 7, 10.5, 20, 1), (1, 11, 30, 40, 1), (1, 2, 5, 5, 0), (1, 13, 1, 2, 1), (2, 15, 3, 4, 1),
            (3, 1, 0, 0, 0)]
    (tmp_path / "parts" / "part_locs.txt").write_text("".join(" ".join(map(str, r)) + "\n" for r in rows))
    parts = PM.load_cub_parts(tmp_path)
    assert sorted(parts) == [1, 2]  # image 3 has no visible keypoint
    assert parts[1].parts.tolist() == [6, 6, 8]  # left eye, right eye -> eye (6); right wing -> wing (8)
    assert parts[1].boxes[:, :2].tolist() == [[10.5, 20], [30, 40], [1, 2]] and parts[1].points
    assert parts[2].parts.tolist() == [11]  # throat
    (tmp_path / "parts" / "part_locs.txt").write_text("1 16 3 4 1\n")
    with pytest.raises(PM.PrototypeMetricError, match=r"part_locs.txt, row 1: got .* expected part id in 1..15"):
        PM.load_cub_parts(tmp_path)


def test_split_parts_gives_the_synthetic_part_boxes_in_input_pixels(tiny_data):
    """split_parts joins parts/part_boxes.txt on the test split's image ids and squashes the boxes like the
    synthetic data's test transform (32 x 32)."""
    from PIL import Image

    from qpm_dist.data.cub import load_part_boxes
    from qpm_dist.data.sources import read_splits

    cfg = DataConfig(dataset="synthetic", root=str(tiny_data), img_size=32)
    split = read_splits(cfg).test_split
    num_parts, parts_of = PM.split_parts(cfg, split)
    assert num_parts == 6
    raw = load_part_boxes(tiny_data)
    index = 3
    rows = raw[int(split.image_ids[index])]
    width, height = Image.open(split.image_dir / split.paths[index]).size
    parts = parts_of(index)
    assert parts.parts.tolist() == (rows[:, 0] - 1).astype(int).tolist()
    x, y, w, h = (rows[:, c].astype(np.float64) for c in (1, 2, 3, 4))
    expected = np.stack([y * 32 / height, (y + h) * 32 / height, x * 32 / width, (x + w) * 32 / width], axis=1)
    np.testing.assert_allclose(parts.boxes, np.clip(expected, 0, 32), atol=1e-4)
    with pytest.raises(PM.PrototypeMetricError, match="data.dataset: imagenet has no part annotations"):
        PM.split_parts(DataConfig(dataset="imagenet"), split)


def test_split_parts_keypoints_are_the_own_part_centres_of_part_locs(tiny_data):
    """synthetic_parts="keypoints": the visible rows of parts/part_locs.txt (each own class part's centre, no
    distractor) as 1x1 boxes at the squashed point (the CUB protocol, spec §4.1), unmerged part ids."""
    from PIL import Image

    from qpm_dist.data.cub import load_part_boxes
    from qpm_dist.data.sources import read_splits

    cfg = DataConfig(dataset="synthetic", root=str(tiny_data), img_size=32)
    split = read_splits(cfg).test_split
    num_parts, parts_of = PM.split_parts(cfg, split, "keypoints")
    assert num_parts == 6
    locs = np.loadtxt(tiny_data / "parts" / "part_locs.txt", ndmin=2)
    boxes = load_part_boxes(tiny_data)
    checked_distractor = False
    for index in range(len(split.paths)):
        image_id = int(split.image_ids[index])
        rows = locs[(locs[:, 0] == image_id) & (locs[:, 4] == 1)]
        width, height = Image.open(split.image_dir / split.paths[index]).size
        parts = parts_of(index)
        if len(rows) == 0:
            assert parts is None
            continue
        assert parts.parts.tolist() == (rows[:, 1] - 1).astype(int).tolist()
        y, x = rows[:, 3] * 32 / height, rows[:, 2] * 32 / width
        np.testing.assert_allclose(parts.boxes, np.stack([y, y + 1, x, x + 1], axis=1), atol=1e-9)
        distractors = boxes[image_id][boxes[image_id][:, 5] == 1, 0] - 1
        for part in distractors.astype(int):  # a distractor's part type is not among the keypoints
            assert part not in parts.parts.tolist()
            checked_distractor = True
    assert checked_distractor, "the fixture should have an image with a distractor"
    with pytest.raises(PM.PrototypeMetricError, match="synthetic_parts: got 'centres', expected 'boxes' or"):
        PM.split_parts(cfg, split, "centres")


def test_pre_cropped_images_are_refused_by_name():
    with pytest.raises(PM.PrototypeMetricError, match="data.crop_root"):
        PM.InputGeometry.of(DataConfig(dataset="cub", crop_root="/somewhere"))


# ---------------------------------------------------------------------------------------------------------------
# 2. Patches per mapping


def test_centres_and_patches_of_the_three_mappings():
    bounds = torch.tensor([[[0, 40, 0, 60], [0, 40, 100, 224]], [[150, 224, 0, 60], [150, 224, 100, 224]]])
    cells = torch.tensor([[[0, 1], [1, 0]]])
    assert PM.rf_centres(cells, bounds).tolist() == [[[20, 162], [187, 30]]]
    # round((i + 0.5) * 224 / 2): 56 and 168; on a 7 x 7 grid cell 3: round(3.5 * 32) = 112
    assert PM.upsample_centres(cells, (2, 2), (224, 224)).tolist() == [[[56, 168], [168, 56]]]
    assert PM.upsample_centres(torch.tensor([[3, 0]]), (7, 7), (224, 224)).tolist() == [[112, 16]]
    # 7 x 7 at 32 px: 6.5 * 32 / 7 = 29.71 -> 30, 0.5 * 32 / 7 = 2.29 -> 2; 4 cells at 20 px: 2.5 -> 2, 7.5 -> 8
    assert PM.upsample_centres(torch.tensor([[6, 0]]), (7, 7), (32, 32)).tolist() == [[30, 2]]
    assert PM.upsample_centres(torch.tensor([[0, 1]]), (4, 4), (20, 20)).tolist() == [[2, 8]]
    assert PM.half_size((224, 224)) == (36, 36) and PM.half_size((32, 64)) == pytest.approx((36 / 7, 72 / 7))
    assert PM.patch_boxes(torch.tensor([[20.0, 162.0], [187, 30]]), (224, 224)).tolist() == [
        [0, 56, 126, 198], [151, 223, 0, 66]]
    a = PM.random_centres([5, 6], 3, (224, 100), seed=1)
    assert a.shape == (2, 3, 2) and (a[..., 0] < 224).all() and (a[..., 1] < 100).all() and (a >= 0).all()
    assert torch.equal(a[1], PM.random_centres([6], 3, (224, 100), seed=1)[0])  # per image, not per batch
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a, PM.random_centres([5, 6], 3, (224, 100), seed=1, stream=1))


def test_a_part_counts_once_and_only_with_a_positive_area_overlap():
    parts = PM.ImageParts(np.array([0, 0, 2]), np.array([[10, 11, 10, 11], [50, 51, 50, 51], [30, 31, 40, 41.]]))
    # the last four touch part 0 or part 2 at an edge only (in y, in x, or both)
    patches = torch.tensor([[0, 60, 0, 60], [11, 30, 11, 40], [0, 10, 0, 100], [0, 60, 11, 30], [11, 30, 0, 60.]])
    hits, visible = PM.part_hits(patches, parts, 3)
    assert hits.tolist() == [[True, False, True]] + [[False, False, False]] * 4
    assert visible.tolist() == [True, False, True]


# ---------------------------------------------------------------------------------------------------------------
# 3. Consistency and stability


def box(y0, y1, x0, x1):
    return [float(y0), float(y1), float(x0), float(x1)]


def test_consistency_and_stability_hand_computed_with_a_never_shown_part_and_0_over_0_jaccard():
    """Prototypes 0, 1 (class 0) and 2, 3 (class 1), parts 0..2; part 2 never shows in class 1 (B6) and several
    (image, prototype) pairs miss every part before and after noise (B7). Values worked out in the comments."""
    from prototype_metrics_probe import keypoints

    tables = PM.PrototypePartTables(4, 3, mappings=("ours",))
    nothing = box(100, 110, 0, 5)

    def add(ids, parts, clean, noisy):
        tables.add_image(torch.tensor(ids), parts, {"ours": torch.tensor(clean)}, {"ours": torch.tensor(noisy)})

    # A (class 0): parts 0, 1, 2. p0 hits 0 before and after noise; p1 hits 1, after noise 1 and 2 (Jaccard 1/2)
    add([0, 1], keypoints((0, 10, 10), (1, 100, 100), (2, 200, 200)), [box(0, 46, 0, 46), box(90, 110, 90, 110)],
        [box(0, 46, 0, 46), box(90, 210, 90, 210)])
    # B (class 0): parts 0, 1. p0 hits 0, after noise nothing (0); p1 nothing before and after (0/0 -> 1)
    add([0, 1], keypoints((0, 10, 10), (1, 150, 150)), [box(0, 46, 0, 46), box(0, 20, 200, 220)],
        [nothing, nothing])
    # C (class 1): parts 0, 1. p2 hits both before and after; p3 nothing before and after (0/0 -> 1)
    add([2, 3], keypoints((0, 50, 50), (1, 60, 60)), [box(40, 70, 40, 70), box(100, 110, 100, 110)],
        [box(40, 70, 40, 70), nothing])
    # D (class 1): part 0. p2 hits it, after noise not (0); p3 hits it before and after (1)
    add([2, 3], keypoints((0, 50, 50)), [box(40, 70, 40, 70), box(45, 55, 45, 55)], [nothing, box(45, 55, 45, 55)])
    # E (class 1): no visible part -> not counted
    add([2, 3], None, [nothing, nothing], [nothing, nothing])

    assert tables.n.tolist() == [[2, 2, 1], [2, 2, 1], [2, 1, 0], [2, 1, 0]]
    assert tables.m["ours"].tolist() == [[2, 0, 0], [0, 1, 0], [2, 1, 0], [1, 0, 0]]
    # s_p = max over shown parts of m / n: 1, 1/2, 1 (part 2: 0/0 ignored; the reference's NaN max gave NaN), 1/2
    assert tables.consistency_per_prototype("ours").tolist() == [1, 0.5, 1, 0.5]
    scores = tables.scores()
    assert scores["ours_consistency_soft"] == 0.75 and scores["ours_consistency_hard"] == 0.5
    # hard per prototype: (1 + 0) / 2, (0 + 1) / 2, (1 + 0) / 2, (1 + 1) / 2; soft: (1 + 0) / 2, (1/2 + 1) / 2,
    # (1 + 0) / 2, (1 + 1) / 2
    assert scores["ours_stability_hard"] == 0.625 and scores["ours_stability_soft"] == 0.6875
    assert scores["part_images"] == 4 and scores["consistency_prototypes"] == scores["stability_prototypes"] == 4
    assert tables.scores(threshold=0.5)["ours_consistency_hard"] == 1.0


def test_prototype_part_scores_on_mixed_class_batches_hand_computed():
    """prototype_metrics_probe's case through the streamed driver: batches mixing the two classes, every image
    scored with its own class's prototypes (worked out below)."""
    from prototype_metrics_probe import part_scores

    scores = part_scores()
    # n: p0, p1 = [1, 2] (part 0 in image 0; part 1 in images 0, 2); p2, p3 = [1, 0]. "ours" hits: image 0 p0 -> 0,
    # image 1 p2 -> 0: s = 1, 0, 1, 0. "upsample": p0 -> part 1 in images 0, 2 (1); p1 -> part 1 in image 2 (1/2)
    assert scores["ours_consistency_soft"] == 0.5 and scores["ours_consistency_hard"] == 0.5
    assert scores["upsample_consistency_soft"] == 0.375 and scores["upsample_consistency_hard"] == 0.25
    # only image 1's p2 moves (cell (0, 0) -> (1, 1)): "ours" loses its hit (0); everything else keeps its hits or
    # stays empty (0/0 -> 1) -> p2 = 0, others 1; "upsample" p2 had no hit before either -> 1
    assert scores["ours_stability_hard"] == scores["ours_stability_soft"] == 0.75
    assert scores["upsample_stability_hard"] == scores["upsample_stability_soft"] == 1.0
    assert scores["part_images"] == 3 and scores["consistency_prototypes"] == 4
    for key in ("consistency_soft", "consistency_hard", "stability_soft", "stability_hard"):
        assert 0 <= scores[f"random_{key}"] <= 1


def test_stability_noise_is_seeded_per_image_not_per_batch():
    images = torch.zeros(3, 3, 8, 8)
    noisy = PM.stability_noise(images, [4, 5, 6], seed=2)
    assert torch.equal(noisy[1:], PM.stability_noise(images[1:], [5, 6], seed=2))
    assert noisy.std().item() == pytest.approx(0.2, rel=0.15)
    assert not torch.equal(noisy[0], noisy[1])
    assert not torch.equal(noisy, PM.stability_noise(images, [4, 5, 6], seed=3))


def test_two_gloo_processes_give_the_one_process_results(tmp_path):
    """Each rank scores its shard (images rank::2, so the mixed batches split across ranks) and the tables are
    all-reduced: the same numbers as one process over everything."""
    from helpers import REPO, clean_env
    from prototype_metrics_probe import part_scores, rot_scores

    out = tmp_path / "two_ranks.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "tests" / "prototype_metrics_probe.py"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=clean_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["parts"] == part_scores()  # counts: exact; the random mapping too (seeded per image)
    assert two["rot"] == rot_scores()  # sums of exactly representable values: exact in any order


# ---------------------------------------------------------------------------------------------------------------
# 4. Relevance ordering test


def rot_of(relevance, **kw):
    """ROT of prototype 0 (region rows 0..3, cols 0..4 of 20 x 20, similarity = its mean) on an image that is 3
    everywhere, from the seeded N(0, 1) baseline, in steps of 5 % (20 pixels: the region's size)."""
    from prototype_metrics_probe import ROT_HW, region_similarity

    image = torch.full((1, 1, ROT_HW, ROT_HW), 3.0)
    return PM.relevance_ordering_test([(image, torch.tensor([[0]]), [0])], region_similarity, relevance,
                                      num_prototypes=4, input_shape=(1, ROT_HW, ROT_HW),
                                      **{"step_fraction": 0.05, **kw})


def test_rot_area_is_near_1_for_the_right_order_near_0_reversed_and_between_for_random():
    from prototype_metrics_probe import region_relevance, region_similarity

    region_similarity.images = 0
    right = rot_of(region_relevance(1.0))
    assert region_similarity.images == 21  # 0, 20, ..., 400 pixels: 21 forwards, not 401
    # normalised curve 0, 1, 1, ..., 1 over 20 steps: area (19 + 1/2) / 20; all of the region after 5 %
    assert right["rot_area"] == pytest.approx(0.975, abs=1e-12) and right["rot_pct_at_orig_sim"] == 5.0
    reverse = rot_of(region_relevance(-1.0))  # the region's pixels come last: 0, ..., 0, 1
    assert reverse["rot_area"] == pytest.approx(0.025, abs=1e-12) and reverse["rot_pct_at_orig_sim"] == 100.0
    random = rot_of(PM.random_relevance(seed=0))
    assert 0.2 < random["rot_area"] < 0.8
    assert right["rot_curve"][-1] == reverse["rot_curve"][-1] == random["rot_curve"][-1] == 3.0  # the image itself
    assert right["rot_curve"][0] == pytest.approx(float(PM.rot_baseline((1, 20, 20))[0, :4, :5].mean()))
    assert right["rot_pct_pixels"] == [5.0 * j for j in range(21)]


def test_rot_counts_each_sample_prototype_pair_on_mixed_classes():
    """Four images with overlapping prototype sets (the reference counted a batch for the classes of its last
    sample only, B5). From a zero baseline the final similarity of pair (i, p) is (p + 1) * value_i:
    p0: (1 + 3 + 5) / 3, p1: (2 + 4) / 2, p2: (9 + 15) / 2, p3: 8 -> curve end (3 + 3 + 12 + 8) / 4 = 6.5."""
    from prototype_metrics_probe import rot_scores

    result = rot_scores()
    assert result["rot_pairs"] == 8
    assert result["rot_curve"][0] == 0 and result["rot_curve"][1:] == pytest.approx([6.5] * 20)
    assert result["rot_area"] == pytest.approx(0.975) and result["rot_pct_at_orig_sim"] == 5.0


def test_rot_tables_average_per_prototype_then_over_prototypes():
    tables = PM.RotTables(3, torch.tensor([0, 2]), 4)
    tables.add(torch.tensor([0, 1]), torch.tensor([[0.0, 2.0], [0.0, 6.0]]))
    tables.add(torch.tensor([0]), torch.tensor([[0.0, 4.0]]))
    assert tables.samples.tolist() == [2, 1, 0]
    assert tables.curve().tolist() == [0, (3 + 6) / 2]  # prototype 2 never evaluated: left out, not 0 or inf
    summary = tables.summary()
    assert summary["rot_area"] == 0.5 and summary["rot_pct_at_orig_sim"] == 50.0


# ---------------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("kw, match", [
    (dict(step_fraction=0.0), r"ROT step_fraction: got 0.0, expected a fraction in \(0, 1\]"),
    (dict(step_fraction=1.5), "ROT step_fraction: got 1.5"),
    (dict(prop_pixels=0.0), r"ROT prop_pixels: got 0.0, expected a fraction in \(0, 1\]"),
    (dict(step_fraction=0.0025, max_steps=100), "ROT steps .*: got 400, expected at most 100"),
    (dict(max_steps=5000), "ROT max_steps: got 5000, expected 1..1000"),
    (dict(batch_size=0), "ROT batch_size: got 0"),
])
def test_rot_parameters_out_of_range_stop_with_one_clear_line(kw, match):
    from prototype_metrics_probe import region_relevance

    with pytest.raises(PM.PrototypeMetricError, match=match):
        rot_of(region_relevance(), **kw)


def test_rot_shape_mismatches_and_too_much_work_are_refused():
    from prototype_metrics_probe import region_relevance, region_similarity

    image = torch.zeros(1, 1, 20, 20)

    def rot(prototype_ids, similarity=region_similarity, relevance=region_relevance(), images=image, **kw):
        return PM.relevance_ordering_test([(images, prototype_ids, [0])], similarity, relevance, 4, (1, 20, 20),
                                          **{"step_fraction": 0.05, **kw})

    with pytest.raises(PM.PrototypeMetricError, match=r"ROT relevance maps shape: got \(1, 10, 10\), expected"):
        rot(torch.tensor([[0]]), relevance=lambda image, ids, index: torch.zeros(len(ids), 10, 10))
    with pytest.raises(PM.PrototypeMetricError, match=r"ROT similarity output shape: got \(21, 2\)"):
        rot(torch.tensor([[0]]), similarity=lambda x, ids: torch.zeros(len(x), 2))
    with pytest.raises(PM.PrototypeMetricError, match=r"ROT batch: got \(\(1, 1, 20, 20\), \(2, 1\), 1\)"):
        rot(torch.tensor([[0], [1]]))
    with pytest.raises(PM.PrototypeMetricError, match=r"ROT batch: got \(\(1, 3, 20, 20\)"):
        rot(torch.tensor([[0]]), images=torch.zeros(1, 3, 20, 20))
    with pytest.raises(PM.PrototypeMetricError, match="ROT prototypes per image: got 101, expected at most 100"):
        rot(torch.zeros(1, 101, dtype=torch.long))
    with pytest.raises(PM.PrototypeMetricError, match=r"ROT prototype_ids: got \[7\]"):
        rot(torch.tensor([[7]]))
    with pytest.raises(PM.PrototypeMetricError, match="ROT num_samples: got 0, expected 1..10000"):
        rot(torch.tensor([[0]]), num_samples=0)


def test_rot_reads_at_most_num_samples_images():
    from prototype_metrics_probe import region_relevance, region_similarity

    images = torch.full((3, 1, 20, 20), 3.0)
    batches = [(images, torch.tensor([[0], [1], [2]]), [0, 1, 2]), (images, torch.tensor([[3]] * 3), [3, 4, 5])]
    region_similarity.images = 0
    result = PM.relevance_ordering_test(batches, region_similarity, region_relevance(), 4, (1, 20, 20),
                                        num_samples=2, step_fraction=0.5)
    assert result["rot_pairs"] == 2 and region_similarity.images == 2 * 3  # 0, 200 and 400 pixels


def test_bad_cells_bounds_patches_and_threshold_are_refused():
    bounds = torch.zeros(2, 2, 4)
    with pytest.raises(PM.PrototypeMetricError, match="cells: got a cell outside the 2 x 2 grid"):
        PM.rf_centres(torch.tensor([[2, 0]]), bounds)
    with pytest.raises(PM.PrototypeMetricError, match=r"rf_bounds shape: got \(2, 2, 3\), expected Hz x Wz x 4"):
        PM.rf_centres(torch.tensor([[0, 0]]), torch.zeros(2, 2, 3))
    with pytest.raises(PM.PrototypeMetricError, match=r"cells shape: got \(1, 3\)"):
        PM.upsample_centres(torch.tensor([[0, 0, 0]]), (2, 2), (224, 224))
    tables = PM.PrototypePartTables(4, 2, mappings=("ours",))
    parts = PM.ImageParts(np.array([0]), np.array([[0, 1, 0, 1.]]))
    with pytest.raises(PM.PrototypeMetricError, match=r"patches\['ours'\] shape: got \(1, 4\), expected \(2, 4\)"):
        tables.add_image(torch.tensor([0, 1]), parts, {"ours": torch.zeros(1, 4)})
    with pytest.raises(PM.PrototypeMetricError, match=r"patches mappings: got \['upsample'\]"):
        tables.add_image(torch.tensor([0, 1]), parts, {"upsample": torch.zeros(2, 4)})
    with pytest.raises(PM.PrototypeMetricError, match=r"prototype_ids: got \[0, 0\], expected distinct ids in 0..3"):
        tables.add_image(torch.tensor([0, 0]), parts, {"ours": torch.zeros(2, 4)})
    with pytest.raises(PM.PrototypeMetricError, match=r"part index: got \[5\]"):
        PM.part_hits(torch.zeros(1, 4), PM.ImageParts(np.array([5]), np.zeros((1, 4))), 2)
    with pytest.raises(PM.PrototypeMetricError, match="consistency threshold: got 1.5"):
        tables.scores(threshold=1.5)
    with pytest.raises(PM.PrototypeMetricError, match="noise std: got -0.1"):
        PM.stability_noise(torch.zeros(1, 1, 2, 2), [0], 0, std=-0.1)
