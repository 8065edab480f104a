"""ImageNet as it is distributed (tests/fake_imagenet.py): devkit labels, awkward image files, bounding-box XMLs,
class names from the devkit's words, the Kaggle layout, class subsets, and what crop_to_box and the converters
accept for it."""

import contextlib
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from fake_imagenet import ILSVRC_IDS, WNIDS, WORDS, describe
from helpers import run_qpm, write_test_config
from qpm_dist.config import ConfigError, DataConfig, ModelConfig, load_config
from qpm_dist.data.sources import read_splits

TRAIN, VAL = describe()


def read(root, **options):
    return read_splits(DataConfig(dataset="imagenet", root=str(root), **options))


def read_with_train_boxes(root):
    from qpm_dist.data.imagenet import read_imagenet

    return read_imagenet(root, train_boxes=True)


def xywh_union(objects):
    a = np.array(objects, dtype=np.float64)
    x0, y0, x1, y1 = a[:, 0].min(), a[:, 1].min(), a[:, 2].max(), a[:, 3].max()
    return [x0, y0, x1 - x0, y1 - y0]


def expected_boxes(images, annotated=lambda image: image.box_file):
    return np.array([xywh_union(i.objects) if annotated(i) else [np.nan] * 4 for i in images])


@pytest.fixture
def imagenet_copy(fake_imagenet, tmp_path):
    """A private copy of the official fake ImageNet, for tests that damage or prune it."""
    return shutil.copytree(fake_imagenet, tmp_path / "imagenet")


def test_official_layout_labels_follow_the_devkit_and_names_its_words(fake_imagenet):
    data = read(fake_imagenet)
    assert ILSVRC_IDS != sorted(ILSVRC_IDS)  # the devkit's ids are not in wnid order: labels must use meta.mat
    assert data.class_names == WNIDS  # wnids stay the identity (folders, labels, conversions)
    assert data.display_names == WORDS  # reports show the devkit's words
    assert data.train_split.paths == [i.path for i in TRAIN]
    assert data.train_split.labels.tolist() == [WNIDS.index(i.wnid) for i in TRAIN]
    assert data.test_split.paths == [i.path for i in VAL]
    assert data.test_split.labels.tolist() == [WNIDS.index(i.wnid) for i in VAL]


def test_every_image_decodes_to_three_channels_as_annotated(fake_imagenet):
    """Grayscale and CMYK JPEGs and a PNG named .JPEG (as the real train set has) decode to 3-channel RGB at their
    size, on the folder backend's loading path."""
    data = read(fake_imagenet)
    for split, images in (("train", TRAIN), ("test", VAL)):
        dataset = data.dataset(split, augment=False)
        for index, image in enumerate(images):
            pixels = dataset.load(index)
            assert pixels.dtype == torch.uint8 and tuple(pixels.shape) == (3, image.size[1], image.size[0]), image
    kinds = {i.kind for i in TRAIN + VAL}
    assert kinds == {"rgb", "gray", "cmyk", "png"}
    gray = data.dataset("train", augment=False).load([i.kind for i in TRAIN].index("gray"))
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_boxes_come_from_the_xmls_as_the_union_of_the_objects_in_pixels(fake_imagenet):
    data = read(fake_imagenet)
    assert data.train_split.boxes is None  # training reads no train box (nothing uses them; ~40 s per rank)
    train, val = read_with_train_boxes(fake_imagenet).train.boxes, data.test_split.boxes
    np.testing.assert_allclose(train, expected_boxes(TRAIN), equal_nan=True)  # NaN: no XML for that image
    np.testing.assert_allclose(val, expected_boxes(VAL), equal_nan=True)
    assert np.isnan(train[:, 0]).sum() == sum(not i.box_file for i in TRAIN) > 0
    assert any(len(i.objects) > 1 for i in TRAIN) and any(len(i.objects) > 1 for i in VAL)
    # (x, y, w, h) in the image's pixels, as CUB's and Cars' boxes: the object's pixels are where the box says
    first = TRAIN[0]
    x, y, w, h = (int(v) for v in train[0])
    image = data.dataset("train", augment=False).load(0)
    assert (x, y, x + w, y + h) == first.objects[0] and image.shape[2] >= x + w and image.shape[1] >= y + h


def test_val_boxes_also_for_val_sorted_into_class_folders(imagenet_copy):
    val = imagenet_copy / "val"
    for image in VAL:
        (val / image.wnid).mkdir(exist_ok=True)
        (val / image.path).rename(val / image.wnid / image.path)
    data = read(imagenet_copy)
    by_name = {p.split("/")[1]: (label, box) for p, label, box in
               zip(data.test_split.paths, data.test_split.labels, data.test_split.boxes)}
    for image in VAL:
        label, box = by_name[image.path]
        assert label == WNIDS.index(image.wnid)
        np.testing.assert_allclose(box, xywh_union(image.objects))


@pytest.mark.parametrize("damage, message", [
    (lambda text: text.replace("<name>n01440764</name>", "<name>n01443537</name>"), "of class 'n01443537'.*n01440764"),
    (lambda text: text.replace("</annotation>", ""), "not a readable bounding-box XML"),
    (lambda text: text.replace("<xmax>", "<xmax>x"), "numeric <bndbox>"),
    (lambda text: text.replace("<difficult>0</difficult>", "<difficult>yes</difficult>"), "<difficult> must be 0 or 1"),
])
def test_a_wrong_or_damaged_box_xml_is_named(imagenet_copy, damage, message):
    xml = imagenet_copy / "bbox" / "train" / WNIDS[0] / f"{WNIDS[0]}_1.xml"
    xml.write_text(damage(xml.read_text()))
    with pytest.raises(ValueError, match=message) as error:
        read_with_train_boxes(imagenet_copy)
    assert str(xml) in str(error.value)


def test_a_damaged_val_box_xml_stops_the_training_reader(imagenet_copy):
    xml = sorted((imagenet_copy / "bbox" / "val").glob("*.xml"))[0]
    xml.write_text(xml.read_text().replace("</annotation>", ""))
    with pytest.raises(ValueError, match="not a readable bounding-box XML") as error:
        read(imagenet_copy)
    assert str(xml) in str(error.value)


def test_kaggle_layout_reads_the_same_dataset(fake_imagenet, fake_imagenet_kaggle):
    official, kaggle = read(fake_imagenet), read(fake_imagenet_kaggle)
    assert (fake_imagenet_kaggle / "LOC_val_solution.csv").is_file() and not list(fake_imagenet_kaggle.glob("*.tar.gz"))
    assert kaggle.class_names == official.class_names and kaggle.display_names == WORDS
    for a, b in ((official.train_split, kaggle.train_split), (official.test_split, kaggle.test_split)):
        assert a.paths == b.paths and a.labels.tolist() == b.labels.tolist()
    np.testing.assert_allclose(official.test_split.boxes, kaggle.test_split.boxes, equal_nan=True)  # from the csv
    np.testing.assert_allclose(read_with_train_boxes(fake_imagenet).train.boxes,
                               read_with_train_boxes(fake_imagenet_kaggle).train.boxes, equal_nan=True)
    assert kaggle.fingerprint == official.fingerprint  # same files, same labels
    image = kaggle.dataset("test", augment=False).load(0)
    assert image.shape[0] == 3


def test_kaggle_val_solution_errors_name_the_line(fake_imagenet_kaggle, tmp_path):
    root = shutil.copytree(fake_imagenet_kaggle, tmp_path / "kaggle")
    csv = root / "LOC_val_solution.csv"
    lines = csv.read_text().splitlines()
    lines[2] = lines[2].split(",")[0] + ",n01440764 1 2 3"
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="LOC_val_solution.csv line 3"):
        read(root)


def test_class_subset_needs_val_classes_train(imagenet_copy):
    """A train tree with a subset of the classes: the flat val's other images stop the reader naming the option;
    data.val_classes=train leaves them out."""
    kept = WNIDS[:4]
    for wnid in WNIDS[4:]:
        shutil.rmtree(imagenet_copy / "train" / wnid)
    with pytest.raises(ValueError, match="data.val_classes=train"):
        read(imagenet_copy)
    data = read(imagenet_copy, val_classes="train")
    assert data.class_names == kept and data.display_names == WORDS[:4]
    expected = [i for i in VAL if i.wnid in kept]
    assert data.test_split.paths == [i.path for i in expected] and len(expected) < len(VAL)
    assert data.test_split.labels.tolist() == [kept.index(i.wnid) for i in expected]
    np.testing.assert_allclose(data.test_split.boxes, expected_boxes(expected))


def test_val_classes_is_a_checked_config_option():
    assert load_config(None, ["data.val_classes=train"]).data.val_classes == "train"
    with pytest.raises(ConfigError, match="val_classes"):
        load_config(None, ["data.val_classes=some"])


@pytest.mark.parametrize("dataset, accepted", [("imagenet", False), ("folder", False), ("cub", True),
                                               ("cars", True), ("synthetic", True)])
def test_crop_to_box_needs_one_box_per_image_in_config_and_converter(dataset, accepted, fake_imagenet, tmp_path):
    """ImageNet's box XMLs cover only some train images: data.crop_to_box and `--crop-to-box` both refuse it."""
    from data_prep.__main__ import main as data_prep

    overrides = [f"data.dataset={dataset}", "data.crop_to_box=true"]
    if accepted:
        assert load_config(None, overrides).data.crop_to_box
        return
    with pytest.raises(ConfigError, match="data.crop_to_box: needs one bounding box per image"):
        load_config(None, overrides)
    code = data_prep(["to-wds", str(tmp_path / "out"), "--dataset", dataset, "--root", str(fake_imagenet),
                      "--crop-to-box", "--quiet", "--workers", "1"])
    assert code == 2


def test_converters_accept_val_and_carry_the_class_names(fake_imagenet, tmp_path, capsys):
    """`--splits train val` names the test split; dataset.json keeps wnids as class_names and the words as the
    names reports use, which the converted backends read."""
    from data_prep.__main__ import main as data_prep
    from qpm_dist.data.wds_loader import WebDatasetSource

    out = tmp_path / "wds"
    assert data_prep(["to-wds", str(out), "--dataset", "imagenet", "--root", str(fake_imagenet), "--splits", "train",
                      "val", "--quiet", "--workers", "1"]) == 0
    manifest = json.loads((out / "dataset.json").read_text())
    assert sorted(manifest["splits"]) == ["test", "train"] and manifest["split_names"] == ["test", "train"]
    assert manifest["splits"]["test"]["num_samples"] == len(VAL)
    assert manifest["class_names"] == WNIDS and manifest["display_names"] == WORDS
    source = WebDatasetSource(DataConfig(dataset="imagenet", backend="wds", converted=str(out)), seed=0)
    assert source.display_names == WORDS and source.class_names == WNIDS
    assert data_prep(["verify", str(out), "--quiet", "--workers", "1"]) == 0, capsys.readouterr()


def test_converting_a_class_subset_with_val_classes_train_verifies(imagenet_copy, tmp_path, capsys):
    from data_prep.__main__ import main as data_prep

    for wnid in WNIDS[3:]:
        shutil.rmtree(imagenet_copy / "train" / wnid)
    out = tmp_path / "wds"
    args = ["to-wds", str(out), "--dataset", "imagenet", "--root", str(imagenet_copy), "--quiet", "--workers", "1"]
    assert data_prep(args) == 2 and "data.val_classes=train" in capsys.readouterr().err
    assert data_prep([*args, "--val-classes", "train", "--force"]) == 0
    assert json.loads((out / "dataset.json").read_text())["splits"]["test"]["num_samples"] == \
        sum(i.wnid in WNIDS[:3] for i in VAL)
    assert data_prep(["verify", str(out), "--quiet", "--workers", "1"]) == 0, capsys.readouterr()


def tiny_weights(path, classes):
    """A tiny_resnet backbone (BASE_CONFIG's) with a torchvision-style `fc` for `classes` classes."""
    from qpm_dist.models.net import build_model

    model = build_model(ModelConfig(arch="tiny_resnet", tiny_width=8), classes)
    state = {k.removeprefix("backbone."): v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    state["fc.weight"], state["fc.bias"] = model.head.linear.weight.detach(), model.head.linear.bias.detach()
    torch.save(state, path)
    return path


def test_dense_epochs_zero_refuses_weights_without_the_datasets_head(fake_imagenet, tmp_path):
    """A class subset with 1000-class weights: the fc cannot be used, so `dense.epochs=0` would evaluate (and
    fine-tune from) a random head at chance. One line, exit 2; with a matching head the stage runs."""
    weights = tiny_weights(tmp_path / "imagenet1k.pt", 1000)
    config = write_test_config(tmp_path / "c.yaml", fake_imagenet, tmp_path / "runs",
                               data={"dataset": "imagenet", "img_size": 32}, model={"weights": str(weights)},
                               dense={"epochs": 0})
    proc = run_qpm(1, "run", str(config), "--stage", "dense")
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "dense.epochs=0" in last and "fc.weight (1000, 32)" in last and "10 classes" in last, proc.stderr


def test_build_model_require_head(tmp_path):
    from qpm_dist.models.net import WeightsHeadMismatch, build_model

    weights = tiny_weights(tmp_path / "w.pt", 1000)
    cfg = ModelConfig(arch="tiny_resnet", tiny_width=8, weights=str(weights))
    build_model(cfg, 10)  # before training, the head may start random
    with pytest.raises(WeightsHeadMismatch, match="1000"):
        build_model(cfg, 10, require_head=True)
    model = build_model(dataclasses.replace(cfg, weights=str(tiny_weights(tmp_path / "w10.pt", 10))), 10,
                        require_head=True)
    assert torch.equal(model.head.linear.weight, torch.load(tmp_path / "w10.pt")["fc.weight"])


def test_report_names_classes_by_the_devkits_words(fake_imagenet, tmp_path):
    """A QPM run on the fake ImageNet (tiny backbone, in process, ~15 s): the report says "tench", not n01440764."""
    from helpers import run_in_process, stage_dir

    config = write_test_config(tmp_path / "c.yaml", fake_imagenet, tmp_path / "runs",
                               data={"dataset": "imagenet", "img_size": 32},
                               finetune={"epochs": 1, "batch_size": 16, "eval_batch_size": 32})
    run_in_process(config)
    html = (stage_dir(tmp_path / "runs", "qpm_report") / "report.html").read_text()
    assert "tench, Tinca tinca" in html and "goldfish, Carassius auratus" in html
    assert not any(wnid in html for wnid in WNIDS)
    # the val box XMLs reach the pointing metrics, for the dense and the QPM model
    metrics = json.loads((stage_dir(tmp_path / "runs", "qpm_evaluate") / "metrics.json").read_text())
    for model in ("dense", "qpm"):
        assert metrics[model]["pointing_images"] == len(VAL), metrics[model]
        assert metrics[model]["pointing_unannotated"] == 0 and metrics[model]["content_heatmap_images"] == len(VAL)
        for key in ("pointing_game", "stochastic_pointing", "stochastic_pointing_sampled", "content_heatmap"):
            assert 0 <= metrics[model][key] <= 1, (key, metrics[model])
    assert "Pointing game: Grad-CAM peak within 15 px" in html and "Content heatmap" in html


# --- object boxes in a metric: the pointing game -----------------------------------------------------------------

@pytest.mark.parametrize("augment, size", [("imagenet", (60, 40)), ("imagenet", (36, 70)), ("cub", (50, 41)),
                                           ("light", (60, 40))])
def test_test_point_to_source_inverts_the_test_transform(augment, size):
    """A bright spot of the original image is where the mapping puts the transformed image's brightest pixel."""
    from qpm_dist.data.transforms import test_point_to_source, test_transform

    cfg = DataConfig(dataset="imagenet", img_size=16, augment=augment)
    width, height = size
    for sx, sy in ((width // 2, height // 2), (width // 2 + 5, height // 2 - 4)):
        image = torch.zeros(3, height, width, dtype=torch.uint8)
        image[:, sy - 1:sy + 2, sx - 1:sx + 2] = 255
        out = test_transform(cfg)(image)[0]
        peak = int(out.argmax())
        x, y = test_point_to_source(cfg, width, height, peak % 16 + 0.5, peak // 16 + 0.5)
        assert abs(x - (sx + 0.5)) <= width / 16 and abs(y - (sy + 0.5)) <= height / 16, (x, y, sx, sy)


def test_val_object_boxes_are_each_object_of_the_xml_or_the_kaggle_csv(fake_imagenet, fake_imagenet_kaggle):
    """Split.object_boxes keeps every object's own box (Split.boxes keeps their union, for crop_to_box)."""
    official, kaggle = read(fake_imagenet).test_split, read(fake_imagenet_kaggle).test_split
    for split in (official, kaggle):
        assert len(split.object_boxes) == len(VAL)
        for (boxes, difficult), image in zip(split.object_boxes, VAL):
            expected = [(x0, y0, x1 - x0, y1 - y0) for x0, y0, x1, y1 in image.objects]
            np.testing.assert_array_equal(boxes, np.array(expected, dtype=np.float32))
            assert difficult.tolist() == [False] * len(expected)
    assert sum(len(boxes) == 2 for boxes, _ in kaggle.object_boxes) > 0  # several objects on one csv line


class UniformBackbone(torch.nn.Module):
    """One feature map of ones: every Grad-CAM is uniform, so CH is the mask's share of the image."""

    num_features = 1

    def forward(self, images):
        return torch.ones(images.shape[0], 1, images.shape[2] // 4, images.shape[3] // 4)


def uniform_pointing(data, resize=48):
    from qpm_dist import dist
    from qpm_dist.metrics.pointing import pointing_metrics
    from qpm_dist.models.net import Classifier, DenseHead

    head = DenseHead(1, data.num_classes)
    with torch.no_grad():
        head.linear.weight.fill_(1.0)
    return pointing_metrics(Classifier(UniformBackbone(), head), data, dist.init("cpu"), contextlib.nullcontext,
                            batch_size=1, resize=resize)


def filled_objects(image):
    """The reference's mask by hand (spec §7.1): rows ymin-1..ymax-1, cols xmin-1..xmax-1 of every object, a 0
    coordinate clamped to the first row/column instead of wrapping."""
    width, height = image.size
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in image.objects:
        mask[max(y0 - 1, 0):y1, max(x0 - 1, 0):x1] = True
    return mask


def test_pointing_masks_fill_each_object_and_clamp_zero_coordinates(fake_imagenet):
    """The fake val set has images with two objects whose bounding rectangle covers more than they do, and
    objects with a 0 coordinate. With a uniform map (whole image, eval.pointing_resize) CH is the filled union's
    share of the image and SPG the share within 15 px of it: both checked against a brute-force computation of the
    reference's rules (PG's peak is a tie here; hand-built maps test it in test_pointing.py)."""
    data = read(fake_imagenet)
    result = uniform_pointing(data)
    ch, spg = [], []
    for image in VAL:
        mask = filled_objects(image)
        rows, cols = np.nonzero(mask)
        grid_rows, grid_cols = np.indices(mask.shape).reshape(2, -1, 1)
        near = ((grid_rows - rows) ** 2 + (grid_cols - cols) ** 2 < 15 ** 2).any(axis=1)
        ch.append(mask.mean())
        spg.append(near.mean())
    assert result["content_heatmap"] == pytest.approx(np.mean(ch), rel=1e-6)
    assert result["stochastic_pointing"] == pytest.approx(np.mean(spg), rel=1e-6)
    zero = sum(x0 == 0 or y0 == 0 for image in VAL for x0, y0, _, _ in image.objects)
    assert (result["pointing_clamped_boxes"], result["pointing_images"], result["content_heatmap_images"]) == (
        zero, len(VAL), len(VAL)) and zero > 0
    # Split.boxes' union rectangle covers more than the two objects: its CH would differ
    rectangles = []
    for image in VAL:
        x, y, w, h = xywh_union(image.objects)
        corners = tuple(int(v) for v in (x, y, x + w, y + h))
        rectangles.append(filled_objects(dataclasses.replace(image, objects=[corners])).mean())
    assert np.mean(rectangles) - result["content_heatmap"] > 0.01


def test_difficult_images_are_skipped_by_pg_and_spg_not_by_ch(imagenet_copy):
    """Spec §7.2/§7.4: an image whose objects are all difficult is left out of PG and SPG (counted in
    pointing_skipped) and scored by CH; one difficult object of two does not skip the image."""
    xml_dir = imagenet_copy / "bbox" / "val"
    first, two = VAL[0], next(i for i in VAL if len(i.objects) == 2)
    for image, objects in ((first, 1), (two, 1)):
        xml = xml_dir / image.path.replace(".JPEG", ".xml")
        xml.write_text(xml.read_text().replace("<difficult>0</difficult>", "<difficult>1</difficult>", objects))
    data = read(imagenet_copy)
    flags = {path: difficult.tolist() for path, (_, difficult) in zip(data.test_split.paths,
                                                                     data.test_split.object_boxes)}
    assert flags[first.path] == [True] and flags[two.path] == [True, False]
    result = uniform_pointing(data)
    assert (result["pointing_skipped"], result["pointing_images"], result["content_heatmap_images"]) == (
        1, len(VAL) - 1, len(VAL))


def test_val_classes_enters_stage_keys_through_the_dataset_only():
    """data.val_classes changes the val file list (the dataset fingerprint); as a key of its own it would restart
    every existing run's stages after this option was added."""
    from qpm_dist.stages.train import data_key

    default, subset = load_config(None, []), load_config(None, ["data.val_classes=train"])
    assert "val_classes" not in data_key(default) and data_key(default) == data_key(subset)
