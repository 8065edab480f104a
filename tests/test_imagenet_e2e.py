"""The README's ImageNet commands, end to end, on a fake ImageNet in the official layout (issue 14).

The commands are taken from README.md as written (`readme_commands`), with only what differs on this machine
substituted: the dataset and output paths, 2 processes instead of 8, and a tiny backbone at 32 px instead of
ResNet-50 at 224 px (`TINY`). The fake ImageNet (tests/fake_imagenet.py) has what the real one has and readers
trip over: a devkit archive whose class ids are not in wnid order, a flat val, box XMLs for some images, a
grayscale, a CMYK and a PNG-named-.JPEG image.

"Pretrained" weights are what users have: a torchvision references checkpoint (`model`, `model_ema`, `args` as
a Namespace), written from a dense model trained here with the same config. Its test accuracy is the dense
accuracy every `dense.epochs: 0` run must report: that proves the file was read into the right layers.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, clean_env, load_weights, stage_dir
from real_slurm import free_port
from test_readme_commands import readme_commands

pytestmark = pytest.mark.slow

# configs/imagenet_*.yaml at a size this machine trains in seconds; everything else as the configs say
# (augment=imagenet, normalised inputs, standard strides, dense.epochs=0, the QPM and SLDD recipes' structure).
TINY = ["model.arch=tiny_resnet", "model.tiny_width=8", "data.img_size=32", "data.num_workers=0",
        "engine.precision=fp32", "engine.channels_last=false", "engine.progress=false", "wandb.mode=disabled",
        "dense.eval_batch_size=30", "finetune.epochs=2", "finetune.batch_size=20", "finetune.eval_batch_size=30",
        "finetune.eval_every_epochs=1", "finetune.optim.lr=0.01", "eval.batch_size=30", "eval.gmm_samples=200",
        "report.class_pairs=2", "qpm.n_features=6", "qpm.n_per_class=2", "qpm.stats_batch_size=30",
        "qpm.solver.time_limit=60", "sldd.n_features=6", "sldd.n_per_class=2", "glm.batch_size=30"]
README_DATA, README_WEIGHTS = "/data/imagenet", "/data/weights/resnet50.pth"


def readme_command(*words: str) -> list[str]:
    """The one README command that contains all `words` (as shell words)."""
    found = [c.argv for c in readme_commands() if all(w in c.argv for w in words)]
    assert len(found) >= 1, f"README.md has no command with {words}"
    return found[0]


def substitute(argv: list[str], mapping: dict[str, str]) -> list[str]:
    out = []
    for word in argv:
        for old, new in mapping.items():
            word = word.replace(old, new)
        out.append(word)
    return out


def run(argv: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    if argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    elif argv[0] == "qpm-dist":
        argv = [sys.executable, "-m", "qpm_dist", *argv[1:]]
    env = clean_env()  # the venv's launchers (torchrun, deepspeed) first on the PATH, as `make test` has them
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory, fake_imagenet) -> dict[str, Path]:
    """The fake ImageNet, its README conversions, and a references-format weights file trained on it."""
    tmp = tmp_path_factory.mktemp("imagenet_e2e")
    paths = {"root": fake_imagenet, "wds": tmp / "imagenet-wds", "ffcv": tmp / "imagenet-ffcv", "tmp": tmp}
    mapping = {f"{README_DATA}-wds": str(paths["wds"]), f"{README_DATA}-ffcv": str(paths["ffcv"]),
               README_DATA: str(fake_imagenet)}
    for argv in (readme_command("to-wds", "imagenet"), readme_command("to-ffcv", "imagenet")):
        run(substitute(argv, mapping) + ["--workers", "2"])
    verify = readme_command("verify", f"{README_DATA}-wds")
    for converted in ("wds", "ffcv"):
        run(substitute(verify, {f"{README_DATA}-wds": str(paths[converted])}))

    # The "pretrained" ResNet: a dense model trained with the QPM config itself, saved as torchvision's
    # references/classification scripts save checkpoints.
    pretrain = tmp / "pretrain"
    run(["qpm-dist", "run", "configs/imagenet_qpm.yaml", "--stage", "dense", f"data.root={fake_imagenet}",
         f"run.out_dir={pretrain}", "dense.epochs=8", "dense.batch_size=20", "dense.optim.lr=0.05", *TINY])
    dense = stage_dir(pretrain)
    state = load_weights(dense / "model.pt")
    torchvision_layout = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    torchvision_layout |= {"fc.weight": state["head.linear.weight"], "fc.bias": state["head.linear.bias"]}
    ema = {f"module.{k}": torch.zeros_like(v) for k, v in torchvision_layout.items()}  # must not be the one read
    paths["weights"] = tmp / "resnet50.pth"
    torch.save({"model": torchvision_layout, "model_ema": {**ema, "n_averaged": torch.tensor(3)},
                "args": argparse.Namespace(model="resnet50", lr=0.5), "epoch": 8}, paths["weights"])
    paths["pretrained_top1"] = json.loads((dense / "result.json").read_text())["test"]["acc"]
    return paths


def readme_run(imagenet, words: tuple[str, ...], out: str, *extra: str, config: str = "configs/imagenet_qpm.yaml",
               nproc: int = 2) -> Path:
    """Run the README command with `words` (its ImageNet QPM config replaced by `config`), on `nproc` processes
    and the fake data; returns its run folder."""
    argv = substitute(readme_command(*words), {README_WEIGHTS: str(imagenet["weights"]),
                                               "configs/imagenet_qpm.yaml": config})
    argv = [w if w != "8" or argv[i - 1] not in ("--nproc-per-node", "--num_gpus") else str(nproc)
            for i, w in enumerate(argv)]
    if argv[0] == "deepspeed":  # not DeepSpeed's default port 29500, which every run on the machine shares
        argv[1:1] = ["--master_port", str(free_port())]
    out_dir = imagenet["tmp"] / out
    argv += [f"data.root={imagenet['root']}", f"run.out_dir={out_dir}", *TINY, *extra]
    if argv[:2] == ["qpm-dist", "launch"] and "--run" not in argv:  # it prints the command to run: run that
        argv = shlex.split(run(argv).stdout.strip().splitlines()[-1])
        assert argv[0] == "torchrun", argv
    run(argv)
    return out_dir


def dense_top1(out_dir: Path) -> float:
    return json.loads((stage_dir(out_dir, "dense") / "result.json").read_text())["test"]["acc"]


def test_readme_check_accepts_the_fake_imagenet_and_the_references_checkpoint(imagenet):
    argv = substitute(readme_command("check", "configs/imagenet_qpm.yaml"), {README_WEIGHTS: str(imagenet["weights"])})
    proc = run(argv + [f"data.root={imagenet['root']}", *TINY])
    assert "inputs: all found" in proc.stdout, proc.stdout  # the data folder, and weights that fit model.arch


def test_qpm_ddp_on_ffcv_and_deepspeed_on_webdataset(imagenet):
    ddp = readme_run(imagenet, ("launch", "--nproc-per-node", "configs/imagenet_qpm.yaml"), "qpm-ddp-ffcv",
                     "data.backend=ffcv", f"data.converted={imagenet['ffcv']}")
    ds = readme_run(imagenet, ("deepspeed", "--num_gpus", "configs/imagenet_qpm.yaml"), "qpm-ds-wds",
                    "data.backend=wds", f"data.converted={imagenet['wds']}")
    for out in (ddp, ds):
        weight = load_weights(stage_dir(out, "qpm_finetune") / "model.pt")["head.weight"]
        assert weight.shape == (10, 6) and (weight.sum(1) == 2).all()  # 10 wnids, 2 of 6 features each
        metrics = json.loads((stage_dir(out, "qpm_evaluate") / "metrics.json").read_text())
        # the converted data holds the same pixels: the weights file's model scores as it did when trained
        assert metrics["dense"]["accuracy"] == pytest.approx(imagenet["pretrained_top1"], abs=1e-9)
        assert metrics["qpm"]["accuracy"] > 20  # 10 classes: twice chance at least
        report = (stage_dir(out, "qpm_report") / "report.html").read_text()
        assert "tench" in report and "n01440764" not in report.split("<body", 1)[-1]  # devkit words, not wnids


def test_sldd_ddp_and_deepspeed_agree_and_read_the_weights_as_trained(imagenet):
    sldd = "configs/imagenet_sldd.yaml"
    ddp = readme_run(imagenet, ("launch", "--nproc-per-node", "configs/imagenet_qpm.yaml"), "sldd-ddp", config=sldd)
    ds = readme_run(imagenet, ("deepspeed", "--num_gpus", "configs/imagenet_qpm.yaml"), "sldd-ds", config=sldd)
    for out in (ddp, ds):  # dense.epochs=0: the weights file's `model`, evaluated as it was when trained
        assert dense_top1(out) == pytest.approx(imagenet["pretrained_top1"], abs=1e-9)
    a, b = (load_weights(stage_dir(out, "sldd_finetune") / "model.pt") for out in (ddp, ds))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), rtol=1e-5, atol=1e-6), key
    sldd = json.loads((stage_dir(ddp, "sldd_evaluate") / "metrics.json").read_text())["sldd"]
    # the val box XMLs were read: the pointing metrics score the annotated val images, on the folder backend
    assert sldd["pointing_images"] > 0 and 0 <= sldd["pointing_game"] <= 1 and 0 <= sldd["content_heatmap"] <= 1
