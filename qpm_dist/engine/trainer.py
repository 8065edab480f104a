"""The training loop every phase of every method uses (dense training, fine-tuning, ...).

What a phase optimises is a training task (`engine.task`): the trainer calls its `step` for every micro-batch
and its epoch hooks, and builds the optimizer from its parameter groups. What it guarantees:
* the global batch (phase.batch_size) is split over ranks and accumulation steps, so results do not
  depend on the number of processes (up to batch-norm statistics and floating-point reduction order);
* every rank runs the same number of steps; evaluation all-reduces sums, so every test sample counts once;
* checkpoints at epoch ends, every `checkpoint_every_steps`, and on SIGTERM/SIGUSR1 (then exit 75);
* a non-finite loss stops the phase (`NonFiniteError`) before anything is saved from it: checked where the
  trainer already synchronises (the all-reduced metric window at every log step, every checkpoint and the epoch
  end), so it costs no extra sync, and the decision is the same on every rank. With
  `engine.skip_nonfinite_steps=N` such a step is instead skipped (its gradients dropped, one host sync per step,
  as fp16 loss scaling does) and counted; the phase stops at the (N+1)-th skipped step;
  resuming restores model, optimizer, scheduler, grad scaler, the position inside the epoch and every
  rank's RNG state, so an interrupted and resumed CPU run ends bitwise equal to an uninterrupted one;
* a checkpoint inside an epoch also holds every rank's running metric sums (`MetricWindow`), so the resumed
  epoch's record (train_loss, train_acc, ...) covers the whole epoch: bitwise the uninterrupted run's with the
  same number of ranks, to float64 rounding with another (the sums are then restored on rank 0);
* the task's epoch-end hook runs once per epoch, before that epoch's checkpoint, never again on resume;
* progress bar and metrics (JSON lines, wandb) on rank 0 only: the task's named logs, all-reduced.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from qpm_dist import dist
from qpm_dist.config import EngineConfig, PhaseConfig, WandbConfig
from qpm_dist.data.batch import Batch
from qpm_dist.data.composites import composite_loader
from qpm_dist.data.loaders import DataSource
from qpm_dist.dist import DistInfo
from qpm_dist.engine.checkpoint import CheckpointManager, capture_rng, restore_rng
from qpm_dist.engine.evaluate import evaluate_accuracy
from qpm_dist.engine.monitor import MetricsLogger, new_run_id
from qpm_dist.engine.optim import build_optimizer, build_scheduler
from qpm_dist.engine.preemption import StopRequest, at_checkpoint, stop_requests
from qpm_dist.engine.strategy import DDPStrategy, DeepSpeedStrategy
from qpm_dist.engine.task import TrainingTask
from qpm_dist.errors import MissingInput, TrainedTooLong
from qpm_dist.models.io import save_classifier
from qpm_dist.utils import atomic_write_text, log, progress


@dataclass
class Progress:
    epoch: int = 0  # the epoch in progress (== epochs completed when step_in_epoch == 0)
    step_in_epoch: int = 0  # optimizer steps already taken in `epoch`
    global_step: int = 0
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss (engine.skip_nonfinite_steps)


class NonFiniteError(RuntimeError):
    """Training diverged (a NaN/inf loss) or a stage's outputs hold NaN/inf; nothing of it is saved or marked
    finished. The CLI exits with EXIT_NONFINITE: rerunning the same command would diverge again."""


@dataclass
class TrainerSetup:
    """Everything a phase needs besides the model and the data."""

    phase: str  # the config section of the phase ("dense", "finetune"), named in errors and logs
    cfg: PhaseConfig
    engine: EngineConfig
    wandb: WandbConfig
    stage_dir: Path
    run_name: str  # wandb: the run is "<run_name>/<stage>" in group <run_name>
    stage: str = ""  # the stage this phase trains for (default: the phase)
    resume: str = "auto"  # "auto", "never" or a checkpoint directory
    config_dict: dict | None = None

    def __post_init__(self) -> None:
        self.stage = self.stage or self.phase


class Trainer:
    def __init__(self, setup: TrainerSetup, model: nn.Module, task: TrainingTask, data: DataSource,
                 info: DistInfo) -> None:
        self.setup, self.cfg, self.info = setup, setup.cfg, info
        self.task, self.data = task, data
        world = info.world_size
        if self.cfg.batch_size % (world * self.cfg.grad_accum):
            raise ValueError(
                f"{setup.phase}.batch_size={self.cfg.batch_size} must be divisible by world size ({world}) x "
                f"{setup.phase}.grad_accum ({self.cfg.grad_accum})"
            )
        self.micro_batch = self.cfg.batch_size // (world * self.cfg.grad_accum)
        pin = info.device.type == "cuda"
        self.fields = task.batch_fields(data)  # joined by sample index, so the loader returns indices for them
        if task.composites is not None:  # 2x2 composite images (data.composites), built by the data pipeline
            self.loader = composite_loader(data, task.composites, self.micro_batch, self.cfg.batch_size, info.rank,
                                           world, pin_memory=pin)
        else:
            self.loader = data.train_loader(self.micro_batch, self.cfg.batch_size, info.rank, world,
                                            pin_memory=pin, return_index=bool(self.fields))
        self.steps_per_epoch = self.loader.batches_per_epoch // self.cfg.grad_accum
        if model_uses_sync_bn(model) and info.device.type != "cuda" and world > 1:
            raise ValueError("model.norm=sync_batch needs GPUs (torch's SyncBatchNorm does not run on CPU); "
                             "use model.norm=group or batch")
        optimizer = build_optimizer(task.param_groups(model), self.cfg.optim)
        scheduler = build_scheduler(optimizer, self.cfg.schedule, self.steps_per_epoch, self.cfg.epochs)
        common = dict(info=info, precision=setup.engine.precision, channels_last=setup.engine.channels_last,
                      grad_accum=self.cfg.grad_accum, clip_grad_norm=self.cfg.clip_grad_norm)
        if setup.engine.strategy == "deepspeed":
            self.strategy = DeepSpeedStrategy(model, optimizer, scheduler, config_path=setup.engine.deepspeed_config,
                                              micro_batch=self.micro_batch, **common)
        else:
            self.strategy = DDPStrategy(model, optimizer, scheduler, find_unused_parameters=task.unused_parameters,
                                        **common)
        self.checkpoints = CheckpointManager(setup.stage_dir / "checkpoints", setup.engine.keep_checkpoints)
        self.progress = Progress()
        self.run_id = dist.broadcast_object(new_run_id())
        self.logger: MetricsLogger | None = None
        # The running metric sums of the epoch in progress (since its start, and since the last log line); kept
        # on the trainer so that a checkpoint inside an epoch can save them and a resumed epoch continue them.
        self.epoch_sums, self.window = MetricWindow(info.device), MetricWindow(info.device)
        self.restored_count = 0  # samples (all ranks) restored into `window`: not seen by this process

    @property
    def module(self) -> nn.Module:
        return self.strategy.module

    # ------------------------------------------------------------------------------------ resume
    def _resume(self) -> None:
        mode = self.setup.resume
        if mode == "never":
            return
        if mode == "auto":
            path = self.checkpoints.find_resumable()
            if path is None:
                return
        else:
            path = Path(mode)
            if not path.is_dir():
                raise MissingInput(f"run.resume: checkpoint directory not found: {path}")
            self.checkpoints.require_intact(path)
        client = self.strategy.load(path)
        self.progress = Progress(**client["progress"])
        needed = self.progress.epoch + (self.progress.step_in_epoch > 0)  # epochs the checkpoint has begun
        if needed > self.cfg.epochs:
            raise TrainedTooLong(f"{self.setup.phase}.epochs={self.cfg.epochs}: the checkpoint {path} is past it "
                                 f"(epoch {self.progress.epoch}, step {self.progress.step_in_epoch} of it); set "
                                 f"{self.setup.phase}.epochs to at least {needed} to continue it, "
                                 f"or run.resume=never to train {self.cfg.epochs} epochs from the start")
        self.run_id = client["run_id"]
        self.task.load_state_dict(client.get("task", {}))
        self._restore_metric_sums(client.get("metric_sums"))
        rng = client["rng"]
        if len(rng) == self.info.world_size:
            restore_rng(rng[self.info.rank])
        else:
            log.warning("checkpoint was written by %d ranks, this run has %d: data order is unchanged but "
                        "per-rank random streams (dropout) are not restored", len(rng), self.info.world_size)
        log.info("resumed %s from %s (epoch %d, step %d of the epoch, global step %d)", self.setup.stage, path,
                 self.progress.epoch, self.progress.step_in_epoch, self.progress.global_step)

    def _restore_metric_sums(self, saved: list[dict] | None) -> None:
        """Continue the interrupted epoch's metric sums (every rank's, as saved) so its record covers all of it."""
        if self.progress.step_in_epoch == 0:
            return
        if saved is None:  # written by a version that did not save them
            log.warning("%s: the checkpoint holds no metric sums of the interrupted epoch %d: its train_* record "
                        "covers only the %d steps after the resume", self.setup.stage, self.progress.epoch,
                        self.steps_per_epoch - self.progress.step_in_epoch)
            return
        if len(saved) == self.info.world_size:
            mine = saved[self.info.rank]
        elif self.info.is_main:  # another world size: rank 0 carries every rank's sums, the all-reduce adds them
            mine = {part: MetricWindow.combined([s[part] for s in saved]) for part in ("epoch", "window")}
        else:
            mine = {"epoch": {"sums": {}, "count": 0}, "window": {"sums": {}, "count": 0}}
        self.epoch_sums.load_state_dict(mine["epoch"])
        self.window.load_state_dict(mine["window"])
        self.restored_count = sum(s["window"]["count"] for s in saved)

    def save_checkpoint(self) -> Path:
        client = {"progress": asdict(self.progress), "run_id": self.run_id, "task": self.task.state_dict(),
                  "rng": dist.all_gather_object(capture_rng()),
                  "metric_sums": dist.all_gather_object({"epoch": self.epoch_sums.state_dict(),
                                                         "window": self.window.state_dict()})}
        meta = {"phase": self.setup.phase, "strategy": self.strategy.name, "world_size": self.info.world_size,
                **asdict(self.progress)}
        return self.checkpoints.save(self.strategy, self.progress.global_step, client, meta)

    # ------------------------------------------------------------------------------------ loop
    def fit(self) -> dict:
        start = time.time()
        self._resume()
        stage_dir = self.setup.stage_dir
        self.logger = MetricsLogger(stage_dir / "metrics.jsonl", self.info.is_main, self.setup.wandb, self.run_id,
                                    name=f"{self.setup.run_name}/{self.setup.stage}",
                                    group=self.setup.run_name,
                                    job_type=self.setup.phase, config=self.setup.config_dict or {},
                                    directory=stage_dir)
        self.last_eval: dict = {}
        try:
            with stop_requests() as stop:
                handled_before, stop.checkpointing = stop.checkpointing, True
                try:
                    self._train_epochs(stop)
                finally:
                    stop.checkpointing = handled_before
            if not self.last_eval:  # resumed after the last epoch had finished
                self.last_eval = self.evaluate()
            self._check_finite(self.last_eval, "test")
            result = {"phase": self.setup.phase, "epochs": self.cfg.epochs, "global_step": self.progress.global_step,
                      "world_size": self.info.world_size, "strategy": self.strategy.name,
                      "seconds": round(time.time() - start, 2), "test": self.last_eval}
            if self.progress.skipped_steps:
                result["skipped_steps"] = self.progress.skipped_steps
            task_state = self.task.state_dict()
            if task_state:  # what the task's hooks recorded (e.g. which epochs they ran at)
                result["task"] = task_state
            self._export(result)
            return result
        finally:
            self.logger.close()
            self.strategy.close()

    def _train_epochs(self, stop: StopRequest) -> None:
        while self.progress.epoch < self.cfg.epochs:
            train_stats = self.train_epoch(stop)
            self.task.on_epoch_end(self)
            self.strategy.parameters_edited()
            epoch = self.progress.epoch
            self.progress.epoch += 1
            self.progress.step_in_epoch = 0
            record = {"phase": self.setup.phase, "event": "epoch", "epoch": epoch,
                      "global_step": self.progress.global_step, **train_stats}
            if (epoch + 1) % self.cfg.eval_every_epochs == 0 or self.progress.epoch == self.cfg.epochs:
                self.last_eval = self.evaluate()
                record.update({f"test_{k}": v for k, v in self.last_eval.items()})
            self.logger.log(record, step=self.progress.global_step)
            self._check_finite(self.last_eval, "test")  # a model that predicts NaN is not checkpointed
            self.save_checkpoint()

    def train_epoch(self, stop: StopRequest) -> dict:
        accum = self.cfg.grad_accum
        self.loader.set_epoch(self.progress.epoch, skip_batches=self.progress.step_in_epoch * accum)
        self.module.train()
        self.task.on_epoch_start(self)
        self.strategy.parameters_edited()
        device = self.info.device
        # step: the micro-batches of the optimizer step in progress; window: kept steps since the last log line;
        # epoch_sums: the epoch's steps up to the last log line (both restored by a resume inside the epoch)
        epoch_sums, window, step = self.epoch_sums, self.window, MetricWindow(device)
        bar = progress(self.steps_per_epoch, f"{self.setup.phase} epoch {self.progress.epoch + 1}/{self.cfg.epochs}",
                       show=self.info.is_main and self.setup.engine.progress, initial=self.progress.step_in_epoch,
                       unit="steps")
        every = self.setup.engine.log_every_steps
        may_skip = self.setup.engine.skip_nonfinite_steps
        tick, micro = time.perf_counter(), 0
        try:
            for item in self.loader:
                micro += 1
                boundary = micro % accum == 0
                batch = Batch.of(item).join(self.fields)
                with self.strategy.accumulate(boundary):
                    loss, logs = self.task.step(batch, self.strategy)
                    self.strategy.backward(loss)
                step.add({"loss": loss, **logs}, batch.size)
                if not boundary:
                    self.strategy.step(boundary)
                    continue
                if may_skip and dist.any_rank(not step.finite()):  # the same decision on every rank
                    self._skip_step()
                else:
                    self.strategy.step(boundary)
                    window.merge(step)
                step.clear()
                self.progress.step_in_epoch += 1
                self.progress.global_step += 1
                bar.update(1)
                if every and self.progress.global_step % every == 0:
                    epoch_sums.merge(window)
                    stats = window.all_reduced()
                    elapsed = time.perf_counter() - tick
                    seen, self.restored_count = stats.pop("count") - self.restored_count, 0
                    stats["images_per_s"] = round(seen / max(elapsed, 1e-9), 1)
                    extra = {"skipped_steps": self.progress.skipped_steps} if may_skip else {}
                    self.logger.log({"phase": self.setup.phase, "event": "step", "epoch": self.progress.epoch,
                                     "global_step": self.progress.global_step, "lr": self.strategy.lr(), **stats,
                                     **extra}, step=self.progress.global_step)
                    self._check_finite(stats, "training")
                    bar.set_postfix({k: f"{stats[k]:.3f}" if k == "loss" else f"{stats[k]:.1f}"
                                     for k in ("loss", "acc") if k in stats})
                    window.clear()
                    tick = time.perf_counter()
                if dist.any_rank(stop.requested):
                    self._check_finite(window.all_reduced(), "training")  # never checkpoint a diverged model
                    path = self.save_checkpoint()
                    log.warning("stop requested: saved %s at epoch %d step %d", path, self.progress.epoch,
                                self.progress.step_in_epoch)
                    raise at_checkpoint(self.setup.stage, str(path), self.progress.global_step, stop.signum)
                n_ckpt = self.setup.engine.checkpoint_every_steps
                if (n_ckpt and self.progress.global_step % n_ckpt == 0
                        and self.progress.step_in_epoch < self.steps_per_epoch):
                    self._check_finite(window.all_reduced(), "training")
                    self.save_checkpoint()
        finally:
            bar.close()
        epoch_sums.merge(window)
        stats = epoch_sums.all_reduced()
        stats.pop("count")
        epoch_sums.clear()
        window.clear()
        self.restored_count = 0
        self._check_finite(stats, "training")
        return {f"train_{k}": v for k, v in stats.items()}

    def _skip_step(self) -> None:
        """Drop the step whose loss was not finite on some rank (every rank skips it); stop past the bound."""
        self.strategy.skip_step()
        self.progress.skipped_steps += 1
        bound = self.setup.engine.skip_nonfinite_steps
        where = f"{self.setup.phase} (stage {self.setup.stage}) global step {self.progress.global_step + 1}"
        if self.progress.skipped_steps > bound:
            raise NonFiniteError(f"{where}: non-finite training loss; {self.progress.skipped_steps} steps skipped, "
                                 f"more than engine.skip_nonfinite_steps={bound}: training diverged, stopped "
                                 f"without saving it (lower {self.setup.phase}.optim.lr or set "
                                 f"{self.setup.phase}.clip_grad_norm)")
        log.warning("%s: non-finite training loss, step skipped (%d skipped so far, at most %d)", where,
                    self.progress.skipped_steps, bound)

    def _check_finite(self, stats: dict, what: str) -> None:
        """Raise NonFiniteError if an all-reduced statistic is NaN/inf (every rank holds the same numbers)."""
        bad = {k: v for k, v in stats.items() if isinstance(v, float) and not math.isfinite(v)}
        if bad:
            raise NonFiniteError(
                f"{self.setup.phase} (stage {self.setup.stage}): non-finite {what} "
                f"{', '.join(f'{k}={v}' for k, v in sorted(bad.items()))} by global step {self.progress.global_step}: "
                f"training diverged, stopped without saving it (lower {self.setup.phase}.optim.lr, set "
                f"{self.setup.phase}.clip_grad_norm, or let engine.skip_nonfinite_steps skip such steps)")

    def evaluate(self) -> dict:
        """Top-1/top-5 accuracy (percent) and mean CE over the whole test set, all-reduced over ranks.

        Buffers (BatchNorm running statistics) are first copied from rank 0: each rank updated its own
        during its last training forward, and every rank must evaluate the model that rank 0 exports.
        """
        if self.info.world_size > 1:
            for buffer in self.module.buffers():
                dist.broadcast_tensor(buffer, src=0)
        per_rank = max(1, self.cfg.eval_batch_size // self.info.world_size)
        loader = self.data.eval_loader("test", per_rank, self.info.rank, self.info.world_size,
                                       pin_memory=self.info.device.type == "cuda")
        return evaluate_accuracy(self.module, loader, self.info, self.strategy.autocast, self.strategy.prepare,
                                 desc=f"{self.setup.phase} epoch {self.progress.epoch}/{self.cfg.epochs}: test set")

    def _export(self, result: dict) -> None:
        """Write the trained model (`model.pt`, see models.io) and `result.json`; they mark the phase as finished."""
        state = self.strategy.export_state_dict(self.checkpoints.complete()[0])
        if self.info.is_main:
            save_classifier(self.setup.stage_dir / "model.pt", self.module, state)
            atomic_write_text(self.setup.stage_dir / "result.json", json.dumps(result, indent=1, default=str))
        dist.barrier()


def model_uses_sync_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


class MetricWindow:
    """Named sums of the task's logs (each a per-sample mean, weighted by its batch size) and the sample count.

    The names are the same on every rank (every rank runs the same task), so one all-reduce of the sums stacked
    in name order combines them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, logs: dict[str, torch.Tensor], size: int) -> None:
        for name, value in logs.items():
            term = value.detach().double() * size
            self.sums[name] = self.sums[name] + term if name in self.sums else term
        self.count += size

    def merge(self, other: "MetricWindow") -> None:
        for name, value in other.sums.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.count += other.count

    def clear(self) -> None:
        self.sums, self.count = {}, 0

    def state_dict(self) -> dict:
        """This rank's sums (CPU float64) and count, for a checkpoint."""
        return {"sums": {n: v.detach().cpu() for n, v in self.sums.items()}, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.sums = {n: v.to(self.device) for n, v in state["sums"].items()}
        self.count = state["count"]

    @staticmethod
    def combined(states: list[dict]) -> dict:
        """The sum of several ranks' `state_dict`s (for a resume with another number of ranks)."""
        sums: dict[str, torch.Tensor] = {}
        for state in states:
            for name, value in state["sums"].items():
                sums[name] = sums[name] + value.cpu() if name in sums else value.cpu().clone()
        return {"sums": sums, "count": sum(state["count"] for state in states)}

    def finite(self) -> bool:
        """True if every sum is finite on this rank (reads the device: one host sync)."""
        if not self.sums:
            return True
        return bool(torch.isfinite(torch.stack([v.to(self.device) for v in self.sums.values()])).all())

    def all_reduced(self) -> dict[str, float]:
        """{name: Σ value·size / Σ size over all ranks, ..., "count": Σ size}."""
        names = sorted(self.sums)
        stacked = torch.stack([self.sums[n].to(self.device) for n in names]
                              + [torch.tensor(float(self.count), device=self.device, dtype=torch.float64)])
        totals = dist.all_reduce(stacked).tolist()
        count = max(totals[-1], 1.0)
        return {**{n: v / count for n, v in zip(names, totals[:-1])}, "count": totals[-1]}
