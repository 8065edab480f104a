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
    assert {"demo_gc.yaml", "cub_gc.yaml", "imagenet_gc_resnet18.yaml", "imagenet_gc_resnet50_gmp.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    import typing

    from qpm_dist.config import DataConfig

    dataset = (yaml.safe_load(path.read_text()).get("data") or {}).get("dataset", "synthetic")
    known = typing.get_args(typing.get_type_hints(DataConfig)["dataset"])
    if dataset not in known:
        pytest.skip(f"data.dataset={dataset!r} is not known to this branch's config (knows {known})")
    overrides = ["model.weights=/somewhere/resnet50.pth"]
    cfg = load_config(path, overrides)
    from qpm_dist import methods

    for name in methods.get(cfg.method).sections:  # ProtoPNet's is PixPNet's `pixpnet` section
        section = getattr(cfg, name)
        if hasattr(section, "n_per_class"):
            assert section.n_per_class <= section.n_features, path
    # <dataset>_<method>[_<variant>].yaml runs <method>; demo.yaml runs QPM
    assert cfg.method in path.stem.split("_") or path.stem == "demo", path


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


# ------------------------------------------------------------------- ranges (issue 13, item 3)


def _numeric_fields(cls, prefix=""):
    """(dotted key, dataclasses.Field) of every int / float field of `cls` and its nested sections, including
    Optional[int | float] and list[int | float]."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, key)
            continue
        args = typing.get_args(tp) or (tp,)
        if typing.get_origin(tp) is typing.Literal:
            continue
        if {a for a in args if a is not type(None)} & {int, float}:
            yield key, f


def test_every_numeric_field_of_every_section_declares_its_range():
    """A field added without a range would go unchecked: `bounded(default, ge=..., ...)` is the schema's way."""
    from qpm_dist.config import config_class

    fields = dict(_numeric_fields(config_class()))
    assert {"eval.batch_size", "data.std", "qsenn.round_epochs", "qpm.solver.mip_gap", "glm.fit.alpha"} <= set(fields)
    missing = [key for key, f in fields.items() if "range" not in f.metadata]
    assert not missing, f"numeric config fields without a declared range: {missing}"


def test_solver_options_are_bounded_at_load_as_the_solver_bounds_them():
    """A value the solver refuses must stop the run at load, not at the solve after hours of training."""
    from solver_service.problem import OPTION_BOUNDS

    from qpm_dist.config import config_class
    fields = dict(_numeric_fields(config_class()))
    for option, key in [("time_limit", "qpm.solver.time_limit"), ("threads", "qpm.solver.threads"),
                        ("seed", "run.seed")]:
        assert fields[key].metadata["range"].le == OPTION_BOUNDS[option][1], key
    with pytest.raises(ConfigError, match="run.seed"):
        load_config(None, ["run.seed=3000000000"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("eval.batch_size=0", "eval.batch_size: expected an integer >= 1, got 0"),
        ("eval.pointing_resize=0", "eval.pointing_resize: expected an integer >= 1, got 0"),
        ("qpm.dropout=-1", "qpm.dropout: expected a number in [0, 1), got -1.0"),
        ("model.dropout=1.5", "model.dropout: expected a number in [0, 1), got 1.5"),
        ("data.num_workers=-1", "data.num_workers: expected an integer >= 0, got -1"),
        ("data.std=[0.2, 0, 0.2]", "data.std[1]: expected a number in (0, 1], got 0.0"),
        ("dense.schedule.step_epochs=0", "dense.schedule.step_epochs: expected an integer >= 1, got 0"),
        ("finetune.optim.head_lr=-0.1", "finetune.optim.head_lr: expected a number > 0, got -0.1"),
        ("dense.optim.lr=.nan", "dense.optim.lr: expected a finite number > 0, got nan"),
        ("dense.optim.lr=.inf", "dense.optim.lr: expected a finite number > 0, got inf"),
        ("qsenn.round_epochs=[3, 0]", "qsenn.round_epochs[1]: expected an integer >= 1, got 0"),
        ("glm.selection.lookbehind=0", "glm.selection.lookbehind: expected an integer >= 1, got 0"),
        ("qpm.solver.threads=0", "qpm.solver.threads: expected an integer in [1, 1024], got 0"),
        ("dense.grad_accum=0", "dense.grad_accum: expected an integer >= 1, got 0"),  # not a ZeroDivisionError
    ],
)
def test_out_of_range_values_name_the_key_and_the_range(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value) == message


def test_nesterov_without_momentum_is_refused_before_torch_would_refuse_it_at_the_first_phase():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["finetune.optim.nesterov=true", "finetune.optim.momentum=0"])
    assert str(info.value) == "finetune.optim.nesterov: Nesterov momentum needs finetune.optim.momentum > 0"


def test_an_out_of_range_value_stops_the_run_before_any_work(capsys, tmp_path):
    """The issue's case: eval.batch_size=0 used to fail in the last stage (report), after hours of training."""
    from qpm_dist import cli

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    code = cli.main(["run", str(demo), f"run.out_dir={tmp_path}", "eval.batch_size=0"])
    err = capsys.readouterr().err
    assert code == 2 and err == "qpm-dist: error: eval.batch_size: expected an integer >= 1, got 0\n"
    assert not any(tmp_path.iterdir())  # no run folder, no data read


# ------------------------------------------------- YAML: duplicate keys and 1e-3 (issue 13, item 3)


def test_a_duplicate_key_is_an_error_naming_the_file_and_line(tmp_path):
    """PyYAML keeps the second of two equal keys: the second `dense:` block silently reset epochs 5 to 150."""
    path = write(tmp_path, "dense:\n  epochs: 5\nrun:\n  name: x\ndense:\n  batch_size: 16\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (f"{path}, line 5, column 1: duplicate key 'dense' (first on line 1); the second "
                               "would silently replace the first")
    nested = write(tmp_path, "dense:\n  optim: {lr: 0.1, momentum: 0.5, lr: 0.2}\n")
    with pytest.raises(ConfigError, match=r"line 2, column 35: duplicate key 'lr' \(first on line 2\)"):
        load_config(nested)
    with pytest.raises(ConfigError, match=r"override 'wandb\.tags=\{a: 1, a: 2\}'.*duplicate key 'a'"):
        load_config(None, ["wandb.tags={a: 1, a: 2}"])


def test_exponent_without_a_dot_is_a_float_in_files_and_overrides(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-3 as the string '1e-3'; every other tool the users know reads a float."""
    path = write(tmp_path, "dense:\n  optim: {lr: 1e-3, weight_decay: 5E-4, head_lr: +2e1}\n"
                           "finetune:\n  optim: {lr: 1.5e-4}\n")
    cfg = load_config(path, ["finetune.optim.weight_decay=1e-5", "finetune.optim.head_lr=3.e-2"])
    assert (cfg.dense.optim.lr, cfg.dense.optim.weight_decay, cfg.dense.optim.head_lr) == (1e-3, 5e-4, 20.0)
    assert (cfg.finetune.optim.lr, cfg.finetune.optim.weight_decay, cfg.finetune.optim.head_lr) == (1.5e-4, 1e-5, 0.03)
    with pytest.raises(ConfigError, match=r"dense\.epochs: expected int, got 1000\.0"):
        load_config(None, ["dense.epochs=1e3"])
    assert load_config(None, ["run.name='1e3'"]).run.name == "1e3"  # quoted stays a string
