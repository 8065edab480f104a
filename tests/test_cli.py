"""Bad input stops at once, with exit code 2 and a message naming the key or the path, before training.

The command line runs in this process (`cli.main`), except where several processes are the point."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import REPO, run_qpm, stage_dir
from qpm_dist.cli import build_parser, main


def _no_stage_started(config: Path) -> None:
    out = Path(yaml.safe_load(config.read_text())["run"]["out_dir"])
    assert not list(out.glob("*/dense-*")), "a stage folder was created: work started despite bad input"


@pytest.mark.parametrize(
    "override, message",
    [
        ("dense.optim.lrr=0.1", "unknown config key 'dense.optim.lrr'; did you mean 'dense.optim.lr'?"),
        ("dense.epochs=many", "dense.epochs: expected int, got 'many'"),
        ("engine.strategy=horovod", "engine.strategy: expected one of 'ddp', 'deepspeed'"),
        ("data.root=/nonexistent/cub", "data.root: dataset folder not found: /nonexistent/cub"),
        ("model.weights=/nonexistent/resnet50.pth", "model.weights: file not found: /nonexistent/resnet50.pth"),
        ("engine.deepspeed_config=/nonexistent/z.json", "engine.deepspeed_config: file not found"),
    ],
)
def test_bad_input_exits_2_naming_the_problem(write_config, capsys, override, message):
    config = write_config()
    overrides = [override] + (["engine.strategy=deepspeed"] if "deepspeed_config" in override else [])
    assert main(["run", str(config), *overrides]) == 2
    assert message in capsys.readouterr().err
    _no_stage_started(config)


def test_bad_input_under_torchrun_fails_fast(write_config):
    config = write_config()
    proc = run_qpm(2, "run", str(config), "data.root=/nonexistent/x", timeout=120)
    assert proc.returncode != 0
    # each rank checks on its own; torchrun stops the other worker as soon as the first one exits
    assert "data.root: dataset folder not found: /nonexistent/x" in proc.stderr
    _no_stage_started(config)


def test_corrupt_annotation_file_is_named(write_config, tiny_data, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_data, broken)
    (broken / "image_class_labels.txt").write_text("1 1\n2 x\n")
    assert main(["run", str(write_config()), f"data.root={broken}"]) == 2
    assert "image_class_labels.txt" in capsys.readouterr().err


def test_unknown_stage_and_print_config(write_config, capsys):
    config = write_config()
    assert main(["run", str(config), "--stage", "densee"]) == 2
    assert "unknown stage 'densee'" in capsys.readouterr().err
    assert main(["print-config", str(config), "dense.epochs=7"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["dense"]["epochs"] == 7


def test_finished_stage_is_reused_and_changed_config_gets_a_new_stage(write_config, capsys):
    config = write_config(dense={"epochs": 1})
    assert main(["run", str(config), "--stage", "dense"]) == 0
    out = Path(yaml.safe_load(config.read_text())["run"]["out_dir"])
    done = stage_dir(out)
    capsys.readouterr()
    assert main(["run", str(config), "--stage", "dense", "engine.log_every_steps=5"]) == 0  # logging changes nothing
    assert f"finished earlier, reusing {done}" in capsys.readouterr().err
    assert main(["run", str(config), "--stage", "dense", "dense.optim.lr=0.01"]) == 0
    assert len(list(out.glob("*/dense-*"))) == 2  # a new key, a new folder; the old result is untouched
    saved = yaml.safe_load((out / "t" / "config.yaml").read_text())
    assert saved["dense"]["optim"]["lr"] == 0.01  # the resolved config of the latest run is kept


def test_overrides_before_and_after_options_are_both_applied(write_config, capsys):
    assert main(["print-config", str(write_config()), "--plugin", "toy_method", "dense.epochs=7"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["dense"]["epochs"] == 7
    assert main(["run", "/nonexistent.yaml", "--stage", "dense", "dense.epochs=3"]) == 2  # parsed, then the file
    with pytest.raises(SystemExit):
        main(["run", "x.yaml", "--stage", "dense", "--bogus"])
    assert build_parser().parse_known_args(["run", "x.yaml", "--stage", "dense", "a.b=1"])[1] == ["a.b=1"]


def test_demo_runs_qpm_then_sldd_and_qsenn_on_sibling_configs():
    from qpm_dist.cli import demo_configs, demo_methods

    assert demo_methods() == ["qpm", "sldd", "qsenn", "gc", "protopnet", "pixpnet"]  # the registry's order
    runs = demo_configs("configs/demo.yaml", "")
    assert [(m, str(p)) for m, p in runs] == [("qpm", "configs/demo.yaml"), ("sldd", "configs/demo_sldd.yaml"),
                                              ("qsenn", "configs/demo_qsenn.yaml"), ("gc", "configs/demo_gc.yaml"),
                                              ("protopnet", "configs/demo_protopnet.yaml"),
                                              ("pixpnet", "configs/demo_pixpnet.yaml")]
    for _, path in runs:
        assert (REPO / path).is_file()
    with pytest.raises(ValueError, match="unknown method 'no_such_method'"):
        demo_configs("configs/demo.yaml", "qpm,no_such_method")


def test_demo_iis_scores_random_init_each_distinct_dense_model_and_each_final_model_under_its_own_config():
    """`qpm-dist demo --iis`: the stage each method's evaluation scored, under that method's config (so the key and
    the comparison column are the evaluated model's), with the iis section of demo_iis.yaml as overrides."""
    import yaml

    from qpm_dist.cli import demo_configs, demo_iis_runs, iis_overrides
    from qpm_dist.config import load_config, to_dict

    configs = [(m, p, load_config(REPO / p)) for m, p in demo_configs("configs/demo.yaml", "")]
    runs = [(str(p), b) for p, b in demo_iis_runs(configs)]
    assert runs == [("configs/demo.yaml", "random"), ("configs/demo.yaml", "dense"),
                    ("configs/demo.yaml", "qpm_finetune"), ("configs/demo_sldd.yaml", "sldd_finetune"),
                    ("configs/demo_qsenn.yaml", "qsenn_finetune3"),
                    ("configs/demo_gc.yaml", "dense"), ("configs/demo_gc.yaml", "gc_train"),  # GC: its own baseline
                    ("configs/demo_protopnet.yaml", "protopnet_train"),  # prototype methods: no dense baseline
                    ("configs/demo_pixpnet.yaml", "pixpnet_train")]
    overrides = iis_overrides(REPO / "configs/demo_iis.yaml")
    assert not any(o.startswith("iis.backbone=") for o in overrides)
    section = yaml.safe_load((REPO / "configs/demo_iis.yaml").read_text())["iis"]
    scored = to_dict(load_config(REPO / "configs/demo.yaml", [*overrides, "method=iis"]).iis)
    for part in ("concepts", "heads"):
        assert {k: scored[part][k] for k in section[part]} == section[part]
    assert scored["heads"]["batch_size"] == 64 != to_dict(load_config(REPO / "configs/demo.yaml").iis)["heads"][
        "batch_size"]


def test_the_demo_summary_prints_each_methods_headline_numbers(tmp_path):
    """Part recovery for the sparse-head methods, the pointing games and content heatmap for GC (its dense head
    has no 'assignment' to recover links from)."""
    import json

    from qpm_dist.cli import demo_summary

    common = {"NFfeatures": 64, "PerClass": 64.0, "part_recovery": 0.5, "part_recovery_random": 0.4,
              "part_precision": 0.9}
    scores = lambda acc, pg, spg, ch: {**common, "accuracy": acc, "pointing_game": pg,  # noqa: E731
                                       "stochastic_pointing": spg, "content_heatmap": ch}
    for stage, metrics in (("gc_evaluate", {"dense": scores(77.0, 1.0, 0.962, 0.709), "gc": scores(79.0, 0.997, 0.974,
                                                                                                     0.742)}),
                           ("qpm_evaluate", {"dense": scores(86.3, 1, 1, 1), "qpm": scores(84.5, 1, 1, 1)})):
        (tmp_path / f"{stage}-0").mkdir()
        (tmp_path / f"{stage}-0" / "metrics.json").write_text(json.dumps(metrics))
    lines = demo_summary(tmp_path).splitlines()
    assert "  GC: test top-1 dense 77.0% -> GC 79.0%  (64 features, 64.0 per class)" in lines
    assert ("    pointing game / stochastic pointing game / content heatmap: dense 1.000 / 0.962 / 0.709 -> "
            "GC 0.997 / 0.974 / 0.742") in lines
    assert sum("class-part links recovered by" in line for line in lines) == 1  # QPM's, not GC's
    assert not any("IIS" in line or "by mapping" in line for line in lines)


def test_the_demo_summary_prints_a_prototype_methods_scores_per_mapping(tmp_path):
    """PixPNet: its prototypes counted as prototypes, and consistency / stability / ROT area for the receptive-field,
    upsampling and random mappings side by side; a score the evaluation skipped prints as n/a."""
    import json

    from qpm_dist.cli import demo_summary

    scores = {"accuracy": 63.5, "NFfeatures": 100, "PerClass": 5.0, "pointing_game": 0.998,
              "stochastic_pointing": 0.997, "content_heatmap": 0.982}
    for key, values in (("consistency_hard", (0.96, 0.95, 0.0)), ("stability_hard", (0.918, 0.922, None)),
                        ("rot_area", (1.003, 0.899, 0.278))):
        scores.update({f"{key}_{m}": v for m, v in zip(("ours", "upsample", "random"), values)})
    (tmp_path / "pixpnet_evaluate-0").mkdir()
    (tmp_path / "pixpnet_evaluate-0" / "metrics.json").write_text(json.dumps({"pixpnet": scores}))
    lines = demo_summary(tmp_path).splitlines()
    assert "  PixPNet: test top-1 PixPNet 63.5%  (100 prototypes, 5.0 per class)" in lines
    assert ("    prototypes by mapping, receptive field / upsampling / random: consistency 0.960 / 0.950 / 0.000, "
            "stability 0.918 / 0.922 / n/a, ROT area 1.003 / 0.899 / 0.278") in lines


def test_the_demo_summary_lists_every_iis_score_of_its_run_in_order(tmp_path):
    """`qpm-dist demo --iis`: one line per scored model of this run (not another run's), oldest first."""
    import json
    import os

    from qpm_dist.cli import demo_summary

    scored = [("demo", "iis_score-a", "random init (tiny_resnet)", "iis_backbone", 0.654, 16.9),
              ("demo", "iis_score-b", "qpm", "qpm_finetune", 0.964, 88.9),
              ("other", "iis_score-c", "sldd", "sldd_finetune", 0.5, 50.0)]
    for i, (run, folder, name, stage, iis, probe) in enumerate(scored):
        out = tmp_path / run / folder
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps({name: {"iis": iis, "iis_dense_probe": probe}}))
        (out / "backbone.json").write_text(json.dumps({"name": name, "stage": stage, "key": f"{i}" * 64}))
        os.utime(out / "metrics.json", (1000 + i, 1000 + i))
    lines = demo_summary(tmp_path / "demo").splitlines()
    assert lines[-2:] == ["    random init (tiny_resnet) (iis_backbone @00000000): IIS 0.654, dense probe 16.9%",
                          "    QPM (qpm_finetune @11111111): IIS 0.964, dense probe 88.9%"]


def test_the_demo_pins_threads_and_kernels_unless_the_user_chose(monkeypatch):
    import platform

    from qpm_dist.cli import demo_environment

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    env = demo_environment({"OMP_NUM_THREADS": "4"})
    assert env == {"OMP_NUM_THREADS": "4", "WANDB_SILENT": "true", "ATEN_CPU_CAPABILITY": "avx2",
                   "ONEDNN_MAX_CPU_ISA": "AVX2"}
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert "ATEN_CPU_CAPABILITY" not in demo_environment({})


def test_a_missing_resume_checkpoint_is_bad_input(write_config, capsys):
    assert main(["run", str(write_config()), "run.resume=/nonexistent/step_1", "--stage", "dense"]) == 2
    err = capsys.readouterr().err
    assert "run.resume: checkpoint directory not found: /nonexistent/step_1" in err and "Traceback" not in err


def test_an_unexpected_missing_file_inside_a_stage_is_a_crash_not_bad_input(write_config, monkeypatch):
    # e.g. the checkpoint temp folder of a run sharing the stage folder (issue 18): exit 2 "bad input" hid it
    from qpm_dist.engine.checkpoint import CheckpointManager

    def vanished(self, *args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", str(self.root / "step_000000008.tmp"))

    monkeypatch.setattr(CheckpointManager, "save", vanished)
    with pytest.raises(FileNotFoundError, match="step_000000008.tmp"):
        main(["run", str(write_config()), "--stage", "dense"])


def test_check_says_what_would_run_and_names_every_missing_input(write_config, capsys):
    config = write_config()
    assert main(["check", str(config), "--stage", "stats", "dense.epochs=1"]) == 0
    out = capsys.readouterr().out
    assert f"config {config}: valid" in out and "stages dense, stats, qpm_solve" in out and "(--stage stats)" in out
    assert "inputs: all found" in out
    _no_stage_started(config)

    assert main(["check", str(config), "data.root=/nonexistent/x", "model.weights=/nonexistent/w.pth"]) == 2
    captured = capsys.readouterr()
    assert f"config {config}: valid" in captured.out  # the config is fine, the files are not
    assert captured.err.strip() == ("qpm-dist: error: data.root: dataset folder not found: /nonexistent/x (create it "
                                    "with `qpm-dist make-synthetic`); model.weights: file not found: /nonexistent/w.pth")

    assert main(["check", str(config), "--stage", "nope"]) == 2
    assert "--stage: unknown stage 'nope'" in capsys.readouterr().err
