"""IIS of a named backbone stage that the run folder holds under another key (issue 17: `qpm-dist iis
configs/demo_iis.yaml --backbone gc_train` trained GC anew at 64 px and scored that model instead of the demo's):
refused before anything trains (methods.iis.BackboneGuard), with hand-built run folders; a stage folder scored by
path is not guarded, but refused when the config would build another architecture."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import write_test_config

OTHER = "aaaaaaaaaaaa" + "a" * 52  # the folder key of a finished stage trained under another config


@pytest.fixture
def iis_cfg(tmp_path):
    from qpm_dist.config import load_config

    config = write_test_config(tmp_path / "iis.yaml", tmp_path / "data", tmp_path / "runs")
    return lambda *overrides: load_config(config, ["method=iis", *overrides])


def context(cfg):
    from qpm_dist.stages.runner import RunContext

    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    return RunContext(cfg=cfg, info=None, run_dir=run_dir, data=SimpleNamespace(fingerprint="fp"))


def finished(run_dir: Path, stage: str, key: str, output_key: str, config: dict, upstream: dict | None = None,
             outputs: dict | None = None) -> Path:
    """A hand-built finished stage folder (its stage.json as the runner writes it)."""
    folder = run_dir / f"{stage}-{key[:12]}"
    folder.mkdir(parents=True)
    (folder / "stage.json").write_text(json.dumps({
        "stage": stage, "key": key, "output_key": output_key, "config": config, "dataset": "fp",
        "upstream": upstream or {}, "outputs": outputs or {}}))
    return folder


class Stub:
    """A stage of the Stage protocol whose run only says it ran."""

    def __init__(self, name: str, config: dict, depends: tuple[str, ...] = ()) -> None:
        self.name, self.config, self.depends = name, config, depends

    def config_parts(self, cfg) -> dict:
        return self.config

    def run(self, ctx, out_dir) -> dict:
        return {"ran": self.name}


def this_keys(chain, ctx):
    """{stage: (folder key, output key)} this config gives the chain (as run_stages computes them)."""
    from qpm_dist.stages.runner import output_key, stage_key

    keys = {}
    for stage in chain:
        key = stage_key(stage, ctx)
        ctx.keys[stage.name] = output_key(stage, key, ctx.cfg)
        keys[stage.name] = key, ctx.keys[stage.name]
    ctx.keys.clear()
    return keys


def test_a_backbone_stage_finished_under_another_key_is_refused_and_one_with_this_key_is_scored(iis_cfg):
    from qpm_dist.methods.iis import BackboneGuard, BackboneMismatch, resolve_backbone, retrain_conflict

    cfg = iis_cfg("iis.backbone=gc_train")
    ctx = context(cfg)
    backbone = resolve_backbone(cfg)
    assert [s.name for s in backbone.stages] == ["gc_train"] and isinstance(backbone.stages[0], BackboneGuard)
    (train,) = backbone.stages
    assert retrain_conflict([train], "gc_train", ctx) == ""  # no gc_train in the run folder: IIS trains its own

    key, out = this_keys([train], ctx)["gc_train"]
    parts = train.config_parts(cfg)
    other = json.loads(json.dumps(parts))
    other["data"]["img_size"], other["model"]["dropout"] = 48, 0.0
    folder = finished(ctx.run_dir, "gc_train", OTHER, "b" * 64, other)
    problem = retrain_conflict([train], "gc_train", ctx)
    assert problem.startswith(f"iis.backbone: gc_train: {ctx.run_dir} holds the finished gc_train-aaaaaaaaaaaa, but "
                              f"this config gives gc_train the key {key[:12]} (gc_train: data.img_size: 48 -> 32, "
                              f"model.dropout: 0.0 -> 0.2), so IIS would train a new gc_train")
    assert f"--backbone {folder} " in problem and "iis.retrain_backbone=true" in problem and "\n" not in problem

    # the guard runs before the wrapped stage would train, and removes the folder the runner made for it
    ran = BackboneGuard(Stub("gc_train", parts), [train], "gc_train")
    out_dir = ctx.run_dir / f"gc_train-{key[:12]}"
    out_dir.mkdir()
    (out_dir / "stage_config.json").write_text("{}")
    with pytest.raises(BackboneMismatch, match="holds the finished gc_train-aaaaaaaaaaaa"):
        ran.run(ctx, out_dir)
    assert not out_dir.exists()
    retrain = context(iis_cfg("iis.backbone=gc_train", "iis.retrain_backbone=true"))
    assert ran.run(retrain, out_dir) == {"ran": "gc_train"}  # the explicit override trains anew

    # a finished gc_train of this config's key beside the other one: that model is scored, nothing is refused
    finished(ctx.run_dir, "gc_train", key, out, parts)
    assert retrain_conflict([train], "gc_train", ctx) == ""
    assert ran.run(ctx, out_dir) == {"ran": "gc_train"}


def test_the_refusal_names_the_root_cause_in_an_input_stage(iis_cfg):
    """qpm_finetune's key differs because qpm_solve's n_features does: the message says so, not just "its input
    stage qpm_solve: <hash> -> <hash>"."""
    from qpm_dist.methods.iis import retrain_conflict

    ctx = context(iis_cfg())
    chain = [Stub("solve", {"n_features": 16, "seed": 0}), Stub("finetune", {"epochs": 10}, depends=("solve",))]
    keys = this_keys(chain, ctx)
    finished(ctx.run_dir, "solve", "c" * 64, "d" * 64, {"n_features": 12, "seed": 0})
    finished(ctx.run_dir, "finetune", "e" * 64, "f" * 64, {"epochs": 10}, upstream={"solve": "d" * 64})
    problem = retrain_conflict(chain, "finetune", ctx)
    assert (f"holds the finished finetune-eeeeeeeeeeee, but this config gives finetune the key "
            f"{keys['finetune'][0][:12]} (solve: n_features: 12 -> 16), so IIS") in problem
    # the other run's solve folder gone: what is known is still said
    (ctx.run_dir / "solve-cccccccccccc" / "stage.json").unlink()
    assert f"(solve: its folder is not in {ctx.run_dir}), so IIS" in retrain_conflict(chain, "finetune", ctx)


def test_a_stage_folder_backbone_is_not_guarded_but_must_be_built_as_it_was_trained(iis_cfg, tmp_path):
    from qpm_dist.errors import BadInput
    from qpm_dist.methods.iis import BACKBONE_STAGE, BackboneGuard, BackboneStage, folder_model, stages
    from qpm_dist.utils import file_sha256

    cfg = iis_cfg("iis.backbone=gc_train")
    ctx = context(cfg)
    (train,) = stages(cfg)[:1]
    parts = train.config_parts(cfg)
    other = json.loads(json.dumps(parts))
    other["data"]["img_size"] = 48
    folder = finished(ctx.run_dir, "gc_train", OTHER, "b" * 64, other)
    (folder / "model.pt").write_bytes(b"weights")
    sha = file_sha256(folder / "model.pt")
    (folder / "stage.json").write_text(json.dumps({**json.loads((folder / "stage.json").read_text()),
                                                   "outputs": {"model.pt": sha}}))

    by_path = iis_cfg(f"iis.backbone={folder}")
    first = stages(by_path)[0]
    assert first.name == BACKBONE_STAGE and not any(isinstance(s, BackboneGuard) for s in stages(by_path))
    assert BackboneStage().config_parts(by_path)["sha256"] == sha  # no refusal: the conflicting gc_train is read
    # the comparison's identity of that model: the folder's stage and output key, if IIS reads it as trained
    assert folder_model(folder, sha, iis_cfg(f"iis.backbone={folder}", "data.img_size=48")) == {
        "stage": "gc_train", "key": "b" * 64}
    assert folder_model(folder, sha, by_path) is None  # images at another size: not that evaluation
    assert folder_model(folder, "0" * 64, iis_cfg("data.img_size=48")) is None  # not the model.pt it wrote

    other["model"]["reduced_strides"] = False  # the strides hold no weights: the file would load into another net
    (folder / "stage.json").write_text(json.dumps({**json.loads((folder / "stage.json").read_text()),
                                                   "config": other}))
    with pytest.raises(BadInput, match=r"was trained as another network than this config builds \(model.reduced_"
                                       r"strides: False \(the folder's\) vs True \(this config\)\)"):
        BackboneStage().config_parts(by_path)


def test_the_cli_refuses_in_one_line_before_anything_trains(tiny_data, tmp_path, capsys):
    from qpm_dist.cli import main
    from qpm_dist.config import load_config
    from qpm_dist.methods.iis import stages

    config = write_test_config(tmp_path / "iis.yaml", tiny_data, tmp_path / "runs")
    cfg = load_config(config, ["method=iis", "iis.backbone=gc_train"])
    (train,) = stages(cfg)[:1]
    other = json.loads(json.dumps(train.config_parts(cfg)))
    other["gc"] = "another"
    run_dir = tmp_path / "runs" / "t"
    finished(run_dir, "gc_train", OTHER, "b" * 64, other)
    assert main(["iis", str(config), "--backbone", "gc_train"]) == 2
    err = capsys.readouterr().err.splitlines()  # the run's log lines, then the error
    assert [line for line in err if "error" in line] == err[-1:]
    assert err[-1].startswith("qpm-dist: error: iis.backbone: gc_train: ") and "gc: another -> (absent)" in err[-1]
    assert sorted(p.name for p in run_dir.iterdir() if p.name != ".locks") == ["config.yaml", "gc_train-aaaaaaaaaaaa"]
