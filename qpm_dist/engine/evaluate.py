"""Test-set accuracy, streamed and all-reduced: every test sample counted once, whatever the world size."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from qpm_dist import dist
from qpm_dist.dist import DistInfo
from qpm_dist.engine.streaming import model_outputs


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts for `precision` on `device` (fp32 on CPU)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision) if device.type == "cuda" else None
    return lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def accuracy_terms(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[Σ cross-entropy, top-1 hits, top-5 hits, count] of one batch, as float64 (all-reducible)."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return torch.stack([
        F.cross_entropy(logits, targets, reduction="sum").double(),
        (top[:, 0] == targets).sum().double(),
        (top == targets[:, None]).any(dim=1).sum().double(),
        torch.tensor(float(targets.numel()), device=logits.device, dtype=torch.float64),
    ])


def evaluate_accuracy(module: nn.Module, loader: Iterable, info: DistInfo,
                      autocast: Callable[[], contextlib.AbstractContextManager],
                      prepare: Callable[[torch.Tensor], torch.Tensor] | None = None, desc: str = "") -> dict:
    """Top-1/top-5 accuracy (percent) and mean cross-entropy of `module` over this rank's shard, all-reduced.
    `desc` labels the pass's progress on rank 0 (ImageNet's test set takes minutes; empty: silent)."""
    sums = torch.zeros(4, device=info.device, dtype=torch.float64)
    for output, targets in model_outputs(module, loader, info, autocast, desc=desc, prepare=prepare):
        sums += accuracy_terms(output.logits.float(), targets)
    loss, top1, top5, count = dist.all_reduce(sums).tolist()
    count = max(count, 1.0)
    return {"loss": loss / count, "acc": 100.0 * top1 / count, "acc5": 100.0 * top5 / count, "count": int(count)}
