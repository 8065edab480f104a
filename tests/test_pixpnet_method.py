"""PixPNet as a method (qpm_dist.methods.pixpnet): config checks, the push schedule, the held-out validation split,
the warm-up, a resumed run, the model file, and a 2-process training step against the 1-process one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import REPO, clean_env, load_weights, qpm_command, stage_dir, stop_inside_epoch_1_then_resume

# 128 tiny_data training images: 12 held out (3 per class), 116 trained on = 14 steps of 8 per epoch.
PIX = {"layer": "layer2", "prototypes_per_class": 3, "dim": 8, "warmup_epochs": 1, "push_every": 2,
       "push_batch_size": 16, "val_fraction": 0.1,
       "train": {"epochs": 3, "batch_size": 8, "eval_batch_size": 32, "eval_every_epochs": 3,
                 "optim": {"name": "adam", "lr": 1.0e-3}}}
STEPS_PER_EPOCH = 14


def pix_config(path: Path, data_root: Path, out_dir: Path, method: str = "pixpnet", **pixpnet) -> Path:
    cfg = {"method": method, "run": {"name": "t", "seed": 0, "out_dir": str(out_dir)},
           "data": {"dataset": "synthetic", "root": str(data_root), "img_size": 32, "num_workers": 0,
                    "augment": "light"},
           "model": {"arch": "tiny_resnet", "tiny_width": 8, "reduced_strides": False},
           "pixpnet": {**PIX, **pixpnet},
           "engine": {"precision": "fp32", "progress": False, "log_every_steps": 1},
           "wandb": {"mode": "disabled"}}
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("override, expected", [
    ("pixpnet.layer=layer4", "pixpnet.layer: truncation layer 'layer4' does not exist in tiny_resnet; expected one "
                             "of conv1, layer1, layer2, layer3"),
    ("pixpnet.warmup_epochs=4", "pixpnet.warmup_epochs: 4 exceeds pixpnet.train.epochs=3"),
    ("pixpnet.train.fdl_beta=0.1", "pixpnet.train.fdl_beta / label_smoothing: PixPNet's objective"),
    ("pixpnet.train.epochs=0", "pixpnet.train.epochs: PixPNet trains its model"),
    ("pixpnet.val_fraction=1.0", "pixpnet.val_fraction: expected a number in [0, 1), got 1.0"),
    ("pixpnet.prototypes_per_class=0", "pixpnet.prototypes_per_class: expected an integer >= 1"),
    ("engine.strategy=deepspeed", "pixpnet.warmup_epochs: freezing the backbone mid-run is not supported"),
    ("data.backend=wds", "pixpnet.val_fraction: a held-out validation split needs data.backend=folder"),
    ("model.arch=vgg11_bn", "pixpnet.layer: truncation layer 'layer2' does not exist in vgg11_bn; expected one of "
                            "conv1, maxpool1, maxpool2, maxpool3, maxpool4, maxpool5"),
])
def test_config_errors_name_the_key(tmp_path, tiny_data, override, expected):
    from qpm_dist.config import ConfigError, load_config

    path = pix_config(tmp_path / "c.yaml", tiny_data, tmp_path / "runs")
    extra = ["data.converted=/nowhere"] if override.startswith("data.backend") else []
    with pytest.raises(ConfigError) as err:
        load_config(path, [override, *extra])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_vgg_is_refused_for_a_method_without_a_prototype_head(tmp_path, tiny_data):
    from qpm_dist.config import ConfigError, load_config

    path = pix_config(tmp_path / "c.yaml", tiny_data, tmp_path / "runs")
    load_config(path, ["model.arch=vgg16_bn", "pixpnet.layer=maxpool5"])  # fine for PixPNet
    with pytest.raises(ConfigError, match="model.norm: vgg16_bn has BatchNorm"):
        load_config(path, ["model.arch=vgg16_bn", "pixpnet.layer=maxpool5", "model.norm=group"])
    with pytest.raises(ConfigError, match="model.arch: vgg16_bn is available to methods that cut the backbone"):
        load_config(path, ["method=qpm", "model.arch=vgg16_bn"])


def test_a_bad_layer_stops_the_cli_with_one_line_and_exit_2(tmp_path, tiny_data):
    path = pix_config(tmp_path / "c.yaml", tiny_data, tmp_path / "runs")
    proc = subprocess.run(qpm_command(1, "run", str(path), "pixpnet.layer=layer9"), capture_output=True, text=True,
                          timeout=120, env=clean_env(), cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pixpnet.layer: truncation layer 'layer9' does not exist in tiny_resnet" in lines[0]


def test_push_schedule():
    from qpm_dist.methods.pixpnet import push_epochs

    assert push_epochs(20, 4) == [1, 4, 8, 12, 16, 20]  # spec §2.1.3
    assert push_epochs(20, 4, push_first=False) == [4, 8, 12, 16, 20]  # I2: no push inside the warm-up
    assert push_epochs(3, 2) == [1, 2, 3]
    assert push_epochs(10, 4) == [1, 4, 8, 10]
    assert push_epochs(1, 4) == [1]


def test_shipped_configs_load():
    from qpm_dist.config import load_config

    for name in ("demo_pixpnet", "cub_pixpnet", "cars_pixpnet", "imagenet_pixpnet"):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert cfg.method == "pixpnet", name


# ------------------------------------------------------------------------------------------ held-out split


def test_held_out_split_is_stratified_seeded_and_disjoint(tiny_data):
    from qpm_dist.config import DataConfig
    from qpm_dist.data.held_out import HeldOutSource, held_out_indices
    from qpm_dist.data.sources import read_splits

    labels = np.repeat(np.arange(4), [10, 3, 1, 6])
    val = held_out_indices(labels, 0.3, seed=5)
    assert np.bincount(labels[val], minlength=4).tolist() == [3, 1, 0, 2]  # round(0.3 n), a class keeps >= 1
    assert np.array_equal(val, held_out_indices(labels, 0.3, seed=5))
    assert not np.array_equal(val, held_out_indices(labels, 0.3, seed=6))

    data = read_splits(DataConfig(dataset="synthetic", root=str(tiny_data), img_size=32, num_workers=0))
    source = HeldOutSource(data, 0.1, seed=0)
    val, train = set(source.val_indices.tolist()), set(source.train_indices.tolist())
    assert len(val) == 12 and not val & train and len(val | train) == data.num_samples("train")

    def indices(loader) -> set:
        return {i for batch in loader for i in batch[2].tolist()}

    trained = set()
    for rank in (0, 1):  # every rank's augmented batches over an epoch: the remaining images only
        loader = source.train_loader(4, 8, rank, 2, return_index=True)
        loader.set_epoch(0)
        trained |= indices(loader)
    assert trained <= train and len(trained) == 112  # 116 cut to a multiple of the global batch
    pushed = indices(source.eval_loader("train", 16, 0, 2, return_index=True)) | indices(
        source.eval_loader("train", 16, 1, 2, return_index=True))
    assert pushed == train
    assert indices(source.eval_loader("val", 16, 0, 1, return_index=True)) == val
    assert source.num_samples("test") == data.num_samples("test")
    # a held-out image is served test-transformed, the same pixels as the bundle's own eval loader gives it
    first = source.val_indices[0]
    held = next(iter(source.eval_loader("val", 1, 0, 1)))[0][0]
    assert torch.equal(held, data.dataset("train", augment=False)[int(first)][0])


# ------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """One uninterrupted in-process run of pixpnet_train (bitwise what a 1-process `qpm-dist run` computes)."""
    from helpers import run_in_process

    tmp = tmp_path_factory.mktemp("pix")
    path = pix_config(tmp / "c.yaml", tiny_data, tmp / "runs", **{"train": {**PIX["train"], "epochs": 3}})
    records, ctx = run_in_process(path, "engine.keep_checkpoints=3", stage="pixpnet_train")
    return path, stage_dir(tmp / "runs", "pixpnet_train"), ctx


def checkpoint_params(folder: Path) -> list[dict]:
    """The model parameters of every epoch-end checkpoint, in epoch order."""
    out = []
    for ckpt in sorted(folder.glob("checkpoints/step_*"), key=lambda p: int(p.name.split("_")[1])):
        out.append(torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)["model"])
    return out


def test_warm_up_freezes_the_backbone_and_joint_trains_it(trained):
    from qpm_dist.methods.pixpnet import build_pixpnet_model

    path, folder, ctx = trained
    initial = build_pixpnet_model(ctx.cfg, ctx.data.num_classes).state_dict()
    epochs = checkpoint_params(folder)
    assert len(epochs) == 3
    params = {n for n, _ in build_pixpnet_model(ctx.cfg, ctx.data.num_classes).named_parameters()}
    backbone = sorted(n for n in params if n.startswith("backbone."))
    after_warm_up, after_joint = epochs[0], epochs[1]
    assert all(torch.equal(after_warm_up[n], initial[n]) for n in backbone)  # epoch 1: frozen, no weight decay
    assert all(not torch.equal(after_warm_up[n], initial[n]) for n in params - set(backbone))
    changed = [n for n in backbone if not torch.equal(after_joint[n], after_warm_up[n])]
    assert changed == backbone  # epoch 2: everything trains
    # BatchNorm stayed in train mode during the warm-up: its running statistics moved
    assert not torch.equal(after_warm_up["backbone.bn1.running_mean"], initial["backbone.bn1.running_mean"])


def test_pushes_happen_after_the_scheduled_epochs_and_never_to_held_out_images(trained):
    from qpm_dist.data.held_out import HeldOutSource
    from qpm_dist.models.io import load_classifier

    path, folder, ctx = trained
    result = json.loads((folder / "result.json").read_text())
    pushes = result["task"]["pushes"]
    assert [p["epoch"] for p in pushes] == [1, 2, 3] == result["task"]["push_epochs"]
    held = HeldOutSource(ctx.data, ctx.cfg.pixpnet.val_fraction, ctx.cfg.run.seed)
    for push in pushes:
        assert push["pushed"] == 12 and not set(push["sample"]) & set(held.val_indices.tolist())
    assert [v["epoch"] for v in result["task"]["validation"]] == [1, 2, 3]
    assert result["task"]["validation"][-1]["count"] == 12
    assert result["task"]["held_out"] == {"fraction": 0.1, "val": 12, "train": 116}
    # the saved model loads from the config alone (the file names the cut layer), its prototypes are the last push's
    model = load_classifier(folder / "model.pt", ctx.cfg.model)
    assert model.backbone.layer == "layer2"
    assert model.head.source_sample.tolist() == pushes[-1]["sample"]
    epochs = checkpoint_params(folder)  # each push's prototypes are in the checkpoint of its epoch
    assert not torch.equal(epochs[0]["head.prototypes"], epochs[1]["head.prototypes"])
    assert torch.equal(epochs[-1]["head.prototypes"], model.head.prototypes)


def test_a_run_stopped_after_a_push_resumes_without_repeating_or_skipping_one(trained, tiny_data, tmp_path):
    """SIGTERM 3 steps into epoch 2 (after epoch 1's push and checkpoint), resume: the model and the push records
    equal the uninterrupted run's bitwise."""
    path, folder, _ = trained
    out = tmp_path / "runs-stopped"
    stopped_cfg = pix_config(tmp_path / "c.yaml", tiny_data, out)
    command = qpm_command(1, "run", str(stopped_cfg), "--stage", "pixpnet_train", "engine.keep_checkpoints=3")
    run, ckpt, resumed = stop_inside_epoch_1_then_resume(command, clean_env(), out, "pixpnet_train", STEPS_PER_EPOCH)
    expected = json.loads((folder / "result.json").read_text())["task"]
    got = json.loads((run / "result.json").read_text())["task"]
    assert got["pushes"] == expected["pushes"] and got["validation"] == expected["validation"]
    a, b = load_weights(folder / "model.pt"), load_weights(run / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_training_steps_equal_the_one_process_steps(tiny_data, tmp_path):
    """A warm-up step and a joint step of the PixPNet loss (CE, cluster, separation) under DDP on 2 gloo ranks,
    4 images each: gradients (None for the frozen backbone) and updated parameters equal one process's on all 8."""
    from pixpnet_train_probe import train_steps

    from qpm_dist import dist

    one = train_steps(str(tiny_data), dist.init("cpu"))
    out = tmp_path / "steps"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "tests" / "pixpnet_train_probe.py"), str(tiny_data), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=clean_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, grad in one["grads0"].items():  # the warm-up step: no gradient reaches the backbone
        assert (grad is None) == name.startswith("backbone."), name
    assert all(g is not None for g in one["grads1"].values())
    for rank in (0, 1):
        two = torch.load(f"{out}.rank{rank}.pt", weights_only=True)
        for step in ("0", "1"):
            for name, grad in one[f"grads{step}"].items():
                if grad is None:
                    assert two[f"grads{step}"][name] is None, (rank, step, name)
                else:
                    torch.testing.assert_close(two[f"grads{step}"][name], grad, rtol=1e-4, atol=1e-6)
            for name, value in one[f"params{step}"].items():
                torch.testing.assert_close(two[f"params{step}"][name], value, rtol=1e-5, atol=1e-6)


def test_model_weights_of_the_full_backbone_load_into_the_cut_one(tmp_path, tiny_data):
    """model.weights (a torchvision-layout file of the whole backbone, fc included) initialises the layers the cut
    backbone keeps; the layers it drops and the fc are ignored."""
    from helpers import write_torchvision_weights

    from qpm_dist.config import load_config
    from qpm_dist.methods.pixpnet import build_pixpnet_model

    backbone, _ = write_torchvision_weights(tmp_path / "w.pth", num_classes=4)
    cfg = load_config(pix_config(tmp_path / "c.yaml", tiny_data, tmp_path / "runs"),
                      [f"model.weights={tmp_path / 'w.pth'}"])
    model = build_pixpnet_model(cfg, 4)
    full = backbone.state_dict()
    kept = model.backbone.state_dict()
    assert set(kept) == {k for k in full if not k.startswith("layer3.")}
    assert all(torch.equal(kept[k], full[k]) for k in kept)


def test_adam_takes_each_groups_coupled_weight_decay():
    from qpm_dist.config import OptimConfig
    from qpm_dist.engine.optim import build_optimizer

    w = torch.nn.Parameter(torch.ones(2))
    optimizer = build_optimizer([{"params": [w], "lr": 0.1, "weight_decay": 0.5}], OptimConfig(name="adam"))
    assert type(optimizer) is torch.optim.Adam and optimizer.param_groups[0]["weight_decay"] == 0.5
    w.grad = torch.zeros(2)  # coupled L2: the decay enters the gradient, so Adam's first step is -lr * sign(0.5 w)
    optimizer.step()
    torch.testing.assert_close(w.detach(), torch.full((2,), 0.9))


@pytest.mark.slow
def test_deepspeed_keeps_every_push_and_trains_what_ddp_trains(tiny_data, tmp_path):
    """Without warm-up (DeepSpeed with a warm-up is refused), ZeRO-1 in fp32 on one process: the pushes write into
    the module, `parameters_edited` copies them into DeepSpeed's fp32 partition, so the next steps start from the
    pushed prototypes: the final model equals the DDP run's bitwise."""
    models = {}
    for strategy in ("ddp", "deepspeed"):
        out = tmp_path / strategy
        path = pix_config(tmp_path / f"{strategy}.yaml", tiny_data, out, warmup_epochs=0)
        proc = subprocess.run(qpm_command(1, "run", str(path), "--stage", "pixpnet_train",
                                          f"engine.strategy={strategy}"),
                              capture_output=True, text=True, timeout=300, env=clean_env(), cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        models[strategy] = load_weights(stage_dir(out, "pixpnet_train") / "model.pt")
    a, b = models["ddp"], models["deepspeed"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_saved_cut_vgg_model_loads_from_the_config_alone(tmp_path):
    """The model file names the cut layer: load_classifier rebuilds vgg11_bn cut after maxpool1 with the prototype
    head, strictly, from `model.*` (a file without the layer would fail: the full VGG has more tensors)."""
    from qpm_dist.config import ModelConfig
    from qpm_dist.models.io import load_classifier, save_classifier
    from qpm_dist.models.net import Classifier
    from qpm_dist.models.protonet import PrototypeHead
    from qpm_dist.models.truncation import truncated_backbone

    torch.manual_seed(0)
    backbone = truncated_backbone("vgg11_bn", "maxpool1")
    model = Classifier(backbone, PrototypeHead(backbone.num_features, 3, prototypes_per_class=2, dim=4))
    save_classifier(tmp_path / "model.pt", model)
    loaded = load_classifier(tmp_path / "model.pt", ModelConfig(arch="vgg11_bn", reduced_strides=False))
    assert loaded.backbone.layer == "maxpool1"
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    images = torch.rand(2, 3, 16, 16)
    model.eval(), loaded.eval()
    assert torch.equal(model(images).logits, loaded(images).logits)


# ------------------------------------------------------------------------------------------ ProtoPNet


def test_protopnet_runs_pixpnets_stages_under_its_own_names_and_settings(tiny_data, tmp_path):
    """methods.protopnet: the config's method picks the stage names (protopnet_*), the metrics key and the
    comparison column; the `pixpnet` section's ProtoPNet settings build the last-layer model with the linear
    read-out. The shipped demo config is demo_pixpnet.yaml with exactly ProtoPNet's settings changed."""
    from helpers import run_in_process

    from qpm_dist.config import ConfigError, load_config, to_dict
    from qpm_dist.models.io import load_classifier
    from qpm_dist.report.compare import method_columns

    path = pix_config(tmp_path / "c.yaml", tiny_data, tmp_path / "runs", method="protopnet", layer=None,
                      readout="linear", cluster=0.8, separation=0.08, push_every=1,
                      eval={"rot_samples": 2, "rot_step_fraction": 0.25}, **{"train": {**PIX["train"], "epochs": 1}})
    records, ctx = run_in_process(path)
    assert list(records) == ["protopnet_train", "protopnet_evaluate", "protopnet_report"]
    model = load_classifier(stage_dir(tmp_path / "runs", "protopnet_train") / "model.pt", ctx.cfg.model)
    assert model.backbone.layer == "layer3" and model.head.readout_kind == "linear"  # tiny_resnet's last layer
    metrics = json.loads((stage_dir(tmp_path / "runs", "protopnet_evaluate") / "metrics.json").read_text())
    assert set(metrics) == {"protopnet"}
    assert {"consistency_hard_upsample", "consistency_hard_ours", "rot_area_upsample"} <= set(metrics["protopnet"])
    assert "ProtoPNet" in [c.label for c in method_columns(tmp_path / "runs")]
    assert not list((tmp_path / "runs").glob("*/pixpnet_*"))

    with pytest.raises(ConfigError, match="pixpnet.readout: method protopnet has ProtoPNet's linear read-out"):
        load_config(path, ["pixpnet.readout=proto"])
    pix, proto = (to_dict(load_config(REPO / "configs" / f"demo_{m}.yaml")) for m in ("pixpnet", "protopnet"))
    assert (pix.pop("method"), proto.pop("method")) == ("pixpnet", "protopnet")
    changed = {k for k in pix["pixpnet"] if pix["pixpnet"][k] != proto["pixpnet"][k]}
    assert changed == {"layer", "readout", "cluster", "separation"}
    assert (proto["pixpnet"]["layer"], proto["pixpnet"]["readout"]) == (None, "linear")
    assert {k: v for k, v in pix.items() if k != "pixpnet"} == {k: v for k, v in proto.items() if k != "pixpnet"}
