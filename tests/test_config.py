"""Config loading: YAML + dotted overrides, typed validation with messages naming the key."""

import pytest
import yaml

from qpm_dist.config import Config, ConfigError, load_config, save_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_file_and_overrides_layer_in_order(tmp_path):
    path = write(tmp_path, "dense:\n  epochs: 3\n  optim:\n    lr: 0.5\nmodel:\n  arch: tiny_resnet\n")
    cfg = load_config(path, ["dense.optim.lr=0.1", "engine.strategy=deepspeed", "wandb.tags=[a, b]"])
    assert cfg.dense.epochs == 3
    assert cfg.dense.optim.lr == 0.1
    assert cfg.dense.optim.momentum == 0.9  # untouched default survives the nested merge
    assert cfg.dense.optim.head_lr == 0.01  # dense-phase default
    assert cfg.finetune.optim.lr == 1e-4  # fine-tuning default
    assert cfg.engine.strategy == "deepspeed"
    assert cfg.wandb.tags == ["a", "b"]
    assert cfg.model.arch == "tiny_resnet"


def test_int_widens_to_float_but_not_the_reverse(tmp_path):
    assert load_config(None, ["dense.optim.lr=1"]).dense.optim.lr == 1.0
    with pytest.raises(ConfigError, match=r"dense\.epochs: expected int, got 2\.5"):
        load_config(None, ["dense.epochs=2.5"])


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("dense.optim.lrr=0.1", r"unknown config key 'dense\.optim\.lrr'; did you mean 'dense\.optim\.lr'"),
        ("trian.lr=0.1", r"unknown config key 'trian'"),
        ("dense.epochs=ten", r"dense\.epochs: expected int, got 'ten'"),
        ("engine.strategy=horovod", r"engine\.strategy: expected one of 'ddp', 'deepspeed'"),
        ("model.reduced_strides=maybe", r"model\.reduced_strides: expected bool"),
        ("model.weights=3", r"model\.weights: expected str or null"),
        ("data.mean=0.5", r"data\.mean: expected a list of float"),
        ("dense=3", r"dense: expected a mapping \(PhaseConfig\)"),
        ("dense.batch_size=10", r"dense\.batch_size \(10\) must be divisible by dense\.grad_accum"),
        ("nokey", r"not of the form key\.sub=value"),
    ],
)
def test_bad_values_name_the_key(override, pattern):
    overrides = [override] + (["dense.grad_accum=3"] if "batch_size" in override else [])
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_bad_yaml_file_names_the_file_and_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.size'"):
        load_config(write(tmp_path, "data:\n  size: 3\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["run.name=x", "dense.schedule.name=cosine"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["run"]["name"] == "x"
    assert again != Config()


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        cfg = load_config(path, ["model.weights=/somewhere/resnet50.pth"])
        assert cfg.qpm.n_per_class <= cfg.qpm.n_features, path


def test_more_features_than_the_backbone_has_is_an_error():
    with pytest.raises(ConfigError, match=r"qpm\.n_features \(50\) exceeds the 32 features of model\.arch=tiny_resnet"):
        load_config(None, ["model.arch=tiny_resnet", "model.tiny_width=8"])
    assert load_config(None, ["model.arch=tiny_resnet", "model.tiny_width=8", "qpm.n_features=32"])
