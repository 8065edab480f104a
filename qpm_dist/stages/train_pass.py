"""The streamed pass of a trained model over the training set (and, if asked, the test set).

One forward pass with test-time transforms, every rank over its own shard (rows rank, rank + W, ... of each
split, no padding), nothing per image kept in memory. What is computed from the outputs is up to the
accumulators the stage is given, for example:
* QPM: float64 feature sums and locality sums, all-reduced into A, R and B (methods.qpm);
* the glm-based sparse layers (and IIS): the pooled features of every row written to per-rank shard files,
  plus their sums (methods.glm_stages).
Each accumulator sees every batch of every split, then `finish` combines the ranks' parts (collectives are
allowed there: every rank calls it) and writes the stage's files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from qpm_dist.config import Config
from qpm_dist.engine.streaming import model_outputs
from qpm_dist.models.net import Classifier, ModelOutput
from qpm_dist.stages.artifacts import load_model
from qpm_dist.stages.runner import RunContext
from qpm_dist.stages.train import data_key


class Accumulator:
    """Collects what a stage needs from the model's outputs; every method has a neutral default."""

    def start(self, split: str, rows: int) -> None:
        """A split begins; this rank will see `rows` of its samples."""

    def update(self, split: str, output: ModelOutput, labels: torch.Tensor) -> None:
        """One batch of `split` (outputs and labels on the device)."""

    def end(self, split: str) -> None:
        """The split is done."""

    def finish(self, out_dir: Path) -> dict[str, Any]:
        """Combine the ranks' parts (a collective), write the stage's files; return summary entries."""
        return {}


AccumulatorFactory = Callable[[RunContext, Classifier, Path], list[Accumulator]]


class TrainingSetPass:
    """A stage: the model of `model_stage`, streamed over `splits`, feeding the accumulators `accumulators(ctx,
    model, out_dir)` builds. `batch_size(cfg)` is the global batch of the pass; `key(cfg)` holds the config the
    accumulators read (it enters the stage key)."""

    def __init__(self, name: str, model_stage: str, accumulators: AccumulatorFactory,
                 batch_size: Callable[[Config], int], splits: tuple[str, ...] = ("train",),
                 key: Callable[[Config], dict] = lambda cfg: {}) -> None:
        self.name, self.model_stage, self.accumulators = name, model_stage, accumulators
        self.batch_size, self.splits, self.key = batch_size, splits, key
        self.depends: tuple[str, ...] = (model_stage,)

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        return {"data": data_key(cfg), "precision": cfg.engine.precision, "splits": list(self.splits), **self.key(cfg)}

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        info = ctx.info
        model = load_model(ctx, self.model_stage).to(info.device)
        accumulators = self.accumulators(ctx, model, out_dir)
        per_rank = max(1, self.batch_size(ctx.cfg) // info.world_size)
        for split in self.splits:
            loader = ctx.data.eval_loader(split, per_rank, info.rank, info.world_size,
                                          pin_memory=info.device.type == "cuda")
            rows = len(range(info.rank, ctx.data.num_samples(split), info.world_size))
            for acc in accumulators:
                acc.start(split, rows)
            for output, labels in model_outputs(model, loader, info, ctx.autocast, desc=f"{self.name}: {split}"):
                for acc in accumulators:
                    acc.update(split, output, labels)
            for acc in accumulators:
                acc.end(split)
        summary: dict[str, Any] = {"model": self.model_stage}
        for acc in accumulators:
            summary.update(acc.finish(out_dir))
        return summary
