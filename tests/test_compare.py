"""The side-by-side comparison of methods."""

from qpm_dist.report.tables import Column, table_text


def test_models_with_fewer_than_five_features_per_class_get_their_own_sid_rows():
    dense = {"accuracy": 86.3, "SID@4": 0.9, "SID@5": 0.93, "diversity@4": 0.9, "diversity@5": 0.95, "PerClass": 64.0}
    qpm = {"accuracy": 84.5, "SID@4": 0.92, "SID@5": None, "diversity@4": 0.96, "diversity@5": None, "PerClass": 4.0}
    text = table_text([Column("dense", "dense", dense), Column("qpm", "QPM", qpm)])
    lines = {line.split("  ")[0].strip(): line.split() for line in text.splitlines()}
    assert lines["SID@5"][-1] == "–" and lines["SID@4"][-2:] == ["0.900", "0.920"]
    assert lines["Diversity@4"][-1] == "0.960"
    assert list(lines).index("SID@4") == list(lines).index("Diversity@5") + 1
