"""Grad-CAM consistency training, "GC" (Pillai & Pirsiavash, AAAI 2021; specs/gc_consistency.md) as cached stages:

    dense -> gc_train -> gc_evaluate -> gc_report

dense        the baseline: the same model trained with the same phase (`dense`), seed and data order, without
             the consistency loss; shared with QPM, SLDD and Q-SENN (same stage, same key)
gc_train     the model trained from scratch (or from model.weights) with `ConsistencyTask`: cross-entropy (+ the
             phase's feature diversity loss, 0 in the GC configs) on the positives plus λ times the consistency
             loss between the Grad-CAM of each positive and of its 2x2 composite (§5)
gc_evaluate  accuracy and the interpretability metrics (pointing game, stochastic pointing game, content
             heatmap, ...) of the GC model and of the baseline
gc_report    the HTML report

Both train with `dense` as their phase, so "the same schedule" holds by construction, not by two sections kept
equal by hand. GMP (global max pooling) is `model.pooling: max`, a property of the model shared by the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from qpm_dist import gradcam
from qpm_dist.config import Config, ConfigError, PhaseConfig, bounded, to_dict
from qpm_dist.data.batch import Batch
from qpm_dist.engine.task import ClassificationTask
from qpm_dist.losses.consistency import consistency_loss
from qpm_dist.methods import MethodSpec, register
from qpm_dist.models.backbones import build_backbone, output_stride
from qpm_dist.models.net import DenseHead
from qpm_dist.stages.evaluate import EvaluateStage
from qpm_dist.stages.report import ReportStage
from qpm_dist.stages.runner import Stage
from qpm_dist.stages.train import DenseStage, TrainStage

HEADLINE = ("accuracy", "pointing_game", "stochastic_pointing", "content_heatmap")
FEATURES_PER_CLASS = 5  # a dense model has no k of its own: SID@k / diversity@k up to the paper's 5


@dataclass
class GCConfig:
    # λ, the weight of the consistency loss next to the cross-entropy (spec §5.7: 25 on ImageNet, 1 on MS-COCO;
    # 0 trains the baseline). L_GC is a mean over the composite map's cells, so λ is tied to the map size: 25 is
    # tuned for 7x7 maps (224 px on a standard-stride ResNet); other sizes need another λ (§5.9).
    lam: float = bounded(25.0, ge=0)
    # Where a composite's three other images come from: other-class images of the dataset, each with its own
    # augmentation (the reference), or other samples of the same batch (§10.3: no extra decoding, cheaper).
    negatives: Literal["dataset", "in_batch"] = "dataset"
    # The Grad-CAM layer: null = the feature maps the head pools (the reference's layer4), else a module name of
    # the model (e.g. backbone.layer3), whose map takes the autograd path (double backward).
    layer: Optional[str] = None
    # The map's closed form (§10.4, no double backward; exact for the dense head's avg or max pooling, taking the
    # head's dropout as the identity, i.e. the eval-mode map): "auto" wherever it applies (layer null), "always"
    # requires it, "never" takes the autograd path (the reference's computation) also where it applies.
    closed_form: Literal["auto", "always", "never"] = "auto"

    def check(self, key: str) -> None:
        if self.layer is not None and not self.layer.strip():
            raise ConfigError(f"{key}.layer: expected null (the head's feature maps) or a module name, got ''")
        if self.closed_form == "always" and self.layer is not None:
            raise ConfigError(f"{key}.closed_form: 'always' needs {key}.layer=null (the closed form is the map of the "
                              f"maps the head pools), got {key}.layer={self.layer!r}")


class ConsistencyTask(ClassificationTask):
    """One micro-batch of GC training (spec §5): forward the positives and their composites (two passes in train
    mode, so BatchNorm normalises each with its own batch statistics, as the reference), the classification loss
    on the positives, the ground-truth class's Grad-CAM of both (fp32, differentiable) and
    loss = classification + λ · L_GC. Nothing is read on the host (no .item(), no Python ints from tensors)."""

    def __init__(self, gc: GCConfig, phase: PhaseConfig) -> None:
        super().__init__(phase)
        self.gc = gc
        self.composites = gc.negatives  # the trainer then builds the composite loader (data.composites)
        self.closed = {"auto": None, "always": True, "never": False}[gc.closed_form]

    def class_maps(self, strategy, images: torch.Tensor, targets: torch.Tensor) -> gradcam.GradCam:
        return gradcam.class_maps(strategy.module, strategy.prepare(images), targets, self.gc.layer, self.closed,
                                  forward=strategy.forward)

    def step(self, batch: Batch, strategy) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        device = strategy.device
        targets = batch.targets.to(device, non_blocking=True)
        with strategy.autocast():
            positive = self.class_maps(strategy, batch.images, targets)
            loss, parts = self.criterion(positive.output, targets, strategy.module)
            composite = self.class_maps(strategy, batch["composites"], targets)
        gc = consistency_loss(positive.maps, composite.maps, batch["quadrant"].to(device, non_blocking=True))
        logs = self.logs(positive.output, targets, loss, parts)
        logs.update(gc=gc, same_class_negatives=batch["same_class_negatives"].to(device).float().mean())
        return loss + self.gc.lam * gc, logs


def consistency_task(cfg: Config, phase: PhaseConfig) -> ConsistencyTask:
    return ConsistencyTask(cfg.gc, phase)


def stages(cfg: Config) -> list[Stage]:
    k = lambda c: FEATURES_PER_CLASS  # noqa: E731
    return [DenseStage(),
            TrainStage("gc_train", "dense", lambda c: c.dense, model_stage=None, task=consistency_task,
                       task_key=lambda c: to_dict(c.gc)),
            EvaluateStage("gc", "gc_train", k),
            ReportStage("gc", "gc_train", k)]


def validate(cfg: Config) -> None:
    model, size = cfg.model, cfg.data.img_size
    stride = output_stride(model.arch, model.reduced_strides)
    if size % stride:
        raise ConfigError(f"data.img_size: {size} is not a multiple of the total stride {stride} of model.arch="
                          f"{model.arch} (reduced_strides={model.reduced_strides}), so the composite's Grad-CAM map "
                          f"is not twice the image's; use {size - size % stride} or {size - size % stride + stride}")
    if cfg.dense.epochs == 0:
        raise ConfigError("dense.epochs: GC trains the model with the dense phase, so it needs epochs > 0, got 0")
    if cfg.gc.layer is not None:
        with torch.device("meta"):  # module names only: no memory, no initialisation cost
            backbone = build_backbone(model.arch, model.reduced_strides, model.norm, model.tiny_width)
        names = {f"backbone.{name}" if name else "backbone" for name, _ in backbone.named_modules()}
        if cfg.gc.layer not in names:
            stages = ", ".join(f"backbone.{name}" for name, _ in backbone.named_children())
            raise ConfigError(f"gc.layer: {cfg.gc.layer!r} is not a module of model.arch={model.arch}'s backbone "
                              f"(its top-level modules: {stages})")


SPEC = register(MethodSpec(
    name="gc", label="GC", sections={"gc": GCConfig}, stages=stages, head=DenseHead, validate=validate,
    demo_config="demo_gc.yaml", order=40, headline=HEADLINE,
))
