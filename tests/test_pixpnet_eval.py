"""PixPNet's evaluate and report stages (qpm_dist/methods/pixpnet_eval.py) on the tiny synthetic data with a seeded,
pushed tiny prototype model (tests/pixpnet_eval_probe.py)."""

from __future__ import annotations

import copy
import dataclasses
import html
import json
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from qpm_dist import dist
from qpm_dist.metrics import prototypes as PM
from qpm_dist.methods import pixpnet_eval as PE
from qpm_dist.models.receptive_fields import backbone_receptive_fields
from qpm_dist.report.tables import fmt

MAPPED = [f"{metric}_{m}" for m in PM.MAPPINGS
          for metric in ("consistency_soft", "consistency_hard", "stability_soft", "stability_hard")]
ROT = [f"rot_{what}_{m}" for m in PM.MAPPINGS for what in ("area", "pct", "curve")] + ["rot_pct_pixels", "rot_pairs"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """1 thread: bitwise what a 1-process torchrun run computes, and no OpenMP spinning on a busy machine (tiny
    tensors gain nothing from more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_process(one_thread, tiny_data, tmp_path_factory):
    """The stage in this process."""
    from pixpnet_eval_probe import run_stage

    return run_stage(tiny_data, tmp_path_factory.mktemp("eval1"), dist.init("cpu"))


def test_evaluate_stage_writes_the_prototype_metrics_of_every_mapping(one_process):
    summary, metrics, model, _ = one_process
    own = metrics["pixpnet"]
    assert set(metrics) == {"pixpnet"}  # no baseline stage given
    for key in MAPPED:
        assert 0.0 <= own[key] <= 1.0, key
    assert own["part_images"] == 32.0 and own["consistency_prototypes"] == own["stability_prototypes"] == 8
    for m in PM.MAPPINGS:
        assert 0.0 <= own[f"rot_pct_{m}"] <= 100.0 and own[f"rot_area_{m}"] is not None
        assert len(own[f"rot_curve_{m}"]) == len(own["rot_pct_pixels"]) == 12  # 0, 10 %, ..., 100 % of 32 x 32
    assert own["rot_pairs"] == 5 * 2  # the first 5 test images x their class's 2 prototypes
    # the RF box's centre is not the naive cell centre at the clipped border cells: the scores differ
    assert own["consistency_soft_ours"] != own["consistency_soft_upsample"]
    assert own["rot_curve_ours"] != own["rot_curve_upsample"]
    # the generic metrics of every classifier, without the ones read from the one-hot class_weights()
    for key in ("accuracy", "SID@2", "diversity@2", "pointing_game", "stochastic_pointing", "content_heatmap",
                "part_localisation", "NFfeatures"):
        assert own[key] is not None, key
    assert not set(PE.WEIGHT_ONLY_METRICS) & set(own)
    assert own["NFfeatures"] == 8 and own["PerClass"] == 2.0
    assert not any(isinstance(v, (list, dict)) for v in summary["pixpnet"].values())


def test_the_stage_key_holds_the_evaluation_settings(one_process):
    """A changed ROT budget or noise must not reuse a cached evaluation."""
    cfg = one_process[3].cfg
    parts = [PE.PixPNetEvaluateStage("pixpnet_train", lambda c, s=s: s, lambda c: 2).config_parts(cfg)
             for s in (PE.PixPNetEvalConfig(), PE.PixPNetEvalConfig(rot_samples=7),
                       PE.PixPNetEvalConfig(noise_std=0.1))]
    assert parts[0] != parts[1] and parts[0] != parts[2] and parts[0]["eval"] == parts[1]["eval"]


def test_ours_is_the_rf_centre_mapping_of_the_model_layer(one_process):
    """The stage's `ours` numbers are prototype_part_scores with the receptive fields of the model's own layer
    (tiny_resnet layer2 at 32 px), the true class's prototypes and the model's argmin cells."""
    _, metrics, model, ctx = one_process
    rf = backbone_receptive_fields("tiny_resnet", "layer2", False, 32, 32)
    num_parts, parts_of = PM.split_parts(ctx.cfg.data, ctx.data.test_split)
    loader = ctx.data.eval_loader("test", 32, 0, 1, return_index=True)

    def locate(images, ids):
        cells = model(images).prototypes.min_cells.gather(1, ids)
        return torch.stack([cells // rf.grid[1], cells % rf.grid[1]], dim=-1)

    with torch.no_grad():
        expected = PM.prototype_part_scores(loader, locate, torch.arange(8).view(4, 2), torch.as_tensor(rf.bounds),
                                            parts_of, num_parts, seed=ctx.cfg.run.seed)
    for m in PM.MAPPINGS:
        for metric in ("consistency_soft", "consistency_hard", "stability_soft", "stability_hard"):
            assert metrics["pixpnet"][f"{metric}_{m}"] == pytest.approx(expected[f"{m}_{metric}"], abs=1e-12)


def test_two_gloo_processes_give_the_one_process_prototype_metrics(one_process, tiny_data, tmp_path):
    """The stage end to end under torchrun (push, consistency/stability over rank::2 shards, ROT over the ranks'
    shares of the first 5 images): the new metrics equal the 1-process run's (counts exactly; sums of floats
    to rounding)."""
    from helpers import REPO, clean_env

    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "tests" / "pixpnet_eval_probe.py"), str(tiny_data), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=clean_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((out / "metrics.json").read_text())["pixpnet"]
    one = one_process[1]["pixpnet"]
    for key in MAPPED + ROT + ["part_images", "consistency_prototypes", "stability_prototypes"]:
        assert two[key] == pytest.approx(one[key], rel=1e-12, abs=1e-12), key
    for key in ("consistency_hard_ours", "stability_hard_ours", "part_images", "rot_pairs"):
        assert two[key] == one[key], key  # ratios of counts: exact


def test_consistency_and_stability_are_skipped_with_the_reason_where_there_are_no_parts(one_process):
    _, _, model, ctx = one_process
    settings = PE.PixPNetEvalConfig(rot_samples=0)
    info = dist.init("cpu")
    no_split = SimpleNamespace(num_classes=4, eval_loader=ctx.data.eval_loader)  # e.g. ffcv/wds: no image list
    result = PE.prototype_metrics(model, no_split, info, ctx.cfg.data, settings, torch.no_grad)
    assert set(result) == {"prototype_parts_skipped"} and "folder backend" in result["prototype_parts_skipped"]
    cars = dataclasses.replace(ctx.cfg.data, dataset="cars")
    result = PE.prototype_metrics(model, ctx.data, info, cars, settings, torch.no_grad)
    assert "has no part annotations" in result["prototype_parts_skipped"] and "consistency_soft_ours" not in result


def test_a_model_without_a_prototype_head_is_refused_by_name(one_process):
    from qpm_dist.models.net import Classifier, DenseHead

    _, _, model, ctx = one_process
    dense = Classifier(model.backbone, DenseHead(model.backbone.num_features, 4))
    with pytest.raises(TypeError, match="PrototypeHead, got head DenseHead"):
        PE.prototype_metrics(dense, ctx.data, dist.init("cpu"), ctx.cfg.data, PE.PixPNetEvalConfig(), torch.no_grad)


def test_report_shows_each_prototype_with_its_source_rf_box(one_process, tmp_path):
    """The whole report page (PixPNetReportStage.render): the comparison table with the prototype rows, the metrics
    by mapping with the ROT curves, and one figure per shown prototype (report.max_classes bounds the classes)
    whose caption names the push source and the RF box of its cell, inside the input."""
    _, metrics, model, ctx = one_process
    spec = SimpleNamespace(label="PixPNet", report_sections=PE.pixpnet_report_sections)
    ctx = dataclasses.replace(ctx, cfg=copy.deepcopy(ctx.cfg), method=spec,
                              outputs={"pixpnet_evaluate": ctx.run_dir})  # run_stage's folder holds metrics.json
    ctx.cfg.report.max_classes = 3  # bounded: 3 of the 4 classes
    ctx.cfg.run.out_dir = str(tmp_path / "runs")  # no other method to compare with
    PE.PixPNetReportStage("pixpnet_train", lambda c: 2, load=lambda c, s: model).render(ctx, tmp_path,
                                                                                      tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert "src=\"http" not in page and page.count("<img") == page.count("src=\"data:image/png;base64,")
    own = metrics["pixpnet"]
    for label, key in (("Prototype consistency (soft: mean best-part hit rate): RF box", "consistency_soft_ours"),
                       ("... upsampling mapping (ProtoPNet)", "consistency_soft_upsample")):
        assert f"<td>{html.escape(label)}</td><td>{fmt(own[key])}</td>" in page
    assert "<h2>Prototype metrics by pixel-space mapping</h2>" in page and "alt=\"rot_curves.png\"" in page
    figures = re.findall(r"<figure class='prototype'><img src=\"data:image/png;base64,[^\"]+\"[^>]*><figcaption>"
                         r"prototype (\d+): pushed to training image #(\d+), cell \((\d+), (\d+)\), "
                         r"RF box x (\d+)-(\d+), y (\d+)-(\d+)</figcaption></figure>", page)
    assert len(figures) == page.count("<figure") == 6 == len(list((tmp_path / "figures").glob("prototype_*.png")))
    rf = backbone_receptive_fields("tiny_resnet", "layer2", False, 32, 32)
    head = model.head
    for j, sample, h, w, x1, x2, y1, y2 in (tuple(map(int, f)) for f in figures):
        assert sample == int(head.source_sample[j]) and h * rf.grid[1] + w == int(head.source_cell[j])
        assert (y1, y2, x1, x2) == tuple(rf.bounds[h, w])
        assert 0 <= x1 < x2 <= 32 and 0 <= y1 < y2 <= 32  # inside the 32 x 32 input
    assert [int(f[0]) for f in figures] == list(range(6))


def test_too_many_rot_steps_are_refused_before_training():
    """Steps are counted at the input size as the ROT counts them: at 224 px a fraction of 0.001 rounds to 50-pixel
    chunks, 1004 steps."""
    from qpm_dist.config import ConfigError

    with pytest.raises(ConfigError, match=r"pixpnet.eval.rot_step_fraction / rot_prop_pixels at data.img_size=224: "
                                          r"ROT steps .*: got 1004, expected at most 1000"):
        PE.check_settings(PE.PixPNetEvalConfig(rot_step_fraction=0.001), 224, "pixpnet.eval")
    PE.check_settings(PE.PixPNetEvalConfig(rot_step_fraction=0.001, rot_prop_pixels=0.99), 224, "pixpnet.eval")
    PE.check_settings(PE.PixPNetEvalConfig(rot_step_fraction=0.0001, rot_samples=0), 224, "pixpnet.eval")  # no ROT


def test_a_baseline_stage_is_scored_with_every_generic_metric_next_to_the_prototype_model(one_process, tmp_path):
    """With `baseline`, metrics.json has the dense column as EvaluateStage writes it (incl. the weight-based part
    recovery, meaningful for a dense head) and the prototype model's without those."""
    from qpm_dist.models.io import save_classifier
    from qpm_dist.models.net import build_model

    _, _, model, ctx = one_process
    torch.manual_seed(0)
    save_classifier(tmp_path / "dense" / "model.pt", build_model(ctx.cfg.model, 4))
    ctx = dataclasses.replace(ctx, cfg=copy.deepcopy(ctx.cfg), outputs={"dense": tmp_path / "dense"})
    ctx.cfg.eval.gmm_max_features = 0  # no contrastiveness GMMs: seconds of fitting, not the point here
    stage = PE.PixPNetEvaluateStage("pixpnet_train", lambda c: PE.PixPNetEvalConfig(rot_samples=0), lambda c: 2,
                                    baseline="dense", load=lambda c, s: model)
    assert stage.depends == ("dense", "pixpnet_train")
    stage.run(ctx, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"dense", "pixpnet"}
    assert metrics["dense"]["part_recovery"] is not None and "consistency_soft_ours" not in metrics["dense"]
    assert "part_recovery" not in metrics["pixpnet"] and metrics["pixpnet"]["consistency_soft_ours"] is not None
