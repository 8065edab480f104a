"""Tests of the synthetic dataset generator (data_prep.synthetic) and the CUB metadata reader.

All datasets here are tiny (a few dozen images of <= 64 px) so the file runs in seconds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import synthetic
from data_prep.__main__ import main
from qpm_dist.data.cub import load_cub_metadata, load_part_boxes

REPO = Path(__file__).resolve().parents[1]
# 6 classes x 6 images; P=8, k=3. Sizes from the minimum upwards, so tight layouts are exercised.
TINY = dict(classes=6, parts=8, parts_per_class=3, min_size=32, max_size=64, train_per_class=4, test_per_class=2, seed=123)


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, keyed by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def tree_mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def read_rows(path: Path) -> list[list[float]]:
    return [[float(x) for x in line.split()] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The TINY dataset, generated once in-process."""
    return synthetic.generate(tmp_path_factory.mktemp("tiny") / "ds", workers=1, **TINY)


# ---------------------------------------------------------------------------
# Determinism


def test_layout_of_output(tiny):
    n = TINY["classes"] * (TINY["train_per_class"] + TINY["test_per_class"])
    assert len(list((tiny / "images").rglob("*.jpg"))) == n
    for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt"):
        assert len((tiny / name).read_text().splitlines()) == n, name
    assert len((tiny / "parts" / "part_locs.txt").read_text().splitlines()) == n * TINY["parts"]
    assert len((tiny / "classes.txt").read_text().splitlines()) == TINY["classes"]
    assert len((tiny / "parts" / "parts.txt").read_text().splitlines()) == TINY["parts"]
    meta = json.loads((tiny / "synthetic.json").read_text())
    assert meta["params"]["seed"] == TINY["seed"] and meta["counts"]["images"] == n
    assert not (tiny / synthetic.PARTIAL_FILE).exists()
    assert not list(tiny.rglob("*.tmp"))


def test_same_seed_is_byte_identical_for_any_worker_count(tiny, tmp_path):
    again = synthetic.generate(tmp_path / "two_workers", workers=2, **TINY)
    reference = tree_hashes(tiny)
    assert len(reference) > 40
    assert tree_hashes(again) == reference


def test_different_seed_gives_different_images(tiny, tmp_path):
    other = synthetic.generate(tmp_path / "other", workers=1, **{**TINY, "seed": TINY["seed"] + 1})
    a, b = tree_hashes(tiny), tree_hashes(other)
    jpegs = [k for k in a if k.endswith(".jpg")]
    assert jpegs and all(a[k] != b[k] for k in jpegs)
    assert a["bounding_boxes.txt"] != b["bounding_boxes.txt"]


# ---------------------------------------------------------------------------
# Class design


@pytest.mark.parametrize(
    "classes,parts,k",
    [(20, 16, 4), (4, 16, 4), (5, 16, 4), (35, 7, 3), (34, 7, 3), (1000, 16, 4), (3, 5, 2)],
)
def test_class_design(classes, parts, k):
    """Distinct rows of exactly k parts, every part used (incl. the dense C = binom(P, k) case)."""
    m = synthetic.design_classes(classes, parts, k, seed=7)
    assert m.shape == (classes, parts) and m.dtype == np.uint8
    assert set(np.unique(m)) <= {0, 1}
    assert (m.sum(axis=1) == k).all()
    assert (m.sum(axis=0) >= 1).all()
    assert len({row.tobytes() for row in m}) == classes
    assert np.array_equal(m, synthetic.design_classes(classes, parts, k, seed=7))


def test_classes_share_parts():
    m = synthetic.design_classes(20, 16, 4, seed=0).astype(int)
    overlap = m @ m.T
    np.fill_diagonal(overlap, 0)
    assert overlap.max() >= 1 and overlap.max() < 4


def test_part_vocabulary_is_distinct_and_spread():
    vocab = synthetic.part_vocabulary(synthetic.MAX_PARTS)
    assert len(set(vocab)) == synthetic.MAX_PARTS
    first = synthetic.part_vocabulary(16)
    assert {t.shape for t in first} == set(synthetic.SHAPES)
    assert {t.colour for t in first} == set(synthetic.COLOURS)
    assert {t.texture for t in first} == set(synthetic.TEXTURES)
    for i, a in enumerate(first):  # any two of the default types differ in >= 2 attributes
        for b in first[i + 1 :]:
            assert sum(x != y for x, y in zip(a, b)) >= 2, (a, b)


def test_too_many_classes_for_parts_is_an_error():
    assert math.comb(8, 3) == 56
    with pytest.raises(ValueError, match=r"binom\(8, 3\) = 56.*at least 9"):
        synthetic.resolve_params(classes=57, parts=8, parts_per_class=3)
    assert synthetic.resolve_params(classes=56, parts=8, parts_per_class=3).parts == 8


def test_parts_chosen_automatically():
    assert synthetic.resolve_params().parts == 16
    assert math.comb(16, 4) == 1820
    assert synthetic.resolve_params(classes=1820).parts == 16
    assert synthetic.resolve_params(classes=1821).parts == 17
    assert synthetic.resolve_params(classes=2, parts_per_class=3).parts == 6  # every part still used


def test_unused_parts_is_an_error():
    with pytest.raises(ValueError, match="never be used"):
        synthetic.resolve_params(classes=2, parts=16, parts_per_class=4)


# ---------------------------------------------------------------------------
# Annotations


def test_boxes_inside_actual_images(tiny):
    meta = load_cub_metadata(tiny)
    part_boxes = load_part_boxes(tiny)
    checked = 0
    for image_id, rel, (x, y, w, h) in zip(meta.image_ids, meta.paths, meta.boxes):
        with Image.open(tiny / "images" / rel) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            W, H = im.size
        assert TINY["min_size"] <= min(W, H) and max(W, H) <= TINY["max_size"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= W and y + h <= H
        for part, px, py, pw, ph, distractor in part_boxes[int(image_id)]:
            assert 0 <= px and 0 <= py and pw > 0 and ph > 0 and px + pw <= W and py + ph <= H
            if not distractor:  # class parts lie in the object box
                assert x <= px and y <= py and px + pw <= x + w and py + ph <= y + h
                checked += 1
    assert checked >= len(meta)


def test_parts_agree_with_ground_truth(tiny):
    meta = load_cub_metadata(tiny)
    part_boxes = load_part_boxes(tiny)
    locs = np.array(read_rows(tiny / "parts" / "part_locs.txt")).reshape(len(meta), TINY["parts"], 5)
    n_distractors = n_missing = 0
    for i, (image_id, label) in enumerate(zip(meta.image_ids, meta.labels)):
        row = meta.class_parts[label].astype(bool)
        assert (locs[i, :, 0] == image_id).all() and (locs[i, :, 1] == np.arange(1, TINY["parts"] + 1)).all()
        visible = locs[i, :, 4] == 1
        assert visible.any(), "every image shows at least one class part"
        assert not (visible & ~row).any(), "visible parts must belong to the class"
        assert (locs[i, ~visible, 2:4] == 0).all()
        n_missing += int((row & ~visible).sum())
        boxes = part_boxes[int(image_id)]
        drawn = boxes[:, 5] == 0
        assert sorted(boxes[drawn, 0].astype(int) - 1) == list(np.flatnonzero(visible))
        for part, px, py, pw, ph, _ in boxes[drawn]:  # part_locs centre lies in its box
            cx, cy = locs[i, int(part) - 1, 2:4]
            assert px - 0.5 <= cx <= px + pw + 0.5 and py - 0.5 <= cy <= py + ph + 0.5
        for part in boxes[~drawn, 0].astype(int) - 1:
            assert not row[part], "distractors are parts the class does not have"
            n_distractors += 1
    # the task is not trivial: some distractors and some missing parts occur
    assert n_distractors > 0 and n_missing > 0
    counts = json.loads((tiny / "synthetic.json").read_text())["counts"]
    assert counts["distractors"] == n_distractors and counts["missing_parts"] == n_missing


def test_parts_are_actually_drawn():
    """Unoccluded pixels of solid parts have the part's colour (annotations match pixels)."""
    params = synthetic.resolve_params(**TINY)
    class_parts = synthetic.design_classes(params.classes, params.parts, params.parts_per_class, params.seed)
    vocab = synthetic.part_vocabulary(params.parts)
    errors = []
    for image_id in range(1, params.num_images + 1):
        layout = synthetic.make_layout(image_id, params, class_parts)
        img = np.asarray(synthetic.render_image(layout, params), dtype=np.float32)
        for n, inst in enumerate(layout.instances):
            t = vocab[inst.part]
            if t.texture != "solid":
                continue
            x0, y0, x1, y1 = inst.crop
            visible = inst.mask > 0.99
            for later in layout.instances[n + 1 :]:  # drawn on top
                cover = np.zeros(img.shape[:2], dtype=bool)
                lx0, ly0, lx1, ly1 = later.crop
                cover[ly0:ly1, lx0:lx1] = later.mask > 0
                visible &= ~cover[y0:y1, x0:x1]
            if visible.sum() >= 4:
                mean = img[y0:y1, x0:x1][visible].mean(axis=0)
                errors.append(np.abs(mean - np.array(synthetic.COLOURS[t.colour])).max())
    assert len(errors) >= 5
    assert max(errors) < 45  # brightness jitter x0.85..1.1 and sensor grain only


def test_images_are_not_flat(tiny):
    """Backgrounds are textured (realistic JPEG sizes), not flat cartoons."""
    img = np.asarray(Image.open(next((tiny / "images").rglob("*.jpg"))), dtype=np.float32)
    assert np.abs(np.diff(img, axis=1)).mean() > 2.0


# ---------------------------------------------------------------------------
# Reader


def test_reader_round_trips_generator_metadata(tiny):
    meta = load_cub_metadata(tiny)
    n_per_class = TINY["train_per_class"] + TINY["test_per_class"]
    n = TINY["classes"] * n_per_class
    assert len(meta) == n and meta.image_ids.dtype == np.int64
    assert np.array_equal(meta.image_ids, np.arange(1, n + 1))
    assert np.array_equal(meta.labels, np.repeat(np.arange(TINY["classes"]), n_per_class))
    assert meta.is_train.dtype == bool and meta.is_train.sum() == TINY["classes"] * TINY["train_per_class"]
    assert meta.boxes.shape == (n, 4) and meta.boxes.dtype == np.float32
    assert len(meta.class_names) == meta.num_classes == TINY["classes"]
    for rel, label in zip(meta.paths, meta.labels):
        assert rel.split("/")[0] == meta.class_names[label]
        assert (meta.image_dir / rel).is_file()
    assert meta.part_names == [t.name for t in synthetic.part_vocabulary(TINY["parts"])]
    expected = synthetic.design_classes(TINY["classes"], TINY["parts"], TINY["parts_per_class"], TINY["seed"])
    assert meta.class_parts.dtype == np.uint8 and np.array_equal(meta.class_parts, expected)

    train, test = meta.split(True), meta.split(False)
    assert len(train) + len(test) == n and train.is_train.all() and not test.is_train.any()
    assert train.class_parts is meta.class_parts
    assert train.paths == [p for p, t in zip(meta.paths, meta.is_train) if t]


def test_reader_reads_real_cub_layout(tmp_path):
    """Real CUB: root is CUB_200_2011/ (or its parent), no part_boxes.txt or class_parts.txt."""
    root = tmp_path / "CUB_200_2011"
    (root / "parts").mkdir(parents=True)
    (root / "images.txt").write_text(
        "1 001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg\n"
        "2 001.Black_footed_Albatross/Black_Footed_Albatross_0009_34.jpg\n"
        "3 002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg\n"
    )
    (root / "image_class_labels.txt").write_text("1 1\n2 1\n3 2\n")
    (root / "train_test_split.txt").write_text("1 0\n2 1\n3 1\n")
    (root / "bounding_boxes.txt").write_text("1 60.0 27.0 325.0 304.0\n2 139.0 30.0 153.0 264.0\n3 14.0 112.0 388.0 186.0\n")
    (root / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    (root / "parts" / "parts.txt").write_text("1 back\n2 beak\n3 belly\n4 breast\n5 crown\n6 forehead\n7 left eye\n")
    for where in (root, tmp_path):
        meta = load_cub_metadata(where)
        assert meta.root == root
        assert meta.labels.tolist() == [0, 0, 1] and meta.is_train.tolist() == [False, True, True]
        assert meta.boxes[2].tolist() == [14.0, 112.0, 388.0, 186.0]
        assert meta.part_names[6] == "left eye" and meta.class_parts is None
    assert meta.split(True).image_ids.tolist() == [2, 3]
    with pytest.raises(FileNotFoundError, match="part_boxes.txt"):
        load_part_boxes(root)


@pytest.fixture
def metadata_copy(tiny, tmp_path) -> Path:
    """A copy of the tiny dataset's metadata files (no images) to corrupt."""
    return Path(shutil.copytree(tiny, tmp_path / "copy", ignore=shutil.ignore_patterns("*.jpg")))


@pytest.mark.parametrize("name", ["images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt", "classes.txt"])
def test_reader_names_missing_file(metadata_copy, name):
    (metadata_copy / name).unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_cub_metadata(metadata_copy)
    assert str(metadata_copy / name) in str(err.value) and "should contain" in str(err.value)


@pytest.mark.parametrize(
    "name,line,text,message",
    [
        ("bounding_boxes.txt", 5, "5 1.0 abc 3.0 4.0", "not a number"),
        ("bounding_boxes.txt", 5, "5 1.0 2.0 3.0", "expected 5 fields"),
        ("bounding_boxes.txt", 5, "5 1.0 2.0 0.0 4.0", "width, height > 0"),
        ("image_class_labels.txt", 7, "99 1", "image id 99"),
        ("image_class_labels.txt", 7, "7 7", r"class id 7 not in 1\.\.6"),
        ("images.txt", 3, "3", "expected '<image_id> <path>'"),
        ("images.txt", 3, "2 a/b.jpg", "duplicate image id 2"),
        ("train_test_split.txt", 4, "4 2", "must be 1"),
        ("classes.txt", 2, "3 foo", "expected '2 <name>'"),
        ("class_parts.txt", 2, "0 1 0 1 0 0 2 0", "0 or 1"),
        ("parts/part_boxes.txt", 2, "1 2 3.0 4.0 x 6.0 0", "not a number"),
    ],
)
def test_reader_names_file_and_line_of_bad_content(metadata_copy, name, line, text, message):
    path = metadata_copy / name
    lines = path.read_text().splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")
    loader = load_part_boxes if name.startswith("parts/") else load_cub_metadata
    with pytest.raises(ValueError, match=message) as err:
        loader(metadata_copy)
    assert f"{path}, line {line}:" in str(err.value)


def test_reader_reports_missing_lines(metadata_copy):
    path = metadata_copy / "train_test_split.txt"
    path.write_text("".join(path.read_text().splitlines(True)[:-1]))
    with pytest.raises(ValueError, match="train_test_split.txt ends after 35 entries but images.txt has 36"):
        load_cub_metadata(metadata_copy)


# ---------------------------------------------------------------------------
# Resumability and --force


def test_rerun_with_same_parameters_does_nothing(tiny):
    before_hashes, before_mtimes = tree_hashes(tiny), tree_mtimes(tiny)
    assert synthetic.generate(tiny, workers=1, **TINY) == tiny
    assert main(["make-synthetic", str(tiny), "--quiet", *cli_flags(TINY)]) == 0
    assert tree_mtimes(tiny) == before_mtimes and tree_hashes(tiny) == before_hashes


def cli_flags(params: dict) -> list[str]:
    return [x for k, v in params.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def test_different_parameters_need_force(tiny, tmp_path):
    out = Path(shutil.copytree(tiny, tmp_path / "ds"))
    before = tree_hashes(out)
    changed = {**TINY, "seed": 5, "test_per_class": 1}
    with pytest.raises(FileExistsError, match="--force") as err:
        synthetic.generate(out, workers=1, **changed)
    assert "seed 123 -> 5" in str(err.value) and "test_per_class 2 -> 1" in str(err.value)
    assert tree_hashes(out) == before
    synthetic.generate(out, workers=1, force=True, **changed)
    fresh = synthetic.generate(tmp_path / "fresh", workers=1, **changed)
    assert tree_hashes(out) == tree_hashes(fresh)  # no stale images or lines left behind


def test_foreign_directory_needs_force_and_keeps_foreign_files(tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "README").write_text("mine")
    with pytest.raises(FileExistsError, match="not a synthetic dataset"):
        synthetic.generate(out, workers=1, **TINY)
    assert sorted(os.listdir(out)) == ["README"]
    synthetic.generate(out, workers=1, force=True, **TINY)
    assert (out / "README").read_text() == "mine" and (out / "synthetic.json").exists()


def test_interrupted_run_is_never_complete_and_resumes(tiny, tmp_path, monkeypatch):
    out = tmp_path / "ds"
    real_render = synthetic.render_image
    rendered: list[int] = []

    def render_until_20(layout, params):
        if layout.image_id == 20:
            raise KeyboardInterrupt
        rendered.append(layout.image_id)
        return real_render(layout, params)

    monkeypatch.setattr(synthetic, "render_image", render_until_20)
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate(out, workers=1, **TINY)
    assert rendered == list(range(1, 20))
    assert not (out / "synthetic.json").exists() and not (out / "images.txt").exists()
    assert not list(out.rglob("*.tmp"))
    with pytest.raises(FileNotFoundError):
        load_cub_metadata(out)
    # a different configuration must not silently reuse the half-written folder
    with pytest.raises(FileExistsError, match="unfinished"):
        synthetic.generate(out, workers=1, **{**TINY, "seed": 1})

    rendered.clear()
    monkeypatch.setattr(synthetic, "render_image", lambda layout, params: rendered.append(layout.image_id) or real_render(layout, params))
    synthetic.generate(out, workers=1, **TINY)
    assert rendered[0] == 20 and len(rendered) == 36 - 19  # images 1..19 were kept
    assert tree_hashes(out) == tree_hashes(tiny)


# ---------------------------------------------------------------------------
# Command line


def test_cli_entry_point(tmp_path):
    """`python -m data_prep make-synthetic` works end to end (with a worker pool) and reports errors."""
    out = tmp_path / "cli"
    flags = ["--classes", "3", "--parts", "6", "--parts-per-class", "2", "--min-size", "32", "--max-size", "40",
             "--train-per-class", "2", "--test-per-class", "1", "--workers", "2", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "data_prep", "make-synthetic", str(out)]
    done = subprocess.run(cmd + flags, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(load_cub_metadata(out)) == 9
    done = subprocess.run(cmd + flags + ["--seed", "1"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--force" in done.stderr


def test_cli_reports_bad_parameters(tmp_path, capsys):
    assert main(["make-synthetic", str(tmp_path / "x"), "--classes", "100", "--parts", "8", "--quiet"]) == 2
    assert "binom(8, 4) = 70" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
