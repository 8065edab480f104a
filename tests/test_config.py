"""Config loading: YAML + dotted overrides, typed validation with messages naming the key."""

from pathlib import Path

import pytest
import yaml

from qpm_dist.config import ConfigError, default_config, load_config, save_config


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
    assert again != default_config()


SHIPPED_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))  # not deepspeed/*.json


def test_the_shipped_configs_are_there():
    names = {p.name for p in SHIPPED_CONFIGS}
    for dataset in ("demo", "cub", "cars", "imagenet"):
        for method in ("sldd", "qsenn"):
            assert f"{dataset}_{method}.yaml" in names
    assert {"demo.yaml", "cub_qpm.yaml", "imagenet_qpm.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    import typing

    from qpm_dist.config import DataConfig

    dataset = (yaml.safe_load(path.read_text()).get("data") or {}).get("dataset", "synthetic")
    known = typing.get_args(typing.get_type_hints(DataConfig)["dataset"])
    if dataset not in known:
        pytest.skip(f"data.dataset={dataset!r} is not known to this branch's config (knows {known})")
    cfg = load_config(path, ["model.weights=/somewhere/resnet50.pth"])
    section = getattr(cfg, cfg.method)
    assert section.n_per_class <= section.n_features, path
    assert path.stem.split("_")[-1] in (cfg.method, "demo")  # <dataset>_<method>.yaml runs <method>


def test_the_demo_methods_share_the_dense_stage():
    """demo.yaml, demo_sldd.yaml and demo_qsenn.yaml train one dense model (same stage key inputs, same run dir)."""
    from qpm_dist.stages.train import DenseStage

    configs = {name: load_config(Path(__file__).resolve().parents[1] / "configs" / name)
               for name in ("demo.yaml", "demo_sldd.yaml", "demo_qsenn.yaml")}
    assert [c.method for c in configs.values()] == ["qpm", "sldd", "qsenn"]
    parts = [DenseStage().config_parts(c) for c in configs.values()]
    assert parts[0] == parts[1] == parts[2]
    assert len({(c.run.out_dir, c.run.name) for c in configs.values()}) == 1
    # the features and selection stages are shared by SLDD and Q-SENN as well
    from qpm_dist.methods.glm_stages import SelectStage, features_stage

    sldd, qsenn = configs["demo_sldd.yaml"], configs["demo_qsenn.yaml"]
    features = features_stage("features", "dense")
    assert features.config_parts(sldd) == features.config_parts(qsenn)
    assert SelectStage("sldd").config_parts(sldd) == SelectStage("qsenn").config_parts(qsenn)


def test_more_features_than_the_backbone_has_is_an_error():
    with pytest.raises(ConfigError, match=r"qpm\.n_features \(50\) exceeds the 32 features of model\.arch=tiny_resnet"):
        load_config(None, ["model.arch=tiny_resnet", "model.tiny_width=8"])
    assert load_config(None, ["model.arch=tiny_resnet", "model.tiny_width=8", "qpm.n_features=32"])
