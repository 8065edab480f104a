"""Converters `to-wds` / `to-ffcv` and `verify`: round trips keep every sample and label, conversions resume
without rewriting finished shards, corrupt images stop the conversion or are left out (never silently)."""

import importlib.util
import json
import os

import numpy as np
import pytest

from data_helpers import convert, copy_dataset, data_prep, wds_samples
from qpm_dist.config import DataConfig
from qpm_dist.data.sources import read_splits


def source_labels(root):
    data = read_splits(DataConfig(dataset="synthetic", root=str(root)))
    return {"train": data.train_split.labels, "test": data.test_split.labels}


def test_wds_round_trip_keeps_every_sample_and_label(tiny_data, tmp_path, capfd):
    out = convert("wds", tiny_data, tmp_path / "wds", "--samples-per-shard", "24")
    manifest = json.loads((out / "dataset.json").read_text())
    labels = source_labels(tiny_data)
    for split in ("train", "test"):
        stored = wds_samples(out, split)
        assert sorted(stored) == list(range(len(labels[split])))  # every sample exactly once
        assert all(stored[i][0] == labels[split][i] for i in stored)
        shards = manifest["splits"][split]["shards"]
        assert manifest["splits"][split]["num_samples"] == len(labels[split])
        per_shard = {s["file"]: s["count"] for s in shards}
        assert per_shard == {f: sum(1 for _, g in stored.values() if g == f) for f in per_shard}
    assert [s["count"] for s in manifest["splits"]["train"]["shards"]] == [24] * 5 + [8]
    first = [i for i, (_, f) in sorted(wds_samples(out, "train").items()) if f == "train-000000.tar"]
    assert first != list(range(24))  # shuffled before sharding
    source = read_splits(DataConfig(root=str(tiny_data)))
    assert manifest["class_names"] == source.class_names
    assert manifest["class_parts"] == source.class_parts.tolist()  # ground truth kept for the part metrics
    capfd.readouterr()
    assert data_prep("verify", out, "--workers", "1", "--quiet") == 0
    assert "train: OK: 128 samples decode" in capfd.readouterr().out
    stamp = (out / "train-000000.tar").stat().st_mtime_ns
    convert("wds", tiny_data, out, "--samples-per-shard", "24")  # the same command again: nothing to do
    assert "already converted" in capfd.readouterr().out
    assert (out / "train-000000.tar").stat().st_mtime_ns == stamp


def test_wds_stops_on_a_corrupt_image_and_resumes_without_rewriting_finished_shards(tiny_data, tmp_path, capfd):
    src = copy_dataset(tiny_data, tmp_path / "src")
    bad = sorted((src / "images").rglob("*.jpg"))[-1]  # the last class: its images are in the test split
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[:100])
    args = ("to-wds", tmp_path / "wds", "--dataset", "synthetic", "--root", src, "--workers", "1", "--quiet",
            "--samples-per-shard", "40")
    capfd.readouterr()
    assert data_prep(*args) == 2
    err = capfd.readouterr().err
    assert f"cannot decode image {bad}" in err and "rerun the same command to resume" in err
    train_shards = sorted((tmp_path / "wds").glob("train-*.tar"))
    assert len(train_shards) == 4 and not (tmp_path / "wds" / "dataset.json").exists()
    stamps = {p: p.stat().st_mtime_ns for p in train_shards}
    os.utime(train_shards[0], ns=(1, 1))  # a rewrite would change this
    bad.write_bytes(good_bytes)
    assert data_prep(*args) == 0
    assert train_shards[0].stat().st_mtime_ns == 1
    assert all(p.stat().st_mtime_ns == stamps[p] for p in train_shards[1:])
    assert sorted(wds_samples(tmp_path / "wds", "test")) == list(range(32))
    # a different conversion into the same folder is refused unless --force
    other = [a if a != "40" else "50" for a in args]
    assert data_prep(*other) == 2
    assert "--force" in capfd.readouterr().err
    assert data_prep(*other, "--force") == 0
    assert [s["count"] for s in json.loads((tmp_path / "wds" / "dataset.json").read_text())["splits"]["train"]
            ["shards"]] == [50, 50, 28]


def test_wds_skip_mode_leaves_the_image_out_and_lists_it(tiny_data, tmp_path, capfd):
    src = copy_dataset(tiny_data, tmp_path / "src")
    bad = sorted((src / "images").rglob("*.jpg"))[0]
    bad.write_bytes(b"garbage")
    capfd.readouterr()
    out = convert("wds", src, tmp_path / "wds", "--on-corrupt", "skip")
    assert f"cannot decode image {bad}" in capfd.readouterr().err
    train = json.loads((out / "dataset.json").read_text())["splits"]["train"]
    assert train["num_samples"] == 127 and [s["index"] for s in train["skipped"]] == [0]
    assert 0 not in wds_samples(out, "train")
    assert data_prep("verify", out, "--workers", "1", "--quiet") == 0
    assert "1 left out at conversion" in capfd.readouterr().out


def test_verify_finds_a_damaged_shard(tiny_data, tmp_path, capfd):
    out = convert("wds", tiny_data, tmp_path / "wds", "--samples-per-shard", "64")
    shard = out / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    capfd.readouterr()
    assert data_prep("verify", out, "--workers", "1", "--quiet") == 2
    report = capfd.readouterr().out
    assert "train: " in report and "train-000001.tar" in report and "test: OK" in report


needs_ffcv = pytest.mark.skipif(importlib.util.find_spec("ffcv") is None, reason="FFCV is not installed")


def ffcv_rows(path):
    from qpm_dist.data.ffcv_loader import beton_columns

    columns = beton_columns(path)
    return columns["label"].astype(int), columns["index"].astype(int)


@needs_ffcv
def test_ffcv_round_trip_keeps_every_sample_and_label(tiny_data, tmp_path, capfd):
    out = convert("ffcv", tiny_data, tmp_path / "ffcv", "--write-mode", "proportion", "--max-side", "36")
    labels = source_labels(tiny_data)
    for split in ("train", "test"):
        stored_labels, indices = ffcv_rows(out / f"{split}.beton")
        assert indices.tolist() == list(range(len(labels[split])))
        assert stored_labels.tolist() == labels[split].tolist()
    capfd.readouterr()
    assert data_prep("verify", out, "--workers", "1", "--quiet") == 0
    assert "test: OK: 32 samples decode" in capfd.readouterr().out


@needs_ffcv
def test_ffcv_corrupt_image_is_named_and_left_out_only_on_request(tiny_data, tmp_path, capfd):
    src = copy_dataset(tiny_data, tmp_path / "src")
    bad = sorted((src / "images").rglob("*.jpg"))[1]
    bad.write_bytes(b"garbage")
    capfd.readouterr()
    args = ("to-ffcv", tmp_path / "ffcv", "--dataset", "synthetic", "--root", src, "--workers", "1", "--quiet")
    assert data_prep(*args) == 2
    assert str(bad) in capfd.readouterr().err
    assert not (tmp_path / "ffcv" / "train.beton").exists()
    assert data_prep(*args, "--on-corrupt", "skip") == 2  # other options than the unfinished run: refused
    assert data_prep(*args, "--on-corrupt", "skip", "--force") == 0
    assert str(bad) in capfd.readouterr().err
    train = json.loads((tmp_path / "ffcv" / "dataset.json").read_text())["splits"]["train"]
    assert train["num_samples"] == 127 and train["skipped"] == [{"index": 1, "path": str(bad)}]
    stored_labels, indices = ffcv_rows(tmp_path / "ffcv" / "train.beton")
    assert stored_labels[indices == 1].tolist() == [-1]  # the placeholder row the loaders never read
    assert data_prep("verify", tmp_path / "ffcv", "--workers", "1", "--quiet") == 0
    assert np.count_nonzero(stored_labels >= 0) == 127
