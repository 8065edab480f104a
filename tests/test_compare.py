"""The side-by-side comparison of methods."""

import json
import os

from qpm_dist.report.compare import comparison_figures, headline_metrics, method_columns
from qpm_dist.report.tables import Column, table_text


def write_metrics(out, run, stage, metrics, age):
    path = out / run / f"{stage}-0123456789ab" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(metrics))
    os.utime(path, (1_000_000 + age, 1_000_000 + age))
    return path


def test_the_newest_evaluation_of_each_method_in_registry_order_and_the_reports_own_models_first(tmp_path):
    old = {"dense": {"accuracy": 80.0}, "qpm": {"accuracy": 70.0, "part_recovery": 0.5}}
    new = {"dense": {"accuracy": 81.0}, "qpm": {"accuracy": 71.0, "part_recovery": 0.6}}
    write_metrics(tmp_path, "a", "qpm_evaluate", old, age=1)
    write_metrics(tmp_path, "b", "qpm_evaluate", new, age=2)
    write_metrics(tmp_path, "b", "zzz_evaluate", {"zzz": {"accuracy": 60.0}}, age=3)  # a method unknown here
    write_metrics(tmp_path, "b", "sldd_evaluate", {"dense": {"accuracy": 81.0},
                                                   "sldd": {"accuracy": 75.0, "part_recovery": 0.4}}, age=0)
    columns = method_columns(tmp_path)
    assert [(c.name, c.label, c.metrics["accuracy"]) for c in columns] == [
        ("dense", "dense", 81.0), ("qpm", "QPM", 71.0), ("sldd", "SLDD", 75.0), ("zzz", "zzz", 60.0)]
    own = [Column("dense", "dense", {"accuracy": 90.0}), Column("sldd", "SLDD", {"accuracy": 91.0, "dependence": 0.3})]
    columns = method_columns(tmp_path, own=own)  # the own dense model differs from QPM's: one column each
    assert [(c.label, c.metrics["accuracy"]) for c in columns] == [
        ("dense (QPM)", 81.0), ("dense (SLDD)", 90.0), ("QPM", 71.0), ("SLDD", 91.0), ("zzz", 60.0)]
    # plotted: headline metrics of the compared methods that at least two models report
    assert headline_metrics(columns) == []  # part_recovery only for QPM, dependence only for the own SLDD
    columns[0].metrics["part_recovery"] = 0.3
    assert headline_metrics(columns) == ["part_recovery"]
    assert comparison_figures(columns).count('alt="comparison figure"') == 2  # accuracy scatter, bars vs chance


def test_methods_with_different_dense_baselines_get_one_dense_column_each(tmp_path):
    """The demo: QPM and SLDD compare against one dense model, GC against its own baseline. Each distinct dense
    stage (stage.json's upstream key) is one column named after the methods it is the baseline of."""
    def evaluation(run, method, dense_acc, dense_key, age):
        path = write_metrics(tmp_path, run, f"{method}_evaluate", {"dense": {"accuracy": dense_acc},
                                                                    method: {"accuracy": dense_acc + 1}}, age)
        (path.parent / "stage.json").write_text(json.dumps({"upstream": {"dense": dense_key, method: "x"}}))

    evaluation("demo", "qpm", 86.3, "k1", age=1)
    evaluation("demo", "gc", 77.0, "k2", age=3)
    evaluation("demo", "sldd", 86.3, "k1", age=2)
    columns = method_columns(tmp_path)
    assert [(c.label, c.metrics["accuracy"]) for c in columns] == [
        ("dense (QPM, SLDD)", 86.3), ("dense (GC)", 77.0), ("QPM", 87.3), ("SLDD", 87.3), ("GC", 78.0)]
    # a report's own run: its dense model is the baseline its key names
    own = [Column("dense", "dense", {"accuracy": 77.0}), Column("gc", "GC", {"accuracy": 78.5})]
    columns = method_columns(tmp_path, own=own, own_dense_key="k2")
    assert [(c.label, c.metrics["accuracy"]) for c in columns] == [
        ("dense (QPM, SLDD)", 86.3), ("dense (GC)", 77.0), ("QPM", 87.3), ("SLDD", 87.3), ("GC", 78.5)]
    assert "dense (QPM, SLDD)" in table_text(columns).splitlines()[0]


def test_models_with_fewer_than_five_features_per_class_get_their_own_sid_rows():
    dense = {"accuracy": 86.3, "SID@4": 0.9, "SID@5": 0.93, "diversity@4": 0.9, "diversity@5": 0.95, "PerClass": 64.0}
    qpm = {"accuracy": 84.5, "SID@4": 0.92, "SID@5": None, "diversity@4": 0.96, "diversity@5": None, "PerClass": 4.0}
    text = table_text([Column("dense", "dense", dense), Column("qpm", "QPM", qpm)])
    lines = {line.split("  ")[0].strip(): line.split() for line in text.splitlines()}
    assert lines["SID@5"][-1] == "–" and lines["SID@4"][-2:] == ["0.900", "0.920"]
    assert lines["Diversity@4"][-1] == "0.960"
    assert list(lines).index("SID@4") == list(lines).index("Diversity@5") + 1


def test_pointing_game_spg_and_ch_of_every_method_in_one_table(tmp_path):
    """`qpm-dist compare` and every report: PG, SPG (exact and sampled) and CH as rows, one column per model."""
    scores = lambda base: {"accuracy": 80.0, "pointing_game": base, "stochastic_pointing": base - 0.1,
                           "stochastic_pointing_sampled": base - 0.11, "content_heatmap": base - 0.2}
    write_metrics(tmp_path, "a", "qpm_evaluate", {"dense": scores(0.7), "qpm": scores(0.8)}, age=1)
    write_metrics(tmp_path, "a", "sldd_evaluate", {"dense": scores(0.7), "sldd": scores(0.9)}, age=2)
    text = table_text(method_columns(tmp_path))
    rows = {line.split("  ")[0].strip(): line.split()[-3:] for line in text.splitlines()}
    assert rows["Pointing game: Grad-CAM peak within 15 px of the object boxes (mean over classes)"] == [
        "0.700", "0.800", "0.900"]
    assert rows["Stochastic pointing game: Grad-CAM mass within 15 px of the boxes (exact)"] == ["0.600", "0.700",
                                                                                                "0.800"]
    assert rows["... sampled (100 points per image)"] == ["0.590", "0.690", "0.790"]
    assert rows["Content heatmap: Grad-CAM mass inside the object boxes"] == ["0.500", "0.600", "0.700"]


def write_iis(out, run, folder, backbone, metrics, age):
    """A hand-built iis_score folder: metrics.json {scored name: metrics} and backbone.json (methods.iis)."""
    path = out / run / f"iis_score-{folder}"
    path.mkdir(parents=True)
    (path / "backbone.json").write_text(json.dumps(backbone))
    (path / "metrics.json").write_text(json.dumps({backbone["name"]: metrics}))
    os.utime(path / "metrics.json", (1_000_000 + age, 1_000_000 + age))


def test_an_iis_joins_a_column_only_if_it_scored_the_model_that_column_evaluates(tmp_path):
    """Issue 17's bug: `--backbone gc_train` under another config retrained GC (another key) and its IIS landed in
    the GC column, next to the accuracy of a different model. An IIS joins a column by the scored stage's key."""
    def evaluation(run, method, stage, key, dense_key, age):
        path = write_metrics(tmp_path, run, f"{method}_evaluate", {"dense": {"accuracy": 80.0 + age},
                                                                    method: {"accuracy": 70.0 + age}}, age)
        (path.parent / "stage.json").write_text(json.dumps({"upstream": {"dense": dense_key, stage: key}}))

    evaluation("demo", "gc", "gc_train", "g1" * 32, "d2" * 32, age=1)
    evaluation("demo", "qpm", "qpm_finetune", "q1" * 32, "d1" * 32, age=2)
    iis = lambda value: {"iis": value, "iis_normalised": value + 0.01, "iis_dense_probe": 50.0}  # noqa: E731
    write_iis(tmp_path, "demo", "same", {"name": "gc", "stage": "gc_train", "key": "g1" * 32}, iis(0.5), age=3)
    write_iis(tmp_path, "demo", "other", {"name": "gc", "stage": "gc_train", "key": "g9" * 32}, iis(0.9), age=4)
    write_iis(tmp_path, "demo", "dense", {"name": "dense", "stage": "dense", "key": "d1" * 32}, iis(0.7), age=5)
    columns = {c.label: c.metrics for c in method_columns(tmp_path)}
    assert list(columns) == ["dense (QPM)", "dense (GC)", "QPM", "GC", "gc_train @g9g9g9g9 (IIS only)"]
    assert columns["GC"] == {"accuracy": 71.0, **iis(0.5)}  # same name, same key: merged
    assert columns["gc_train @g9g9g9g9 (IIS only)"] == iis(0.9)  # same name, another key: a column of its own
    assert columns["dense (QPM)"] == {"accuracy": 82.0, **iis(0.7)} and columns["dense (GC)"] == {"accuracy": 81.0}
    assert "iis" not in columns["QPM"]
    assert "gc_train @g9g9g9g9 (IIS only)" in table_text(method_columns(tmp_path)).splitlines()[0]

    # of two scores of the same model (e.g. other IIS settings) the newest is shown, the other nowhere
    write_iis(tmp_path, "demo", "newer", {"name": "gc", "stage": "gc_train", "key": "g1" * 32}, iis(0.6), age=6)
    write_iis(tmp_path, "demo", "older", {"name": "gc", "stage": "gc_train", "key": "g1" * 32}, iis(0.4), age=0)
    columns = {c.label: c.metrics for c in method_columns(tmp_path)}
    assert columns["GC"] == {"accuracy": 71.0, **iis(0.6)} and len(columns) == 5

    # a stage folder scored by path (--backbone runs/demo/gc_train-...): its own stage and key identify the model
    write_iis(tmp_path, "demo", "folder", {"name": "gc", "stage": "iis_backbone", "key": "b1" * 32,
                                           "model_stage": "gc_train", "model_key": "g1" * 32}, iis(0.3), age=7)
    write_iis(tmp_path, "demo", "random", {"name": "random init (tiny_resnet)", "stage": "iis_backbone",
                                           "key": "r1" * 32}, iis(0.1), age=8)
    columns = {c.label: c.metrics for c in method_columns(tmp_path)}
    assert columns["GC"] == {"accuracy": 71.0, **iis(0.3)}
    assert columns["random init (tiny_resnet) @r1r1r1r1 (IIS only)"] == iis(0.1)
