"""Fault injection, data: a source JPEG, a .beton, a tar shard and the conversion manifest are damaged at several
offsets (tests/damage.py); each damage is detected with a message naming the file, or what the loaders read is
bitwise what they read without it. Also: missing images are found before training, a corrupt image stops a run
with exit code 2 and one line naming it, and `verify` reports a cut .beton instead of crashing.

Where the bytes of one image change and its file keeps its size and structure, only a per-image digest tells: a
source JPEG with a digest list (`data_prep fingerprint`, data.digests) is named when read; without one nothing can
tell (xfail, strict, so a change of behaviour is noticed). For converted data `verify` finds it (the sha256
dataset.json records); the wds loader's per-sample digests are tested in test_faults_digests.py."""

import importlib.util
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch

from damage import damaged_folder_copies, standard_damages, truncate
from data_helpers import convert, data_prep, source_cfg
from qpm_dist.data.datasets import ImageListDataset
from qpm_dist.data.decode import CorruptImageError, read_image
from qpm_dist.data.digests import DIGEST_LIST, image_digest, load_digest_list, split_digests, write_digest_list
from qpm_dist.data.integrity import DataIntegrityError, plain_message
from qpm_dist.data.sources import build_datasets

needs_ffcv = pytest.mark.skipif(importlib.util.find_spec("ffcv") is None, reason="FFCV is not installed")
PAYLOAD = "the bytes of one image change, its file keeps size and structure"


def damaged(src, name, tmp_path, damage):
    return next(damaged_folder_copies(src, name, tmp_path, [damage]))[1]


def verify_names(folder, name, capfd) -> bool:
    """`data_prep verify` exits 2 and names the damaged file."""
    capfd.readouterr()
    code = data_prep("verify", folder, "--workers", "1", "--quiet")
    out = capfd.readouterr()
    return code == 2 and name in out.out and "Traceback" not in out.err


# ------------------------------------------------------------------------------------------- .beton
@pytest.fixture(scope="module")
def ffcv_dir(tiny_data, tmp_path_factory):
    return convert("ffcv", tiny_data, tmp_path_factory.mktemp("faults") / "ffcv")


def beton_rows(path) -> list[tuple[bytes, bytes]]:
    """Per row: its metadata and the image bytes FFCV reads for it (where its allocation table points)."""
    from ffcv.reader import Reader

    reader, data = Reader(str(path)), np.fromfile(path, dtype=np.uint8)
    table = {int(p): int(s) for p, s in zip(reader.alloc_table["ptr"], reader.alloc_table["size"])}
    rows = []
    for meta in reader.metadata:
        ptr = int(meta["f0"]["data_ptr"])
        rows.append((meta.tobytes(), data[ptr:ptr + table[ptr]].tobytes()))
    return rows


@needs_ffcv
@pytest.mark.parametrize("damage", standard_damages(), ids=repr)
def test_damaged_beton_is_refused_at_open_or_reads_identically(ffcv_dir, tiny_data, tmp_path, damage, capfd):
    folder = damaged(ffcv_dir, "train.beton", tmp_path, damage)
    path = str(folder / "train.beton")
    try:
        build_datasets(source_cfg("ffcv", folder, tiny_data, augment="none"), seed=0)
    except DataIntegrityError as exc:
        assert path in str(exc) and "data_prep verify" in str(exc)
        return
    assert not damage.name.startswith("truncate"), "a cut .beton must be refused at open"
    if beton_rows(path) != beton_rows(ffcv_dir / "train.beton"):  # a changed image byte: verify's digest
        assert verify_names(folder, path, capfd), f"{damage}: loaded data differs and verify does not say so"


# ------------------------------------------------------------------------------------------- tar shards
@pytest.fixture(scope="module")
def wds_dir(tiny_data, tmp_path_factory):
    return convert("wds", tiny_data, tmp_path_factory.mktemp("faults") / "wds", "--samples-per-shard", "24")


def shard_samples(src) -> list[tuple]:
    """Every sample of the training split as the loader reads it (key and raw member bytes)."""
    from qpm_dist.data.wds_loader import read_pieces

    urls, counts = src.shards("train")
    return [tuple(sorted((k, v) for k, v in s.items() if not k.startswith("__url")))
            for s in read_pieces([(u, 0, c) for u, c in zip(urls, counts)])]


@pytest.mark.parametrize("damage", standard_damages(), ids=repr)
def test_damaged_shard_is_refused_or_reads_identically(wds_dir, tiny_data, tmp_path, damage, capfd):
    name = "train-000001.tar"
    folder = damaged(wds_dir, name, tmp_path, damage)
    path = str(folder / name)
    reference = shard_samples(build_datasets(source_cfg("wds", wds_dir, tiny_data), seed=0))
    try:
        samples = shard_samples(build_datasets(source_cfg("wds", folder, tiny_data), seed=0))
    except DataIntegrityError as exc:  # at open (size) or while reading (tar error, too few samples)
        assert path in str(exc) and "data_prep verify" in str(exc)
        return
    if samples != reference:
        assert verify_names(folder, name, capfd), f"{damage}: loaded samples differ and verify does not say so"


@pytest.mark.parametrize("cut", ["mid-member", "member boundary"])
def test_cut_shard_without_recorded_size_fails_reading_naming_it(wds_dir, tiny_data, tmp_path, cut):
    """Manifests written before sizes were checked (or a shard replaced by one of the same size): the tar error
    or the count mismatch met while reading names the shard and the fix, instead of a raw tarfile.ReadError."""
    name = "train-000001.tar"
    with tarfile.open(wds_dir / name) as tar:
        member = tar.getmembers()[21]
    keep = member.offset + 700 if cut == "mid-member" else member.offset
    folder = damaged(wds_dir, name, tmp_path, truncate(keep))
    manifest = json.loads((folder / "dataset.json").read_text())
    for shard in manifest["splits"]["train"]["shards"]:
        del shard["bytes"]
    (folder / "dataset.json").unlink()  # a hard link to the original: replace, do not write through it
    (folder / "dataset.json").write_text(json.dumps(manifest))
    src = build_datasets(source_cfg("wds", folder, tiny_data), seed=0)
    with pytest.raises(DataIntegrityError, match=rf"{folder / name}: .*data_prep verify"):
        shard_samples(src)
    if cut == "mid-member":  # resampled mode reads whole shards through webdataset's own pipeline
        resampled = build_datasets(source_cfg("wds", folder, tiny_data, wds_mode="resampled"), seed=0)
        with pytest.raises(DataIntegrityError, match=rf"{folder / name}: cannot read the tar .*data_prep verify"):
            for epoch in range(4):  # shards are drawn at random: within a few epochs the cut one is read
                epoch_batches(resampled, epoch)


def epoch_batches(src, epoch):
    loader = src.train_loader(8, 16, 0, 1)
    loader.set_epoch(epoch)
    return list(loader)


# ------------------------------------------------------------------------------------------- manifest
@pytest.mark.parametrize("damage", standard_damages(), ids=repr)
def test_damaged_manifest_is_refused_naming_it_or_reads_identically(wds_dir, tiny_data, tmp_path, damage):
    folder = damaged(wds_dir, "dataset.json", tmp_path, damage)
    try:
        src = build_datasets(source_cfg("wds", folder, tiny_data), seed=0)
    except ValueError as exc:
        assert str(folder / "dataset.json") in str(exc)
        return
    reference = build_datasets(source_cfg("wds", wds_dir, tiny_data), seed=0)
    assert src.manifest == reference.manifest  # e.g. only the final newline was cut


# ------------------------------------------------------------------------------------------- source JPEG
JPEG_DAMAGES = [pytest.param(d, True, id=f"{d}-digests") for d in standard_damages()] + [
    pytest.param(d, False, id=repr(d), marks=[pytest.mark.xfail(strict=True, reason=f"{PAYLOAD}: not detectable")]
                 if d.name.startswith(("flip_byte(f)", "zero_block")) else [])
    for d in standard_damages()]


@pytest.mark.parametrize("damage,with_digests", JPEG_DAMAGES)
def test_damaged_jpeg_stops_or_warns_naming_it_or_decodes_identically(tiny_data, tmp_path, damage, with_digests):
    name = "synth_1_0001.jpg"
    original = tiny_data / "images" / "001.synth_class_001" / name
    shutil.copyfile(original, tmp_path / name)
    digests = lenient_digests = None
    if with_digests:  # as `data_prep fingerprint` writes it before the damage
        write_digest_list(tmp_path / DIGEST_LIST, {name: image_digest(original.read_bytes())})
        files = load_digest_list(tmp_path / DIGEST_LIST, tmp_path)
        digests = split_digests(tmp_path / DIGEST_LIST, files, tmp_path, [name], tmp_path, "folder")
        lenient_digests = split_digests(tmp_path / DIGEST_LIST, files, tmp_path, [name, name], tmp_path, "folder")
    damage.apply(tmp_path / name)
    strict = ImageListDataset(tmp_path, [name], np.zeros(1), lambda x: x, on_corrupt="error", digests=digests)
    try:
        image = strict[0][0]
    except CorruptImageError as exc:
        assert str(tmp_path / name) in str(exc)
        lenient = ImageListDataset(tmp_path, [name, name], np.zeros(2), lambda x: x, on_corrupt="skip",
                                   digests=lenient_digests)
        with pytest.warns(RuntimeWarning, match=str(tmp_path / name)), pytest.raises(CorruptImageError):
            lenient[0]  # nothing readable is left to take its place
        return
    assert not with_digests, f"{damage}: the bytes changed, but the digest check did not say so"
    expected = read_image(original)
    assert image.shape == expected.shape and torch.equal(image, expected), f"{damage}: decodes to other pixels"


# ------------------------------------------------------------------------------------------- runs
def test_missing_images_are_found_before_training(tiny_data, tmp_path, write_config, capfd):
    from qpm_dist.cli import main

    root = shutil.copytree(tiny_data, tmp_path / "data")
    gone = [root / "images" / "001.synth_class_001" / n for n in ("synth_1_0001.jpg", "synth_1_0033.jpg")]
    for path in gone:  # one train and one test image
        path.unlink()
    config = write_config()
    capfd.readouterr()
    assert main(["run", str(config), f"data.root={root}", "--stage", "dense"]) == 2
    err = capfd.readouterr().err
    assert "2 image file(s)" in err and all(str(p) in err for p in gone) and "Traceback" not in err
    assert not list((tmp_path / "runs-config").glob("*/dense-*/metrics.jsonl")), "training started"


def test_missing_file_check_shards_folders_over_ranks(tiny_data, tmp_path):
    from qpm_dist.config import DataConfig
    from qpm_dist.data.sources import missing_files, read_splits

    root = shutil.copytree(tiny_data, tmp_path / "data")
    for c in (1, 2):  # train images in folders 0 and 1 of the sorted list: one per rank of 2
        next((root / "images").glob(f"00{c}.*/synth_{c}_0001.jpg")).unlink()
    split = read_splits(DataConfig(root=str(root))).train_split
    shares = [missing_files(split, r, 2) for r in range(2)]
    assert all(len(s) == 1 for s in shares) and missing_files(split, 0, 1) == sorted(shares[0] + shares[1])


@pytest.mark.parametrize("digests", ["off", "auto"])
def test_corrupt_image_stops_the_run_with_exit_2_naming_it(tiny_data, tmp_path, write_config, capfd, digests):
    """Without a digest list the decoder finds the garbage; with the generator's list the digest check does."""
    from qpm_dist.cli import main

    root = shutil.copytree(tiny_data, tmp_path / "data")
    bad = root / "images" / "002.synth_class_002" / "synth_2_0005.jpg"
    bad.write_bytes(b"garbage")
    capfd.readouterr()
    code = main(["run", str(write_config()), f"data.root={root}", "data.num_workers=1", f"data.digests={digests}",
                 "--stage", "dense"])
    err = capfd.readouterr().err
    assert code == 2, err[-2000:]
    expected = f"cannot decode image {bad}:" if digests == "off" else f"image {bad} is damaged: its bytes"
    assert f"qpm-dist: error: {expected}" in err and "Traceback" not in err
    assert list((tmp_path / "runs-config").glob("*/dense-*")), "met at open, not while training"


def test_plain_message_unwraps_a_dataloader_worker_error():
    from torch._utils import ExceptionWrapper

    try:
        raise CorruptImageError("cannot decode image /data/x.jpg: bad")
    except CorruptImageError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(CorruptImageError) as caught:
        wrapped.reraise()
    assert plain_message(caught.value) == "cannot decode image /data/x.jpg: bad"


@needs_ffcv
def test_verify_reports_a_cut_beton_in_one_line(ffcv_dir, tmp_path, capfd):
    folder = damaged(ffcv_dir, "train.beton", tmp_path, truncate(lambda size: size // 2))
    capfd.readouterr()
    assert data_prep("verify", folder, "--workers", "1", "--quiet") == 2
    out = capfd.readouterr()
    assert f"{folder / 'train.beton'}: 8390144 bytes" in out.out and "Traceback" not in out.err
