"""What a training phase optimises: the task object the trainer calls.

The trainer owns the loop and everything that must be right at scale: the data order and its resume position,
gradient accumulation, the strategy's backward and optimizer step (DDP or DeepSpeed), checkpoints, stop signals
and the metric window. A task owns what happens to one batch and at epoch boundaries, so a method with another
objective (Grad-CAM consistency, prototype losses, distillation) plugs in without touching the loop; the same
split as timm's TrainingTask and torchtitan's `forward_backward_step`.

The trainer calls, in this order::

    task.param_groups(model)              once, to build the optimizer (groups carry their own lr)
    task.batch_fields(data)               once: per-sample arrays joined to every batch by sample index
    for each epoch:
        task.on_epoch_start(trainer)      also when a run resumes inside the epoch
        for each micro-batch:
            loss, logs = task.step(batch, strategy)     inside the strategy's accumulation context
            strategy.backward(loss); strategy.step(...)
        task.on_epoch_end(trainer)        once per finished epoch, before the epoch's checkpoint
    task.state_dict() / load_state_dict() with every checkpoint

Inside a hook `trainer.progress.epoch` is the epoch that starts or has just ended; `trainer.module` is the bare
model, `trainer.data` the data source, `trainer.info` this rank. Hooks run on every rank; what they change must
change identically everywhere (a prototype push, say, ends with a broadcast of the winners). A hook may edit
parameter values in place: after every hook the trainer tells the strategy (`parameters_edited`), so DeepSpeed's
own fp32 copy follows the edit instead of overwriting it at the next step.

Checkpoint consistency of the hooks: `on_epoch_end` runs exactly once per epoch; what it changes in the model
is in the checkpoint written right after it, and what it records about itself goes into `state_dict()`, so a
run resumed later neither repeats nor skips it. `on_epoch_start` is called again when a run resumes inside
an epoch, so it must be a function of the epoch (set modes, freeze or unfreeze), not a one-off event.

`logs` are per-sample means over the micro-batch (plain scalar tensors, the same names at every step); the
trainer weights them by the batch size, sums them over steps and ranks and reports sum / count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from qpm_dist.config import PhaseConfig
from qpm_dist.data.batch import Batch
from qpm_dist.engine.optim import classifier_param_groups
from qpm_dist.losses import ClassificationLoss

if TYPE_CHECKING:  # annotations only: the trainer imports this module
    from qpm_dist.engine.trainer import Trainer


class TrainingTask:
    """Base class; `step` must be overridden, everything else has a neutral default."""

    # None, or where a composite image's negatives come from ("dataset" or "in_batch", see data.composites):
    # then every batch also carries `composites`, `quadrant`, `negative_index` and `same_class_negatives`.
    composites: str | None = None
    # True if some parameters get no gradient in some epochs (a hook sets requires_grad=False, e.g. PixPNet's
    # warm-up freezes the backbone): DDP is then built with find_unused_parameters=True, which leaves such
    # parameters' gradients None (the optimizer skips them) instead of waiting for them.
    unused_parameters: bool = False

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Parameter groups, each with its own `lr` (and `weight_decay`)."""
        raise NotImplementedError

    def batch_fields(self, data) -> dict[str, np.ndarray]:
        """Per-sample arrays of the training split, indexed by sample position, to join to every batch."""
        return {}

    def step(self, batch: Batch, strategy) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and loss of one micro-batch: (the loss to backpropagate, per-sample-mean logs)."""
        raise NotImplementedError

    def on_epoch_start(self, trainer: "Trainer") -> None:
        pass

    def on_epoch_end(self, trainer: "Trainer") -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """What the hooks recorded; saved in every checkpoint, so plain data only (numbers, strings, lists,
        dicts, tensors: checkpoints are read with torch.load(weights_only=True))."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ClassificationTask(TrainingTask):
    """Cross-entropy + feature diversity loss on a classifier (specs/qpm.md §4): dense training and every
    fine-tuning of the sparse-head methods. Backbone and head groups take the phase's `lr` and `head_lr`."""

    def __init__(self, phase: PhaseConfig) -> None:
        self.phase = phase
        self.criterion = ClassificationLoss(phase.fdl_beta, phase.fdl_detach_weights, phase.label_smoothing)

    def param_groups(self, model: nn.Module) -> list[dict]:
        return classifier_param_groups(model, self.phase.optim)

    def step(self, batch: Batch, strategy) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = strategy.prepare(batch.images)
        targets = batch.targets.to(strategy.device, non_blocking=True)
        with strategy.autocast():
            output = strategy.forward(images)
            loss, parts = self.criterion(output, targets, strategy.module)
        return loss, self.logs(output, targets, loss, parts)

    @staticmethod
    def logs(output, targets: torch.Tensor, loss: torch.Tensor, parts: dict) -> dict[str, torch.Tensor]:
        """The classification logs of a step (ce, fdl, acc); tasks that add to the objective extend them."""
        accuracy = (output.logits.argmax(1) == targets).double().mean() * 100.0
        return {"ce": parts["ce"], "fdl": parts.get("fdl", torch.zeros((), device=loss.device)), "acc": accuracy}
