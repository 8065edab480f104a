"""Optimizers with the reference's parameter groups and per-iteration learning-rate schedules.

Schedules are LambdaLR factors of the optimizer step, so they step identically under DDP and DeepSpeed
and resume exactly from the scheduler state. The reference's StepLR (stepped once per epoch) is the
`step` schedule: the factor only changes at epoch boundaries.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qpm_dist.config import OptimConfig, ScheduleConfig


def classifier_param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters of a classifier in backbone/head x decayed/not-decayed groups.

    The head (the `model.head` module) may use its own learning rate (dense phase: backbone 0.005,
    classifier 0.01); normalisation parameters and biases may use their own weight decay
    (`norm_weight_decay`, e.g. 0 for ImageNet). Groups come in a fixed order (backbone before head, decayed
    before not), so an optimizer's state lines up with its checkpoint.
    """
    norm_wd = cfg.weight_decay if cfg.norm_weight_decay is None else cfg.norm_weight_decay
    head_lr = cfg.lr if cfg.head_lr is None else cfg.head_lr
    in_head = {id(p) for p in model.head.parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1  # norm weights/biases and all biases
        groups.setdefault((id(p) in in_head, no_decay), []).append(p)
    return [{"params": params, "lr": head_lr if is_head else cfg.lr,
             "weight_decay": norm_wd if no_decay else cfg.weight_decay}
            for (is_head, no_decay), params in sorted(groups.items())]


def build_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer of `cfg` over parameter groups that carry their own `lr` (and `weight_decay`)."""
    if not groups or not any(g["params"] for g in groups):
        raise ValueError("the model has no trainable parameters")
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adam":  # coupled L2: each group's weight_decay is added to its gradient (spec pixpnet §2.3)
        return torch.optim.Adam(groups, lr=cfg.lr)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise ValueError(f"optim.name: unknown optimizer {cfg.name!r}")


class LRFactor:
    """Multiplier of the base learning rates as a function of the optimizer step.

    A class rather than a closure so that LambdaLR's state_dict can record its parameters.
    """

    def __init__(self, cfg: ScheduleConfig, steps_per_epoch: int, epochs: int) -> None:
        self.name = cfg.name
        self.steps_per_epoch = steps_per_epoch
        self.total = max(1, steps_per_epoch * epochs)
        self.warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
        self.step_epochs, self.gamma, self.min_ratio = cfg.step_epochs, cfg.gamma, cfg.min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.name == "constant":
            return 1.0
        if self.name == "step":
            return self.gamma ** ((step // self.steps_per_epoch) // self.step_epochs)
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.name == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * t))
        elif self.name == "linear":
            decay = 1.0 - t
        else:
            raise ValueError(f"schedule.name: unknown schedule {self.name!r}")
        return self.min_ratio + (1.0 - self.min_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int,
                    epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRFactor(cfg, steps_per_epoch, epochs))
