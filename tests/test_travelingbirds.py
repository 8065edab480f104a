"""TravelingBirds (images from its own tree, split/labels/boxes from the CUB root) and data.crop_root
(pre-cropped images instead of the originals), on the tiny synthetic dataset, which is in CUB's layout."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import data_prep, source_cfg, wds_samples
from qpm_dist.config import ConfigError, DataConfig, load_config
from qpm_dist.data.decode import read_image
from qpm_dist.data.sources import build_datasets, read_splits
from qpm_dist.data.transforms import squashes
from qpm_dist.errors import MissingInput


def images_txt_paths(cub):
    return [line.split()[1] for line in (cub / "images.txt").read_text().splitlines() if line.strip()]


def write_flipped(source, dest):
    """Another 'background' than the original: the image mirrored (keeps the size, as the generator does)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    Image.open(source).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(dest, quality=95)


@pytest.fixture(scope="module")
def birds(tiny_data, tmp_path_factory):
    """TravelingBirds/CUB_fixed/{train,test}/<CUB relative path> for every CUB image: train/ holds copies,
    test/ mirrored images, so a test can tell which folder a split read."""
    root = tmp_path_factory.mktemp("tb") / "TravelingBirds"
    for rel in images_txt_paths(tiny_data):
        (root / "CUB_fixed" / "train" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_data / "images" / rel, root / "CUB_fixed" / "train" / rel)
        write_flipped(tiny_data / "images" / rel, root / "CUB_fixed" / "test" / rel)
    return root


def birds_cfg(birds, cub, **kw):
    return DataConfig(**{**dict(dataset="travelingbirds", root=str(birds), cub_root=str(cub), img_size=32,
                                num_workers=0), **kw})


def test_split_labels_and_boxes_come_from_cub_and_images_from_each_splits_folder(birds, tiny_data):
    cub = read_splits(DataConfig(dataset="synthetic", root=str(tiny_data)))
    for root in (birds, birds / "CUB_fixed"):  # the download's folder or its CUB_fixed/ itself
        tb = read_splits(birds_cfg(root, tiny_data))
        assert tb.train_split.image_dir == birds / "CUB_fixed" / "train"
        assert tb.test_split.image_dir == birds / "CUB_fixed" / "test"
        for mine, theirs in ((tb.train_split, cub.train_split), (tb.test_split, cub.test_split)):
            assert mine.paths == theirs.paths
            np.testing.assert_array_equal(mine.labels, theirs.labels)
            np.testing.assert_array_equal(mine.boxes, theirs.boxes)
            np.testing.assert_array_equal(mine.image_ids, theirs.image_ids)
        assert tb.class_names == cub.class_names and tb.num_classes == cub.num_classes
        assert tb.fingerprint != cub.fingerprint  # never reuses results computed on CUB's own images
    path = tb.test_split.image_dir / tb.test_split.paths[0]
    flipped = read_image(tiny_data / "images" / tb.test_split.paths[0]).flip(-1)
    assert (read_image(path).float() - flipped.float()).abs().mean() < 8  # the test folder's (mirrored) image


def test_folder_backend_trains_on_one_batch_with_the_boxes(birds, tiny_data):
    data = build_datasets(birds_cfg(birds, tiny_data, crop_to_box=True, augment="cub"), seed=0)
    loader = data.train_loader(micro_batch=4, global_batch=4, rank=0, world_size=1)
    loader.set_epoch(0, 0)
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and torch.isfinite(images).all()
    assert set(labels.tolist()) <= set(range(data.num_classes))
    images, labels = next(iter(data.eval_loader("test", 8, 0, 1)))
    assert labels.tolist() == data.test_split.labels[:8].tolist()


@pytest.mark.parametrize("damage", ["missing", "extra"])
def test_a_missing_or_extra_image_is_named(birds, tiny_data, tmp_path, damage):
    root = shutil.copytree(birds, tmp_path / "TravelingBirds")
    rel = images_txt_paths(tiny_data)[-1]  # a test image: the train folder must still hold it
    if damage == "missing":
        (root / "CUB_fixed" / "train" / rel).unlink()
        error, pattern = MissingInput, r"1 TravelingBirds image\(s\) missing .*" + rel
    else:
        shutil.copy(root / "CUB_fixed" / "test" / rel, root / "CUB_fixed" / "test" / (rel + ".copy.jpg"))
        error, pattern = ValueError, r"not in CUB's images.txt .*" + rel + r"\.copy\.jpg"
    with pytest.raises(error, match=pattern):
        read_splits(birds_cfg(root, tiny_data))


def test_missing_cub_root_or_tree_is_refused_naming_the_key(birds, tiny_data, tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.cub_root: data\.dataset=travelingbirds needs"):
        load_config(None, ["data.dataset=travelingbirds", f"data.root={birds}"])
    with pytest.raises(MissingInput, match=r"^data\.cub_root: CUB-200-2011 folder not found"):
        read_splits(birds_cfg(birds, tmp_path / "nowhere"))
    with pytest.raises(MissingInput, match=r"^data\.root: .* holds neither train/ and test/ nor CUB_fixed/"):
        read_splits(birds_cfg(tiny_data, tiny_data))  # CUB's own folder given as the TravelingBirds root


def test_wds_conversion_reads_travelingbirds_and_needs_the_cub_root(birds, tiny_data, tmp_path, capfd):
    out = tmp_path / "wds"
    common = ("to-wds", out, "--dataset", "travelingbirds", "--root", birds, "--workers", "1", "--quiet")
    assert data_prep(*common) == 2
    assert "data.cub_root" in capfd.readouterr().err
    assert data_prep(*common, "--cub-root", tiny_data, "--crop-to-box") == 0
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["dataset"] == "travelingbirds" and manifest["cub_root"] == str(tiny_data.resolve())
    source = read_splits(birds_cfg(birds, tiny_data))
    for split, s in (("train", source.train_split), ("test", source.test_split)):
        stored = wds_samples(out, split)
        assert sorted(stored) == list(range(len(s)))
        assert all(stored[i][0] == s.labels[i] for i in stored)
    assert data_prep("verify", out, "--workers", "1", "--quiet") == 0
    wds = build_datasets(source_cfg("wds", out, birds, dataset="travelingbirds", cub_root=str(tiny_data),
                                    crop_to_box=True), seed=0)
    assert wds.num_classes == source.num_classes


# ---------------------------------------------------------------------------
# data.crop_root


@pytest.fixture(scope="module")
def cropped(tiny_data, tmp_path_factory):
    """<crop_root>/synthetic/{train,test}_cropped/<relative path>: each split's images cut to their boxes
    (the reference's PPCUB200/CUB_200_2011/{train,test}_cropped)."""
    crop_root = tmp_path_factory.mktemp("crops") / "PPsynthetic"
    data = read_splits(DataConfig(dataset="synthetic", root=str(tiny_data)))
    for folder, split in (("train_cropped", data.train_split), ("test_cropped", data.test_split)):
        for rel, (x, y, w, h) in zip(split.paths, split.boxes):
            dest = crop_root / tiny_data.name / folder / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            Image.open(split.image_dir / rel).crop((int(x), int(y), int(x + w), int(y + h))).save(dest, quality=95)
    return crop_root


def test_crop_root_replaces_the_images_of_each_split(cropped, tiny_data):
    cfg = DataConfig(dataset="synthetic", root=str(tiny_data), crop_root=str(cropped), img_size=32, num_workers=0)
    data = build_datasets(cfg, seed=0)  # data.root's digest list describes the originals: not applied
    assert data.train_split.image_dir == cropped / tiny_data.name / "train_cropped"
    assert data.test_split.image_dir == cropped / tiny_data.name / "test_cropped"
    original = read_splits(DataConfig(dataset="synthetic", root=str(tiny_data)))
    assert data.test_split.paths == original.test_split.paths and data.fingerprint != original.fingerprint
    x, y, w, h = original.test_split.boxes[0]
    assert tuple(data.dataset("test", augment=False).load(0).shape[1:]) == (int(y + h) - int(y), int(x + w) - int(x))
    assert squashes(DataConfig(dataset="cub", crop_root=str(cropped)))  # as the reference: squash crops
    images, _ = next(iter(data.eval_loader("train", 4, 0, 1)))
    assert images.shape == (4, 3, 32, 32)


def test_crop_root_for_travelingbirds_uses_its_variant_folder(birds, tiny_data, tmp_path):
    for split in ("train", "test"):  # PPTravelingBirds/CUB_fixed/{train,test}_cropped
        shutil.copytree(birds / "CUB_fixed" / split, tmp_path / "PP" / "CUB_fixed" / f"{split}_cropped")
    data = read_splits(birds_cfg(birds, tiny_data, crop_root=str(tmp_path / "PP")))
    assert data.train_split.image_dir == tmp_path / "PP" / "CUB_fixed" / "train_cropped"


def test_crop_root_is_checked(cropped, tiny_data, tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.crop_root and data\.crop_to_box: choose one"):
        load_config(None, [f"data.crop_root={cropped}", "data.crop_to_box=true"])
    with pytest.raises(ConfigError, match=r"^data\.crop_root: .* not for data\.dataset=imagenet"):
        load_config(None, [f"data.crop_root={cropped}", "data.dataset=imagenet"])
    with pytest.raises(MissingInput, match=r"^data\.crop_root: .* holds neither train_cropped/"):
        read_splits(DataConfig(dataset="synthetic", root=str(tiny_data), crop_root=str(tmp_path)))


def test_converted_crops_need_the_same_crop_root_setting(cropped, tiny_data, tmp_path):
    out = tmp_path / "wds"
    assert data_prep("to-wds", out, "--dataset", "synthetic", "--root", tiny_data, "--crop-root", cropped,
                     "--workers", "1", "--quiet") == 0
    with pytest.raises(ValueError, match=r"converted with crop_root=.*, but data\.crop_root=None"):
        build_datasets(source_cfg("wds", out, tiny_data), seed=0)
    data = build_datasets(source_cfg("wds", out, tiny_data, crop_root=str(cropped)), seed=0)
    assert data.num_samples("test") == len(read_splits(DataConfig(root=str(tiny_data))).test_split)


def test_structural_grounding_reads_cubs_attributes_from_the_cub_root(birds, tmp_path):
    from qpm_dist.metrics.collect import attributes_root, ground_truth_class_similarity

    cub = tmp_path / "CUB_200_2011"
    (cub / "attributes").mkdir(parents=True)
    np.savetxt(cub / "attributes" / "class_attribute_labels_continuous.txt", [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    root = attributes_root(DataConfig(dataset="travelingbirds", root=str(birds), cub_root=str(cub)))
    similarity = ground_truth_class_similarity(root, None)  # the TravelingBirds tree itself has no attributes
    assert similarity is not None and similarity.shape == (3, 3)
    assert attributes_root(DataConfig(dataset="cub", root=str(cub))) == cub


@pytest.mark.parametrize("method", ["qpm", "sldd", "qsenn"])
def test_shipped_configs_are_cubs_with_travelingbirds_data(method):
    from pathlib import Path

    from qpm_dist.config import to_dict

    configs = Path(__file__).resolve().parents[1] / "configs"
    weights = ["model.weights=/somewhere/resnet50.pth"]
    tb, cub = (to_dict(load_config(configs / f"{d}_{method}.yaml", weights)) for d in ("travelingbirds", "cub"))
    assert tb["data"]["dataset"] == "travelingbirds" and tb["data"]["cub_root"]
    assert tb["data"]["mean"] == [0.4584, 0.4369, 0.3957] and tb["data"]["std"] == [0.2610, 0.2569, 0.2722]
    for name in ("dataset", "root", "cub_root", "mean", "std"):
        tb["data"].pop(name), cub["data"].pop(name)
    tb["run"].pop("name"), cub["run"].pop("name")
    assert tb == cub  # the spec's hyperparameters: the CUB recipe


def test_fingerprint_records_the_travelingbirds_images_for_the_folder_backend(birds, tiny_data, tmp_path):
    root = shutil.copytree(birds, tmp_path / "TravelingBirds")
    assert data_prep("fingerprint", root, "--dataset", "travelingbirds", "--cub-root", tiny_data,
                     "--workers", "1", "--quiet") == 0
    keys = json.loads((root / "qpm_dist_digests.json").read_text())
    assert any(k.startswith("CUB_fixed/test/") for k in keys["files"])
    data = build_datasets(birds_cfg(root, tiny_data), seed=0)
    assert data.train_split.digests is not None and data.test_split.digests is not None
