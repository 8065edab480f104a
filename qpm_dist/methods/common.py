"""Stages shared by QPM, Q-SENN and SLDD."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qpm_dist import dist
from qpm_dist.config import Config, to_dict
from qpm_dist.engine.evaluate import autocast_for, evaluate_accuracy
from qpm_dist.engine.trainer import Trainer, TrainerSetup
from qpm_dist.losses import ClassificationLoss
from qpm_dist.methods.stages import RunContext
from qpm_dist.models.net import Classifier, build_model
from qpm_dist.utils import atomic_open, atomic_write_text


def data_key(cfg: Config) -> dict[str, Any]:
    """Data settings that change results (not the folder name: the dataset fingerprint covers content)."""
    d = to_dict(cfg.data)
    for name in ("root", "converted", "num_workers"):
        d.pop(name)
    return d


def file_digest(path: str) -> str:
    """sha256 of a file's content: a replaced weights file under the same name is a new input."""
    import hashlib

    h = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def autocast(ctx: RunContext):
    """The run's autocast context factory (engine.precision on this rank's device)."""
    return autocast_for(ctx.cfg.engine.precision, ctx.info.device)


def save_model(model: nn.Module, path: Path) -> None:
    """Rank 0 writes the state dict (CPU tensors) atomically; every rank waits for it."""
    if dist.is_main():
        with atomic_open(path) as fh:
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, fh)
    dist.barrier()


def prepare_for_training(model: nn.Module, cfg: Config) -> nn.Module:
    """Convert BatchNorm to SyncBatchNorm when the config asks for it (GPU only)."""
    if cfg.model.norm == "sync_batch":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def build_dense_model(cfg: Config, num_classes: int) -> Classifier:
    """Same initial weights on every rank (seeded); the caller then seeds per-rank streams for dropout."""
    torch.manual_seed(cfg.run.seed)
    return prepare_for_training(build_model(cfg.model, num_classes), cfg)


def seed_rank_streams(seed: int, rank: int) -> None:
    torch.manual_seed(seed * 7919 + rank + 1)


def trainer_setup(ctx: RunContext, phase: str, out_dir: Path) -> TrainerSetup:
    cfg = ctx.cfg
    return TrainerSetup(
        phase=phase, cfg=getattr(cfg, phase), engine=cfg.engine, wandb=cfg.wandb, stage_dir=out_dir,
        run_name=cfg.run.name, resume=cfg.run.resume,
        config_dict=to_dict(cfg),
    )


class DenseStage:
    """Train backbone + dense head with CE + feature diversity loss (specs/qpm.md §4)."""

    name = "dense"
    depends: tuple[str, ...] = ()

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        phase = dataclasses.replace(cfg.dense, eval_every_epochs=1)  # evaluation cadence does not change weights
        return {"data": data_key(cfg), "model": to_dict(cfg.model), "dense": to_dict(phase), "seed": cfg.run.seed,
                "strategy": cfg.engine.strategy, "precision": cfg.engine.precision,
                "weights_sha256": file_digest(cfg.model.weights) if cfg.model.weights else None}

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        model = build_dense_model(ctx.cfg, ctx.data.num_classes)
        if ctx.cfg.dense.epochs == 0:
            return self._pretrained(ctx, model, out_dir)
        seed_rank_streams(ctx.cfg.run.seed, ctx.info.rank)
        phase = ctx.cfg.dense
        criterion = ClassificationLoss(phase.fdl_beta, phase.fdl_detach_weights, phase.label_smoothing)
        trainer = Trainer(trainer_setup(ctx, "dense", out_dir), model, criterion, ctx.data, ctx.info)
        return trainer.fit()

    @staticmethod
    def _pretrained(ctx: RunContext, model: Classifier, out_dir: Path) -> dict:
        """dense.epochs=0: the dense model is model.weights as given (e.g. torchvision ImageNet weights)."""
        info = ctx.info
        model = model.to(info.device)
        per_rank = max(1, ctx.cfg.dense.eval_batch_size // info.world_size)
        loader = ctx.data.eval_loader("test", per_rank, info.rank, info.world_size, pin_memory=info.device.type == "cuda")
        test = evaluate_accuracy(model, loader, info.device, autocast(ctx))
        save_model(model, out_dir / "model.pt")
        if info.is_main:
            atomic_write_text(out_dir / "result.json", json.dumps({"phase": "dense", "epochs": 0, "test": test,
                                                                    "weights": ctx.cfg.model.weights}, indent=1))
        dist.barrier()
        return {"phase": "dense", "epochs": 0, "weights": ctx.cfg.model.weights, "test": test}
