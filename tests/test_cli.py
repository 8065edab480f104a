"""Bad input stops at once, with exit code 2 and a message naming the key or the path, before training."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import REPO, run_qpm, stage_dir


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
def test_bad_input_exits_2_naming_the_problem(write_config, override, message):
    config = write_config()
    overrides = [override] + (["engine.strategy=deepspeed"] if "deepspeed_config" in override else [])
    proc = run_qpm(1, "run", str(config), *overrides, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    _no_stage_started(config)


def test_bad_input_under_torchrun_fails_fast(write_config):
    config = write_config()
    proc = run_qpm(2, "run", str(config), "data.root=/nonexistent/x", timeout=120)
    assert proc.returncode != 0
    # each rank checks on its own; torchrun stops the other worker as soon as the first one exits
    assert "data.root: dataset folder not found: /nonexistent/x" in proc.stderr
    _no_stage_started(config)


def test_corrupt_annotation_file_is_named(write_config, tiny_data, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_data, broken)
    (broken / "image_class_labels.txt").write_text("1 1\n2 x\n")
    proc = run_qpm(1, "run", str(write_config()), f"data.root={broken}", timeout=120)
    assert proc.returncode == 2
    assert "image_class_labels.txt" in proc.stderr


def test_unknown_stage_and_print_config(write_config):
    config = write_config()
    proc = run_qpm(1, "run", str(config), "--stage", "densee", timeout=120)
    assert proc.returncode == 2 and "unknown stage 'densee'" in proc.stderr
    shown = run_qpm(1, "print-config", str(config), "dense.epochs=7", timeout=120)
    assert shown.returncode == 0
    assert yaml.safe_load(shown.stdout)["dense"]["epochs"] == 7


def test_finished_stage_is_reused_and_changed_config_gets_a_new_stage(write_config):
    config = write_config(dense={"epochs": 1})
    first = run_qpm(1, "run", str(config), "--stage", "dense")
    assert first.returncode == 0, first.stderr[-2000:]
    out = Path(yaml.safe_load(config.read_text())["run"]["out_dir"])
    done = stage_dir(out)
    again = run_qpm(1, "run", str(config), "--stage", "dense", "engine.log_every_steps=5")  # logging does not change results
    assert again.returncode == 0 and f"finished earlier, reusing {done}" in again.stderr
    changed = run_qpm(1, "run", str(config), "--stage", "dense", "dense.optim.lr=0.01")
    assert changed.returncode == 0
    assert len(list(out.glob("*/dense-*"))) == 2  # a new key, a new folder; the old result is untouched
    saved = yaml.safe_load((out / "t" / "config.yaml").read_text())
    assert saved["dense"]["optim"]["lr"] == 0.01  # the resolved config of the latest run is kept


def test_overrides_before_and_after_options_are_both_applied(write_config):
    shown = run_qpm(1, "print-config", str(write_config()), "dense.epochs=7", timeout=120)
    assert yaml.safe_load(shown.stdout)["dense"]["epochs"] == 7
    from qpm_dist.cli import build_parser, main

    assert main(["run", "/nonexistent.yaml", "--stage", "dense", "dense.epochs=3"]) == 2  # parsed, then the file
    with pytest.raises(SystemExit):
        main(["run", "x.yaml", "--stage", "dense", "--bogus"])
    assert build_parser().parse_known_args(["run", "x.yaml", "--stage", "dense", "a.b=1"])[1] == ["a.b=1"]


def test_demo_runs_qpm_then_sldd_and_qsenn_on_sibling_configs():
    from qpm_dist.cli import demo_configs, demo_methods

    assert demo_methods() == ["qpm", "sldd", "qsenn"]  # the registry's order
    runs = demo_configs("configs/demo.yaml", "")
    assert [(m, str(p)) for m, p in runs] == [("qpm", "configs/demo.yaml"), ("sldd", "configs/demo_sldd.yaml"),
                                              ("qsenn", "configs/demo_qsenn.yaml")]
    for _, path in runs:
        assert (REPO / path).is_file()
    with pytest.raises(ValueError, match="unknown method 'pixpnet'"):
        demo_configs("configs/demo.yaml", "qpm,pixpnet")
