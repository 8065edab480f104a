"""IIS from a manifest of head results (specs/iis.md §4; reference bugs 3 and 6)."""

import json

import pytest

from qpm_dist.iis.score import BadManifest, iis_area, read_manifest, score, score_manifest, write_manifest

RATIOS = [0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98]
WORKED = [0.790, 0.788, 0.780, 0.770, 0.750, 0.700, 0.640, 0.520]  # spec §4, A_dense = 0.80


def records(accuracies=WORKED, ratios=RATIOS, dense=0.80, lrs=(0.01,), library="prototype"):
    out = [{"library": "dense", "ratio": None, "lr": lr, "accuracy": dense} for lr in lrs]
    out += [{"library": library, "ratio": s, "lr": lr, "accuracy": a} for s, a in zip(ratios, accuracies) for lr in lrs]
    return out


def test_the_worked_example():
    result = score(records(), "prototype")
    assert result.iis == pytest.approx(0.92325, abs=1e-12)
    assert result.iis_normalised == pytest.approx(0.92325 / 0.98, abs=1e-12)
    assert round(result.iis_normalised, 4) == 0.9421
    assert result.arr == pytest.approx([0.9875, 0.985, 0.975, 0.9625, 0.9375, 0.875, 0.80, 0.65], abs=1e-12)


def test_all_ones_arr_is_the_grid_width_and_one_ratio_scores_zero():
    assert score(records([0.8] * 8), "prototype").iis == pytest.approx(0.98, abs=1e-12)
    single = score(records([0.7], [0.7]), "prototype")
    assert single.iis == 0 and single.iis_normalised is None and single.arr == pytest.approx([0.875])
    assert iis_area([0.7], [0.7], 0.8) == 0


def test_best_over_the_same_lr_grid_for_dense_and_heads():
    recs = records([0.5, 0.4], [0, 0.5], dense=0.5, lrs=(0.001,))
    recs += [{"library": "dense", "ratio": None, "lr": 0.01, "accuracy": 0.8},  # the best dense: not the last lr
             {"library": "dense", "ratio": None, "lr": 0.1, "accuracy": 0.6},
             {"library": "prototype", "ratio": 0, "lr": 0.01, "accuracy": 0.6},
             {"library": "prototype", "ratio": 0.5, "lr": 0.01, "accuracy": 0.3},
             {"library": "prototype", "ratio": 0, "lr": 0.1, "accuracy": 0.2},
             {"library": "prototype", "ratio": 0.5, "lr": 0.1, "accuracy": 0.2}]
    result = score(recs, "prototype")
    assert (result.dense_accuracy, result.dense_lr) == (0.8, 0.01)
    assert result.accuracies == [0.6, 0.4] and result.best_lrs == [0.01, 0.001]
    assert result.iis == pytest.approx(0.5 * (0.6 + 0.4) / (2 * 0.8))


def test_missing_dense_is_an_error():
    with pytest.raises(BadManifest, match="no dense probe records"):
        score(records()[1:], "prototype")


def test_missing_jobs_are_named_in_one_error():
    recs = [r for r in records(lrs=(0.01, 0.1)) if not (r["ratio"] == 0.5 and r["lr"] == 0.1)]
    recs = [r for r in recs if not (r["library"] == "dense" and r["lr"] == 0.01)]
    with pytest.raises(BadManifest, match=r"2 job\(s\).*dense lr=0.01, prototype ratio=0.5 lr=0.1$"):
        score(recs, "prototype")
    with pytest.raises(BadManifest, match=r"prototype ratio=0.6 lr=0.01"):  # a configured ratio never run
        score(records(), "prototype", ratios=RATIOS + [0.6])


@pytest.mark.parametrize("change, message", [
    ({"accuracy": 1.5}, "accuracy 1.5; expected a fraction"),
    ({"ratio": -0.1}, "ratio -0.1; expected a number in"),
    ({"lr": 0}, "lr 0; expected a positive number"),
    ({"library": ""}, "library ''"),
])
def test_bad_records(change, message):
    recs = records()
    recs[3].update(change)
    with pytest.raises(BadManifest, match=f"record 3: {message}"):
        score(recs, "prototype")


def test_duplicate_and_unknown_library():
    with pytest.raises(BadManifest, match="record 9: a second record"):
        score(records() + [records()[1]], "prototype")
    with pytest.raises(BadManifest, match="no records of library 'text'; found libraries: prototype"):
        score(records(), "text")


def test_manifest_file_round_trip_and_damage(tmp_path):
    path = tmp_path / "manifest.json"
    write_manifest(path, records())
    assert read_manifest(path) == records()
    assert score_manifest(path, "prototype").iis == pytest.approx(0.92325, abs=1e-12)
    path.write_text("{")
    with pytest.raises(BadManifest, match="not readable JSON"):
        read_manifest(path)
    path.write_text(json.dumps([1]))
    with pytest.raises(BadManifest, match="expected an object with a list 'records', found list"):
        read_manifest(path)
    with pytest.raises(BadManifest, match="no such file"):
        read_manifest(tmp_path / "absent.json")
