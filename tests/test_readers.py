"""Dataset readers: ImageNet (class-folder and flat devkit-labelled val), Stanford Cars (.mat), class folders,
and the decoder's handling of missing and corrupt files."""

import io
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from qpm_dist.config import DataConfig
from qpm_dist.data.datasets import ImageListDataset
from qpm_dist.data.sources import read_splits
from qpm_dist.data.decode import CorruptImageError, decode, read_image


def write_jpeg(path, seed=0, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


WNIDS = ["n01440764", "n01443537", "n01484850"]


def devkit_bytes(val_ids):
    """meta.mat (3 leaf synsets + 1 inner node, ids deliberately not in wnid order) and the ground truth."""
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    synsets = np.zeros((4, 1), dtype=dtype)
    for row, (ilsvrc_id, wnid, children) in enumerate([(2, WNIDS[0], 0), (1, WNIDS[1], 0), (3, WNIDS[2], 0),
                                                       (1001, "n00000001", 3)]):
        synsets[row, 0] = (ilsvrc_id, wnid, f"words of {wnid}", children)
    buf = io.BytesIO()
    savemat(buf, {"synsets": synsets})
    return buf.getvalue(), "".join(f"{i}\n" for i in val_ids).encode()


def make_imagenet(root, flat_val=True, devkit="dir"):
    for c, wnid in enumerate(WNIDS):
        for j in range(2):
            write_jpeg(root / "train" / wnid / f"{wnid}_{j}.JPEG", seed=10 * c + j)
    val_ids = [1, 3, 2, 2]  # ILSVRC ids of val images 1..4 -> wnids 1, 2, 0, 0
    if not flat_val:
        for n, i in enumerate(val_ids, start=1):
            wnid = {2: WNIDS[0], 1: WNIDS[1], 3: WNIDS[2]}[i]
            write_jpeg(root / "val" / wnid / f"ILSVRC2012_val_{n:08d}.JPEG", seed=100 + n)
        return root
    for n in range(1, len(val_ids) + 1):
        write_jpeg(root / "val" / f"ILSVRC2012_val_{n:08d}.JPEG", seed=100 + n)
    meta, truth = devkit_bytes(val_ids)
    if devkit == "dir":
        data = root / "ILSVRC2012_devkit_t12" / "data"
        data.mkdir(parents=True)
        (data / "meta.mat").write_bytes(meta)
        (data / "ILSVRC2012_validation_ground_truth.txt").write_bytes(truth)
    elif devkit == "tar":
        with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
            for name, blob in (("meta.mat", meta), ("ILSVRC2012_validation_ground_truth.txt", truth)):
                info = tarfile.TarInfo(f"ILSVRC2012_devkit_t12/data/{name}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    return root


@pytest.mark.parametrize("devkit", ["dir", "tar"])
def test_imagenet_flat_val_is_labelled_by_the_devkit(tmp_path, devkit):
    data = read_splits(DataConfig(dataset="imagenet", root=str(make_imagenet(tmp_path, devkit=devkit))))
    assert data.class_names == WNIDS
    assert data.train_split.paths[0] == f"{WNIDS[0]}/{WNIDS[0]}_0.JPEG"
    assert data.train_split.labels.tolist() == [0, 0, 1, 1, 2, 2]
    # ILSVRC ids 1, 3, 2, 2 name wnids 1, 2, 0, 0 in meta.mat (not in sorted order)
    assert data.test_split.paths == [f"ILSVRC2012_val_{n:08d}.JPEG" for n in range(1, 5)]
    assert data.test_split.labels.tolist() == [1, 2, 0, 0]


def test_imagenet_val_class_folders_give_the_same_labels(tmp_path):
    data = read_splits(DataConfig(dataset="imagenet", root=str(make_imagenet(tmp_path, flat_val=False))))
    labels = dict(zip((p.split("/")[1] for p in data.test_split.paths), data.test_split.labels.tolist()))
    assert labels == {f"ILSVRC2012_val_{n:08d}.JPEG": y for n, y in zip(range(1, 5), [1, 2, 0, 0])}


def test_imagenet_errors_name_what_is_missing(tmp_path):
    root = make_imagenet(tmp_path, devkit="none")
    with pytest.raises(FileNotFoundError, match="ILSVRC2012_devkit_t12"):
        read_splits(DataConfig(dataset="imagenet", root=str(root)))
    write_jpeg(root / "val" / "stray.JPEG")
    (root / "ILSVRC2012_devkit_t12" / "data").mkdir(parents=True)
    meta, truth = devkit_bytes([1, 3, 2, 2])
    (root / "ILSVRC2012_devkit_t12" / "data" / "meta.mat").write_bytes(meta)
    (root / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt").write_bytes(truth)
    with pytest.raises(ValueError, match="stray.JPEG"):
        read_splits(DataConfig(dataset="imagenet", root=str(root)))


def make_cars(root, n_train=3, n_test=2):
    dtype = [(f, "O") for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    (root / "devkit").mkdir(parents=True)
    savemat(root / "devkit" / "cars_meta.mat",
            {"class_names": np.array([["Audi A4 2012", "BMW M3 2010", "Fiat 500 2012"]], dtype=object)})
    for name, folder, n in (("devkit/cars_train_annos.mat", "cars_train", n_train),
                            ("cars_test_annos_withlabels.mat", "cars_test", n_test)):
        annos = np.zeros((1, n), dtype=dtype)
        for i in range(n):
            annos[0, i] = (2, 3, 12, 9, i % 3 + 1, f"{i + 1:05d}.jpg")
            write_jpeg(root / folder / f"{i + 1:05d}.jpg", seed=i)
        savemat(root / name, {"annotations": annos})
    return root


def test_stanford_cars_reads_devkit_annotations(tmp_path):
    make_cars(tmp_path / "stanford_cars")
    data = read_splits(DataConfig(dataset="cars", root=str(tmp_path)))  # the parent folder is accepted
    assert data.class_names == ["Audi A4 2012", "BMW M3 2010", "Fiat 500 2012"]
    assert data.train_split.paths == ["00001.jpg", "00002.jpg", "00003.jpg"]
    assert data.train_split.labels.tolist() == [0, 1, 2]
    assert data.test_split.labels.tolist() == [0, 1]
    assert data.train_split.boxes[0].tolist() == [2, 3, 10, 6]  # x1, y1, x2 - x1, y2 - y1
    # crop_to_box cuts the annotated box out of the image
    cfg = DataConfig(dataset="cars", root=str(tmp_path), crop_to_box=True)
    image = read_splits(cfg).dataset("train", augment=False).load(0)
    assert image.shape == (3, 6, 10)


def test_stanford_cars_missing_image_is_named(tmp_path):
    root = make_cars(tmp_path)
    (root / "cars_test" / "00002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="cars_test/00002.jpg"):
        read_splits(DataConfig(dataset="cars", root=str(root)))


def test_class_folder_tree(tmp_path):
    for split, n in (("train", 3), ("val", 1)):
        for c in ("cat", "dog"):
            for j in range(n):
                write_jpeg(tmp_path / split / c / f"{j}.jpg", seed=j)
    data = read_splits(DataConfig(dataset="folder", root=str(tmp_path)))
    assert data.class_names == ["cat", "dog"]
    assert data.train_split.labels.tolist() == [0, 0, 0, 1, 1, 1] and len(data.test_split) == 2


# ------------------------------------------------------------------------------- decoding, corrupt files
def test_decoders_agree_and_errors_name_the_file(tmp_path):
    path = write_jpeg(tmp_path / "a.jpg", size=(33, 17))
    tv, pil = read_image(path, "torchvision"), read_image(path, "pil")
    assert tv.shape == pil.shape == (3, 17, 33) and tv.dtype == pil.dtype == torch.uint8
    assert (tv.int() - pil.int()).abs().max() <= 2  # both libjpeg-turbo; upsampling details may differ
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        read_image(tmp_path / "missing.jpg")
    data = path.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    for decoder in ("torchvision", "pil"):
        with pytest.raises(CorruptImageError, match="cut.jpg"):
            read_image(tmp_path / "cut.jpg", decoder)
    # a PNG named .jpg: torchvision decodes it by content
    Image.fromarray(np.zeros((5, 6, 3), np.uint8)).save(tmp_path / "png.jpg", format="PNG")
    assert read_image(tmp_path / "png.jpg").shape == (3, 5, 6)
    with pytest.raises(CorruptImageError, match="shard-7.tar:key"):
        decode(b"\xff\xd8\xff" + b"x" * 10, "shard-7.tar:key")


def test_corrupt_image_stops_or_is_skipped_with_a_warning(tmp_path):
    for i in range(3):
        write_jpeg(tmp_path / f"{i}.jpg", seed=i)
    (tmp_path / "1.jpg").write_bytes(b"not an image at all")
    labels = np.array([5, 6, 7])
    strict = ImageListDataset(tmp_path, ["0.jpg", "1.jpg", "2.jpg"], labels, lambda x: x)
    assert strict[0][1] == 5
    with pytest.raises(CorruptImageError, match="1.jpg"):
        strict[1]
    lenient = ImageListDataset(tmp_path, ["0.jpg", "1.jpg", "2.jpg"], labels, lambda x: x, on_corrupt="skip")
    with pytest.warns(RuntimeWarning, match="1.jpg"):
        image, label = lenient[1]
    assert label == 7 and torch.equal(image, read_image(tmp_path / "2.jpg"))  # the next readable sample
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert lenient[2][1] == 7  # readable samples do not warn
