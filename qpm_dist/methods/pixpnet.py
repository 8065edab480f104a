"""PixPNet, pixel-grounded prototypical part networks (Carmichael et al., WACV 2024; specs/pixpnet.md), as stages:

    pixpnet_train -> pixpnet_evaluate -> pixpnet_report

pixpnet_train     Classifier(backbone cut at `pixpnet.layer`, PrototypeHead) trained from scratch (or from
                  model.weights, a full-backbone file loaded into the cut backbone) with `PixPNetTask`, phase
                  `pixpnet.train`; writes model.pt like every training stage (the file names the cut layer, so
                  `models.io.load_classifier` rebuilds it from the run's config alone)
pixpnet_evaluate  accuracy, the metrics of every classifier and the prototype metrics: consistency, stability and
                  the relevance ordering test of the receptive-field, upsampling and random mappings
                  (methods.pixpnet_eval, settings `pixpnet.eval`)
pixpnet_report    the HTML report: each class's prototypes with the training patch they were pushed to

Training (spec §2), one phase with epoch hooks (engine.task):
* warm-up, epochs 1..warmup_epochs: the backbone's parameters have requires_grad=False (no gradient, no Adam
  state, no weight decay: the optimizer skips them); its BatchNorm layers stay in train mode, so their running
  statistics keep updating, as in the reference. Joint afterwards: everything trainable.
* push (spec §3, methods.pixpnet_push) after epoch e when e = 1 (unless `push_first: false`, I2), e divisible by
  `push_every`, or e = the last: configs' 20 epochs push after 1, 4, 8, 12, 16, 20. The last push is the last
  operation, so the trained model's prototypes are exact training patches. The push scans the un-augmented
  training images minus the validation split, every rank its shard, with the per-rank `push_batch_size` (fixed
  for every world size: the push's bitwise rule, see pixpnet_push). BatchNorm buffers are first broadcast from
  rank 0 (each rank updated its own in training), so every rank scans with the model rank 0 exports.
* the last-layer phase (spec §2.1.4) is skipped: the `proto` read-out has no parameters. A `linear` read-out
  (ProtoPNet's) is trained jointly, with the L1 term, without that phase (its reference version is broken
  anyway, B2/B3).
* loss: PrototypeLoss (losses.prototypes), CE only in the configs (cluster and separation 0).
* optimizer: the phase's optimizer (Adam with coupled L2 in the configs) over four groups (spec §2.3): backbone
  (`train.optim.lr` / `train.optim.weight_decay`, norm parameters and biases `norm_weight_decay` when set),
  add-on (`add_on_lr` / `add_on_weight_decay`), prototypes (`prototype_lr` / `prototype_weight_decay`), read-out
  (`train.optim.head_lr`, default lr; no decay; empty for `proto`).
* schedule: the phase's (cosine per optimizer step in the configs, decaying to 0). Deviation from the reference
  (I4): no exponential warm-up factor, so the configured learning rates are reached; `train.schedule.
  warmup_epochs` gives a linear one if wanted.

Model selection (B4): a seeded, class-stratified `val_fraction` of the training split is held out
(data.held_out): never trained on, never pushed to, test-transformed. Its accuracy is measured after every
epoch's hooks (after that epoch's push) and recorded; the stage's model is the LAST one, i.e. right after the
final push (simplest to make exact: no second copy of the model in checkpoints, no DeepSpeed precision
question); `result.json` holds every epoch's validation numbers (`task.validation`, the last one the model's).
`val_fraction: 0` holds nothing out (then no validation numbers). The held-out split needs the folder backend.

Resume: the pushes are a function of the epoch; the trainer runs `on_epoch_end` once per epoch before that
epoch's checkpoint, which holds the pushed prototypes and the task's records (`state_dict`): a run resumed
inside an epoch neither repeats nor skips a push.

Phase choice: `pixpnet.train` is a PhaseConfig of its own (epochs, batch, optimizer, schedule), not `dense:`,
whose defaults and meaning belong to the dense baseline the other methods share; its feature diversity loss and
label smoothing must stay 0 (PixPNet's objective is the prototype loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
from torch import nn

from qpm_dist import dist
from qpm_dist.config import Config, ConfigError, OptimConfig, PhaseConfig, ScheduleConfig, bounded, to_dict
from qpm_dist.data.batch import Batch
from qpm_dist.data.held_out import HeldOutSource
from qpm_dist.engine.evaluate import evaluate_accuracy
from qpm_dist.engine.task import TrainingTask
from qpm_dist.engine.trainer import Trainer, TrainerSetup
from qpm_dist.losses.prototypes import PrototypeLoss
from qpm_dist.methods import MethodSpec, register
from qpm_dist.methods.pixpnet_eval import (HEADLINE, PixPNetEvalConfig, PixPNetEvaluateStage, PixPNetReportStage,
                                           check_settings, pixpnet_report_sections)
from qpm_dist.methods.pixpnet_push import push_prototypes
from qpm_dist.models.net import Classifier
from qpm_dist.models.protonet import PrototypeHead
from qpm_dist.models.truncation import UnknownLayer, backbone_layers, check_layer, truncated_backbone_from_config
from qpm_dist.stages.runner import RunContext, Stage
from qpm_dist.stages.train import TrainStage, prepare_for_training, seed_rank_streams
from qpm_dist.utils import log

def _train_defaults() -> PhaseConfig:
    """Spec §2.3: 20 epochs, batch 64, Adam (coupled L2), backbone lr 1e-4 / wd 1e-3, read-out lr 1e-4, cosine."""
    return PhaseConfig(epochs=20, batch_size=64, eval_batch_size=64, eval_every_epochs=5,
                       optim=OptimConfig(name="adam", lr=1e-4, weight_decay=1e-3),
                       schedule=ScheduleConfig(name="cosine"), fdl_beta=0.0)


@dataclass
class PixPNetConfig:
    # The backbone layer the prototypes compare with (models.truncation: resnets conv1, maxpool, layer1..4; VGG
    # conv1, maxpool1..5; tiny_resnet conv1, layer1..3); null = the architecture's last (spec §1.1).
    layer: Optional[str] = None
    prototypes_per_class: int = bounded(10, ge=1)  # P = classes x this, prototype j of class j // this (§1.3)
    dim: int = bounded(192, ge=1)  # D, the add-on layers' output channels = the prototypes' length
    add_on: Literal["regular", "bottleneck"] = "regular"  # §1.2
    distance: Literal["cosine", "l2"] = "cosine"  # §1.3
    activation: Literal["log", "linear"] = "log"  # log((d + 1) / (d + 1e-6)) or 1 - d
    # proto: logit_c = sum of class c's similarities (PixPNet, no parameters); linear: ProtoPNet's read-out,
    # trained jointly here (no last-layer phase, see the module docstring).
    readout: Literal["proto", "linear"] = "proto"
    warmup_epochs: int = bounded(5, ge=0)  # epochs 1..N train with the backbone frozen (§2.1)
    push_every: int = bounded(4, ge=1)  # push after every epoch divisible by this, and after the last
    push_first: bool = True  # also push after epoch 1, inside the warm-up (the reference's I2); false skips it
    # Images per forward of the push, PER RANK and the same for every world size: the push's bitwise rule
    # (methods.pixpnet_push) needs every image's distances computed in a batch of this size.
    push_batch_size: int = bounded(64, ge=1)
    # Fraction of each class's training images held out for validation (B4): never trained on or pushed to.
    val_fraction: float = bounded(0.1, ge=0, lt=1)
    # Loss coefficients (§2.2): PixPNet's configs train with cross-entropy only.
    ce: float = bounded(1.0, ge=0)
    cluster: float = bounded(0.0, ge=0)
    separation: float = bounded(0.0, ge=0)
    l1: float = bounded(1e-4, ge=0)  # linear read-out only (the proto read-out has no weights)
    # Parameter groups (§2.3) besides the backbone's (train.optim.lr / weight_decay) and the read-out's
    # (train.optim.head_lr, no decay).
    add_on_lr: float = bounded(3e-3, gt=0)
    add_on_weight_decay: float = bounded(1e-3, ge=0)
    prototype_lr: float = bounded(3e-3, gt=0)
    prototype_weight_decay: float = bounded(0.0, ge=0)
    # The training phase: epochs, global batch, optimizer (backbone lr/wd), schedule (see the module docstring).
    train: PhaseConfig = field(default_factory=_train_defaults)
    # pixpnet_evaluate's prototype metrics (consistency, stability, ROT): their budgets and constants
    eval: PixPNetEvalConfig = field(default_factory=PixPNetEvalConfig)

    def check(self, key: str) -> None:
        if self.layer is not None and not self.layer.strip():
            raise ConfigError(f"{key}.layer: expected null (the architecture's last layer) or a layer name, got ''")
        if self.train.epochs == 0:
            raise ConfigError(f"{key}.train.epochs: PixPNet trains its model, so it needs epochs > 0, got 0")
        if self.train.fdl_beta != 0 or self.train.label_smoothing != 0:
            raise ConfigError(f"{key}.train.fdl_beta / label_smoothing: PixPNet's objective is the prototype loss "
                              f"({key}.ce, cluster, separation, l1), so both must be 0, got {self.train.fdl_beta} "
                              f"and {self.train.label_smoothing}")
        if self.warmup_epochs > self.train.epochs:
            raise ConfigError(f"{key}.warmup_epochs: {self.warmup_epochs} exceeds {key}.train.epochs="
                              f"{self.train.epochs}: the backbone would never train")
        if self.ce == 0 and self.cluster == 0 and self.separation == 0:
            raise ConfigError(f"{key}.ce, cluster, separation: all 0, nothing to train")


def resolved_layer(cfg: Config) -> str:
    """`pixpnet.layer`, or the architecture's last layer when null (spec §1.1's default)."""
    return cfg.pixpnet.layer or backbone_layers(cfg.model.arch)[-1]


def push_epochs(epochs: int, push_every: int, push_first: bool = True) -> list[int]:
    """The 1-based epochs after which the prototypes are pushed (spec §2.1.3): 1 (if `push_first`), every multiple
    of `push_every`, and the last. 20 epochs, every 4: [1, 4, 8, 12, 16, 20]."""
    return [e for e in range(1, epochs + 1) if (e == 1 and push_first) or e % push_every == 0 or e == epochs]


def build_pixpnet_model(cfg: Config, num_classes: int) -> Classifier:
    """The backbone cut at the layer (model.weights, a full-backbone file, loaded before the cut) and a prototype
    head; the same initial weights on every rank (seeded)."""
    pix = cfg.pixpnet
    torch.manual_seed(cfg.run.seed)
    backbone = truncated_backbone_from_config(cfg.model, resolved_layer(cfg))
    head = PrototypeHead(backbone.num_features, num_classes, pix.prototypes_per_class, pix.dim, pix.add_on,
                         pix.distance, pix.activation, pix.readout)
    return prepare_for_training(Classifier(backbone, head), cfg)


class PixPNetTask(TrainingTask):
    """PixPNet's training step and epoch hooks (see the module docstring). `records()` / `state_dict()`: the
    pushes done (epoch and PushRecord.summary()) and the validation accuracy after every epoch."""

    unused_parameters = True  # the warm-up freezes the backbone: DDP must not wait for its gradients

    def __init__(self, pix: PixPNetConfig, phase: PhaseConfig) -> None:
        self.pix, self.phase = pix, phase
        self.loss = PrototypeLoss(pix.ce, pix.cluster, pix.separation, pix.l1)
        self.push_at = push_epochs(phase.epochs, pix.push_every, pix.push_first)
        self.pushes: list[dict] = []  # {"epoch": e, **PushRecord.summary()}
        self.validation: list[dict] = []  # {"epoch": e, "pushed": bool, "acc": ..., "loss": ..., "count": ...}
        self.held_out: dict = {}  # the split's sizes, set by the stage (reported with the records)

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Four groups in a fixed order (backbone decayed, backbone no-decay, add-on, prototypes, read-out), every
        parameter included whatever its requires_grad now (the warm-up toggles it; the optimizer skips a
        parameter without gradient)."""
        optim, pix = self.phase.optim, self.pix
        sets = model.head.parameter_sets()
        norm_wd = optim.weight_decay if optim.norm_weight_decay is None else optim.norm_weight_decay
        backbone = list(model.backbone.parameters())
        groups = [{"params": [p for p in backbone if p.ndim > 1], "lr": optim.lr, "weight_decay": optim.weight_decay},
                  {"params": [p for p in backbone if p.ndim <= 1], "lr": optim.lr, "weight_decay": norm_wd},
                  {"params": sets["add_on"], "lr": pix.add_on_lr, "weight_decay": pix.add_on_weight_decay},
                  {"params": sets["prototypes"], "lr": pix.prototype_lr, "weight_decay": pix.prototype_weight_decay},
                  {"params": sets["readout"], "lr": optim.head_lr or optim.lr, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def step(self, batch: Batch, strategy) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = strategy.prepare(batch.images)
        targets = batch.targets.to(strategy.device, non_blocking=True)
        with strategy.autocast():
            output = strategy.forward(images)
        loss, parts = self.loss(output, targets, strategy.module)
        accuracy = (output.logits.argmax(1) == targets).double().mean() * 100.0
        logs = {name: value.detach() for name, value in parts.items()}
        return loss, {**logs, "acc": accuracy}

    def warm_up(self, epoch: int) -> bool:
        """True if the 0-based `epoch` is a warm-up epoch (backbone frozen)."""
        return epoch < self.pix.warmup_epochs

    def on_epoch_start(self, trainer: Trainer) -> None:
        frozen = self.warm_up(trainer.progress.epoch)
        for p in trainer.module.backbone.parameters():
            p.requires_grad_(not frozen)

    def on_epoch_end(self, trainer: Trainer) -> None:
        epoch = trainer.progress.epoch + 1  # 1-based, as the spec counts
        module, info = trainer.module, trainer.info
        if info.world_size > 1:  # every rank pushes and validates with rank 0's BatchNorm statistics
            for buffer in module.buffers():
                dist.broadcast_tensor(buffer, src=0)
        if epoch in self.push_at:
            loader = trainer.data.eval_loader("train", self.pix.push_batch_size, info.rank, info.world_size,
                                              return_index=True)
            record = push_prototypes(module, loader, self.pix.push_batch_size, info.device, trainer.strategy.autocast,
                                     desc=f"push after epoch {epoch}" if trainer.setup.engine.progress else "")
            self.pushes.append({"epoch": epoch, **record.summary()})
            log.info("pixpnet: pushed %d prototypes after epoch %d", int(record.updated.sum()), epoch)
        if trainer.data.num_samples("val"):
            per_rank = max(1, self.phase.eval_batch_size // info.world_size)
            loader = trainer.data.eval_loader("val", per_rank, info.rank, info.world_size)
            val = evaluate_accuracy(module, loader, info, trainer.strategy.autocast, trainer.strategy.prepare)
            self.validation.append({"epoch": epoch, "pushed": epoch in self.push_at,
                                    **{k: val[k] for k in ("acc", "loss", "count")}})

    def state_dict(self) -> dict[str, Any]:
        return {"push_epochs": list(self.push_at), "held_out": self.held_out, "pushes": self.pushes,
                "validation": self.validation}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pushes = list(state.get("pushes", []))
        self.validation = list(state.get("validation", []))


def pixpnet_task(cfg: Config, phase: PhaseConfig) -> PixPNetTask:
    return PixPNetTask(cfg.pixpnet, phase)


def task_key(cfg: Config) -> dict[str, Any]:
    """What the task reads beyond the phase (the phase is in TrainStage's key already); the layer resolved."""
    key = to_dict(cfg.pixpnet)
    key.pop("train")
    key.pop("eval")  # read by pixpnet_evaluate only
    key["layer"] = resolved_layer(cfg)
    return key


class PixPNetTrainStage(TrainStage):
    """`pixpnet_train` (or `<method>_train` for a method built from these stages, see `method_stages`): TrainStage
    with PixPNet's model and the training data minus the held-out split."""

    def __init__(self, name: str = "pixpnet_train") -> None:
        super().__init__(name, "pixpnet.train", lambda cfg: cfg.pixpnet.train, model_stage=None,
                         task=pixpnet_task, task_key=task_key)

    def extends(self, record: dict, cfg: Config, folder: Path) -> str:
        """A longer run is a different push schedule (the last epoch pushes): never continued, always fresh."""
        return ""

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        parts = super().config_parts(cfg)
        parts[self.phase_name]["epochs"] = self.phase(cfg).epochs  # the push schedule depends on it
        return parts

    def initial_model(self, ctx: RunContext) -> nn.Module:
        return build_pixpnet_model(ctx.cfg, ctx.data.num_classes)

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        cfg = ctx.cfg
        model = self.initial_model(ctx)
        seed_rank_streams(cfg.run.seed + self.seed_offset, ctx.info.rank)
        data = HeldOutSource(ctx.data, cfg.pixpnet.val_fraction, cfg.run.seed)
        phase = self.phase(cfg)
        setup = TrainerSetup(phase=self.phase_name, cfg=phase, engine=cfg.engine, wandb=cfg.wandb, stage_dir=out_dir,
                             run_name=cfg.run.name, stage=self.name, resume=cfg.run.resume, config_dict=to_dict(cfg))
        task = self.task(cfg, phase)
        task.held_out = {"fraction": cfg.pixpnet.val_fraction, "val": int(data.num_samples("val")),
                         "train": int(data.num_samples("train"))}
        return Trainer(setup, model, task, data, ctx.info).fit()


def method_stages(method: str) -> Callable[[Config], list[Stage]]:
    """The stage list of `method` built from PixPNet's stages under its own names (`<method>_train`,
    `<method>_evaluate` writing metrics {method: ...}, `<method>_report`), all reading the `pixpnet` section:
    PixPNet itself, and ProtoPNet (methods.protopnet), the same model family under ProtoPNet's settings."""

    def stages(cfg: Config) -> list[Stage]:
        k = lambda c: c.pixpnet.prototypes_per_class  # noqa: E731
        train = f"{method}_train"
        return [PixPNetTrainStage(train), PixPNetEvaluateStage(train, lambda c: c.pixpnet.eval, k, method=method),
                PixPNetReportStage(train, k, method=method)]

    return stages


stages = method_stages("pixpnet")


def validate(cfg: Config) -> None:
    pix, model = cfg.pixpnet, cfg.model
    try:
        check_layer(model.arch, resolved_layer(cfg))
    except UnknownLayer as exc:
        raise ConfigError(f"pixpnet.layer: {exc}") from None
    if model.arch.startswith("vgg") and model.norm == "group":
        raise ConfigError(f"model.norm: {model.arch} has BatchNorm (torchvision's VGG-BN), got 'group'; use batch or "
                          f"sync_batch")
    if pix.val_fraction > 0 and cfg.data.backend != "folder":
        raise ConfigError(f"pixpnet.val_fraction: a held-out validation split needs data.backend=folder, got "
                          f"{cfg.data.backend}; set pixpnet.val_fraction=0 (no validation, the last model)")
    check_settings(pix.eval, cfg.data.img_size, "pixpnet.eval")
    if pix.warmup_epochs > 0 and cfg.engine.strategy == "deepspeed":
        raise ConfigError("pixpnet.warmup_epochs: freezing the backbone mid-run is not supported with "
                          "engine.strategy=deepspeed (untested); use ddp, or warmup_epochs=0")


SPEC = register(MethodSpec(
    name="pixpnet", label="PixPNet", sections={"pixpnet": PixPNetConfig}, stages=stages, head=PrototypeHead,
    validate=validate, order=60, headline=HEADLINE, report_sections=pixpnet_report_sections,
    demo_config="demo_pixpnet.yaml", units="prototypes",
))
