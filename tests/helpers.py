"""Helpers for tests that run `qpm-dist` as users do: subprocesses, under torchrun for several ranks, so
signal handling, exit codes and process groups are real."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

# Small enough for seconds per run on 2 CPU cores, large enough for several steps per epoch.
TINY_DATA = dict(classes=4, parts=6, parts_per_class=2, min_size=32, max_size=40, train_per_class=32,
                 test_per_class=8, seed=0)

BASE_CONFIG = {
    "run": {"name": "t", "seed": 0},
    "data": {"dataset": "synthetic", "img_size": 32, "num_workers": 0, "augment": "light"},
    "model": {"arch": "tiny_resnet", "tiny_width": 8, "dropout": 0.2},
    "dense": {"epochs": 2, "batch_size": 16, "eval_batch_size": 32, "eval_every_epochs": 1,
              "optim": {"lr": 0.05, "head_lr": 0.1}, "schedule": {"name": "step", "step_epochs": 1, "gamma": 0.5}},
    "engine": {"precision": "fp32", "progress": False, "log_every_steps": 1,
               "deepspeed_config": str(REPO / "configs/deepspeed/zero1.json")},
    "qpm": {"n_features": 6, "n_per_class": 2},  # the tiny model has 32 features
    "wandb": {"mode": "disabled"},
}


# 3 epochs x 16 steps (48): long enough to stop a run in the middle of an epoch (engine and multi-node tests).
LONG = {"dense": {"epochs": 3, "batch_size": 8}}


def write_test_config(path: Path, data_root: Path, out_dir: Path, **updates: dict) -> Path:
    """BASE_CONFIG with this data root and out_dir, each section updated (one level deep), as YAML."""
    cfg = json.loads(json.dumps(BASE_CONFIG))
    cfg["data"]["root"] = str(data_root)
    cfg["run"]["out_dir"] = str(out_dir)
    for section, values in updates.items():
        cfg.setdefault(section, {}).update(values)
    path = Path(path)
    path.write_text(yaml.safe_dump(cfg))
    return path


def qpm_command(nproc: int, *args: str) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "qpm_dist", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "qpm_dist", *args]


def clean_env() -> dict[str, str]:
    """The environment of a test's subprocess: no torchrun variables of the test process, one thread per rank,
    and this checkout's packages first on the path (not whichever checkout the venv was installed from)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    path = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1", PYTHONPATH=path)
    return env


def run_qpm(nproc: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(qpm_command(nproc, *args), capture_output=True, text=True, timeout=timeout, env=clean_env(),
                          cwd=REPO)


def run_ranks_or_fail(command: list[str], timeout: float, failure: str) -> subprocess.CompletedProcess:
    """Run a torchrun command (its own session) and return its result; if it has not finished after `timeout`
    seconds (a deadlock: ranks waiting in unmatched collectives), stop it and fail the test with `failure`.
    torchrun ends its ranks (own sessions) on SIGTERM, SIGKILL after 30 s; killing torchrun itself would leave
    them running, so SIGKILL goes to the whole session only if SIGTERM did not end it within 60 s."""
    import pytest

    proc = subprocess.Popen(command, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(failure)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def stage_dir(out_dir: Path, stage: str = "dense") -> Path:
    found = sorted(Path(out_dir).glob(f"*/{stage}-*"))
    assert len(found) == 1, f"expected one {stage} stage folder under {out_dir}, found {found}"
    return found[0]


def wait_for_step(out_dir: Path, stage: str, step: int, proc, timeout: float = 300) -> None:
    """Wait until a running `stage` under out_dir has logged optimizer step `step` (its metrics.jsonl)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        for metrics in Path(out_dir).glob(f"*/{stage}-*/metrics.jsonl"):
            lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            if any(r.get("event") == "step" and r["global_step"] >= step for r in lines):
                return
        assert proc.poll() is None, f"run ended before step {step}: {proc.communicate()[1][-2000:]}"
        time.sleep(0.002)
    raise TimeoutError(f"step {step} not reached")


def stop_inside_epoch_1_then_resume(command: list[str], env: dict[str, str], out_dir: Path, stage: str,
                                    steps_per_epoch: int) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """Run `command`, SIGTERM it 3 steps into epoch 1 (after epoch 0's end hooks and checkpoint), check that it
    stopped with exit 75 at a checkpoint inside that epoch, and run it again to the end.
    Returns (the stage folder, the stop's checkpoint, the resumed run)."""
    import signal

    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(out_dir, stage, steps_per_epoch + 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr[-3000:]
    run = stage_dir(out_dir, stage)
    ckpt = max((run / "checkpoints").glob("step_*"))  # the stop's (the end of epoch 0 is kept too)
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["epoch"] == 1 and 0 < meta["step_in_epoch"] < steps_per_epoch, meta
    resumed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return run, ckpt, resumed


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a model file (qpm_dist.models.io), or a plain dict of tensors as saved."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return saved["state_dict"] if saved.get("format") == "qpm-dist/classifier" else saved


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), f"{key} differs (max |diff| {(a[key] - b[key]).abs().max()})"
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=lambda m: f"{key}: {m}")


def run_in_process(config: Path, *overrides: str, stage: str | None = None, threads: int = 1):
    """Run a config's stages in this process (one rank, `threads` threads; with 1 thread, bitwise what a
    1-process `qpm-dist run` under torchrun computes).

    For tests where multi-process behaviour is not the point: no interpreter start, no torch import, no process
    group. Returns (stage records, RunContext)."""
    from qpm_dist import dist, methods
    from qpm_dist.config import load_config
    from qpm_dist.data.sources import build_datasets
    from qpm_dist.stages.runner import RunContext, run_stages

    cfg = load_config(config, list(overrides))
    spec = methods.get(cfg.method)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        info = dist.init("cpu")
        ctx = RunContext(cfg=cfg, info=info, run_dir=Path(cfg.run.out_dir) / cfg.run.name,
                         data=build_datasets(cfg.data, cfg.run.seed), method=spec)
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        return run_stages(spec.stages(cfg), ctx, stage), ctx
    finally:
        torch.set_num_threads(previous)


def newest_logged_step(out_dir: Path, stage: str = "dense") -> int:
    """The newest optimizer step in the metrics of `stage` under run.out_dir (0 before the first one); a line
    being written meanwhile is skipped."""
    newest = 0
    for metrics in Path(out_dir).glob(f"*/{stage}-*/metrics.jsonl"):
        for line in metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("event") == "step":
                newest = max(newest, record["global_step"])
    return newest


def non_contiguous(obj, name: str = "") -> list[str]:
    """Where the tensors of a loaded .pt (nested dicts, lists, tuples) are not contiguous. A non-contiguous
    saved tensor breaks readers that view it as bytes (DeepSpeed's broadcast of a loaded model, issue 14)."""
    if isinstance(obj, torch.Tensor):
        return [] if obj.is_contiguous() else [name or "<tensor>"]
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return [bad for key, value in items for bad in non_contiguous(value, f"{name}/{key}")]


def assert_contiguous(path: Path) -> None:
    """Every tensor in the .pt file is contiguous (model files, DDP and DeepSpeed checkpoints; read weights_only,
    with the DeepSpeed classes our checkpoint engine allows)."""
    from qpm_dist.engine.deepspeed_checkpoints import DEEPSPEED_DATA_CLASSES

    with torch.serialization.safe_globals(DEEPSPEED_DATA_CLASSES):
        assert not (bad := non_contiguous(torch.load(path, map_location="cpu", weights_only=True))), f"{path}: {bad}"


def write_torchvision_weights(path: Path, num_classes: int, seed: int = 3) -> tuple:
    """A torchvision-layout weights file for BASE_CONFIG's model (tiny_resnet, width 8) with an `fc` for
    `num_classes` (what `dense.epochs: 0` needs); returns (backbone, fc) as written."""
    from qpm_dist.config import ModelConfig
    from qpm_dist.models.backbones import build_backbone

    torch.manual_seed(seed)
    backbone = build_backbone("tiny_resnet", ModelConfig().reduced_strides, "batch", 8)
    fc = torch.nn.Linear(backbone.num_features, num_classes)
    torch.save({**backbone.state_dict(), "fc.weight": fc.weight.detach(), "fc.bias": fc.bias.detach()}, path)
    return backbone, fc


def save_torchscript_archive(model: torch.nn.Module, path) -> None:
    """Save `model`'s parameters as a TorchScript archive of nested modules holding the same parameter names, the
    layout of OpenAI's released CLIP files (which `text_encoders.load_clip` rebuilds from the shapes)."""
    root = torch.nn.Module()
    for key, value in model.state_dict().items():
        *parts, leaf = key.split(".")
        module = root
        for part in parts:
            if not hasattr(module, part):
                setattr(module, part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(value.clone(), requires_grad=False))
    torch.jit.script(root).save(str(path))
