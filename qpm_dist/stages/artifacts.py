"""The files stages hand to each other, and the rank bookkeeping of writing and reading them.

Every stage runs on every rank. A file is written once, by rank 0, atomically, and every rank waits until it
exists (`on_main`); a value every rank must hold identically is read or computed on rank 0 and broadcast
(`from_main`), so ranks can never disagree about what a file said. Stage bodies call these helpers instead
of testing their rank and placing barriers themselves.

The generic files every stage folder may hold are named here; a method's own files are named once, next to
the stage that writes them, and read through that module's reader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
from torch import nn

from qpm_dist import dist
from qpm_dist.models.io import load_classifier, save_classifier, state_digest
from qpm_dist.models.net import Classifier
from qpm_dist.utils import atomic_write_text

MODEL = "model.pt"  # a classifier (models.io), written by every stage that produces a model
RESULT = "result.json"  # a training phase's result (test accuracy, steps, ...)
METRICS = "metrics.json"  # an evaluate stage's metrics: {model name: {metric: value}}
RECORD = "stage.json"  # the runner's record of a finished stage (key, config, summary); marks it finished

T = TypeVar("T")


def on_main(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Rank 0 runs `fn(*args, **kwargs)`; every rank waits until it is done."""
    if dist.is_main():
        fn(*args, **kwargs)
    dist.barrier()


def from_main(fn: Callable[[], T]) -> T:
    """Rank 0 computes `fn()`; every rank returns that value (broadcast)."""
    return dist.broadcast_object(fn() if dist.is_main() else None)


def write_json(path: Path, obj: Any) -> None:
    on_main(atomic_write_text, Path(path), json.dumps(obj, indent=1, default=str))


def read_json(path: Path) -> Any:
    return from_main(lambda: json.loads(Path(path).read_text()))


def read_npz(path: Path) -> dict[str, np.ndarray]:
    def read() -> dict[str, np.ndarray]:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}

    return from_main(read)


def same_on_every_rank(digest: str, what: str) -> list[str]:
    """Every rank's `digest` (rank order); raises if they differ (e.g. a sparse head built on every rank)."""
    digests = dist.all_gather_object(digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"{what} differs across ranks: {digests}")
    return digests


def save_model(path: Path, model: nn.Module) -> list[str]:
    """Check that every rank holds the same model, write it once; returns the ranks' digests."""
    digests = same_on_every_rank(state_digest(model.state_dict()), f"the model for {path}")
    on_main(save_classifier, Path(path), model)
    return digests


def load_model(ctx, stage: str) -> Classifier:
    """The classifier `stage` wrote (every rank reads the file itself)."""
    return load_classifier(ctx.outputs[stage] / MODEL, ctx.cfg.model)
