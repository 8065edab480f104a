"""Stages shared by QPM, Q-SENN and SLDD."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qpm_dist.config import Config, to_dict
from qpm_dist.engine.trainer import Trainer, TrainerSetup
from qpm_dist.losses import ClassificationLoss
from qpm_dist.methods.stages import RunContext
from qpm_dist.models.net import Classifier, build_model


def data_key(cfg: Config) -> dict[str, Any]:
    """Data settings that change results (not the folder name: the dataset fingerprint covers content)."""
    d = to_dict(cfg.data)
    for name in ("root", "converted", "num_workers"):
        d.pop(name)
    return d


def build_dense_model(cfg: Config, num_classes: int) -> Classifier:
    """Same initial weights on every rank (seeded), then per-rank random streams for dropout."""
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, num_classes)
    if cfg.model.norm == "sync_batch":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


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
                "strategy": cfg.engine.strategy, "precision": cfg.engine.precision}

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        model = build_dense_model(ctx.cfg, ctx.data.num_classes)
        seed_rank_streams(ctx.cfg.run.seed, ctx.info.rank)
        phase = ctx.cfg.dense
        criterion = ClassificationLoss(phase.fdl_beta, phase.fdl_detach_weights, phase.label_smoothing)
        trainer = Trainer(trainer_setup(ctx, "dense", out_dir), model, criterion, ctx.data, ctx.info)
        return trainer.fit()
