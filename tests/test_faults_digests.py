"""Fault injection, per-image digests (qpm_dist.data.digests): a byte changed inside one image, the file keeping its
size and structure, is named when the image is read, before decoding: in a tar shard (the `.sha` member to-wds
writes per sample) and in a source image folder with a digest list (`data_prep fingerprint`, make-synthetic).
`data.on_corrupt=skip` warns naming it and uses a readable sample. Data without digests still loads (unchecked);
a damaged or stale digest list is refused naming it, or reads identically."""

import json
import shutil
import tarfile
import warnings

import numpy as np
import pytest
import torch

from damage import damaged_folder_copies, damaged_tree_copies, flip_bit, flip_byte, standard_damages, zero_block
from data_helpers import convert, data_prep, source_cfg
from qpm_dist.data.decode import CorruptImageError
from qpm_dist.data.digests import DIGEST_LIST, load_digest_list
from qpm_dist.data.integrity import DataIntegrityError
from qpm_dist.utils import file_sha256
from qpm_dist.data.sources import build_datasets


def inside(offset: int, size: int) -> list:
    """Damages of the bytes [offset, offset + size) of a file (one image's data) that keep the file's size."""
    return [flip_byte(offset + 16), flip_byte(offset + size // 2), flip_byte(offset + size - 1),
            zero_block(offset + size // 2, min(64, size - size // 2))]


def eval_images(src, split="train"):
    """Every image of a split as the loader yields it, with its sample index (test transform, one process)."""
    out = {}
    for images, _, indices in src.eval_loader(split, 32, 0, 1, return_index=True):
        out.update({int(i): image for i, image in zip(indices, images)})
    return out


# ------------------------------------------------------------------------------------------- tar shards
SHARD = "train-000001.tar"


@pytest.fixture(scope="module")
def wds_dir(tiny_data, tmp_path_factory):
    return convert("wds", tiny_data, tmp_path_factory.mktemp("digests") / "wds", "--samples-per-shard", "24")


@pytest.fixture(scope="module")
def wds_reference(wds_dir, tiny_data):
    return eval_images(build_datasets(source_cfg("wds", wds_dir, tiny_data, augment="none"), seed=0))


def member(shard, suffix: str, number: int = 5) -> tarfile.TarInfo:
    with tarfile.open(shard) as tar:
        return [m for m in tar.getmembers() if m.name.endswith(suffix)][number]


def wds_damages(wds_dir) -> list:
    image, digest = member(wds_dir / SHARD, ".jpg"), member(wds_dir / SHARD, ".sha")
    return inside(image.offset_data, image.size) + [flip_byte(digest.offset_data + 3)]


@pytest.mark.parametrize("which", range(5), ids=["jpg+16", "jpg/2", "jpg-1", "jpg-zero_block", "sha+3"])
def test_changed_byte_inside_a_shard_sample_is_named_or_skipped(wds_dir, wds_reference, tiny_data, tmp_path, which):
    damage = wds_damages(wds_dir)[which]
    folder = next(damaged_folder_copies(wds_dir, SHARD, tmp_path, [damage]))[1]
    key = member(wds_dir / SHARD, ".jpg").name.split(".")[0]
    where = f"{folder / SHARD}:{key}"
    assert (folder / SHARD).stat().st_size == (wds_dir / SHARD).stat().st_size  # passes the open-time check
    strict = build_datasets(source_cfg("wds", folder, tiny_data, augment="none"), seed=0)
    with pytest.raises(CorruptImageError, match=rf"{where} is damaged: .*data_prep verify"):
        eval_images(strict)
    lenient = build_datasets(source_cfg("wds", folder, tiny_data, augment="none", on_corrupt="skip"), seed=0)
    with pytest.warns(RuntimeWarning, match=rf"{where} is damaged"):
        images = eval_images(lenient)
    assert int(key) not in images and all(torch.equal(images[i], wds_reference[i]) for i in images)


def test_sample_without_its_digest_is_named_when_the_manifest_promises_one(wds_dir, tiny_data, tmp_path):
    """In every reading path: evaluation, exact and resampled training."""
    folder = strip_digests(wds_dir, tmp_path / "wds", keep_manifest_option=True)
    missing = rf"{folder}/(train|test)-\d+\.tar:\d+ has no .sha digest member"
    with pytest.raises(CorruptImageError, match=missing):
        eval_images(build_datasets(source_cfg("wds", folder, tiny_data, augment="none"), seed=0))
    for mode in ("exact", "resampled"):
        loader = build_datasets(source_cfg("wds", folder, tiny_data, wds_mode=mode), seed=0).train_loader(8, 16, 0, 1)
        loader.set_epoch(0)
        with pytest.raises(CorruptImageError, match=missing):
            next(iter(loader))


def test_shards_converted_without_digests_still_load(wds_dir, wds_reference, tiny_data, tmp_path):
    folder = strip_digests(wds_dir, tmp_path / "wds", keep_manifest_option=False)
    images = eval_images(build_datasets(source_cfg("wds", folder, tiny_data, augment="none"), seed=0))
    assert images.keys() == wds_reference.keys() and all(torch.equal(images[i], wds_reference[i]) for i in images)


def strip_digests(src, dst, keep_manifest_option: bool):
    """A copy of a to-wds folder as converted before digests: no `.sha` members, sizes and sha256 updated in
    dataset.json; `options.sample_digest` kept or removed."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "dataset.json").read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            path = dst / shard["file"]
            with tarfile.open(src / shard["file"]) as old, tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as new:
                for m in old.getmembers():
                    if not m.name.endswith(".sha"):
                        new.addfile(m, old.extractfile(m))
            shard["bytes"], shard["sha256"] = path.stat().st_size, file_sha256(path)
    if not keep_manifest_option:
        del manifest["options"]["sample_digest"]
    (dst / "dataset.json").write_text(json.dumps(manifest))
    return dst


# ------------------------------------------------------------------------------------------- source folders
IMAGE = "images/002.synth_class_002/synth_2_0003.jpg"


@pytest.fixture(scope="module")
def source_copy(tiny_data, tmp_path_factory):
    """A copy of the tiny dataset (with the generator's digest list); tests restore what they change."""
    return shutil.copytree(tiny_data, tmp_path_factory.mktemp("digests") / "synthetic")


def folder_images(root, **kw):
    src = build_datasets(source_cfg("folder", None, root, augment="none", **kw), seed=0)
    dataset = src.dataset("train", augment=False)
    return {i: dataset[i][0] for i in range(len(dataset))}, src.train_split.paths


@pytest.fixture(scope="module")
def folder_reference(source_copy):
    return folder_images(source_copy)[0]


@pytest.fixture
def damaged_image(source_copy):
    """Yields a function that damages IMAGE in place; the original is restored afterwards."""
    original = (source_copy / IMAGE).read_bytes()
    yield lambda damage: damage.apply(source_copy / IMAGE)
    (source_copy / IMAGE).write_bytes(original)


@pytest.mark.parametrize("which", range(4), ids=["+16", "/2", "-1", "zero_block"])
def test_changed_byte_inside_a_source_image_is_named_or_skipped(source_copy, folder_reference, damaged_image, which):
    size = (source_copy / IMAGE).stat().st_size
    damaged_image(inside(0, size)[which])
    path = source_copy / IMAGE
    with pytest.raises(CorruptImageError, match=rf"{path} is damaged: .*{DIGEST_LIST} again .*data_prep fingerprint"):
        folder_images(source_copy)
    with pytest.warns(RuntimeWarning, match=rf"{path} is damaged"):
        images, paths = folder_images(source_copy, on_corrupt="skip")
    bad = paths.index(IMAGE.split("/", 1)[1])
    assert all(torch.equal(images[i], folder_reference[i]) for i in images if i != bad)
    assert torch.equal(images[bad], folder_reference[bad + 1])  # the next readable sample


def test_without_a_digest_list_the_folder_still_loads_unchecked(source_copy, folder_reference, damaged_image,
                                                                 tmp_path):
    damaged_image(flip_byte(lambda size: size // 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        images, _ = folder_images(source_copy, digests="off")  # what a folder without a list gets, too
    assert images.keys() == folder_reference.keys()
    plain = shutil.copytree(source_copy, tmp_path / "plain", ignore=shutil.ignore_patterns(DIGEST_LIST))
    images, _ = folder_images(plain)  # data.digests=auto, no list: no check
    assert images.keys() == folder_reference.keys()


def test_fingerprint_writes_the_list_the_dataset_checks(source_copy, tiny_data, tmp_path, damaged_image, capfd):
    out = tmp_path / "digests.json"
    assert data_prep("fingerprint", source_copy, "--dataset", "synthetic", "--output", out, "--workers", "1",
                     "--quiet") == 0
    root = source_copy
    assert load_digest_list(out, root) == load_digest_list(tiny_data / DIGEST_LIST, tiny_data)  # = the generator's
    damaged_image(flip_byte(lambda size: size // 2))
    with pytest.raises(CorruptImageError, match=rf"{root / IMAGE} is damaged: .*{out} again"):
        folder_images(root, digests=str(out))
    capfd.readouterr()
    (root / IMAGE).rename(root / "moved.jpg")
    try:  # a missing image: exit 2, one line naming it, nothing written
        assert data_prep("fingerprint", root, "--dataset", "synthetic", "--output", tmp_path / "x.json",
                         "--workers", "1", "--quiet") == 2
    finally:
        (root / "moved.jpg").rename(root / IMAGE)
    err = capfd.readouterr().err
    assert err.startswith("fingerprint: error:") and IMAGE.split("/")[-1] in err and "Traceback" not in err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("damage", standard_damages(), ids=repr)
def test_damaged_digest_list_is_refused_naming_it_or_reads_identically(tiny_data, tmp_path, damage):
    folder = next(damaged_tree_copies(tiny_data, DIGEST_LIST, tmp_path, [damage]))[1]
    try:
        src = build_datasets(source_cfg("folder", None, folder), seed=0)
    except DataIntegrityError as exc:
        assert str(folder / DIGEST_LIST) in str(exc) and "data_prep fingerprint" in str(exc)
        return
    reference = build_datasets(source_cfg("folder", None, tiny_data), seed=0)
    for split in ("train_split", "test_split"):  # e.g. only the final newline was cut
        assert np.array_equal(getattr(src, split).digests.values, getattr(reference, split).digests.values)


@pytest.mark.parametrize("where", ["digest", "path"])
def test_digest_list_with_one_bit_changed_in_an_entry_is_refused_naming_it(tiny_data, tmp_path, where):
    """The list still parses as JSON: its checksum finds the change, instead of blaming an intact image."""
    text = (tiny_data / DIGEST_LIST).read_text()
    entry = json.loads(text)["files"][IMAGE] if where == "digest" else IMAGE
    at = text.index(f'"{entry}"') + 1 + len(entry) - 2  # a hex digit / the 'p' of '.jpg': stays valid JSON
    folder = next(damaged_tree_copies(tiny_data, DIGEST_LIST, tmp_path, [flip_bit(at)]))[1]
    json.loads((folder / DIGEST_LIST).read_text())
    with pytest.raises(DataIntegrityError, match=rf"{folder / DIGEST_LIST}: its entries do not match its checksum"):
        build_datasets(source_cfg("folder", None, folder), seed=0)


def test_stale_or_missing_digest_list_is_refused_naming_it(tiny_data, tmp_path):
    stale = tmp_path / "stale.json"
    content = json.loads((tiny_data / DIGEST_LIST).read_text())
    from qpm_dist.data.digests import write_digest_list

    write_digest_list(stale, {k: v for k, v in content["files"].items() if k != IMAGE})
    with pytest.raises(DataIntegrityError, match=rf"{stale} has no digest for 1 image file\(s\) .*\({IMAGE}\)"):
        build_datasets(source_cfg("folder", None, tiny_data, digests=str(stale)), seed=0)
    with pytest.raises(FileNotFoundError, match=rf"data.digests: digest list not found: {tmp_path / 'none.json'}"):
        build_datasets(source_cfg("folder", None, tiny_data, digests=str(tmp_path / "none.json")), seed=0)


def test_digests_off_in_yaml_means_off(tmp_path):
    from qpm_dist.config import load_config

    for value, expected in (("off", False), ("auto", "auto"), ("/x/list.json", "/x/list.json")):
        assert load_config(overrides=[f"data.digests={value}"]).data.digests == expected
    with pytest.raises(Exception, match="data.digests"):
        load_config(overrides=["data.digests="])
