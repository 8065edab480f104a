"""Test-set accuracy, streamed and all-reduced: every test sample counted once, whatever the world size."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from qpm_dist import dist


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


@torch.no_grad()
def evaluate_accuracy(module: nn.Module, loader: Iterable, device: torch.device,
                      autocast: Callable[[], contextlib.AbstractContextManager],
                      prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Top-1/top-5 accuracy (percent) and mean cross-entropy of `module` over this rank's shard, all-reduced."""
    was_training = module.training
    module.eval()
    prepare = prepare or (lambda x: x.to(device, non_blocking=True))
    sums = torch.zeros(4, device=device, dtype=torch.float64)
    for images, targets in loader:
        images, targets = prepare(images), targets.to(device, non_blocking=True)
        with autocast():
            logits = module(images).logits.float()
        sums += accuracy_terms(logits, targets)
    loss, top1, top5, count = dist.all_reduce(sums).tolist()
    module.train(was_training)
    count = max(count, 1.0)
    return {"loss": loss / count, "acc": 100.0 * top1 / count, "acc5": 100.0 * top5 / count, "count": int(count)}
