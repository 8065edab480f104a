"""A method defined outside qpm_dist, registered by importing this module (in a test, or with
`qpm-dist run --plugin toy_method` and this folder on PYTHONPATH). It uses every plug point a new method has:

    toy_train      a classifier trained from scratch with ToyTask (the open training step):
                   * an extra batch field, `weight`: a per-sample array joined to every batch by sample index,
                     weighing each sample's cross-entropy (the task checks every batch got the right values);
                   * its own parameter groups: the head learns `toy.head_lr_scale` times faster;
                   * an epoch-end hook that shrinks the head's weights by `toy.shrink` and records the epoch
                     in the task's state, so a resumed run that repeated or skipped it would end differently;
    toy_evaluate   the generic evaluate stage, without a dense baseline.

It has its own config section (`toy:`) with its own ranges (`bounded`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from qpm_dist.config import Config, PhaseConfig, bounded, to_dict
from qpm_dist.data.batch import Batch
from qpm_dist.engine.optim import classifier_param_groups
from qpm_dist.engine.task import TrainingTask
from qpm_dist.methods import MethodSpec, register
from qpm_dist.models.net import DenseHead
from qpm_dist.stages.evaluate import EvaluateStage
from qpm_dist.stages.train import TrainStage


@dataclass
class ToyConfig:
    epochs: int = bounded(3, ge=1)
    shrink: float = bounded(0.5, gt=0, le=1)  # the epoch-end hook multiplies the head's weights by this
    head_lr_scale: float = bounded(2.0, gt=0)


def sample_weights(count: int) -> np.ndarray:
    """The `weight` field: 1, 2, 3, 1, 2, 3, ... by sample position."""
    return (1.0 + np.arange(count) % 3).astype(np.float32)


class ToyTask(TrainingTask):
    def __init__(self, toy: ToyConfig, phase: PhaseConfig) -> None:
        self.toy, self.phase = toy, phase
        self.ended: list[int] = []  # epochs whose end hook ran

    def param_groups(self, model):
        groups = classifier_param_groups(model, self.phase.optim)
        head = {id(p) for p in model.head.parameters()}
        for group in groups:
            if all(id(p) in head for p in group["params"]):
                group["lr"] *= self.toy.head_lr_scale
        return groups

    def batch_fields(self, data) -> dict[str, np.ndarray]:
        return {"weight": sample_weights(data.num_samples("train"))}

    def step(self, batch: Batch, strategy):
        batch.to(strategy.device)
        expected = torch.from_numpy(sample_weights(int(batch["index"].max()) + 1)).to(strategy.device)[batch["index"]]
        if not torch.equal(batch["weight"], expected):
            raise AssertionError("the joined `weight` field does not match the samples' indices")
        images = strategy.prepare(batch.images)
        with strategy.autocast():
            output = strategy.forward(images)
            ce = F.cross_entropy(output.logits.float(), batch.targets, reduction="none")
        loss = (ce * batch["weight"]).mean()
        return loss, {"ce": ce.mean(), "acc": (output.logits.argmax(1) == batch.targets).double().mean() * 100}

    def on_epoch_end(self, trainer) -> None:
        with torch.no_grad():
            trainer.module.head.linear.weight.mul_(self.toy.shrink)
        self.ended.append(trainer.progress.epoch)

    def state_dict(self) -> dict:
        return {"ended": list(self.ended)}

    def load_state_dict(self, state: dict) -> None:
        self.ended = list(state.get("ended", []))


def toy_phase(cfg: Config) -> PhaseConfig:
    return dataclasses.replace(cfg.dense, epochs=cfg.toy.epochs)


def stages(cfg: Config) -> list:
    return [TrainStage("toy_train", "dense", toy_phase, model_stage=None,
                       task=lambda c, phase: ToyTask(c.toy, phase), task_key=lambda c: to_dict(c.toy)),
            EvaluateStage("toy", "toy_train", k=lambda c: 2, baseline=None)]


SPEC = register(MethodSpec(name="toy", label="Toy", sections={"toy": ToyConfig}, stages=stages, head=DenseHead,
                           headline=("accuracy", "class_independence", "structural_grounding")))
