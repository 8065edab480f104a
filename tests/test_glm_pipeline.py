"""SLDD and Q-SENN end to end on the tiny synthetic dataset with 2 processes, and the Q-SENN statistics fix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import BASE_CONFIG, load_weights, run_qpm, stage_dir
from qpm_dist.methods.glm_stages import raw_features
from qpm_dist.models.sparse import SparseHead

GLM = dict(
    model={"arch": "tiny_resnet", "tiny_width": 8, "norm": "group", "dropout": 0.0},
    finetune={"epochs": 1, "batch_size": 16, "eval_batch_size": 32, "optim": {"lr": 0.01, "momentum": 0.95}},
    sldd={"n_features": 6, "n_per_class": 2},
    qsenn={"n_features": 6, "n_per_class": 2, "round_epochs": [1, 1]},
    glm={"fit": {"path_points": 30}},
    eval={"batch_size": 32},
    report={"class_pairs": 2},
)


def run_method(tmp_path_factory, tiny_data, method: str, *overrides: str) -> Path:

    tmp = tmp_path_factory.mktemp(method)
    cfg = json.loads(json.dumps(BASE_CONFIG))
    cfg["data"]["root"] = str(tiny_data)
    cfg["run"]["out_dir"] = str(tmp / "runs")
    cfg["method"] = method
    for k, v in GLM.items():
        cfg.setdefault(k, {}).update(v)
    config = tmp / f"{method}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    proc = run_qpm(2, "run", str(config), *overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp / "runs"


@pytest.fixture(scope="module")
def sldd_run(tmp_path_factory, tiny_data):
    return run_method(tmp_path_factory, tiny_data, "sldd", "glm.solver=fast")


@pytest.fixture(scope="module")
def qsenn_run(tmp_path_factory, tiny_data):
    return run_method(tmp_path_factory, tiny_data, "qsenn", "glm.solver=glm_saga")


def test_sldd_two_ranks(sldd_run):
    out = sldd_run
    for stage in ("dense", "features", "glm_select", "sldd_fit", "sldd_sparse", "sldd_finetune", "sldd_evaluate",
                  "sldd_report"):
        assert (stage_dir(out, stage) / "stage.json").is_file(), stage
    meta = json.loads((stage_dir(out, "features") / "shards" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["rows"] == {"train": [64, 64], "test": [16, 16]}
    selected = json.loads((stage_dir(out, "glm_select") / "selection.json").read_text())["selected"]
    sparse = json.loads((stage_dir(out, "sldd_sparse") / "stage.json").read_text())["summary"]
    assert len(set(sparse["rank_digests"])) == 1
    state = load_weights(stage_dir(out, "sldd_finetune") / "model.pt")
    assert state["head.selection"].tolist() == selected and len(selected) == 6
    W = state["head.weight"]
    assert W.shape == (4, 6) and int((W != 0).sum()) == 8  # n_per_class · C
    assert bool((W != 0).any(dim=1).all())  # no class without a weight
    before = load_weights(stage_dir(out, "sldd_sparse") / "model.pt")
    assert torch.equal(before["head.weight"], W) and torch.equal(before["head.bias"], state["head.bias"])  # frozen
    assert not torch.equal(before["head.std"], state["head.std"])  # the normalisation is fine-tuned
    path = np.load(stage_dir(out, "sldd_fit") / "path.npz")
    assert path["nnz"][sparse["point"]] / 4 <= 2 / 0.5 < path["nnz"][-1] / 4  # densest under the cap, then stop
    metrics = json.loads((stage_dir(out, "sldd_evaluate") / "metrics.json").read_text())
    assert set(metrics) == {"dense", "sldd"}
    assert metrics["sldd"]["test_images"] == 32 and metrics["sldd"]["train_images"] == 128
    assert metrics["sldd"]["PerClass"] == 2
    html = (stage_dir(out, "sldd_report") / "report.html").read_text()
    assert "<th>dense</th><th>SLDD</th>" in html and html.count("<th>metric</th>") == 1 and "http://" not in html


def test_qsenn_two_ranks_glm_saga(qsenn_run):
    out = qsenn_run
    names = ["dense", "features", "glm_select", "qsenn_fit0", "qsenn_sparse0", "qsenn_finetune0", "qsenn_features1",
             "qsenn_fit1", "qsenn_sparse1", "qsenn_finetune1", "qsenn_evaluate", "qsenn_report"]
    for stage in names:
        assert (stage_dir(out, stage) / "stage.json").is_file(), stage
    assert json.loads((stage_dir(out, "glm_select") / "stage.json").read_text())["summary"]["solver"] == "glm_saga"
    for r in (0, 1):
        state = load_weights(stage_dir(out, f"qsenn_sparse{r}") / "model.pt")
        W, b = state["head.weight"], state["head.bias"]
        values = set(W.unique().tolist())
        assert len(values) == 3 and 0.0 in values and min(values) == -max(values)  # {−a, 0, +a}
        assert torch.isfinite(b).all() and float(b.abs().max()) > 0
        assert bool((W != 0).any(dim=1).all())
        # the fit path stops at λ_min = ε·λ_max (no λ = 0 point); the last point was quantised
        path = np.load(stage_dir(out, f"qsenn_fit{r}") / "path.npz")
        assert len(path["lam"]) == 30 and path["lam"][-1] == pytest.approx(path["lam"][0] * 1e-3)
    # round-to-round stability: how many of round 0's ternary entries round 1 kept or changed
    before = load_weights(stage_dir(out, "qsenn_sparse0") / "model.pt")["head.weight"].sign()
    after = load_weights(stage_dir(out, "qsenn_sparse1") / "model.pt")["head.weight"].sign()
    summary = json.loads((stage_dir(out, "qsenn_sparse1") / "stage.json").read_text())["summary"]
    assert summary["entries_changed_from_previous_round"] == int((before != after).sum())
    assert summary["entries_kept_from_previous_round"] == int(((before == after) & (after != 0)).sum())
    metrics = json.loads((stage_dir(out, "qsenn_evaluate") / "metrics.json").read_text())
    assert set(metrics) == {"dense", "qsenn"} and metrics["qsenn"]["test_images"] == 32
    html = (stage_dir(out, "qsenn_report") / "report.html").read_text()
    assert "<th>dense</th><th>Q-SENN</th>" in html and "<h2>Sparse layer</h2>" in html


def test_qsenn_round_statistics_are_those_of_the_raw_features_they_normalise(qsenn_run, tiny_data):
    """Round 1 extracts the RAW selected features of round 0's model; the new head normalises raw features
    with exactly their statistics (the QPM repository fitted z but installed z's statistics, spec bug 3)."""
    from qpm_dist.config import load_config
    from qpm_dist.data.sources import build_datasets
    from qpm_dist.models.io import load_classifier

    out = qsenn_run
    features = stage_dir(out, "qsenn_features1")
    rows = np.concatenate([np.load(features / "shards" / f"train-r{r:04d}-x.npy") for r in (0, 1)])
    head = load_weights(stage_dir(out, "qsenn_sparse1") / "model.pt")
    np.testing.assert_allclose(head["head.mean"].numpy(), rows.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(head["head.std"].numpy(), rows.std(0), rtol=1e-4, atol=1e-5)
    # the rows are raw pooled maps of the previous round's model, not its normalised z
    cfg = load_config(None, [f"data.root={tiny_data}", "method=qsenn", "qsenn.n_features=6", "qsenn.n_per_class=2",
                             "model.arch=tiny_resnet", "model.tiny_width=8",
                             "model.norm=group", f"data.img_size={BASE_CONFIG['data']['img_size']}"])
    data = build_datasets(cfg.data, 0)
    model = load_classifier(stage_dir(out, "qsenn_finetune0") / "model.pt", cfg.model).eval()
    image, _ = data.dataset("train", augment=False)[0]  # rank 0's first row is training sample 0
    with torch.no_grad():
        output = model(image[None])
    np.testing.assert_allclose(raw_features(output)[0].numpy(), np.load(features / "shards" / "train-r0000-x.npy")[0],
                               rtol=1e-4, atol=1e-5)
    assert not np.allclose(output.features[0].numpy(), rows[0], atol=1e-3)


def test_raw_features_of_a_sparse_head_by_hand():
    head = SparseHead(torch.tensor([2, 0]), torch.ones(3, 2), torch.tensor([1.0, 10.0, 2.0]),
                      torch.tensor([2.0, 10.0, 0.5]), dropout=0.0).eval()
    maps = torch.zeros(1, 3, 2, 2)
    maps[0, 0] = 3.0
    maps[0, 2] = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # pooled 3
    out = head(maps)
    torch.testing.assert_close(raw_features(out), torch.tensor([[3.0, 3.0]]))  # selected, raw
    torch.testing.assert_close(out.features, torch.tensor([[(3 - 2) / 0.5, (3 - 1) / 2]]))  # what the head returns


def test_auto_fits_with_glm_saga_where_its_table_is_affordable_and_selects_with_fast():
    from qpm_dist.config import load_config
    from qpm_dist.methods.glm_stages import solver_for

    cfg = load_config(None, ["method=qsenn"])
    assert cfg.glm.solver == "auto" and cfg.glm.saga_max_table == 10**8
    assert solver_for(cfg, "fit", 5994, 200) == "glm_saga"  # CUB: a table of 1.2M entries
    assert solver_for(cfg, "fit", 1_281_167, 1000) == "fast"  # ImageNet: 1.3G entries
    assert solver_for(cfg, "selection", 5994, 200) == "fast"
    fixed = load_config(None, ["method=qsenn", "glm.solver=glm_saga"])
    assert solver_for(fixed, "selection", 1_281_167, 1000) == "glm_saga"  # an explicit choice is kept
