"""QPM end to end on the tiny synthetic dataset: every stage, 1 and 2 ranks, caching, the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import assert_same_weights, load_weights, run_in_process, run_qpm, stage_dir, write_test_config

QPM = dict(
    model={"arch": "tiny_resnet", "tiny_width": 8, "norm": "group", "dropout": 0.0},
    finetune={"epochs": 1, "batch_size": 16, "eval_batch_size": 32, "optim": {"lr": 0.01, "momentum": 0.95}},
    qpm={"n_features": 6, "n_per_class": 2, "solver": {"time_limit": 60}},
    eval={"batch_size": 32},
    report={"class_pairs": 2},
)
STAGES = ["dense", "stats", "qpm_solve", "qpm_sparse", "qpm_finetune", "qpm_evaluate", "qpm_report"]


def out_of(config: Path) -> Path:
    return config.parent / f"runs-{config.stem}"


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, tiny_data):
    """One full 2-rank run shared by the tests below (the expensive part)."""
    tmp = tmp_path_factory.mktemp("qpm2")
    config = write_test_config(tmp / "two.yaml", tiny_data, tmp / "runs-two", **QPM)
    proc = run_qpm(2, "run", str(config))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return config, proc


def test_a_second_identical_run_agrees_bitwise(two_rank_run, tmp_path):
    """The demo is a scientific instrument: the same config and seed give the same numbers and the same models,
    bit for bit (2 processes, another output folder)."""
    config, _ = two_rank_run
    again = tmp_path / "again.yaml"
    text = yaml.safe_load(config.read_text())
    text["run"]["out_dir"] = str(tmp_path / "runs-again")
    again.write_text(yaml.safe_dump(text))
    proc = run_qpm(2, "run", str(again))
    assert proc.returncode == 0, proc.stderr[-4000:]
    for stage in ("dense", "qpm_sparse", "qpm_finetune"):
        assert_same_weights(load_weights(stage_dir(out_of(config), stage) / "model.pt"),
                            load_weights(stage_dir(tmp_path / "runs-again", stage) / "model.pt"))
    first, second = (json.loads((stage_dir(out, "qpm_evaluate") / "metrics.json").read_text())
                     for out in (out_of(config), tmp_path / "runs-again"))
    assert first == second


def test_two_ranks_run_every_stage_and_install_a_valid_sparse_model(two_rank_run):
    config, _ = two_rank_run
    out = out_of(config)
    for stage in STAGES:
        assert (stage_dir(out, stage) / "stage.json").is_file(), stage
    state = load_weights(stage_dir(out, "qpm_finetune") / "model.pt")
    weight = state["head.weight"]
    assert weight.shape == (4, 6) and set(weight.unique().tolist()) <= {0.0, 1.0}
    assert (weight.sum(1) == 2).all()  # exactly k features per class
    assert len({tuple(row.tolist()) for row in weight}) == 4  # no two classes share all features
    assert weight.sum(0).min() >= 0
    result = np.load(stage_dir(out, "qpm_solve") / "result.npz")
    assert result["selected"].tolist() == state["head.selection"].tolist()


def test_sparse_heads_identical_on_every_rank(two_rank_run):
    from qpm_dist.models.io import state_digest

    config, _ = two_rank_run
    sparse = stage_dir(out_of(config), "qpm_sparse")
    record = json.loads((sparse / "stage.json").read_text())["summary"]
    saved = state_digest(load_weights(sparse / "model.pt"))
    assert record["rank_digests"] == [saved, saved]  # both ranks built exactly the saved model
    assert record["n_features"] == 6 and record["nonzero_weights"] == 8


def test_metrics_and_report(two_rank_run):
    config, _ = two_rank_run
    out = out_of(config)
    metrics = json.loads((stage_dir(out, "qpm_evaluate") / "metrics.json").read_text())
    for name in ("dense", "qpm"):
        m = metrics[name]
        assert m["test_images"] == 32 and m["train_images"] == 128  # each sample once across 2 ranks
        for key in ("accuracy", "SID@2", "SID@5", "class_independence", "correlation", "dependence", "contrastiveness",
                    "structural_grounding", "part_recovery", "part_recovery_random"):
            assert key in m, (name, key)
    assert metrics["qpm"]["NFfeatures"] <= 6 and metrics["qpm"]["PerClass"] == 2
    html = (stage_dir(out, "qpm_report") / "report.html").read_text()
    # one metrics table (dense and QPM, side by side with any other method), the comparison pictures (accuracy
    # against each headline metric; recovery against chance), then the solve and the global explanation
    assert html.count("<th>metric</th>") == 1 and html.count("<h2>Methods compared</h2>") == 1
    assert "<th>dense</th><th>QPM</th>" in html and "<h2>Solve</h2>" in html
    assert html.count('alt="comparison figure"') == 2 and html.count("data:image/png;base64,") >= 2 + 4 + 1
    assert "http://" not in html and "https://" not in html  # self-contained, works offline


def test_one_rank_run_and_stage_cache_invalidation(write_config):
    """In process (one rank): what a changed n_features reruns, and what it reuses."""
    config = write_config("one.yaml", **QPM)
    first, before = run_in_process(config)
    assert list(first) == STAGES
    records = {name: (before.outputs[name] / "stage.json").stat().st_mtime_ns for name in ("dense", "stats")}
    changed, after = run_in_process(config, "qpm.n_features=5", stage="qpm_sparse")
    assert list(changed) == STAGES[:4]  # --stage qpm_sparse stops before fine-tuning the new model
    for reused in ("dense", "stats"):  # same key, same folder, not written again
        assert after.outputs[reused] == before.outputs[reused]
        assert (after.outputs[reused] / "stage.json").stat().st_mtime_ns == records[reused]
    out = out_of(config)
    solves = sorted(out.glob("*/qpm_solve-*"))
    assert len(solves) == 2 and before.outputs["qpm_solve"] in solves  # a new solve; the old one is kept, never reused
    assert len(np.load(after.outputs["qpm_solve"] / "result.npz")["selected"]) == 5
    assert len(list(out.glob("*/qpm_finetune-*"))) == 1
