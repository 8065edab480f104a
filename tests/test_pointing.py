"""PG, SPG and CH on hand-built maps and boxes (specs/gc_consistency.md §7, §13)."""

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qpm_dist.metrics import pointing as P


def _delta(height, width, row, col):
    heatmap = np.zeros((height, width))
    heatmap[row, col] = 1.0
    return heatmap


def _scores(heatmap, boxes, samples=100):
    return P.score_image(heatmap, np.asarray(boxes, dtype=float), np.random.default_rng(0), samples=samples)


@pytest.mark.parametrize("row,col", [(20, 30), (20, 39), (29, 30), (29, 39)])  # the four corner pixels
def test_delta_at_a_box_corner_is_a_hit_with_all_the_mass(row, col):
    scores = _scores(_delta(50, 80, row, col), [30, 20, 10, 10])  # pixels cols 30..39, rows 20..29
    assert scores == (True, 1.0, 1.0, 1.0)


@pytest.mark.parametrize("direction", ["right", "left", "below", "above"])
def test_tolerance_is_15_px_strict(direction):
    box = [40, 40, 10, 10]  # rows and cols 40..49

    def at(distance):
        row, col = {"right": (45, 49 + distance), "left": (45, 40 - distance), "below": (49 + distance, 45),
                    "above": (40 - distance, 45)}[direction]
        return _scores(_delta(100, 120, row, col), box)

    assert at(14).hit and at(14).spg == 1.0 and at(14).ch == 0.0
    assert not at(15).hit and at(15).spg == 0.0


@pytest.mark.parametrize("tolerance,hits", [(0.0, (True, False, False)), (5.0, (True, True, False))])
def test_tolerance_is_a_parameter_and_zero_means_inside_the_box(tolerance, hits):
    """eval.pointing_tolerance: 0 counts only points inside the box (the box itself, not an empty set)."""
    box = np.array([[40, 40, 10, 10.0]])  # rows and cols 40..49
    scored = [P.score_image(_delta(100, 120, 45, col), box, np.random.default_rng(0), tolerance=tolerance)
              for col in (49, 53, 54)]  # inside, 4 px right, 5 px right
    assert tuple(s.hit for s in scored) == hits
    assert tuple(s.spg == 1.0 for s in scored) == hits


def test_uniform_map_scores_the_box_area_fraction():
    heatmap = np.full((30, 70), 1.0 / (30 * 70))
    scores = _scores(heatmap, [[10, 5, 20, 10], [60, 0, 5, 4]])  # union of two boxes: 200 + 20 pixels
    assert scores.ch == pytest.approx(220 / (30 * 70))
    assert scores.spg >= scores.ch
    assert P.peak(heatmap) == (0, 0) and scores.hit  # (0, 0) is sqrt(5^2 + 10^2) px from the first box's corner


def test_non_square_image_point_order_is_row_col():
    heatmap = _delta(30, 60, row=7, col=45)
    assert P.peak(heatmap) == (7, 45)
    assert _scores(heatmap, [43, 5, 4, 4]).hit  # x 43..46, y 5..8: the point (row 7, col 45) is inside
    assert not _scores(heatmap, [5, 43 - 30, 4, 4]).hit  # the transposed box (x 5..8, y 13..16) is 37 px away


def test_exact_spg_equals_sampled_within_3_sigma():
    rng = np.random.default_rng(1)
    heatmap = F.interpolate(torch.rand(1, 1, 6, 9, generator=torch.Generator().manual_seed(0)), size=(60, 90),
                            mode="bilinear")[0, 0].numpy().astype(np.float64)
    heatmap /= heatmap.sum()
    near = P.near_mask(P.box_mask(np.array([20, 10, 25, 15.0]), 60, 90))
    exact = P.stochastic_pointing(heatmap, near)
    n = 20000
    sampled = P.sampled_stochastic_pointing(heatmap, near, rng, samples=n)
    assert 0.1 < exact < 0.9
    assert abs(sampled - exact) < 3 * np.sqrt(exact * (1 - exact) / n)
    # and the sampled value is what the reference's per-sample distance rule gives for the same draws
    drawn = np.random.default_rng(1).choice(heatmap.size, size=n, p=heatmap.ravel() / heatmap.sum())
    rows, cols = np.nonzero(P.box_mask(np.array([20, 10, 25, 15.0]), 60, 90))
    hits = [((rows - d // 90) ** 2 + (cols - d % 90) ** 2 < 15 ** 2).any() for d in drawn[:500]]
    assert near.ravel()[drawn[:500]].tolist() == hits


def test_voc_boxes_with_zero_coordinates_are_clamped_not_wrapped():
    # ImageNet XML: xmin=0, ymin=1, xmax=2, ymax=3 (1-based inclusive) -> the reference's xmin - 1 = -1 wrapped
    mask = P.box_mask(P.voc_to_pixel_edges(np.array([0, 1, 2, 2.0])), 6, 8)
    expected = np.zeros((6, 8), dtype=bool)
    expected[0:3, 0:2] = True  # rows ymin-1..ymax-1 = 0..2, cols max(0, -1)..xmax-1 = 0..1
    np.testing.assert_array_equal(mask, expected)
    # a box entirely outside the image leaves nothing to point at: the image is not scored
    assert _scores(_delta(6, 8, 0, 0), [20, 20, 3, 3]) is None


def test_source_heatmap_squash_is_bilinear_resize_and_crop_is_zero_outside():
    cam = torch.rand(4, 5, generator=torch.Generator().manual_seed(0))
    full = P.source_heatmap(cam, 24, 30, (0, 0, 30, 24))
    expected = F.interpolate(cam.double()[None, None], size=(24, 30), mode="bilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(full, (expected / expected.sum()).numpy(), atol=1e-12)
    cropped = P.source_heatmap(cam, 24, 40, (5, 0, 35, 24))  # a centre crop of a wide image
    assert cropped.sum() == pytest.approx(1.0)
    assert (cropped[:, :5] == 0).all() and (cropped[:, 35:] == 0).all() and (cropped[:, 5:35] > 0).all()


class DeltaBackbone(nn.Module):
    """Feature maps with one channel lit at cell (1, 1) of 4 x 4, whatever the image."""

    num_features = 1

    def forward(self, images):
        maps = torch.zeros(images.shape[0], 1, 4, 4)
        maps[:, 0, 1, 1] = 1
        return maps


@pytest.mark.parametrize("dataset,box_pixels", [("synthetic", slice(10, 20)), ("imagenet", slice(9, 20))])
def test_streamed_pass_scores_per_class_and_skips_images_without_a_box(tmp_path, dataset, box_pixels):
    """The map's peak is near (15, 15) of a 40 x 40 image (squashed, or the source of ImageNet's centre crop):
    inside the first box (pixels 10..19; ImageNet's 1-based corners: 9..19), over 19 px from the second
    (30..39 / 29..39); the third image has no box and is left out, not counted as a miss."""
    from PIL import Image

    from qpm_dist import dist
    from qpm_dist.config import DataConfig
    from qpm_dist.data.datasets import DatasetBundle, Split
    from qpm_dist.data.transforms import test_point_to_source
    from qpm_dist.models.net import Classifier, DenseHead

    for n in range(3):
        Image.new("RGB", (40, 40)).save(tmp_path / f"{n}.png")
    boxes = np.array([[10, 10, 10, 10], [30, 30, 10, 10], [np.nan] * 4], dtype=np.float32)
    split = Split(tmp_path, [f"{n}.png" for n in range(3)], np.array([0, 1, 0]), boxes)
    cfg = DataConfig(dataset=dataset, img_size=16, augment="light" if dataset == "synthetic" else "imagenet",
                     num_workers=0)
    data = DatasetBundle(cfg, split, split, 2, ["a", "b"], "f")
    head = DenseHead(1, 2)
    with torch.no_grad():
        head.linear.weight.fill_(1.0)
    model = Classifier(DeltaBackbone(), head)
    result = P.pointing_metrics(model, data, dist.init("cpu"), contextlib.nullcontext, batch_size=2)
    assert result["pointing_game"] == 0.5  # class a: 1/1, class b: 0/1
    assert (result["pointing_images"], result["pointing_classes"], result["pointing_unannotated"]) == (2, 2, 1)
    # by hand: the bilinear tent of cell (1, 1) over the source pixels; box 1 holds its central part, box 2 nothing
    cam = torch.zeros(4, 4)
    cam[1, 1] = 1
    region = (*test_point_to_source(cfg, 40, 40, 0, 0), *test_point_to_source(cfg, 40, 40, 16, 16))
    assert (region == (0, 0, 40, 40)) == (dataset == "synthetic")
    tent = P.source_heatmap(cam, 40, 40, region)
    ch_first = tent[box_pixels, box_pixels].sum()
    assert result["content_heatmap"] == pytest.approx(ch_first / 2, rel=1e-3)  # eps cells add ~1e-8 each
    assert result["stochastic_pointing"] >= result["content_heatmap"]
    assert 0 <= result["stochastic_pointing_sampled"] <= 1


@pytest.fixture(scope="module")
def one_process(tiny_data):
    """pointing_probe's metrics in this process: test transform, whole image, autograd path."""
    from pointing_probe import tiny_model_metrics

    from qpm_dist import dist

    return tiny_model_metrics(str(tiny_data), dist.init("cpu"))


def test_evaluate_model_scores_pg_spg_ch_on_the_synthetic_object_boxes(tiny_data):
    """The synthetic data's bounding_boxes.txt (the box around the class's drawn parts) reaches every test image;
    evaluate_model reports the four scores in [0, 1] with their counts, and no longer object_pointing."""
    from pointing_probe import tiny_model

    from qpm_dist import dist
    from qpm_dist.config import DataConfig, EvalConfig
    from qpm_dist.data.sources import read_splits
    from qpm_dist.metrics.collect import evaluate_model

    data = read_splits(DataConfig(dataset="synthetic", root=str(tiny_data), img_size=32, num_workers=0))
    assert np.isfinite(data.test_split.boxes).all()
    result = evaluate_model(tiny_model(data.num_classes), data, dist.init("cpu"),
                            EvalConfig(batch_size=16, gmm_max_features=0), contextlib.nullcontext)
    n = len(data.test_split)
    assert (result["pointing_images"], result["content_heatmap_images"], result["pointing_classes"]) == (
        n, n, data.num_classes)
    assert result["pointing_unannotated"] == result["pointing_skipped"] == result["pointing_clamped_boxes"] == 0
    for key in P.SCORES:
        assert 0 <= result[key] <= 1, (key, result)
    assert result["stochastic_pointing"] >= result["content_heatmap"]
    assert not any(key.startswith("object_pointing") for key in result)


def test_the_autograd_path_scores_what_the_closed_form_scores(one_process):
    """A head without a linear form (pointing_probe.AutogradHead: the dense head under an unknown kind) is scored
    through autograd Grad-CAM; with the same weights that is the closed form's map, so the same scores."""
    from pointing_probe import AutogradHead

    from qpm_dist import gradcam

    assert gradcam.linear_form(AutogradHead(4, 2)) is None
    assert one_process["autograd"] == pytest.approx(one_process["test_transform"], rel=1e-6)
    assert one_process["full_image"]["pointing_images"] == one_process["test_transform"]["pointing_images"]
    assert one_process["full_image"]["content_heatmap"] != one_process["test_transform"]["content_heatmap"]


class BrightnessBackbone(nn.Module):
    """One feature: the image's brightness, average-pooled over 4 x 4 pixels and rectified (the normalised dark
    background is negative), so the class map peaks where the image is bright."""

    num_features = 1

    def forward(self, images):
        return F.avg_pool2d(images.mean(dim=1, keepdim=True), 4).relu()


def bright_squares(folder, sizes_and_squares, labels, dataset="synthetic", augment="light", box_of=None):
    """A DataSource of black images (width, height) with a white square (x, y, side) each; its box: the square, or
    box_of(width, height, square)."""
    from PIL import Image

    from qpm_dist.config import DataConfig
    from qpm_dist.data.datasets import DatasetBundle, Split

    boxes = []
    for n, ((width, height), (x, y, side)) in enumerate(sizes_and_squares):
        pixels = np.zeros((height, width, 3), dtype=np.uint8)
        pixels[y:y + side, x:x + side] = 255
        Image.fromarray(pixels).save(folder / f"{n}.png")
        boxes.append(box_of(width, height, (x, y, side)) if box_of else (x, y, side, side))
    split = Split(folder, [f"{n}.png" for n in range(len(boxes))], np.array(labels), np.array(boxes, dtype=np.float32))
    cfg = DataConfig(dataset=dataset, img_size=32, augment=augment, num_workers=0)
    return DatasetBundle(cfg, split, split, 2, ["a", "b"], "f")


def brightness_model():
    from qpm_dist.models.net import Classifier, DenseHead

    head = DenseHead(1, 2)
    with torch.no_grad():
        head.linear.weight.fill_(1.0)  # set by hand: both classes read the brightness
    return Classifier(BrightnessBackbone(), head)


class BrightAndDarkBackbone(nn.Module):
    """Two features: brightness (peaks on the white square) and darkness (zero there)."""

    num_features = 2

    def forward(self, images):
        brightness = F.avg_pool2d(images.mean(dim=1, keepdim=True), 4)
        return torch.cat([brightness.relu(), (-brightness).relu()], dim=1)


def test_the_ground_truth_class_is_scored_not_the_prediction(tmp_path):
    """Every image is of class a (whose weight reads brightness) but predicted b (darkness, a large bias): the
    map of class a is scored, so PG 1; the prediction's map (measured: PG 0.25) would miss (spec §11.10)."""
    from qpm_dist import dist
    from qpm_dist.models.net import Classifier, DenseHead

    head = DenseHead(2, 2)
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        head.linear.bias.copy_(torch.tensor([0.0, 100.0]))
    model = Classifier(BrightAndDarkBackbone(), head)
    data = bright_squares(tmp_path, SQUARES, [0, 0, 0, 0])
    result = P.pointing_metrics(model, data, dist.init("cpu"), contextlib.nullcontext, batch_size=4)
    assert (result["pointing_game"], result["pointing_classes"]) == (1.0, 1)
    images = torch.stack([data.dataset("test", augment=False)[i][0] for i in range(4)])
    assert (model(images).logits.argmax(dim=1) == 1).all()


SQUARES = [((48, 32), (4, 4, 12)), ((40, 56), (20, 36, 16)), ((64, 64), (40, 8, 16)), ((36, 60), (4, 40, 16))]


@pytest.mark.parametrize("resize", [None, 40])
def test_a_model_whose_maps_peak_in_the_box_scores_pg_1(tmp_path, resize):
    """evaluate_model of a hand-set model (brightness maps, class weights 1) on images whose box is a white square:
    PG 1 and most of the mass inside; the same maps against the point-mirrored boxes score PG 0."""
    from qpm_dist import dist
    from qpm_dist.config import EvalConfig
    from qpm_dist.metrics.collect import evaluate_model

    cfg = EvalConfig(batch_size=4, gmm_max_features=0, pointing_resize=resize)
    (tmp_path / "in").mkdir()
    (tmp_path / "mirrored").mkdir()
    labels = [0, 1, 0, 1]
    inside = evaluate_model(brightness_model(), bright_squares(tmp_path / "in", SQUARES, labels), dist.init("cpu"),
                            cfg, contextlib.nullcontext)
    assert inside["pointing_game"] == 1.0 and inside["pointing_classes"] == 2
    assert inside["content_heatmap"] > 0.5 and inside["stochastic_pointing"] > 0.9

    def mirrored(width, height, square):
        x, y, side = square
        return (width - x - side, height - y - side, side, side)

    outside = evaluate_model(brightness_model(), bright_squares(tmp_path / "mirrored", SQUARES, labels, box_of=mirrored),
                             dist.init("cpu"), cfg, contextlib.nullcontext)
    assert outside["pointing_game"] == 0.0 and outside["content_heatmap"] < 0.1


def test_full_image_input_maps_the_peak_to_its_pixel_of_a_wide_image(tmp_path):
    """eval.pointing_resize: a 120 x 40 image seen whole at 60 x 20 (no crop); its white square (x 96..111,
    y 8..23) is 2 x 2 map cells. With a 1 px tolerance only a peak inside the square hits: the map is put back
    onto the whole original image, columns as x. The test transform of ImageNet (centre crop of the middle 40 x
    40) cannot see the square: its map is zero there and its peak misses."""
    from qpm_dist import dist

    data = bright_squares(tmp_path, [((120, 40), (96, 8, 16))], [0], dataset="imagenet", augment="imagenet",
                          box_of=lambda w, h, sq: (sq[0] + 1, sq[1] + 1, sq[2] - 1, sq[2] - 1))  # 1-based corners
    score = lambda resize: P.pointing_metrics(brightness_model(), data, dist.init("cpu"), contextlib.nullcontext,
                                              batch_size=1, resize=resize, tolerance=1.0)
    whole = score(20)
    assert whole["pointing_game"] == 1.0 and whole["content_heatmap"] > 0.5
    cropped = score(None)
    assert cropped["pointing_game"] == 0.0 and cropped["content_heatmap"] == pytest.approx(0, abs=1e-6)


def test_boxes_cropped_away_or_missing_leave_the_scores_none_or_absent(tmp_path):
    """With crop_to_box the box is the whole image: the scores are None with the reason; a dataset without boxes
    ("folder") has no pointing keys at all."""
    import dataclasses

    from qpm_dist import dist

    data = bright_squares(tmp_path, SQUARES[:2], [0, 1])
    cropped = dataclasses.replace(data, cfg=dataclasses.replace(data.cfg, crop_to_box=True))
    result = P.pointing_metrics(brightness_model(), cropped, dist.init("cpu"), contextlib.nullcontext, batch_size=2)
    assert all(result[key] is None for key in P.SCORES) and "crop_to_box" in result["pointing_not_computed"]
    folder = dataclasses.replace(data, cfg=dataclasses.replace(data.cfg, dataset="folder"))
    assert P.pointing_metrics(brightness_model(), folder, dist.init("cpu"), contextlib.nullcontext, batch_size=2) == {}


def test_two_gloo_ranks_score_what_one_process_scores(tiny_data, tmp_path, one_process):
    """Each rank scores half of the test images; the all-reduced numbers are the one-process numbers (the image
    counts included: rank 0 alone would have half), on every path (test transform, whole image, autograd)."""
    import json
    import subprocess
    import sys

    from helpers import REPO, clean_env

    out = tmp_path / "two_ranks.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "tests" / "pointing_probe.py"), str(tiny_data), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=clean_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two.keys() == one_process.keys()
    for path in one_process:
        assert two[path] == pytest.approx(one_process[path], rel=1e-9), path


def test_converted_data_is_scored_from_data_root_or_not_at_all(tiny_data, tmp_path, caplog):
    """WebDataset shards hold neither boxes nor original sizes: with data.root readable the metrics are those of
    the folder backend (same data config); without it they are None, with the reason logged and recorded."""
    import shutil

    from data_helpers import convert, source_cfg
    from pointing_probe import tiny_model

    from qpm_dist import dist
    from qpm_dist.data.sources import build_datasets

    shards = convert("wds", tiny_data, tmp_path / "wds")
    folder = build_datasets(source_cfg("folder", None, tiny_data), seed=0)
    score = lambda data: P.pointing_metrics(tiny_model(data.num_classes), data, dist.init("cpu"),
                                            contextlib.nullcontext, batch_size=8)
    expected = score(folder)
    assert expected["pointing_images"] == len(folder.test_split)
    assert score(build_datasets(source_cfg("wds", shards, tiny_data), seed=0)) == expected
    unreadable = build_datasets(source_cfg("wds", shards, tmp_path / "moved"), seed=0)
    with caplog.at_level("WARNING", logger="qpm_dist"):
        result = score(unreadable)
    assert all(result[key] is None for key in P.SCORES), result
    assert "data.root" in result["pointing_not_computed"] and "moved" in result["pointing_not_computed"]
    assert result["pointing_not_computed"] in caplog.text
    # data.root readable, but a test image gone: not computed either (instead of failing mid-pass)
    copy = shutil.copytree(tiny_data, tmp_path / "copy")
    (copy / "images" / folder.test_split.paths[0]).unlink()
    result = score(build_datasets(source_cfg("wds", shards, copy), seed=0))
    assert result["pointing_game"] is None and "missing under data.root" in result["pointing_not_computed"]
