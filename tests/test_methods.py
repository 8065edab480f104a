"""The method registry and the open training step, exercised by a method defined outside qpm_dist
(tests/toy_method.py): in process, under 2 processes, and resumed after a stop in the epoch after its hook ran."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass

import pytest
import yaml

import toy_method
from helpers import (REPO, assert_same_weights, clean_env, load_weights, qpm_command, run_in_process, stage_dir,
                     stop_inside_epoch_1_then_resume, write_test_config)

TOY = dict(method="toy", model={"arch": "tiny_resnet", "tiny_width": 8, "norm": "group", "dropout": 0.0},
           dense={"batch_size": 16, "optim": {"lr": 0.02, "head_lr": 0.05}}, toy={"epochs": 3, "shrink": 0.5},
           eval={"batch_size": 32})
STEPS_PER_EPOCH = 128 // 16


def toy_config(path, data, **extra):
    sections = {k: v for k, v in TOY.items() if k != "method"} | extra
    cfg = write_test_config(path, data, path.parent / f"runs-{path.stem}", **sections)
    text = yaml.safe_load(cfg.read_text())
    text["method"] = "toy"
    cfg.write_text(yaml.safe_dump(text))
    return cfg


def plugin_env() -> dict[str, str]:
    env = clean_env()
    env["PYTHONPATH"] = f"{REPO / 'tests'}:{env['PYTHONPATH']}"
    return env


@pytest.fixture(scope="module")
def toy_reference(tmp_path_factory, tiny_data):
    """The toy method run end to end in this process (1 rank, 1 thread)."""
    config = toy_config(tmp_path_factory.mktemp("toy") / "ref.yaml", tiny_data)
    records, ctx = run_in_process(config)
    return config, records, ctx


def test_registered_from_outside_and_run_end_to_end_in_process(toy_reference):
    from qpm_dist import methods
    from qpm_dist.report.compare import write_comparison

    config, records, ctx = toy_reference
    assert methods.get("toy") is toy_method.SPEC and "toy" in methods.names()
    assert list(records) == ["toy_train", "toy_evaluate"]
    train = records["toy_train"]["summary"]
    assert train["task"] == {"ended": [0, 1, 2]}  # the hook ran once per epoch
    assert train["global_step"] == 3 * STEPS_PER_EPOCH
    metrics = json.loads((ctx.outputs["toy_evaluate"] / "metrics.json").read_text())
    assert set(metrics) == {"toy"} and metrics["toy"]["test_images"] == 32  # no dense baseline
    text, page = write_comparison(ctx.run_dir.parent)
    assert "Toy" in text.splitlines()[0] and "Toy" in page.read_text()


def test_the_hook_and_the_task_groups_change_the_training(toy_reference, tiny_data, tmp_path):
    """Control: without the shrink (shrink=1) the head ends elsewhere, so the resume test below can see a
    repeated or skipped hook; the head's learning rate is the phase's head_lr times head_lr_scale."""
    from qpm_dist.models.io import load_classifier
    from toy_method import ToyConfig, ToyTask

    config, _, ctx = toy_reference
    model = load_classifier(ctx.outputs["toy_train"] / "model.pt", ctx.cfg.model)
    groups = ToyTask(ToyConfig(head_lr_scale=2.0), ctx.cfg.dense).param_groups(model)
    head = {id(p) for p in model.head.parameters()}
    assert sorted({g["lr"] for g in groups if all(id(p) in head for p in g["params"])}) == [0.1]
    assert sorted({g["lr"] for g in groups if not any(id(p) in head for p in g["params"])}) == [0.02]
    unshrunk, _ = run_in_process(toy_config(tmp_path / "noshrink.yaml", tiny_data, toy={"epochs": 3, "shrink": 1.0}),
                                 stage="toy_train")
    other = load_weights(stage_dir(tmp_path / "runs-noshrink", "toy_train") / "model.pt")
    reference = load_weights(ctx.outputs["toy_train"] / "model.pt")
    assert not (other["head.linear.weight"] - reference["head.linear.weight"]).abs().max() < 1e-3


def test_two_processes_equal_one(toy_reference, tiny_data, tmp_path):
    _, _, ctx = toy_reference
    config = toy_config(tmp_path / "two.yaml", tiny_data)
    proc = subprocess.run(qpm_command(2, "run", str(config), "--plugin", "toy_method"), capture_output=True,
                          text=True, timeout=600, env=plugin_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "runs-two"
    assert_same_weights(load_weights(ctx.outputs["toy_train"] / "model.pt"),
                        load_weights(stage_dir(out, "toy_train") / "model.pt"), atol=1e-5)
    result = json.loads((stage_dir(out, "toy_train") / "result.json").read_text())
    assert result["task"] == {"ended": [0, 1, 2]} and result["world_size"] == 2
    assert json.loads((stage_dir(out, "toy_evaluate") / "metrics.json").read_text())["toy"]["test_images"] == 32


def test_under_deepspeed_the_hooks_edit_survives_and_the_run_equals_ddp(toy_reference, tiny_data, tmp_path):
    """ZeRO-1 keeps its own fp32 copy of the parameters; the trainer refreshes it after every hook
    (`parameters_edited`), else the next step would undo the hook's shrink (measured: 0.087 apart from DDP)."""
    _, _, ctx = toy_reference
    config = toy_config(tmp_path / "ds.yaml", tiny_data, engine={**yaml.safe_load(toy_reference[0].read_text())["engine"],
                                                                 "strategy": "deepspeed"})
    proc = subprocess.run(qpm_command(2, "run", str(config), "--plugin", "toy_method", "--stage", "toy_train"),
                          capture_output=True, text=True, timeout=600, env=plugin_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = stage_dir(tmp_path / "runs-ds", "toy_train")
    result = json.loads((run / "result.json").read_text())
    assert result["strategy"] == "deepspeed" and result["task"] == {"ended": [0, 1, 2]}
    assert_same_weights(load_weights(ctx.outputs["toy_train"] / "model.pt"), load_weights(run / "model.pt"), atol=1e-5)


def test_resume_after_a_stop_in_the_epoch_after_the_hook_is_bitwise_identical(toy_reference, tiny_data, tmp_path):
    _, _, ctx = toy_reference
    config = toy_config(tmp_path / "stopped.yaml", tiny_data)
    command = qpm_command(1, "run", str(config), "--plugin", "toy_method", "--stage", "toy_train")
    # stopped inside the epoch after the hook
    run, ckpt, resumed = stop_inside_epoch_1_then_resume(command, plugin_env(), tmp_path / "runs-stopped", "toy_train",
                                                         STEPS_PER_EPOCH)
    assert f"resumed toy_train from {ckpt}" in resumed.stderr
    assert json.loads((run / "result.json").read_text())["task"] == {"ended": [0, 1, 2]}
    assert_same_weights(load_weights(ctx.outputs["toy_train"] / "model.pt"), load_weights(run / "model.pt"))


def test_the_toy_section_is_checked_like_the_built_in_ones(toy_reference):
    from qpm_dist.config import ConfigError, load_config

    config, _, _ = toy_reference
    with pytest.raises(ConfigError, match=r"toy\.shrink: expected a number in \(0, 1\], got 2\.0"):
        load_config(config, ["toy.shrink=2"])
    with pytest.raises(ConfigError, match=r"unknown config key 'toy\.shrinks'"):
        load_config(config, ["toy.shrinks=0.5"])


def test_registry_refuses_clashes_and_names_unknown_methods():
    from qpm_dist import methods
    from qpm_dist.config import ConfigError, load_config

    with pytest.raises(ValueError, match="method 'toy' is already registered"):
        methods.register(methods.MethodSpec(name="toy", label="Other", sections={}, stages=lambda cfg: [],
                                            head=object))

    @dataclass
    class OtherGLM:
        x: int = 0

    with pytest.raises(ValueError, match="declares config section 'glm' as .*OtherGLM"):
        methods.register(methods.MethodSpec(name="clash", label="Clash", sections={"glm": OtherGLM},
                                            stages=lambda cfg: [], head=object))
    assert "clash" not in methods.names()
    with pytest.raises(ConfigError, match=r"method: expected one of 'qpm', 'sldd', 'qsenn'.*got 'no_such_method'"):
        load_config(None, ["method=no_such_method"])
    with pytest.raises(ImportError, match="--plugin no_such_module: cannot import it"):
        methods.load_plugins(["no_such_module"])
