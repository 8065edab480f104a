"""Training stages: one phase of training a classifier with a training task, and the shared dense stage.

`TrainStage` covers every phase of every method: the model comes from an earlier stage's model file (fine-
tuning) or is built from the config (dense training), the objective is a training task (default: CE + feature
diversity loss, `engine.task.ClassificationTask`), and the trainer does the rest (DDP or DeepSpeed,
checkpoints, resume, logging).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from qpm_dist.config import Config, PhaseConfig, to_dict
from qpm_dist.engine.evaluate import evaluate_accuracy
from qpm_dist.engine.task import ClassificationTask, TrainingTask
from qpm_dist.engine.trainer import Trainer, TrainerSetup
from qpm_dist.models.net import Classifier, build_model
from qpm_dist.stages.artifacts import MODEL, RESULT, load_model, save_model, write_json
from qpm_dist.stages.runner import RunContext
from qpm_dist.errors import TrainedTooLong
from qpm_dist.utils import file_sha256

TaskFactory = Callable[[Config, PhaseConfig], TrainingTask]


def data_key(cfg: Config) -> dict[str, Any]:
    """Data settings that change results. Left out: where the data is (the dataset fingerprint covers its
    content, which images val_classes keeps, and whether data.crop_root is used), loader workers (never change
    the data, see data.loaders), FFCV's page-cache choice, the digest check (it checks the bytes, it does not
    transform them: with intact files it changes nothing, and a damaged file stops the run unless
    on_corrupt=skip, which is in the key) and the WebDataset reading settings on other backends (read only by
    the wds backend)."""
    d = to_dict(cfg.data)
    for name in ("root", "converted", "num_workers", "cub_root", "crop_root", "val_classes", "ffcv_os_cache",
                 "digests"):
        d.pop(name)
    if cfg.data.backend != "wds":
        for name in ("wds_mode", "wds_shuffle_buffer"):
            d.pop(name)
    return d


def model_key(cfg: Config) -> dict[str, Any]:
    """Model settings that change results. The weights file enters by content (`weights_sha256` of the dense
    stage), not by path; which state dict of it is read (`weights_key`) only when there is a file; the head's
    pooling only when it is not the average every model had before the option existed (their keys stay)."""
    d = to_dict(cfg.model)
    d.pop("weights")
    if cfg.model.weights is None:
        d.pop("weights_key")
    if cfg.model.pooling == "avg":
        d.pop("pooling")
    return d


# Schedules whose factor at a step depends on the phase's total number of epochs: a phase trained with them for
# N epochs is not the start of one trained for more, so their `epochs` stays in the stage key.
TOTAL_DEPENDENT_SCHEDULES = ("cosine", "linear")


def prepare_for_training(model: nn.Module, cfg: Config) -> nn.Module:
    """Convert BatchNorm to SyncBatchNorm when the config asks for it (GPU only)."""
    if cfg.model.norm == "sync_batch":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def build_dense_model(cfg: Config, num_classes: int) -> Classifier:
    """Same initial weights on every rank (seeded); the caller then seeds per-rank streams for dropout."""
    torch.manual_seed(cfg.run.seed)
    return prepare_for_training(build_model(cfg.model, num_classes, require_head=cfg.dense.epochs == 0), cfg)


def seed_rank_streams(seed: int, rank: int) -> None:
    torch.manual_seed(seed * 7919 + rank + 1)


def classification_task(cfg: Config, phase: PhaseConfig) -> TrainingTask:
    return ClassificationTask(phase)


class TrainStage:
    """Train the model of `model_stage` (None: a new model from the config) for the phase `phase(cfg)`.

    `phase_name` is the config section the phase comes from ("dense", "finetune"): errors and logs name it.
    `task(cfg, phase)` builds the training task; `task_key(cfg)` holds the config it reads beyond the phase
    (it enters the stage key, with the task's name). Each rank seeds its own random streams (dropout) from
    run.seed + seed_offset.
    """

    def __init__(self, name: str, phase_name: str, phase: Callable[[Config], PhaseConfig], model_stage: str | None,
                 seed_offset: int = 0, task: TaskFactory = classification_task,
                 task_key: Callable[[Config], Any] = lambda cfg: None) -> None:
        self.name, self.phase_name, self.phase, self.model_stage = name, phase_name, phase, model_stage
        self.seed_offset, self.task, self.task_key = seed_offset, task, task_key
        self.depends: tuple[str, ...] = (model_stage,) if model_stage else ()

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        """What changes the trained weights. Not: how often and with which batch size the test set is evaluated
        (BatchNorm evaluates with its running statistics, so a sample's logits do not depend on its batch:
        result.json's test numbers agree up to float summation order, and later stages read only the weights);
        nor `epochs` under a schedule that does not depend on the total (see `extends`): a longer run continues
        a shorter one in the same folder, and `output_parts` gives later stages a new key."""
        phase = self.phase(cfg)
        fields = to_dict(phase)
        fields.pop("eval_every_epochs")
        fields.pop("eval_batch_size")
        if self.extensible(phase):
            fields.pop("epochs")
        parts = {"data": data_key(cfg), "model": model_key(cfg), self.phase_name: fields,
                 "seed": cfg.run.seed, "strategy": cfg.engine.strategy,
                 "precision": cfg.engine.precision, "task": self.task.__qualname__, "task_config": self.task_key(cfg)}
        if self.model_stage is None:
            parts["weights_sha256"] = file_sha256(cfg.model.weights) if cfg.model.weights else None
        return parts

    @staticmethod
    def extensible(phase: PhaseConfig) -> bool:
        """True if this phase trained for N epochs equals the first N epochs of it trained for more (and it
        trains at all: `epochs: 0` of the dense stage takes model.weights as given, a different output)."""
        return phase.epochs > 0 and phase.schedule.name not in TOTAL_DEPENDENT_SCHEDULES

    def output_parts(self, cfg: Config) -> dict[str, Any]:
        """What changes the output beyond the folder key: later stages' keys depend on the epochs trained."""
        return {"epochs": self.phase(cfg).epochs}

    def fresh_notes(self, cfg: Config) -> dict[str, str]:
        """Why a key field differing from a sibling folder's means starting over (logged by the runner)."""
        phase = self.phase(cfg)
        if self.extensible(phase) or phase.epochs == 0:
            return {}
        return {f"{self.phase_name}.epochs": f"{self.phase_name}.schedule.name={phase.schedule.name} depends on the "
                                             f"total number of epochs, so a run with other epochs cannot be extended"}

    def extends(self, record: dict, cfg: Config, folder: Path) -> str:
        """Why a finished folder of this stage (its `record`) must train on ("" if it need not): it trained fewer
        epochs than asked (possible only for an extensible phase, whose key leaves `epochs` out). More epochs
        than asked cannot be undone: refused, naming both numbers and the fix."""
        trained, asked = record.get("summary", {}).get("epochs"), self.phase(cfg).epochs
        if trained is None or trained == asked:
            return ""
        if trained > asked:
            raise TrainedTooLong(f"{self.phase_name}.epochs={asked}: stage {self.name} in {folder} "
                                f"was trained for {trained} epochs, more than asked, and its earlier epochs are not "
                                f"kept; set {self.phase_name}.epochs={trained} to reuse it, or another run.name "
                                f"to train {asked} epochs from the start")
        return (f"finished with {trained} epochs earlier, {self.phase_name}.epochs={asked}: training on from its last "
                f"checkpoint")

    def initial_model(self, ctx: RunContext) -> nn.Module:
        if self.model_stage is None:
            return build_dense_model(ctx.cfg, ctx.data.num_classes)
        return prepare_for_training(load_model(ctx, self.model_stage), ctx.cfg)

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        cfg = ctx.cfg
        model = self.initial_model(ctx)
        seed_rank_streams(cfg.run.seed + self.seed_offset, ctx.info.rank)
        phase = self.phase(cfg)
        setup = TrainerSetup(phase=self.phase_name, cfg=phase, engine=cfg.engine, wandb=cfg.wandb, stage_dir=out_dir,
                             run_name=cfg.run.name, stage=self.name, resume=cfg.run.resume, config_dict=to_dict(cfg))
        return Trainer(setup, model, self.task(cfg, phase), ctx.data, ctx.info).fit()


class DenseStage(TrainStage):
    """Backbone + dense head trained with CE + feature diversity loss (specs/qpm.md §4), shared by every method
    run on the same data, model and dense settings (same key); `dense.epochs: 0` takes model.weights as given."""

    def __init__(self) -> None:
        super().__init__("dense", "dense", lambda cfg: cfg.dense, model_stage=None)

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        if ctx.cfg.dense.epochs == 0:
            return self.pretrained(ctx, out_dir)
        return super().run(ctx, out_dir)

    def pretrained(self, ctx: RunContext, out_dir: Path) -> dict:
        """dense.epochs=0: the dense model is model.weights as given (e.g. torchvision ImageNet weights)."""
        info = ctx.info
        model = self.initial_model(ctx).to(info.device)
        per_rank = max(1, ctx.cfg.dense.eval_batch_size // info.world_size)
        loader = ctx.data.eval_loader("test", per_rank, info.rank, info.world_size, pin_memory=info.device.type == "cuda")
        test = evaluate_accuracy(model, loader, info, ctx.autocast, desc="dense (model.weights): test set")
        save_model(out_dir / MODEL, model)
        result = {"phase": "dense", "epochs": 0, "test": test, "weights": ctx.cfg.model.weights}
        write_json(out_dir / RESULT, result)
        return result
